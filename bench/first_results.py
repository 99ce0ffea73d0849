r"""First results: how long a user waits for `hapvr_jax.evaluate` and `hapvr_jax.search` on small workloads.

  python -m bench.first_results --workdir=/tmp/first_results
  python -m bench.first_results --workdir=/tmp/first_results_small --queries=4 --database=12 \
      --index_videos=24 --dims=64

Workloads (random unit region features [T, 9, D] in float32, D = 512 by default, lengths drawn uniformly as
FIVR-5K's short videos: queries 10-24 frames, database 8-32; the network's weights in the converted layout of
tests/references/hapvr_torch.py):

  evaluate  a FIVR-5K-format split of --queries x --database videos (features.hdf5 + annotation files);
  search    a --index_videos index built from a feature file (python -m hapvr_jax.index), one --query_id.

Timed, each in its own process started from scratch: the whole `python -m hapvr_jax.evaluate` command (wall
time from the start to its final printed line) with an empty compilation cache and then with the cache it
filled; the original evaluation's per-pair PyTorch loop on the same pairs (the ops of bench/hapvr_eval.py,
every video indexed once, timed from its first to its last pair, imports and reading excluded); and `python
-m hapvr_jax.search` (wall time to its first printed result), cold and warm. Printed: each wall time, the
load average before it, the ratios loop / evaluate and the largest difference between the loop's scores and
the ones evaluate stored. Ratios measured in one run are worth more than absolute times on a busy machine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import flags

from bench import common
from common_jax import cli, io_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGIONS = 9


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'workloads, caches and outputs (rebuilt)', flag_values=fv, required=True)
  flags.DEFINE_string('json_output', '', 'figures as JSON (default: WORKDIR/first_results.json)', flag_values=fv)
  flags.DEFINE_integer('queries', 50, 'evaluate: queries', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('database', 300, 'evaluate: database videos', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('index_videos', 1000, 'search: videos in the index', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('dims', 512, 'feature size (512 for figures; smaller only to test the plumbing)',
                       flag_values=fv, lower_bound=1)
  flags.DEFINE_list('query_len', ['10', '24'], 'query lengths in frames: min,max', flag_values=fv)
  flags.DEFINE_list('database_len', ['8', '32'], 'database lengths in frames: min,max', flag_values=fv)
  flags.DEFINE_list('parts', ['evaluate', 'loop', 'search'], 'what to time', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'features and weights', flag_values=fv)
  flags.DEFINE_enum('loop_host_memory', 'default', ['default', 'reuse'],
                    "the per-pair loop's malloc settings: 'default' (as the original runs) or 'reuse' (the ones "
                    'evaluate sets, common_jax.host_memory; they speed the loop up as well)', flag_values=fv)
  flags.DEFINE_bool('loop_only', False, 'internal: run the per-pair loop on WORKDIR and print its time',
                    flag_values=fv)


def _lengths(rng, n, bounds):
  lo, hi = (int(b) for b in bounds)
  if not 1 <= lo <= hi:
    raise cli.UsageError(f'lengths {lo},{hi}: expected 1 <= min <= max')
  return rng.integers(lo, hi + 1, n)


def _unit(rng, t, dims):
  x = rng.normal(size=(t, REGIONS, dims)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_workload(args) -> dict:
  """Writes the evaluation split, the search feature file and the checkpoint under args.workdir."""
  import torch
  from common_jax import checkpoint
  from hapvr_jax import convert, synthetic
  from tests.references import hapvr_torch as ref
  rng = np.random.default_rng(args.seed)
  w = {'eval': os.path.join(args.workdir, 'eval'), 'checkpoint': os.path.join(args.workdir, 'checkpoint'),
       'index_features': os.path.join(args.workdir, 'index_features.hdf5'),
       'index': os.path.join(args.workdir, 'index'), 'weights': os.path.join(args.workdir, 'weights.pt')}
  ids = synthetic.random_ids(rng, args.queries + args.database)
  queries, database = ids[:args.queries], ids[args.queries:]
  lens = np.concatenate([_lengths(rng, args.queries, args.query_len),
                         _lengths(rng, args.database, args.database_len)])
  features = {v: _unit(rng, int(t), args.dims) for v, t in zip(ids, lens)}
  positives = {q: {'ND': [str(d) for d in rng.choice(database, min(3, len(database)), replace=False)]}
               for q in queries}
  w['features'] = synthetic.write_fivr_files(w['eval'], features, queries, database, positives, [])
  w['queries'], w['database'] = queries, database
  index_ids = [f'video{k:05d}' for k in range(args.index_videos)]
  with io_util.atomic_open(w['index_features'], 'wb') as f:
    import h5py
    with h5py.File(f, 'w') as h:
      for v, t in zip(index_ids, _lengths(rng, args.index_videos, args.database_len)):
        h[v] = _unit(rng, int(t), args.dims)
  w['query_id'] = index_ids[0]
  torch.manual_seed(args.seed)
  net = ref.SimilarityNetworkRef(dims=args.dims, f_topk_rate=0.1, v_topk_rate=0.03).eval()
  sd = ref.original_state_dict(net)
  torch.save(sd, w['weights'])
  params, cfg = convert.convert_state_dict(sd, ref.original_args(net))
  checkpoint.save_params(w['checkpoint'], params, cfg.to_dict())
  io_util.write_json(os.path.join(args.workdir, 'workload.json'), w)
  return w


def loop_scores(w: dict):
  """({(query, target): score}, seconds) of the original evaluation's per-pair loop on the split of `w`."""
  import torch
  from bench.hapvr_eval import original_ops_similarity
  from hapvr_jax.features import FeatureFile
  from tests.references import hapvr_torch as ref
  torch.set_grad_enabled(False)
  sd = torch.load(w['weights'])
  dims = sd['attention.transform.weight'].shape[0]
  net = ref.SimilarityNetworkRef(dims=dims, f_topk_rate=0.1, v_topk_rate=0.03).eval()
  net.load_state_dict(sd)
  ff = FeatureFile(w['features'], dims=dims, min_len=8)
  q_x = {q: torch.from_numpy(ff.read(q)) for q in w['queries']}
  t_x = {d: torch.from_numpy(ff.read(d)) for d in w['database']}
  t0 = time.perf_counter()
  q_ix = {q: net.index_video(x) for q, x in q_x.items()}
  out = {}
  for d, x in t_x.items():   # each database video indexed once, then scored against every query
    t = net.index_video(x)
    for q in w['queries']:
      out[q, d] = float(original_ops_similarity(sd, q_ix[q], t, 0.1, 0.03))
  return out, time.perf_counter() - t0


def timed(cmd, until=None) -> dict:
  """Runs `cmd` from the repository root: {'wall': seconds to its final printed line (or to the first line
  starting with `until`), 'exit': seconds to its exit, 'cpu': its user + system CPU seconds (less moved by
  other jobs than wall times), 'lines': its output, 'load': the load average before}."""
  import resource
  load = common.load()
  cpu = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))
  cpu0, t0 = cpu(), time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines, wall = [], None
  for line in proc.stdout:
    lines.append(line.rstrip('\n'))
    if until is None or (wall is None and line.startswith(until)):
      wall = time.perf_counter() - t0
  err = proc.stderr.read()
  if proc.wait() != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed (exit {proc.returncode}): {err.strip()[-2000:]}')
  return {'wall': wall, 'exit': time.perf_counter() - t0, 'cpu': cpu() - cpu0, 'lines': lines, 'load': load}


def evaluate_cmd(w: dict, workdir: str, cache: str) -> list:
  return [sys.executable, '-m', 'hapvr_jax.evaluate', '--config=configs/fivr_5k.py', f'--workdir={workdir}',
          f'--config.features={w["features"]}', f'--config.annotations={w["eval"]}',
          f'--config.checkpoint={w["checkpoint"]}', f'--config.compilation_cache={cache}',
          '--config.progress=False', '--config.store_similarities=True']


def search_cmd(w: dict, output: str, cache: str) -> list:
  return [sys.executable, '-m', 'hapvr_jax.search', f'--index={w["index"]}', f'--checkpoint={w["checkpoint"]}',
          f'--query_id={w["query_id"]}', f'--output={output}', f'--compilation_cache={cache}', '--noprogress']


def stored_difference(workdir: str, loop: dict) -> float:
  """Largest |evaluate's stored similarity - the loop's| over the loop's pairs."""
  import pickle
  with open(os.path.join(workdir, 'similarities.pk'), 'rb') as f:
    sims = pickle.load(f)   # written by this run's evaluate
  return max(abs(sims[q][d] - s) for (q, d), s in loop.items())


def measure(args, w: dict, run=timed) -> dict:
  """Every timing of args.parts, each in its own process; `run(cmd, until)` runs one (tests replace it)."""
  out, d = {}, args.workdir
  if 'evaluate' in args.parts:
    cache = os.path.join(d, 'cache_evaluate')
    for name in ('cold', 'warm'):
      out[f'evaluate_{name}'] = run(evaluate_cmd(w, os.path.join(d, f'evaluate_{name}'), cache))
      r = out[f'evaluate_{name}']
      print(f'evaluate, {name} cache: {r["wall"]:.2f}s to the final line ({r["cpu"]:.1f} CPU s; load before '
            f'{r["load"]})', flush=True)
  if 'loop' in args.parts:
    r = run([sys.executable, '-m', 'bench.first_results', f'--workdir={d}', '--loop_only',
             f'--loop_host_memory={args.loop_host_memory}'])
    out['loop'] = {**r, 'wall': float(json.loads(r['lines'][-1])['seconds'])}
    print(f'per-pair PyTorch loop ({args.loop_host_memory} malloc settings): {out["loop"]["wall"]:.2f}s '
          f'({r["cpu"]:.1f} CPU s for the whole process; load before {r["load"]})', flush=True)
  if 'search' in args.parts:
    cache = os.path.join(d, 'cache_search')
    for name in ('cold', 'warm'):
      out[f'search_{name}'] = run(search_cmd(w, os.path.join(d, f'search_{name}'), cache), 'query ')
      r = out[f'search_{name}']
      print(f'search, {name} cache: {r["wall"]:.2f}s to the first result ({r["cpu"]:.1f} CPU s; load before '
            f'{r["load"]})', flush=True)
  return out


def report(args, w: dict, out: dict) -> dict:
  """The ratios of the timings in `out` (printed) and the JSON figures."""
  figures = {k: {'wall_s': v['wall'], 'exit_s': v['exit'], 'cpu_s': v['cpu'], 'load': v['load']}
             for k, v in out.items()}
  print(f'\n{args.queries} queries x {args.database} database videos; search on {args.index_videos} videos; '
        f'dims {args.dims}; load now {common.load()}')
  for name in ('cold', 'warm'):
    if 'loop' in out and f'evaluate_{name}' in out:
      ratio = out['loop']['wall'] / out[f'evaluate_{name}']['wall']
      figures[f'loop_over_evaluate_{name}'] = ratio
      print(f'evaluate {name}: {out[f"evaluate_{name}"]["wall"]:.2f}s, the loop {out["loop"]["wall"]:.2f}s: '
            f'{ratio:.2f}x')
  if 'search_warm' in out:
    print(f'search: cold {out["search_cold"]["wall"]:.2f}s, warm {out["search_warm"]["wall"]:.2f}s '
          f'to the first result')
  if 'loop' in out and 'evaluate_warm' in out:
    loop = {tuple(k.split('\t')): v for k, v in json.loads(out['loop']['lines'][-1])['scores'].items()}
    diff = stored_difference(os.path.join(args.workdir, 'evaluate_warm'), loop)
    figures['max_score_difference'] = diff
    print(f'largest |evaluate - loop| score difference: {diff:.2e}')
  return figures


def run_bench(args) -> dict:
  path = os.path.join(args.workdir, 'workload.json')
  if args.loop_only:
    if args.loop_host_memory == 'reuse':
      from common_jax import host_memory
      host_memory.reuse_freed_memory()
    with open(path) as f:
      scores, seconds = loop_scores(json.load(f))
    print(json.dumps({'seconds': seconds, 'scores': {f'{q}\t{d}': s for (q, d), s in scores.items()}}))
    return {}
  unknown = set(args.parts) - {'evaluate', 'loop', 'search'}
  if unknown:
    raise cli.UsageError(f'--parts: unknown {sorted(unknown)}; expected evaluate, loop, search')
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  t0 = time.perf_counter()
  w = make_workload(args)
  if 'search' in args.parts:
    r = timed([sys.executable, '-m', 'hapvr_jax.index', f'--index={w["index"]}',
               f'--features={w["index_features"]}', '--noprogress'])
    print(f'index of {args.index_videos} videos built in {r["exit"]:.1f}s')
  print(f'workloads written in {time.perf_counter() - t0:.1f}s; device {_device()}', flush=True)
  figures = report(args, w, measure(args, w))
  io_util.write_json(args.json_output or os.path.join(args.workdir, 'first_results.json'), figures)
  return figures


def _device() -> str:
  import jax
  return f'{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs'


main = cli.program(define_flags, run_bench, __doc__)


if __name__ == '__main__':
  cli.run_main(main)
