"""HAP-VR self-supervised training: feature shards -> Grain pipeline -> sharded jitted step -> Orbax.

The loop, in order, per step: take the next batch of loss groups from the Grain iterator, place it on the
mesh, run the step (hapvr_jax.train_step). Every `log_every` steps it writes the mean of each loss term, the
learning rate, the gradient norm, steps/s and the ETA (WORKDIR/train.jsonl + TensorBoard), and stops the
run if a step had a non-finite loss or gradient (naming the step). Every `checkpoint_every` steps, at the
end, and on SIGTERM/SIGINT it saves params, optimizer state, step and the data iterator position to
WORKDIR/ckpt/ (Orbax). Every `eval_every` steps, and at step 0, it evaluates FIVR-5K (or the demo's
synthetic split) through the evaluation engine, writes one line per evaluation to WORKDIR/metrics.jsonl
and draws WORKDIR/plots/ (mAP against the step; the frame-similarity map and comparator output of one
training pair).

Rerunning the same command resumes from the latest checkpoint: same parameters, optimizer moments, step and
the exact next batch, on any device count; the loop itself (its order, which makes a kill lose nothing, and
the log rewind on resume) is common_jax.train_loop. WORKDIR/model_config.json, written with the first
checkpoint, makes the workdir a checkpoint directory that `hapvr_jax.evaluate --config.checkpoint=WORKDIR`
reads.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from common_jax import cli
from common_jax import distributed
from common_jax import mesh as mesh_lib
from common_jax import train_loop
from hapvr_jax import model as model_lib
from hapvr_jax import train_plots
from hapvr_jax import train_step as step_lib


TrainingError = train_loop.TrainingError


class Evaluator:
  """FIVR-style evaluation of the current parameters (a train_loop.Evaluator; `baseline=True` scores the raw
  features instead); the engine (and its compilations) is built once."""

  def __init__(self, eval_config, model_config, mesh):
    from hapvr_jax import engine as engine_lib, features as features_lib
    from hapvr_jax import datasets
    self.bench = datasets.load_benchmark(eval_config.dataset, eval_config.annotations)
    self.features, self.queries, self.database = features_lib.open_split(
        self.bench, eval_config.features, model_config)
    make = lambda **kw: engine_lib.Engine(model_config, None, mesh, engine_lib.EngineConfig(
        **{**eval_config.engine.to_dict(), **kw}))
    self.engine, self.baseline_engine = make(), make(features_only=True)
    self.progress = eval_config.progress

  def __call__(self, params, baseline: bool = False) -> dict:
    engine = self.baseline_engine if baseline else self.engine
    engine.set_params(params)
    scores = engine.score(self.features, self.queries, self.database, progress=self.progress)
    metrics = {k: v for k, v in self.bench.evaluate(scores, self.queries, self.database).items()
               if isinstance(v, float)}
    metrics['mAP'] = metrics.get('DSVR', metrics.get('mAP', float('nan')))
    metrics['eval_seconds'] = engine.stats['seconds']
    return metrics


def _pair_maps(net, params, x):
  """f2f map [T, T] and comparator output [T/4, T/4] of clip x[0] against clip x[1]."""
  call = lambda *a, method: net.apply({'params': params}, *a, method=method)
  idx = call(x, method=model_lib.SimilarityNetwork.index_video)
  f2f = call(idx[:1], idx[1:], method=model_lib.SimilarityNetwork.frame_to_frame)
  out, _, _ = call(call(f2f, method=model_lib.SimilarityNetwork.comparator_input),
                   method=model_lib.SimilarityNetwork.compare)
  return f2f[0, 0], out[0, 0]


def _prepare_demo(config, workdir):
  from hapvr_jax import demo_data
  d = config.demo
  make = lambda: demo_data.make_demo(os.path.join(workdir, 'demo_data'), dims=config.model.dims,
                                     window=config.data.window, train_videos=d.train_videos,
                                     num_queries=d.num_queries, num_database=d.num_database, seed=config.seed)
  data = distributed.primary_first(make, 'hapvr demo data written')
  with config.unlocked():
    config.data.path = data['shards']
    config.eval.features, config.eval.annotations = data['features'], data['annotations']


def _open_data(config, model_config):
  from input_pipeline.hapvr import pipeline
  from input_pipeline.hapvr import shards
  if not config.data.path:
    raise cli.UsageError('config.data.path is empty: give a shard directory (input_pipeline.hapvr.make_shards) '
                         'or the extractor\'s HDF5 views')
  store = shards.open_store(config.data.path)
  info = store.info
  if info.dims != model_config.dims or info.regions != 9:
    raise cli.UsageError(f'{config.data.path}: views have {info.regions} regions x {info.dims} dims; '
                         f'config.model.dims={model_config.dims} and 9 regions are expected')
  iterator = pipeline.make_iterator(store, config.data, seed=config.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count())
  return store, iterator


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) training in `workdir`; returns the last logged metrics."""
  cli.enable_compilation_cache(config.compilation_cache)
  if config.demo.enabled:
    _prepare_demo(config, workdir)
  model_config = model_lib.ModelConfig.from_dict({**config.model.to_dict(), 'source': 'jax'},
                                                 where='config.model')
  mesh = mesh_lib.make_mesh(config.mesh)
  store, data_iter = _open_data(config, model_config)
  # Evaluation runs on this process's devices (with several processes the engine splits the database blocks
  # between them and combines the scores), never on the global training mesh.
  eval_mesh = mesh if jax.process_count() == 1 else mesh_lib.make_mesh(devices=jax.local_devices())
  evaluator = Evaluator(config.eval, model_config, eval_mesh) if config.eval.features else None
  total, t_start = config.total_steps, time.time()
  loop = train_loop.Loop(workdir, keep_checkpoints=config.keep_checkpoints, data_iter=data_iter,
                         model_config=model_config.to_dict())
  try:
    start, state, resumed = loop.restore_or_init(
        step_lib.abstract_state(model_config, config, mesh),
        lambda: jax.device_put(step_lib.init_state(model_config, config, config.seed), mesh_lib.replicated(mesh)))
    logging.info('%s in %s', f'resumed from step {start}' if resumed else 'starting from scratch', workdir)
    train_fn = step_lib.make_train_step(model_config, config, mesh)
    net = model_lib.SimilarityNetwork(model_config)
    pair_maps = jax.jit(lambda p, x: _pair_maps(net, p, x))   # host inputs: runs on this process's device
    last_batch = {}

    def next_batch():
      last_batch.update(next(data_iter))
      return step_lib.put_batch(last_batch, mesh, config)

    def summarize(step, host, seconds):
      row = train_loop.mean_metrics(host)
      rate = len(host) / max(seconds, 1e-9)
      row.update({'steps_per_second': rate, 'clips_per_second': rate * config.data.groups * 2 *
                  config.data.sources_per_group, 'eta_minutes': (total - step) / max(rate, 1e-9) / 60})
      return row, (f'step {step:>6}/{total}  loss={row["loss"]:.4f}  lr={row["lr"]:.2e}  |g|={row["grad_norm"]:.3f}'
                   f'  {rate:.2f} steps/s  ETA {row["eta_minutes"]:.1f} min')

    def evaluate(step, params):
      runs = [('raw-feature Chamfer baseline', True)] if step == 0 else []
      for name, baseline in runs + [('untrained' if step == 0 else 'trained', False)]:
        m = evaluator(params, baseline=baseline)
        loop.writer.write_scalars(step, {'model': name, **m})
        print(f'step {step:>6}  eval {name:<30} mAP={m["mAP"]:.4f}  ({m["eval_seconds"]:.1f}s)', flush=True)
      if loop.writer.is_writer:
        train_plots.plot_map_curve(loop.writer.path, os.path.join(workdir, 'plots', 'map.png'))
        if step > 0:   # the batch of this step: group 0, weak clip 0 and its strong view
          regions = np.asarray(last_batch['regions'][0], np.float32)
          f2f, out = jax.device_get(pair_maps(params, regions[np.array([0, regions.shape[0] // 2])]))
          train_plots.plot_similarity(f2f, out, os.path.join(workdir, 'plots', f'similarity_{step:06d}.png'),
                                      f'step {step}: weak clip vs its strong view')

    schedule = train_loop.Schedule(
        total, log=lambda s: train_loop.itstime(s, config.log_every, total),
        checkpoint=lambda s: train_loop.itstime(s, config.checkpoint_every, total),
        evaluate=lambda s: config.eval_every > 0 and train_loop.itstime(s, config.eval_every, total))
    step, last = loop.run(state, start, schedule, train_fn=train_fn, next_batch=next_batch, summarize=summarize,
                          evaluate=evaluate if evaluator is not None else None,
                          nonfinite_hint='lower the learning rate or check the data')
  finally:
    loop.close()
    if hasattr(data_iter, 'close'):
      data_iter.close()
  logging.info('done at step %d in %.1f s', step, time.time() - t_start)
  return {'step': step, **last}
