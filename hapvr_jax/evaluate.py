r"""Evaluate a similarity network on FIVR-5K/200K, EVVE or SVD from DnS-format features.

  python -m hapvr_jax.evaluate --config=configs/fivr_5k.py --workdir=OUT \
      --config.features=fivr_5k.hdf5 --config.checkpoint=CKPT --config.annotations=ANNOTATIONS

Writes OUT/metrics.json (the original's metric names), OUT/pr_curves.png and, with
--config.store_similarities=True, OUT/similarities.pk ({query id: {target id: similarity}}, as the original).
The database is the set of benchmark ids present in the feature file; queries missing from it are counted
and reported. Any bad input ends the run with one error line naming the culprit and exit code 2; results of
a failed run are never left behind (every output is written to a temporary name and renamed at the end).
"""
from __future__ import annotations

import os
import time

from absl import flags
from ml_collections import config_flags

from common_jax import cli
from common_jax import io_util

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Evaluation config file (configs/fivr_5k.py, ...).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder for metrics.json and the other outputs.')
OUTPUTS = ('metrics.json', 'similarities.pk', 'pr_curves.png')


def load_model(config):
  """(ModelConfig, params): from config.checkpoint, or a fresh network for the demo."""
  from hapvr_jax import model as model_lib
  from common_jax import checkpoint
  if config.checkpoint:
    params, model_dict = checkpoint.load_params(config.checkpoint)
    model_config = model_lib.ModelConfig.from_dict(model_dict, where=config.checkpoint)
  elif config.demo.enabled:
    model_config = model_lib.ModelConfig()
    params = model_lib.init_params(model_config, seed=config.demo.seed)
  else:
    raise cli.UsageError('config.checkpoint is empty: give a converted or trained checkpoint directory')
  if config.min_len != -1:
    model_config = model_lib.ModelConfig.from_dict({**model_config.to_dict(), 'min_len': config.min_len})
  if model_config.min_len < 4:
    raise cli.UsageError(f'min_len={model_config.min_len}: videos shorter than 4 frames have no comparator '
                         'output; use min_len >= 4')
  return model_config, params


def evaluate(config, workdir: str) -> dict:
  import jax
  from common_jax import mesh as mesh_lib
  from hapvr_jax import benchmarks, engine as engine_lib, features as features_lib

  os.makedirs(workdir, exist_ok=True)
  if config.demo.enabled:
    from hapvr_jax import synthetic
    data = synthetic.make_fivr_corpus(os.path.join(workdir, 'demo_data'), config.demo.num_queries,
                                      config.demo.num_database, seed=config.demo.seed)
    config.features, config.annotations = data['features'], data['annotations']
  for key in ('features', 'annotations'):
    if not config[key]:
      raise cli.UsageError(f'config.{key} is empty')
  bench = benchmarks.load_benchmark(config.dataset, config.annotations)
  model_config, params = load_model(config)
  ff, queries, database = features_lib.open_split(bench, config.features, model_config)

  cli.enable_compilation_cache(config.compilation_cache)
  mesh = mesh_lib.make_mesh(config.mesh)
  engine = engine_lib.Engine(model_config, params, mesh, engine_lib.EngineConfig(**config.engine.to_dict()))
  scores = engine.score(ff, queries, database, progress=config.progress)
  metrics = bench.evaluate(scores, queries, database)
  metrics.update({
      'dataset': bench.name, 'features': os.path.abspath(config.features),
      'checkpoint': os.path.abspath(config.checkpoint) if config.checkpoint else 'fresh init (demo)',
      'min_len': model_config.min_len, 'pairs': engine.stats['pairs'], 'seconds': engine.stats['seconds'],
      'pairs_per_second': engine.stats['pairs_per_second'], 'devices': jax.device_count(),
      'synthetic_demo': bool(config.demo.enabled)})
  if config.demo.enabled:  # the raw-feature baseline on the same data
    base = engine_lib.Engine(model_config, params, mesh,
                             engine_lib.EngineConfig(**{**config.engine.to_dict(), 'features_only': True}))
    base_metrics = bench.evaluate(base.score(ff, queries, database, progress=config.progress), queries, database)
    metrics.update({f'baseline_features_only/{k}': v for k, v in base_metrics.items()
                    if isinstance(v, float)})

  if config.store_similarities:
    sims = {q: {d: float(s) for d, s in zip(database, row)} for q, row in zip(queries, scores)}
    io_util.write_pickle(os.path.join(workdir, 'similarities.pk'), sims)
  if config.plots:
    curves = bench.pr_curves(scores, queries, database) if hasattr(bench, 'pr_curves') else None
    if curves:
      benchmarks.plot_pr_curves(curves, os.path.join(workdir, 'pr_curves.png'))
  io_util.write_json(os.path.join(workdir, 'metrics.json'), metrics)
  return metrics


def main(argv):
  del argv
  workdir = _WORKDIR.value
  if not workdir:
    return cli.fail('--workdir is required')
  # A failed run must not leave an earlier run's results looking like its own.
  io_util.remove_if_exists(*(os.path.join(workdir, name) for name in OUTPUTS))
  t0 = time.time()
  with cli.clear_errors():
    metrics = evaluate(_CONFIG.value, workdir)
  shown = {k: v for k, v in metrics.items() if isinstance(v, float) and '/' not in k}
  print(f'{metrics["dataset"]}: ' + '  '.join(f'{k}={v:.4f}' for k, v in sorted(shown.items())
                                                if k not in ('seconds', 'pairs_per_second')))
  print(f'{metrics["pairs"]:,} pairs in {time.time() - t0:.1f}s ({metrics["pairs_per_second"]:.0f} pairs/s); '
        f'wrote {os.path.join(workdir, "metrics.json")}')
  return 0


if __name__ == '__main__':
  cli.run(main)
