r"""Benchmark of the HAP-VR evaluation engine against the original's strategy, measured in the same run.

  python bench/hapvr_eval.py                       # 16 queries x 160 database videos, ~64 frames each
  python bench/hapvr_eval.py --queries=50 --database=500 --mean_len=94

Baseline: the original evaluation loop's strategy — every database video indexed once, then, per (query,
target chunk) pair, the same sequence of PyTorch ops as the original's calculate_video_similarity (written
here; weights from tests/torch_reference.py, an independent implementation with the original's layout), on the
same machine with PyTorch's own threads. Engine: hapvr_jax.engine on the same HDF5 file with the
converted weights. Printed: pairs/s of both and their ratio, the engine's cold start (compilation), the
largest score difference between the two, the engine's FLOP rate against a plain float32 matmul measured in
this run (the practical roofline of this device), and the share of time in the frame-to-frame similarity vs
the comparator CNN.

Measured (2-core Xeon CPU, `--queries=16 --database=96`): baseline 76.9 pairs/s, engine 215.8 pairs/s warm
(2.81x) and 40.7 pairs/s cold (compilation included), max score difference 8.2e-10, engine 100.5 GFLOP/s =
0.62 of the 162.3 GFLOP/s matmul; f2f 84% / CNN 16% of a 16x16 block at 76 frames.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

import h5py  # noqa: E402
import numpy as np  # noqa: E402

F2F_FLOPS, CNN_FLOPS = 82944, 19024   # per (query frame, target frame) cell, spec §7.1


def make_features(path, n, mean_len, dims, seed):
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.lognormal(np.log(mean_len), 0.5, n).astype(int), 8, 4 * mean_len)
  with h5py.File(path, 'w') as f:
    for i, t in enumerate(lengths):
      x = rng.normal(size=(t, 9, dims)).astype(np.float32)
      f[f'v{i:06d}'] = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return [f'v{i:06d}' for i in range(n)], lengths


def original_ops_similarity(w, q, t, f_topk_rate, v_topk_rate, chunk=2048):
  """One pair scored with the original evaluation's sequence of PyTorch ops (einsum to [a,i,o,p,j,b], top-k
  over target regions, means, padded 3x3 convs, pools, hardtanh, temporal top-k), chunk by chunk."""
  import torch
  import torch.nn.functional as F
  scores = []
  for start in range(0, t.shape[0], chunk):
    s = torch.einsum('aiok,bjpk->aiopjb', q[None], t[None, start:start + chunk])
    k = max(round(s.shape[3] * f_topk_rate), 1)
    s = torch.topk(s, k, 3)[0].mean(3, keepdim=True).mean(2, keepdim=True).squeeze(3).squeeze(2)
    x = s.permute(0, 3, 1, 2).reshape(1, 1, s.shape[1], s.shape[2])
    for i, name in enumerate(('conv1', 'conv2', 'conv3')):
      x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), w[f'comparator_module.{name}.weight'],
                          w[f'comparator_module.{name}.bias']))
      if i < 2:
        x = F.max_pool2d(x, 2, 2)
    x = F.hardtanh(F.conv2d(x, w['comparator_module.fconv.weight'], w['comparator_module.fconv.bias']))
    k = max(round(x.shape[3] * v_topk_rate), 1)
    scores.append(torch.topk(x, k, 3)[0].mean(3).mean(2).reshape(-1))
  return torch.cat(scores).mean()


def timed(fn, *args, repeat=3):
  import jax
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(repeat):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeat


def matmul_roofline():
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (4096, 512))
  b = jax.random.normal(jax.random.PRNGKey(1), (512, 4096))
  f = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
  return 2 * 4096 * 4096 * 512 / timed(f, a, b, repeat=5)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--queries', type=int, default=16)
  p.add_argument('--database', type=int, default=160)
  p.add_argument('--mean_len', type=int, default=64)
  p.add_argument('--dims', type=int, default=512)
  p.add_argument('--baseline_pairs', type=int, default=0, help='time the torch loop on this many pairs '
                 '(0: all); its rate is measured on them and the comparison uses rates')
  p.add_argument('--memory_budget_mb', type=int, default=1024)
  p.add_argument('--bucket_ratio', type=float, default=1.25)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='engine compute dtype; other than float32, its accuracy cost against a float32 engine '
                 'on the same pairs is printed')
  p.add_argument('--precision', default='highest', choices=('highest', 'default'),
                 help="engine matmul precision ('default' = TF32/bf16 passes on GPU/TPU)")
  a = p.parse_args()

  import jax
  import torch
  import torch_reference as ref
  from common_jax import mesh as mesh_lib
  from hapvr_jax import convert, engine as engine_lib, features as features_lib, model as model_lib

  torch.manual_seed(a.seed)
  torch.set_grad_enabled(False)
  tmp = tempfile.mkdtemp()
  path = os.path.join(tmp, 'features.hdf5')
  ids, lengths = make_features(path, a.queries + a.database, a.mean_len, a.dims, a.seed)
  qids, dids = ids[:a.queries], ids[a.queries:]
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()}, torch threads {torch.get_num_threads()}')
  print(f'{a.queries} queries x {a.database} database videos, lengths {lengths.min()}-{lengths.max()} '
        f'(mean {lengths.mean():.0f}), dims {a.dims}')

  torch_net = ref.SimilarityNetworkRef(dims=a.dims, f_topk_rate=0.1, v_topk_rate=0.03).eval()
  weights = ref.original_state_dict(torch_net)
  params, cfg = convert.convert_state_dict(ref.original_state_dict(torch_net), None)
  cfg = model_lib.ModelConfig.from_dict({**cfg.to_dict(), 'v_topk_rate': 0.03})
  ff = features_lib.FeatureFile(path, dims=a.dims, min_len=cfg.min_len)

  # --- baseline: the original's per-pair loop -------------------------------------------------------------
  rng = np.random.default_rng(a.seed)
  pairs = [(i, j) for i in range(a.queries) for j in range(a.database)]
  if a.baseline_pairs and a.baseline_pairs < len(pairs):
    pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), a.baseline_pairs, replace=False))]
  t0 = time.perf_counter()
  q_t = [torch_net.index_video(torch.from_numpy(ff.read(q))) for q in qids]
  base_scores, t_cache = {}, {}
  for i, j in pairs:
    if j not in t_cache:
      t_cache = {j: torch_net.index_video(torch.from_numpy(ff.read(dids[j])))}
    base_scores[i, j] = float(original_ops_similarity(weights, q_t[i], t_cache[j], 0.1, 0.03))
  base_s = time.perf_counter() - t0
  base_rate = len(pairs) / base_s

  # --- engine --------------------------------------------------------------------------------------------
  mesh = mesh_lib.make_mesh()
  eng = engine_lib.Engine(cfg, params, mesh, engine_lib.EngineConfig(
      memory_budget_mb=a.memory_budget_mb, bucket_ratio=a.bucket_ratio, dtype=a.dtype, precision=a.precision))
  eng.score(ff, qids, dids, progress=False)
  cold = eng.stats['seconds']
  scores = eng.score(ff, qids, dids, progress=False)
  warm = eng.stats['seconds']
  n_pairs = a.queries * a.database
  diff = max(abs(scores[i, j] - s) for (i, j), s in base_scores.items())

  ql = ff.lengths(qids).astype(np.float64)
  dl = ff.lengths(dids).astype(np.float64)
  useful = (F2F_FLOPS + CNN_FLOPS) * ql.sum() * dl.sum()
  peak = matmul_roofline()

  # --- where the time goes: one representative block, f2f vs CNN ----------------------------------------
  net = model_lib.SimilarityNetwork(cfg)
  L = engine_lib.bucket_of(int(np.median(dl)), engine_lib.bucket_lengths(int(dl.max()), a.bucket_ratio))
  nq, nb = min(16, a.queries), 16
  q = jax.random.normal(jax.random.PRNGKey(0), (nq, L, 9, a.dims))
  t = jax.random.normal(jax.random.PRNGKey(1), (nb, L, 9, a.dims))
  f2f_fn = jax.jit(lambda q, t: net.apply({'params': params}, q, t, method=net.frame_to_frame))
  f2f = f2f_fn(q, t)
  cnn_fn = jax.jit(lambda m: net.apply({'params': params}, m, method=net.compare)[0])
  t_f2f, t_cnn = timed(f2f_fn, q, t), timed(cnn_fn, f2f)

  print(f'baseline (torch, one call per pair): {base_rate:9.1f} pairs/s  ({len(pairs)} pairs in {base_s:.1f}s)')
  print(f'engine (warm):                       {n_pairs / warm:9.1f} pairs/s  ({n_pairs} pairs in {warm:.1f}s, '
        f'{eng.stats["blocks"]} blocks)')
  print(f'engine (cold, with compilation):     {n_pairs / cold:9.1f} pairs/s  ({cold:.1f}s)')
  print(f'ratio engine/baseline: warm {n_pairs / warm / base_rate:.2f}x, cold {n_pairs / cold / base_rate:.2f}x')
  print(f'max |engine - baseline| over the {len(base_scores)} baseline pairs: {diff:.2e}')
  print(f'engine useful FLOP rate: {useful / warm / 1e9:.1f} GFLOP/s; plain float32 matmul on this device: '
        f'{peak / 1e9:.1f} GFLOP/s; ratio {useful / warm / peak:.2f}')
  if a.dtype != 'float32' or a.precision != 'highest':
    ref_scores = engine_lib.Engine(cfg, params, mesh, engine_lib.EngineConfig(
        memory_budget_mb=a.memory_budget_mb, bucket_ratio=a.bucket_ratio)).score(ff, qids, dids, progress=False)
    d = np.abs(scores - ref_scores)
    top1 = np.mean(np.argmax(scores, 1) == np.argmax(ref_scores, 1))
    order = lambda s: np.argsort(-s, axis=1, kind='stable')[:, :10]
    top10 = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(order(scores), order(ref_scores))])
    print(f'accuracy cost of dtype={a.dtype} precision={a.precision} vs float32/highest: max |d score| '
          f'{d.max():.2e}, mean {d.mean():.2e} (scores span {ref_scores.min():.2f}..{ref_scores.max():.2f}); '
          f'same top-1 for {100 * top1:.0f}% of queries, top-10 overlap {100 * top10:.1f}%')
  print(f'one {nq}x{nb} block at {L} frames: f2f {t_f2f * 1e3:.0f} ms ({100 * t_f2f / (t_f2f + t_cnn):.0f}%), '
        f'CNN {t_cnn * 1e3:.0f} ms ({100 * t_cnn / (t_f2f + t_cnn):.0f}%)')


if __name__ == '__main__':
  main()
