r"""Evaluate a similarity network on FIVR-5K/200K, EVVE or SVD from DnS-format features.

  python -m hapvr_jax.evaluate --config=configs/fivr_5k.py --workdir=OUT \
      --config.features=fivr_5k.hdf5 --config.checkpoint=CKPT --config.annotations=ANNOTATIONS

Writes OUT/metrics.json (the original's metric names), OUT/pr_curves.png and, with
--config.store_similarities=True, OUT/similarities.pk ({query id: {target id: similarity}}, as the original).
The database is the set of benchmark ids present in the feature file; queries missing from it are counted
and reported. Any bad input (a config value, a workdir that is a file or read-only, ...) ends the run with one
error line naming the culprit and exit code 2, and so does a full disk; results of a failed run are never
left behind (every output is written to a temporary name and renamed at the end).

Resumable: the engine keeps its partial sums in OUT/partial (saved every config.save_every_s seconds and on
SIGTERM/SIGINT, which end the run cleanly); rerunning the same command skips the finished work and gives the
same scores as an uninterrupted run. A partial from other inputs (ids, checkpoint, features, engine config,
device count) is refused with one error line naming what changed. OUT/partial is removed once the outputs
are written. On several processes (jax.distributed, see common_jax.distributed) every process scores its
share of the database on its own devices, the sums are added, and process 0 writes the outputs.
"""
from __future__ import annotations

import os
import shutil
import time

from common_jax import cli
from common_jax import io_util
from hapvr_jax import validate

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


def evaluate(config, workdir: str, plotter=None) -> dict:
  """Scores, metrics and outputs. Raises engine_state.Stopped (partial results kept) on SIGTERM/SIGINT.
  plotter: a common_jax.plot_worker.Worker that draws the PR curves (default: drawn in this process)."""
  import jax
  from common_jax import distributed, mesh as mesh_lib, preemption
  from hapvr_jax import engine as engine_lib, engine_state, features as features_lib
  from hapvr_jax import datasets

  validate.evaluation(config)
  os.makedirs(workdir, exist_ok=True)
  multi, writer = jax.process_count() > 1, jax.process_index() == 0
  if config.demo.enabled:
    from hapvr_jax import synthetic
    data_dir = os.path.join(workdir, 'demo_data')
    if writer:   # one writer; the others read the finished corpus after the barrier
      synthetic.make_fivr_corpus(data_dir, config.demo.num_queries, config.demo.num_database,
                                 seed=config.demo.seed)
    distributed.barrier('hapvr demo data written')
    config.features, config.annotations = os.path.join(data_dir, 'features.hdf5'), data_dir
  for key in ('features', 'annotations'):
    if not config[key]:
      raise cli.UsageError(f'config.{key} is empty')
  bench = datasets.load_benchmark(config.dataset, config.annotations)
  model_config, params = load_model(config)
  ff, queries, database = features_lib.open_split(bench, config.features, model_config)

  cli.enable_compilation_cache(config.compilation_cache)
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.local_devices() if multi else None)
  state_dir = os.path.join(workdir, 'partial')
  stop = preemption.StopSignal()

  def score(engine_config, name):
    engine = engine_lib.Engine(model_config, params, mesh, engine_lib.EngineConfig(**engine_config))
    try:
      out = engine.score(ff, queries, database, progress=config.progress, save_every_s=config.save_every_s,
                         state_dir=os.path.join(state_dir, name) if config.resume else None,
                         stop=lambda: stop.requested(sync=False))
    except engine_state.Stopped as e:
      raise engine_state.Stopped(f'stopped by {stop.signal_name}: {e}') from None
    return engine, out

  try:
    engine, scores = score(config.engine.to_dict(), 'model')
    metrics = bench.evaluate(scores, queries, database)
    metrics.update({
        'dataset': bench.name, 'features': os.path.abspath(config.features),
        'checkpoint': os.path.abspath(config.checkpoint) if config.checkpoint else 'fresh init (demo)',
        'min_len': model_config.min_len, 'pairs': engine.stats['pairs'], 'seconds': engine.stats['seconds'],
        'pairs_per_second': engine.stats['pairs_per_second'], 'devices': jax.device_count(),
        'processes': jax.process_count(), 'resumed_blocks': engine.stats['blocks_resumed'],
        'synthetic_demo': bool(config.demo.enabled)})
    if config.demo.enabled:  # the raw-feature baseline on the same data
      _, base_scores = score({**config.engine.to_dict(), 'features_only': True}, 'baseline_features_only')
      base_metrics = bench.evaluate(base_scores, queries, database)
      metrics.update({f'baseline_features_only/{k}': v for k, v in base_metrics.items()
                      if isinstance(v, float)})
  finally:
    stop.restore()

  if writer:
    if config.store_similarities:
      sims = {q: {d: float(s) for d, s in zip(database, row)} for q, row in zip(queries, scores)}
      io_util.write_pickle(os.path.join(workdir, 'similarities.pk'), sims)
    if config.plots:
      curves = bench.pr_curves(scores, queries, database) if hasattr(bench, 'pr_curves') else None
      if curves:
        path = os.path.join(workdir, 'pr_curves.png')
        if plotter is not None:
          plotter.draw('hapvr_jax.datasets:plot_pr_curves', curves, path)
        else:
          datasets.plot_pr_curves(curves, path)
    io_util.write_json(os.path.join(workdir, 'metrics.json'), metrics)
  distributed.barrier('hapvr evaluation outputs written')   # no partial is dropped before the outputs exist
  shutil.rmtree(state_dir, ignore_errors=True)
  return metrics


def run(config, workdir) -> int:
  """Checks the config values and the workdir, then evaluates; bad input: one error line, exit code 2."""
  t0 = time.time()
  from common_jax import host_memory, plot_worker, xla_cpu
  host_memory.reuse_freed_memory()   # before JAX allocates: the engine's temporaries reuse pages
  xla_cpu.configure('hapvr_engine')   # before JAX starts: XLA reads its options once
  # matplotlib is imported by a child while this process imports JAX and scores (half a second of a small run)
  plotter = plot_worker.start() if config.get('plots', True) else None
  from hapvr_jax import engine_state
  try:
    with cli.evaluation(config, workdir, 'configs/fivr_5k.py:demo', OUTPUTS, validate.evaluation):
      try:
        metrics = evaluate(config, workdir, plotter)
      except engine_state.Stopped as e:
        print(f'{e}; rerun the same command to resume', flush=True)
        return 0
  finally:
    if plotter is not None:
      plotter.close()
  import jax
  if jax.process_index() != 0:
    return 0
  shown = {k: v for k, v in metrics.items() if isinstance(v, float) and '/' not in k}
  print(f'{metrics["dataset"]}: ' + '  '.join(f'{k}={v:.4f}' for k, v in sorted(shown.items())
                                                if k not in ('seconds', 'pairs_per_second')))
  print(f'{metrics["pairs"]:,} pairs in {time.time() - t0:.1f}s ({metrics["pairs_per_second"]:.0f} pairs/s); '
        f'wrote {os.path.join(workdir, "metrics.json")}')
  return 0


if __name__ == '__main__':
  cli.run_config_program(run, 'Evaluation config file (configs/fivr_5k.py, ...).',
                         'Output folder for metrics.json and the other outputs.')
