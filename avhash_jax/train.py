"""AVHash supervised-contrastive training: the loop, per-epoch validation, best checkpoint, test.

  train_and_evaluate(config, workdir)

* Data: the training list's videos are the anchors of each epoch (tuples from `input_pipeline.avhash.sampling`, read by
  the Grain pipeline `input_pipeline.avhash.pipeline` from the HDF5 files or ArrayRecord shards).
* Step: `avhash_jax.train_step` (three dropout forwards, five InfoNCE terms, Adam eps 1e-3), data-parallel.
* Validation at step 0 (the untrained network) and after every `eval_every_epochs` epochs: codes of the val
  list (queries) and of the retrieval list (database: the training set, as the original), Hamming ranking,
  mAP over the whole ranking (`mAP@all`, the original's selection criterion) plus mAP@K / P@K at config.ks.
  Each evaluation is a line of WORKDIR/metrics.jsonl; training scalars go to WORKDIR/train.jsonl; both also
  to WORKDIR/tensorboard/.
* Checkpoints: WORKDIR/ckpt (Orbax: params, Adam state, step, Grain iterator position) at every epoch end,
  every `checkpoint_every` steps and on SIGTERM/SIGINT; rerunning the same command resumes, on any device
  count (the loop, and why a kill loses nothing: common_jax.train_loop). Whenever the validation mAP
  improves, the parameters are written to WORKDIR/best (a checkpoint directory for `avhash_jax.evaluate
  --config.checkpoint=WORKDIR/best`, replaced atomically) with best.json (step, epoch, mAP), before the
  checkpoint of that step; a resumed run takes the best so far from the validations in metrics.jsonl up to its
  checkpoint.
* At the end, with a test list, the best checkpoint is evaluated as `avhash_jax.evaluate` does (test list vs
  retrieval list) into WORKDIR/test/{metrics.json, codes.h5, pr_curve.png}.
"""
from __future__ import annotations

import os
import shutil
import time

import jax
import numpy as np

from input_pipeline.avhash import lists as data_lists
from avhash_jax import evaluate as evaluate_lib
from avhash_jax import metrics as metrics_lib
from avhash_jax import model as model_lib
from avhash_jax import train_step as step_lib
from common_jax import checkpoint
from common_jax import cli
from common_jax import distributed
from common_jax import io_util
from common_jax import mesh as mesh_lib
from common_jax import metric_writer
from common_jax import train_loop

BEST = 'best'


TrainingError = train_loop.TrainingError


class Validator:
  """Codes of the val list (queries) and the retrieval list (database) → mAP@all, mAP@K, P@K (a
  train_loop.Evaluator)."""

  def __init__(self, config, model_config, features, queries, database, mesh):
    self.config, self.model_config, self.features, self.mesh = config, model_config, features, mesh
    (self.q_ids, self.q_labels), (self.db_ids, self.db_labels) = queries, database

  def __call__(self, params) -> dict:
    t0 = time.time()
    codes = lambda ids, desc: evaluate_lib.extract_codes(
        self.model_config, params, self.features, ids, self.config.eval_batch_size, self.mesh,
        progress=self.config.progress and len(ids) >= 20_000, desc=desc)
    db_codes = codes(self.db_ids, 'validation database codes')
    q_codes = codes(self.q_ids, 'validation query codes')
    ks = tuple(int(k) for k in self.config.ks)
    res = metrics_lib.evaluate(q_codes, self.q_labels, db_codes, self.db_labels, ks=ks, with_all=True,
                               with_pr=False, chunk=self.config.metric_chunk)
    out = {'mAP': res['mAP@all']}
    out.update({k: v for k, v in res.items() if k.startswith(('mAP@', 'P@')) and not k.endswith('_ssvh')})
    out['bit_balance'] = float(np.mean(db_codes > 0))
    out['eval_seconds'] = time.time() - t0
    return out


def _prepare_demo(config, workdir):
  from avhash_jax import demo_data
  d = config.demo
  make = lambda: demo_data.make_demo(
      os.path.join(workdir, 'demo_data'), dim=config.model.hidden_size, tokens=config.model.tokens,
      visual_groups=d.visual_groups, audio_groups=d.audio_groups, styles=d.styles,
      train_per_class=d.train_per_class, val_per_class=d.val_per_class, test_per_class=d.test_per_class, seed=d.seed)
  paths = distributed.primary_first(make, 'avhash demo data written')
  with config.unlocked():
    for key, path in paths.items():
      config[key] = path
    config.retrieval_list = paths['train_list']
    config.num_classes = d.visual_groups * d.audio_groups


def _read_lists(config):
  if config.dataset not in evaluate_lib.LIST_FORMAT:
    raise cli.UsageError(f'config.dataset={config.dataset!r}; expected one of {sorted(evaluate_lib.LIST_FORMAT)}')
  fmt = evaluate_lib.LIST_FORMAT[config.dataset]
  if not config.retrieval_list:
    with config.unlocked():
      config.retrieval_list = config.train_list      # the original's database is the training set
  for key in ('train_list', 'val_list'):
    if not config[key]:
      raise cli.UsageError(f'config.{key} is empty')
  lists = {}
  for key in ('train_list', 'val_list', 'retrieval_list'):
    ids, labels = data_lists.read_list(config[key], fmt)
    if labels.max() >= config.num_classes:
      raise data_lists.ListError(f'{config[key]}: a label exceeds config.num_classes={config.num_classes}')
    lists[key] = (ids, labels)
  data_lists.check_train_classes(lists['train_list'][1], config.train_list, config.n_neg)
  return lists


def _open_features(config, model_config):
  from input_pipeline.avhash import shards as av_shards
  if not config.shards:
    for key in ('image_h5', 'audio_h5'):
      if not config[key]:
        raise cli.UsageError(f'config.{key} is empty (or set config.shards)')
  return av_shards.open_features(config.image_h5, config.audio_h5, config.shards,
                                 frames=model_config.tokens, dim=model_config.hidden_size)


def _initial_params(config, model_config):
  if not config.init_checkpoint:
    return model_lib.init_params(model_config, seed=config.seed)
  params, saved = checkpoint.load_params(config.init_checkpoint)
  saved = model_lib.ModelConfig.from_dict(saved, where=config.init_checkpoint)
  if saved != model_config:
    raise cli.UsageError(f'{config.init_checkpoint}: its architecture {saved.to_dict()} differs from the '
                         f'configured {model_config.to_dict()} (config.model, config.bits)')
  return params


def _save_best(workdir, params, model_config, record) -> None:
  """WORKDIR/best replaced as a whole: written beside it, then swapped in by renames. Called on every process
  (Orbax's save is collective); process 0 alone removes and renames, between barriers."""
  final = os.path.join(workdir, BEST)
  tmp, old = final + '.tmp', final + '.old'
  primary = jax.process_index() == 0
  if primary:
    for d in (tmp, old):
      shutil.rmtree(d, ignore_errors=True)
  distributed.barrier('avhash best: cleared')
  checkpoint.save_params(tmp, params, model_config.to_dict(), step=record['step'])
  distributed.barrier('avhash best: written')   # no process may still be inside Orbax's handling of tmp when it is renamed
  if primary:
    io_util.write_json(os.path.join(tmp, 'best.json'), record)
    if os.path.exists(final):
      os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  distributed.barrier('avhash best: replaced')


def _best_until(workdir, step) -> dict:
  """The best validation (step, epoch, mAP) among the rows of metrics.jsonl up to `step`: what best/ holds at
  the checkpoint of `step` (rows of later steps may come from an attempt killed after that checkpoint)."""
  best = {'mAP': -1.0}
  for row in metric_writer.read_rows(os.path.join(workdir, 'metrics.jsonl'), until=step):
    if isinstance(row.get('mAP'), float) and row['mAP'] > best['mAP']:
      best = {'step': row['step'], 'epoch': row.get('epoch', 0), 'mAP': row['mAP']}
  return best


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) training in `workdir`; returns the best validation record and the test metrics."""
  from input_pipeline.avhash import pipeline as av_pipeline
  cli.enable_compilation_cache(config.compilation_cache)
  if config.demo.enabled:
    _prepare_demo(config, workdir)
  model_config = model_lib.ModelConfig.from_dict({**config.model.to_dict(), 'bits': config.bits},
                                                 where='config.model')
  lists = _read_lists(config)
  train_ids, train_labels = lists['train_list']
  features = _open_features(config, model_config)
  for key in ('train_list', 'val_list', 'retrieval_list'):
    features.check_ids(lists[key][0], config[key])
  mesh = mesh_lib.make_mesh(config.mesh)
  steps_per_epoch = av_pipeline.steps_per_epoch(len(train_ids), config.batch_size)
  total = config.epochs * steps_per_epoch
  data_iter = av_pipeline.make_iterator(
      features, train_ids, train_labels, config, seed=config.seed, epochs=config.epochs,
      shape=(model_config.tokens, model_config.hidden_size), process_index=jax.process_index(),
      process_count=jax.process_count())
  # Validation (and the final test) run whole on each process's own devices: every process gets the same
  # metrics and the same best-checkpoint decision, with no cross-host gather of codes.
  local_mesh = mesh if jax.process_count() == 1 else mesh_lib.make_mesh(devices=jax.local_devices())
  validator = Validator(config, model_config, features, lists['val_list'], lists['retrieval_list'], local_mesh)

  loop = train_loop.Loop(workdir, keep_checkpoints=config.keep_checkpoints, data_iter=data_iter,
                         model_config=model_config.to_dict())
  try:
    start, state, resumed = loop.restore_or_init(
        step_lib.abstract_state(model_config, config, mesh),
        lambda: jax.device_put(step_lib.init_state(_initial_params(config, model_config), config),
                               mesh_lib.replicated(mesh)))
    plan = (f'{len(train_ids)} training videos, {steps_per_epoch} steps of {config.batch_size} tuples per epoch, '
            f'{config.epochs} epochs = {total} steps on {jax.device_count()} device(s)')
    if resumed:
      print(f'resumed from step {start} (epoch {start // steps_per_epoch}) in {workdir}\n{plan}', flush=True)
    train_fn = step_lib.make_train_step(model_config, config, mesh, train=config.train_dropout)
    best = _best_until(workdir, start) if resumed else {'mAP': -1.0}

    def summarize(step, host, seconds):
      row = train_loop.mean_metrics(host, skip=('tuples',))
      rate = len(host) / max(seconds, 1e-9)
      row.update({'epoch': step / steps_per_epoch, 'lr': config.lr, 'steps_per_second': rate,
                  'tuples_per_second': sum(float(m['tuples']) for m in host) / max(seconds, 1e-9),
                  'eta_minutes': (total - step) / max(rate, 1e-9) / 60})
      return row, (f'step {step:>6}/{total} epoch {step / steps_per_epoch:6.2f}  loss={row["loss"]:.4f}  '
                   f'L_V={row["loss/L_V"]:.4f}  |g|={row["grad_norm"]:.3f}  {rate:.2f} steps/s  '
                   f'ETA {row["eta_minutes"]:.1f} min')

    def validate(step, params):
      nonlocal best
      m = validator(params)
      epoch = step // steps_per_epoch
      loop.writer.write_scalars(step, {'model': 'untrained' if step == 0 else 'trained', 'epoch': epoch, **m})
      improved = m['mAP'] > best['mAP']   # the same on every process: validation runs whole on each
      if improved:
        best = {'step': step, 'epoch': epoch, 'mAP': m['mAP']}
        _save_best(workdir, params, model_config, best)
      print(f'step {step:>6} epoch {epoch:>4}  val mAP@all={m["mAP"]:.4f}' + (' (best)' if improved else '')
            + f'  ({m["eval_seconds"]:.1f}s)', flush=True)
      if step == 0:
        print(plan, flush=True)

    at_epoch = lambda s: s % steps_per_epoch == 0
    schedule = train_loop.Schedule(
        total, log=lambda s: train_loop.itstime(s, config.log_every) or at_epoch(s),
        checkpoint=lambda s: at_epoch(s) or train_loop.itstime(s, config.checkpoint_every),
        evaluate=lambda s: (at_epoch(s) and train_loop.itstime(s // steps_per_epoch, config.eval_every_epochs))
        or s == total)
    step, last = loop.run(state, start, schedule, train_fn=train_fn,
                          next_batch=lambda: step_lib.put_batch(next(data_iter), mesh, config),
                          summarize=summarize, evaluate=validate,
                          nonfinite_hint='lower config.lr or check the features')
  finally:
    loop.close()
    features.close()
    if hasattr(data_iter, 'close'):
      data_iter.close()
  result = {'step': step, 'best': best, **last}
  if step >= total and config.test_list and best.get('step') is not None:   # every process; process 0 writes
    with config.unlocked():
      config.checkpoint, config.all_vs_all = os.path.join(workdir, BEST), False
    test = evaluate_lib.evaluate(config, os.path.join(workdir, 'test'), mesh=local_mesh)
    result['test'] = {k: v for k, v in test.items() if k.startswith(('mAP', 'P@', 'R@'))}
    print(f'test ({test["num_queries"]} queries vs {test["num_database"]} videos), best checkpoint (step '
          f'{best["step"]}): mAP@all={test["mAP@all"]:.4f}  ' +
          '  '.join(f'mAP@{k}={test[f"mAP@{k}"]:.4f}' for k in config.ks[:3]), flush=True)
  return result
