r"""Coarse-to-fine search against the exhaustive engine: mAP and time per query for shortlists of the database.

  python -m bench.coarse_to_fine                                  # synthetic FIVR-5K-shaped corpus
  python -m bench.coarse_to_fine --features=fivr_5k.hdf5 --annotations=ANNOTATIONS --checkpoint=CKPT

Stage 1 scores every database video by the coarse descriptor (hapvr_jax.coarse, in a FAISS IndexFlatIP);
stage 2 re-ranks the top `f`% with the similarity network; the rest keep their coarse order below the
shortlist. The exhaustive baseline is hapvr_jax.engine over every (query, database) pair, as
hapvr_jax.evaluate computes it. Printed: DSVR/CSVR/ISVR mAP, their ratio to the exhaustive run's, the recall
of DSVR positives inside the shortlist, and the time per query of both, per shortlist size; plus the
candidate descriptors' curves; a PNG and a JSON beside it.

The synthetic corpus (bench/fivr_like.py) is made up, and so is a network without --checkpoint (a fresh
init). NUMBERS ON SYNTHETIC DATA DO NOT TRANSFER TO REAL DATA: only the real fivr_5k.hdf5 with a trained
checkpoint says how a shortlist does on FIVR. Without --checkpoint the fine stage is the engine's features-only
similarity (TopK-Chamfer over regions and frames, no attention, no comparator): a freshly initialised network
ranks worse than its own inputs and would make the ratios meaningless.

Measured (2-core CPU shared with other jobs, load 2-9; one run, 8 min): exhaustive 50 x 5,000 pairs in 202 s
(4.0 s per query, compilation included), DSVR 0.879 CSVR 0.803 ISVR 0.702. pooled_regions: DSVR ratio
0.819 / 0.956 / 0.997 / 0.999 / 1.000 / 1.000 at 1 / 2 / 5 / 10 / 20 / 50%, 76x / 33x / 24x / 12x / 6.3x /
2.4x less time per query; frame_knn: 1.000 from 1% on, 14x / 12x / 9.7x / 7.1x / 4.7x / 2.2x. Shortlist
scores equal the engine's to 1.2e-7. Speed-ups move with the machine's load between the two runs.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import flags

from bench import common, shortlist
from common_jax import cli, io_util


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('features', '', 'DnS-format FIVR-5K feature file (default: the synthetic corpus)',
                      flag_values=fv)
  flags.DEFINE_string('annotations', '', 'folder of fivr_audio.pickle + fivr_easy_duplicates.txt', flag_values=fv)
  flags.DEFINE_string('checkpoint', '', 'similarity network (default: a fresh init, as the evaluate demo)',
                      flag_values=fv)
  flags.DEFINE_string('workdir', '/tmp/coarse_to_fine', 'synthetic corpus and outputs', flag_values=fv)
  flags.DEFINE_list('fractions', ['1', '2', '5', '10', '20', '50'], 'shortlist sizes, % of the database',
                    flag_values=fv)
  flags.DEFINE_list('candidates', ['pooled_regions', 'frame_knn'], 'coarse descriptors compared',
                    flag_values=fv)
  flags.DEFINE_integer('queries', 50, 'synthetic corpus: queries', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('database', 5000, 'synthetic corpus: database videos', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('timed_queries', 10, 'queries whose coarse-to-fine search is run and timed (the mAP of '
                       'every query uses the exhaustive scores of its shortlist, which the timed runs check)',
                       flag_values=fv, lower_bound=1)
  flags.DEFINE_list('timed', ['pooled_regions', 'frame_knn'], 'the candidates whose pipeline is run and timed',
                    flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'synthetic corpus and fresh network seed', flag_values=fv)


def load_model(checkpoint: str, seed: int):
  """(ModelConfig, params) of a checkpoint; without one, the features-only similarity (no attention; the
  comparator's fresh parameters are not used)."""
  from common_jax import checkpoint as ckpt
  from hapvr_jax import model as model_lib
  if not checkpoint:
    cfg = model_lib.ModelConfig(attention=False)
    return cfg, model_lib.init_params(cfg, seed=seed)
  params, model_dict = ckpt.load_params(checkpoint)
  return model_lib.ModelConfig.from_dict(model_dict, where=checkpoint), params


def exhaustive(ff, queries, database, model_config, params, features_only):
  import jax
  from common_jax import mesh as mesh_lib
  from hapvr_jax import engine as engine_lib
  engine = engine_lib.Engine(model_config, params, mesh_lib.make_mesh(devices=jax.local_devices()),
                             engine_lib.EngineConfig(features_only=features_only))
  t0 = time.perf_counter()
  sims = engine.score(ff, queries, database, progress=False)
  return sims, time.perf_counter() - t0


def c2f_metrics(bench, fine, coarse_rank, fraction, queries, database):
  """FIVR metrics of the ranking: the shortlist (top `fraction` of coarse_rank) by fine score, then the rest
  by coarse order; and the recall of DSVR positives inside the shortlist."""
  n = max(1, int(round(fraction * len(database))))
  sims = np.empty_like(fine)
  hits, total = 0, 0
  for i, q in enumerate(queries):
    order = coarse_rank[i]
    sims[i, order] = -2.0 - np.arange(len(order)) / len(order)       # below any fine score (>= -1)
    sims[i, order[:n]] = fine[i, order[:n]]
    positives = {d for d, lv in bench.gt[q].items() if lv == 0}
    total += len(positives)
    hits += len(positives.intersection(database[j] for j in order[:n]))
  m = bench.evaluate(sims, queries, database)
  return {k: m[k] for k in ('DSVR', 'CSVR', 'ISVR')} | {'recall_DS': hits / max(total, 1), 'shortlist': n}


def plot(path, fractions, rows, exhaustive_time):
  from common_jax import plots
  fig = plots.figure((11, 4.2))
  ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  pct = [100 * f for f in fractions]
  for name, table in rows.items():
    for task, style in (('DSVR', '-'), ('CSVR', '--'), ('ISVR', ':')):
      ax.plot(pct, [r[task + '_ratio'] for r in table], style, marker='o', label=f'{name} {task}')
    if 'seconds_per_query' in table[0]:
      bx.plot(pct, [1e3 * r['seconds_per_query'] for r in table], marker='o', label=f'coarse-to-fine ({name})')
  ax.axhline(0.99, color='gray', lw=0.8)
  ax.set(xscale='log', xlabel='shortlist (% of the database)', ylabel='mAP / exhaustive mAP',
         title='accuracy (synthetic data: does not transfer)')
  ax.legend(fontsize=7)
  bx.axhline(1e3 * exhaustive_time, color='k', label='exhaustive engine')
  bx.set(xscale='log', yscale='log', xlabel='shortlist (% of the database)', ylabel='ms per query',
         title='time per query')
  bx.legend(fontsize=8)
  fig.tight_layout()
  plots.save_png(fig, path)


def run(args) -> dict:
  from hapvr_jax import datasets, features as features_lib
  os.makedirs(args.workdir, exist_ok=True)
  synthetic_data = not args.features
  if synthetic_data:
    from bench import fivr_like
    data = os.path.join(args.workdir, 'corpus')
    t0 = time.perf_counter()
    fivr_like.make(data, args.queries, args.database, seed=args.seed)
    print(f'synthetic corpus: {args.queries} queries x {args.database} videos in {time.perf_counter() - t0:.0f}s')
    args.features, args.annotations = os.path.join(data, 'features.hdf5'), data
  bench = datasets.load_benchmark('fivr_5k', args.annotations)
  model_config, params = load_model(args.checkpoint, args.seed)
  ff, queries, database = features_lib.open_split(bench, args.features, model_config)
  fractions = sorted(float(f) / 100 for f in args.fractions)

  features_only = not args.checkpoint
  full, t_full = exhaustive(ff, queries, database, model_config, params, features_only)
  base = bench.evaluate(full, queries, database)
  per_query_full = t_full / len(queries)
  print(f'exhaustive engine: {len(queries)} x {len(database)} pairs in {t_full:.1f}s '
        f'({per_query_full * 1e3:.0f} ms per query, compilation included); DSVR {base["DSVR"]:.4f} '
        f'CSVR {base["CSVR"]:.4f} ISVR {base["ISVR"]:.4f}')

  videos = shortlist.load_all(ff, database)
  rows, indexes = {}, {}
  for name in args.candidates:
    coarse = shortlist.CoarseIndex(name, videos)
    rank, t_coarse = coarse.rank_all([ff.read(q) for q in queries])
    rows[name] = []
    for f in fractions:
      r = c2f_metrics(bench, full, rank, f, queries, database)
      r.update({f'{t}_ratio': r[t] / base[t] for t in ('DSVR', 'CSVR', 'ISVR')}, fraction=f,
               coarse_seconds_per_query=t_coarse / len(queries))
      rows[name].append(r)
    indexes[name] = coarse

  # the timed candidates' pipelines run for real, query by query: coarse search, then the network on the shortlist
  scorer = shortlist.Scorer(model_config, params, max(len(v) for v in videos.values()),
                            max(len(ff.read(q)) for q in queries), ff.regions(queries[0]), features_only)
  t_warm = scorer.warm_up()
  worst, timed = 0.0, queries[:args.timed_queries]
  for name in args.timed:
    for r in rows[name]:
      t0 = time.perf_counter()
      for i, q in enumerate(timed):
        x = ff.read(q)
        ids = indexes[name].search(x, r['shortlist'])
        got = scorer.score(x, [videos[j] for j in ids])
        worst = max(worst, float(np.abs(got - full[i, ids]).max()))
      r['seconds_per_query'] = (time.perf_counter() - t0) / len(timed)
      r['speedup'] = per_query_full / r['seconds_per_query']
  if worst > 1e-4:   # the shortlist must be scored as the engine scores it, or the mAPs above mean nothing
    raise RuntimeError(f'the shortlist scores differ from the exhaustive engine by {worst:.1e}')

  print('\nNUMBERS ON SYNTHETIC DATA DO NOT TRANSFER TO REAL DATA.' if synthetic_data else '')
  print(f'shortlist scorer: compiled in {t_warm:.1f}s (not in the times below); largest difference from the '
        f'exhaustive scores {worst:.1e}; load {common.load()}')
  for name, table in rows.items():
    print(f'\n{name}:  % db   DSVR (ratio)      CSVR (ratio)      ISVR (ratio)      DS recall  '
          f'ms/query  speed-up')
    for r in table:
      t = (f'{1e3 * r["seconds_per_query"]:8.1f}  {r["speedup"]:6.1f}x' if 'seconds_per_query' in r else
           f'{1e3 * r["coarse_seconds_per_query"]:8.2f}  (coarse stage only)')
      print(f'{" " * len(name)}   {100 * r["fraction"]:5.0f}  ' + '  '.join(
          f'{r[k]:.4f} ({r[k + "_ratio"]:.4f})' for k in ('DSVR', 'CSVR', 'ISVR')) + f'  {r["recall_DS"]:9.3f}  {t}')
  out = {'synthetic': synthetic_data, 'features': args.features, 'exhaustive': {**base, 'seconds': t_full,
         'seconds_per_query': per_query_full}, 'candidates': rows, 'max_score_difference': worst,
         'scorer_compile_seconds': t_warm}
  png = os.path.join(args.workdir, 'coarse_to_fine.png')
  plot(png, fractions, rows, per_query_full)
  io_util.write_json(os.path.join(args.workdir, 'coarse_to_fine.json'),
                     json.loads(json.dumps(out, default=float)))
  print(f'\nwrote {png} and coarse_to_fine.json')
  print('RESULT ' + json.dumps(out, default=float))
  return out


main = cli.program(define_flags, run, __doc__)


if __name__ == '__main__':
  cli.run_main(main)
