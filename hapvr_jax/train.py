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
the exact next batch, on any device count. WORKDIR/model_config.json makes the workdir a checkpoint
directory that `hapvr_jax.evaluate --config.checkpoint=WORKDIR` reads.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from common_jax import checkpoint
from common_jax import cli
from common_jax import distributed
from common_jax import mesh as mesh_lib
from common_jax import metric_writer
from common_jax import preemption
from hapvr_jax import model as model_lib
from hapvr_jax import train_plots
from hapvr_jax import train_step as step_lib


class TrainingError(RuntimeError):
  pass


class Evaluator:
  """FIVR-style evaluation of the current parameters; the engine (and its compilations) is built once."""

  def __init__(self, eval_config, model_config, mesh):
    from hapvr_jax import benchmarks, engine as engine_lib, features as features_lib
    self.bench = benchmarks.load_benchmark(eval_config.dataset, eval_config.annotations)
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
  from input_pipeline import pipeline, shards
  if not config.data.path:
    raise cli.UsageError('config.data.path is empty: give a shard directory (input_pipeline.make_shards) '
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
  os.makedirs(workdir, exist_ok=True)
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

  mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints, item_names=('state', 'data'))
  abstract = step_lib.abstract_state(model_config, config, mesh)
  start, state = checkpoint.restore_train(mngr, abstract, data_iter)
  if state is None:
    start = 0
    state = jax.device_put(step_lib.init_state(model_config, config, config.seed), mesh_lib.replicated(mesh))
    checkpoint.write_model_config(workdir, model_config.to_dict())
    logging.info('starting from scratch in %s', workdir)
  else:
    logging.info('resumed from step %d in %s', start, workdir)
  train_fn = step_lib.make_train_step(model_config, config, mesh)
  writer = metric_writer.MetricWriter(workdir, 'metrics')
  stop = preemption.StopSignal()

  net = model_lib.SimilarityNetwork(model_config)
  pair_maps = jax.jit(lambda p, x: _pair_maps(net, p, x))   # host inputs: runs on this process's device
  last_batch = {}

  def evaluate(step, state):
    if evaluator is None:
      return
    params = jax.device_get(state['params'])
    runs = [('raw-feature Chamfer baseline', True)] if step == 0 else []
    for name, baseline in runs + [('untrained' if step == 0 else 'trained', False)]:
      m = evaluator(params, baseline=baseline)
      writer.write_scalars(step, {'model': name, **m})
      print(f'step {step:>6}  eval {name:<30} mAP={m["mAP"]:.4f}  ({m["eval_seconds"]:.1f}s)', flush=True)
    if writer.is_writer:
      train_plots.plot_map_curve(writer.path, os.path.join(workdir, 'plots', 'map.png'))
      if last_batch:
        regions = np.asarray(last_batch['regions'][0], np.float32)   # group 0: weak clip 0, its strong view
        f2f, out = jax.device_get(pair_maps(params, regions[np.array([0, regions.shape[0] // 2])]))
        train_plots.plot_similarity(f2f, out, os.path.join(workdir, 'plots', f'similarity_{step:06d}.png'),
                                    f'step {step}: weak clip vs its strong view')

  if start == 0:
    evaluate(0, state)
  total = config.total_steps
  pending, last, t_log, s_log, t_start = [], {}, time.time(), start, time.time()
  step = start
  try:
    while step < total:
      host_batch = next(data_iter)
      batch = step_lib.put_batch(host_batch, mesh, config)
      state, metrics = train_fn(state, batch)
      pending.append(metrics)
      step += 1
      at_log = step % config.log_every == 0 or step == total
      # one process: stop at once; several: agree at a log step, which every process reaches
      stopping = (at_log or jax.process_count() == 1) and stop.requested()
      at_ckpt = step % config.checkpoint_every == 0 or step == total or stopping
      if at_log or at_ckpt:   # never log or checkpoint past a non-finite step
        bad = int(jax.device_get(state['nonfinite_step']))
        if bad != step_lib.NO_STEP:
          raise TrainingError(f'non-finite loss or gradient at step {bad}; the last checkpoint before it is '
                              f'kept in {workdir}/ckpt (lower the learning rate or check the data)')
      if at_log or stopping:
        host = jax.device_get(pending)
        last = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        now = time.time()
        rate = (step - s_log) / max(now - t_log, 1e-9)
        last.update({'steps_per_second': rate, 'clips_per_second': rate * config.data.groups * 2 *
                     config.data.sources_per_group, 'eta_minutes': (total - step) / max(rate, 1e-9) / 60})
        writer.write_scalars(step, last, stream='train')
        print(f'step {step:>6}/{total}  loss={last["loss"]:.4f}  lr={last["lr"]:.2e}  '
              f'|g|={last["grad_norm"]:.3f}  {rate:.2f} steps/s  ETA {last["eta_minutes"]:.1f} min', flush=True)
        pending, t_log, s_log = [], now, step
      if at_ckpt:
        checkpoint.save_train(mngr, step, state, data_iter, force=True)
      if config.eval_every and (step % config.eval_every == 0 or step == total):
        last_batch['regions'] = host_batch['regions']
        evaluate(step, state)
        t_log = time.time()   # keep evaluation time out of steps/s
      if stopping:
        print(f'stopped by {stop.signal_name} at step {step}; checkpoint saved in {workdir}/ckpt; rerun the '
              'same command to resume', flush=True)
        break
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    stop.restore()
    if hasattr(data_iter, 'close'):
      data_iter.close()
  logging.info('done at step %d in %.1f s', step, time.time() - t_start)
  return {'step': step, **last}
