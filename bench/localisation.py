r"""Copy localisation on copy corpora built from real clips: each temporal-alignment method on each map, in one run.

  python -m bench.localisation --videos=../shared/data/videos --output=/tmp/bench_localisation \
      --seeds=0,1,2 --corpus_flags='--queries=24 --no_copy=8'

For each seed it builds (or reuses) a corpus with hapvr_jax.make_copies (`--corpus_flags` are passed on; the
corpus of a seed is built once, so use another --output for other flags), a backbone and network as
hapvr_jax.copy_demo does (random weights unless --resnet / --checkpoint are given: say which when quoting
figures), indexes the references at --fps, and computes the frame-to-frame map, the comparator map and the
network's video score of EVERY (query, reference) pair once, cached in seed<S>/maps_fps<F>.npz: later runs (other
methods, options or scores) cost only the alignment. Every pair is aligned, not only the ones a search would
report, so a method's false positives on pairs that share nothing count against it.

Each row is one setting scored on every seed with hapvr_jax.eval_matching: the matching-track µAP (mean over
seeds, and the lowest and highest), VCSL segment precision / recall / F-score (means), segments found (total)
and the alignment time per pair; rows are printed best µAP first.

  --grid='{"threshold": [2.5, 3], "min_seconds": [1, 2]}'   every combination of these alignment options (and
      min_seconds, the shortest segment in seconds, as hapvr_jax.matches.MIN_SECONDS) for each method and map.
  --score=segment|video|product|raw   what ranks the segments for the µAP: the alignment's score; the pair's
      video score from the network; their product; the mean raw map value along the segment's diagonal.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import time

import numpy as np

from hapvr_jax import copy_demo, eval_matching, localize, matches, make_copies, search, vsc
from hapvr_jax import index as index_lib

SCORES = ('segment', 'video', 'product', 'raw')


def build(args, seed: int, out: str) -> tuple[list, list, float]:
  """(ground truth, [(query, ref, maps)], map fps) of one seed's corpus, the maps from the cache if there."""
  corpus, cache = os.path.join(out, 'corpus'), os.path.join(out, f'maps_fps{args.fps:g}.npz')
  if not os.path.exists(os.path.join(corpus, 'ground_truth.csv')):
    assert make_copies.main([f'--videos={args.videos}', f'--output={corpus}', f'--seed={seed}',
                             *shlex.split(args.corpus_flags)]) == 0
  gts = vsc.read_matches(os.path.join(corpus, 'ground_truth.csv'), ground_truth=True)
  if not os.path.exists(cache):
    t0 = time.perf_counter()
    pairs = compute_maps(args, corpus, out)
    print(f'seed {seed}: maps of {len(pairs)} pairs in {time.perf_counter() - t0:.1f} s (index and compilation '
          f'included)')
    tmp = cache + '.tmp.npz'
    np.savez(tmp, ids=np.array([f'{q}\t{r}' for q, r, _ in pairs]), score=[m['score'] for _, _, m in pairs],
             **{f'{which}{i}': m[which] for i, (_, _, m) in enumerate(pairs) for which in matches.MAPS})
    os.replace(tmp, cache)
  with np.load(cache) as z:
    pairs = [(*key.split('\t'), {'score': float(z['score'][i]), **{w: z[f'{w}{i}'] for w in matches.MAPS}})
             for i, key in enumerate(z['ids'])]
  return gts, pairs, args.fps


def compute_maps(args, corpus: str, out: str) -> list:
  from backbones import registry
  from common_jax import checkpoint
  from common_jax.index_dir import IndexDir
  from hapvr_jax import model as model_lib
  resnet = args.resnet or copy_demo.random_backbone(os.path.join(out, 'resnet'), os.path.join(corpus, 'refs'),
                                                    args.fps)
  dims = registry.load(resnet).config.out_dims
  ckpt = args.checkpoint or copy_demo.averaging_network(os.path.join(out, 'hapvr'), dims)
  ix_path = os.path.join(out, f'index_fps{args.fps:g}')
  assert index_lib.main([f'--index={ix_path}', f'--video_dir={corpus}/refs', f'--resnet={resnet}',
                         f'--fps={args.fps}', '--noprogress']) == 0
  ix = IndexDir.open(ix_path, index_lib.KIND)
  with open(os.path.join(corpus, 'queries.txt')) as f:
    items = [(os.path.splitext(os.path.basename(p.strip()))[0], os.path.join(corpus, p.strip()))
             for p in f if p.strip()]
  params, model_dict = checkpoint.load_params(ckpt)
  pair_maps = matches.PairMaps(model_lib.ModelConfig.from_dict(model_dict), params)
  return [(q, r, pair_maps(x, ix.read(r, 'features')))
          for q, x, _ in search.query_features(ix, items, resnet) for r in ix.ids()]


def _raw_mean(sim: np.ndarray, s: tuple, fps: float) -> float:
  """Mean raw map value along the straight line from a segment's first to its last cell."""
  q0, q1, r0, r1 = (int(round(v * fps)) for v in s[:4])
  n = max(q1 - q0, r1 - r0)
  q = np.clip(np.round(np.linspace(q0, q1 - 1, n)).astype(int), 0, sim.shape[0] - 1)
  r = np.clip(np.round(np.linspace(r0, r1 - 1, n)).astype(int), 0, sim.shape[1] - 1)
  return float(sim[q, r].mean())


def rescore(s: tuple, maps: dict, which: str, score: str, fps: float) -> float:
  if score == 'segment':
    return s[4]
  if score == 'video':
    return maps['score']
  if score == 'product':
    return s[4] * max(maps['score'], 0.0)
  return _raw_mean(maps[which], s, fps)


def evaluate(corpora, method: str, which: str, options: dict, score: str) -> dict:
  """Metrics of one setting on every corpus: µAP mean / min / max, P / R / F means, found, s per pair."""
  aps, prf, found_n, seconds, n_pairs = [], [], 0, 0.0, 0
  for gts, pairs, fps in corpora:
    opts = dict(options)
    if 'min_seconds' in opts:
      opts['min_length'] = max(2, int(round(opts.pop('min_seconds') * fps)))
    localize.align(pairs[0][2][which], method=method, **opts)   # warm any compiled path
    t0 = time.perf_counter()
    found = [(q, r, s, m) for q, r, m in pairs for s in matches.segments(m, which, method, fps, **opts)]
    seconds += time.perf_counter() - t0
    n_pairs += len(pairs)
    found = [vsc.Match(q, r, *s[:4], score=rescore(s, m, which, score, fps)) for q, r, s, m in found]
    metrics, _ = eval_matching.evaluate(gts, found)
    aps.append(metrics['matching_micro_ap'])
    prf.append([metrics[f'segment_{k}'] for k in ('precision', 'recall', 'f_score')])
    found_n += len(found)
  return {'ap': float(np.mean(aps)), 'ap_min': min(aps), 'ap_max': max(aps), 'prf': np.mean(prf, axis=0),
          'found': found_n, 'ms': 1e3 * seconds / n_pairs}


def settings(args) -> list:
  """[(method, map, options)] of this run: the --options, or every combination of the --grid on top (a
  method is given only the grid's options that it takes, so each of its settings comes once)."""
  base, grid, out = json.loads(args.options), json.loads(args.grid or '{}'), []
  for m in args.methods.split(','):
    names = sorted(n for n in grid if n in localize.option_names(m) + ('min_seconds',))
    for values in itertools.product(*(grid[n] for n in names)):
      out += [(m, w, dict(base, **dict(zip(names, values)))) for w in args.maps.split(',')]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--videos', required=True)
  p.add_argument('--output', default='/tmp/bench_localisation')
  p.add_argument('--seeds', default='0', help='corpus seeds, comma-separated; figures are averaged over them')
  p.add_argument('--corpus_flags', default='', help="flags for hapvr_jax.make_copies, e.g. '--queries=24'")
  p.add_argument('--fps', type=float, default=2.0)
  p.add_argument('--resnet', default='')
  p.add_argument('--checkpoint', default='')
  p.add_argument('--methods', default=','.join(localize.METHODS))
  p.add_argument('--maps', default=','.join(matches.MAPS))
  p.add_argument('--options', default='{}', help='alignment options as JSON, e.g. {"min_length": 3}')
  p.add_argument('--grid', default='', help='JSON {option: [values]}: one row per combination')
  p.add_argument('--score', default='segment', choices=SCORES, help='what ranks segments for the µAP')
  args = p.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')]
  corpora = [build(args, s, os.path.join(args.output, f'seed{s}')) for s in seeds]
  print(f'{len(seeds)} corpora (seeds {args.seeds}, fps {args.fps:g}): {sum(len(c[1]) for c in corpora)} pairs, '
        f'{sum(len(c[0]) for c in corpora)} ground-truth segments; segments ranked by the {args.score} score')
  rows = [(m, w, o, evaluate(corpora, m, w, o, args.score)) for m, w, o in settings(args)]
  rows.sort(key=lambda row: -row[3]['ap'])
  print(f'{"method":<6} {"map":<10} {"µAP":>6} {"min":>6} {"max":>6} {"seg P":>6} {"seg R":>6} {"seg F":>6} '
        f'{"found":>6} {"ms/pair":>8}  options')
  for m, w, o, r in rows:
    print(f'{m:<6} {w:<10} {r["ap"]:6.3f} {r["ap_min"]:6.3f} {r["ap_max"]:6.3f} '
          + ' '.join(f'{v:6.3f}' for v in r['prf']) + f' {r["found"]:6d} {r["ms"]:8.2f}  {json.dumps(o)}')
  return rows


if __name__ == '__main__':
  main()
