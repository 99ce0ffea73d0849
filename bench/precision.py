r"""Accuracy cost of the evaluation engine's low-precision options against float32, on a trained checkpoint.

  python -m hapvr_jax.main --config=configs/vcdb.py:demo --workdir=/tmp/hapvr_demo     # any trained checkpoint
  python bench/precision.py --checkpoint=/tmp/hapvr_demo --dataset=fivr_5k \
      --features=/tmp/hapvr_demo/demo_data/eval/features.hdf5 --annotations=/tmp/hapvr_demo/demo_data/eval

Scores every query against the database with engine.dtype in {float32, bfloat16} x engine.precision in
{highest, default} and prints, against float32/highest: the largest and mean score change, the share of queries
whose top-10 order is unchanged, the benchmark's main metric and the time. On a CPU 'default' equals 'highest';
on GPUs it means TF32 (Ampere and later) and on TPUs bf16 passes, so run it on the device in question.
Without --checkpoint a freshly initialised network is scored: the speeds and score changes still hold, the
metric means nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import numpy as np  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', default='', help='trained HAP-VR checkpoint (default: a fresh network)')
  p.add_argument('--dataset', default='fivr_5k')
  p.add_argument('--features', required=True)
  p.add_argument('--annotations', required=True)
  a = p.parse_args(argv)
  import jax
  from common_jax import checkpoint, mesh as mesh_lib
  from hapvr_jax import engine, features, model
  from hapvr_jax import datasets
  if a.checkpoint:
    params, mc = checkpoint.load_params(a.checkpoint)
    cfg = model.ModelConfig.from_dict(mc)
  else:
    cfg = model.ModelConfig()
    params = model.init_params(cfg)
  bench = datasets.load_benchmark(a.dataset, a.annotations)
  ff, queries, database = features.open_split(bench, a.features, cfg)
  mesh = mesh_lib.make_mesh()
  print(f'{jax.devices()[0].device_kind} x{jax.device_count()}: {len(queries)} queries x {len(database)} videos')
  ref, rows = None, []
  for dtype in ('float32', 'bfloat16'):
    for precision in ('highest', 'default'):
      eng = engine.Engine(cfg, params, mesh, engine.EngineConfig(dtype=dtype, precision=precision))
      eng.score(ff, queries, database, progress=False)            # compile
      t0 = time.perf_counter()
      s = eng.score(ff, queries, database, progress=False)
      seconds = time.perf_counter() - t0
      ref = s if ref is None else ref
      d = np.abs(s - ref)
      top = lambda x: np.argsort(-x, axis=1, kind='stable')[:, :10]
      same = np.mean(np.all(top(s) == top(ref), axis=1))
      metrics = bench.evaluate(s, queries, database)
      main_metric = next(k for k in ('DSVR', 'mAP', 'EVVE_mAP') if k in metrics)
      print(f'dtype={dtype:8s} precision={precision:7s}  max |d| {d.max():.2e}  mean |d| {d.mean():.2e}  '
            f'(scores {ref.min():.2f}..{ref.max():.2f})  top-10 order unchanged {100 * same:5.1f}%  '
            f'{main_metric} {metrics[main_metric]:.4f}  {len(queries) * len(database) / seconds:.0f} pairs/s')
      rows.append(dict(dtype=dtype, precision=precision, max_abs_diff=float(d.max()), mean_abs_diff=float(d.mean()),
                       top10_unchanged=float(same), metric=main_metric, value=float(metrics[main_metric]),
                       pairs_per_s=len(queries) * len(database) / seconds))
  print('RESULT ' + json.dumps(dict(device=jax.devices()[0].device_kind, platform=jax.default_backend(),
                                    trained=bool(a.checkpoint), queries=len(queries), database=len(database),
                                    rows=rows), default=float))


if __name__ == '__main__':
  main()
