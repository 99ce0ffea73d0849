r"""Copy localisation on a copy corpus built from real clips: each temporal-alignment method on each map, in one run.

  python -m bench.localisation --videos=../shared/data/videos --output=/tmp/bench_localisation

Builds (or reuses) a corpus with hapvr_jax.make_copies, a backbone and network as hapvr_jax.copy_demo does
(random weights unless --resnet / --checkpoint are given: say which when quoting figures), indexes the
references, and computes the frame-to-frame map and the comparator map of EVERY (query, reference) pair once.
Then, for each alignment method of hapvr_jax.localize and each map, it aligns every pair and scores the segments
against the ground truth with hapvr_jax.eval_matching: matching-track µAP, VCSL segment precision / recall /
F-score, segments found, and the alignment time per pair (the maps' time is shared by all methods and printed
once). Every pair is aligned, not only the ones a search would report, so a method's false positives on pairs
that share nothing count against it.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from hapvr_jax import copy_demo, eval_matching, localize, matches, make_copies, search, vsc
from hapvr_jax import index as index_lib


def build(args):
  """(index dir, ground truth, [(qid, features)], network config and params) of the corpus."""
  from backbones import registry
  from common_jax import checkpoint
  from common_jax.index_dir import IndexDir
  from hapvr_jax import model as model_lib
  corpus = os.path.join(args.output, 'corpus')
  if not os.path.exists(os.path.join(corpus, 'ground_truth.csv')):
    assert make_copies.main([f'--videos={args.videos}', f'--output={corpus}', f'--seed={args.seed}']) == 0
  resnet = args.resnet or copy_demo.random_backbone(os.path.join(args.output, 'resnet'),
                                                    os.path.join(corpus, 'refs'), args.fps)
  dims = registry.load(resnet).config.out_dims
  ckpt = args.checkpoint or copy_demo.averaging_network(os.path.join(args.output, 'hapvr'), dims)
  assert index_lib.main([f'--index={args.output}/index', f'--video_dir={corpus}/refs', f'--resnet={resnet}',
                         f'--fps={args.fps}', '--noprogress']) == 0
  ix = IndexDir.open(os.path.join(args.output, 'index'), index_lib.KIND)
  with open(os.path.join(corpus, 'queries.txt')) as f:
    items = [(os.path.splitext(os.path.basename(p.strip()))[0], os.path.join(corpus, p.strip()))
             for p in f if p.strip()]
  queries = [(q, x) for q, x, _ in search.query_features(ix, items, resnet)]
  params, model_dict = checkpoint.load_params(ckpt)
  gts = vsc.read_matches(os.path.join(corpus, 'ground_truth.csv'), ground_truth=True)
  return ix, gts, queries, model_lib.ModelConfig.from_dict(model_dict), params


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--videos', required=True)
  p.add_argument('--output', default='/tmp/bench_localisation')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--fps', type=float, default=2.0)
  p.add_argument('--resnet', default='')
  p.add_argument('--checkpoint', default='')
  p.add_argument('--methods', default=','.join(localize.METHODS))
  p.add_argument('--options', default='{}', help='alignment options as JSON, e.g. {"min_length": 3}')
  args = p.parse_args(argv)
  options = json.loads(args.options)
  ix, gts, queries, model_config, params, = build(args)
  pair_maps, fps = matches.PairMaps(model_config, params), ix.config['fps']
  t0 = time.perf_counter()
  maps = {(q, r): pair_maps(x, ix.read(r, 'features')) for q, x in queries for r in ix.ids()}
  maps_s = (time.perf_counter() - t0) / len(maps)
  print(f'{len(queries)} queries x {len(ix)} references = {len(maps)} pairs, {len(gts)} ground-truth segments; '
        f'maps {1e3 * maps_s:.1f} ms/pair (f2f and comparator together, compilation included)')
  print(f'{"method":<8} {"map":<11} {"µAP":>6} {"seg P":>6} {"seg R":>6} {"seg F":>6} {"found":>6} {"ms/pair":>8}')
  rows = []
  for method in args.methods.split(','):
    for which in matches.MAPS:
      localize.align(next(iter(maps.values()))[which], method=method, **options)   # warm any compiled path
      t0 = time.perf_counter()
      found = [vsc.Match(q, r, *s[:4], score=s[4]) for (q, r), m in maps.items()
               for s in matches.segments(m, which, method, fps, **options)]
      per_pair = (time.perf_counter() - t0) / len(maps)
      metrics, _ = eval_matching.evaluate(gts, found)
      rows.append((method, which, metrics, per_pair))
      print(f'{method:<8} {which:<11} {metrics["matching_micro_ap"]:6.3f} {metrics["segment_precision"]:6.3f} '
            f'{metrics["segment_recall"]:6.3f} {metrics["segment_f_score"]:6.3f} {len(found):6d} '
            f'{1e3 * per_pair:8.2f}')
  best = max(rows, key=lambda r: r[2]['matching_micro_ap'])
  print(f'best matching µAP: {best[0]} on the {best[1]} map ({best[2]["matching_micro_ap"]:.3f})')
  return rows


if __name__ == '__main__':
  np.set_printoptions(precision=3)
  main()
