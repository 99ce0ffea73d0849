"""The training loop both systems run (HAP-VR and AVHash supply data, model, step function and evaluation):
restore or initialise, step, log, evaluate, checkpoint, stop on SIGTERM/SIGINT, clean up.

A kill at any moment loses nothing because of one order. At a step that logs, evaluates and checkpoints, the
loop writes the training row, then evaluates (the evaluation's rows, plots and decisions such as AVHash's
best/), and only then saves the checkpoint. Everything the checkpoint of step s stands for was written before
it committed, and whatever was written after it belongs to steps > s. A resumed run drops the rows of steps
after its checkpoint (MetricWriter.rewind) and runs those steps again, evaluations included, from the same
state and the same batches; a fresh start drops every row of an earlier attempt.

Kill points for fault-injection tests (common_jax.faults): `train.step` before each step is dispatched (its
first visit comes before the step function compiles), `train.evaluated` after each evaluation (step 0's
included), before the checkpoint of that step, and `train.checkpointed` after each checkpoint commits.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import jax
import numpy as np

from common_jax import checkpoint
from common_jax import faults
from common_jax import metric_writer
from common_jax import preemption

NO_STEP = np.iinfo(np.int32).max   # the state's `nonfinite_step` while every step has been finite


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss): the message names the step."""


def new_state(params, tx) -> dict:
  """The train state of both systems, a plain pytree that Orbax saves as is: params, the optax `tx` state
  of them, the step and `nonfinite_step`."""
  import jax.numpy as jnp
  return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32),
          'nonfinite_step': jnp.full((), NO_STEP, jnp.int32)}


def apply_if_finite(tx, state, loss, grads):
  """(next state, gradient norm): one `tx` update of `state`, taken only when the loss and the gradient are
  finite. Otherwise params and optimizer state stay as they were, and `nonfinite_step` keeps the first such
  step for the loop to report (the step function never stops by itself: it runs inside jit)."""
  import jax.numpy as jnp
  import optax
  step = state['step']
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  return {'params': keep(params, state['params']), 'opt_state': keep(opt_state, state['opt_state']),
          'step': step + 1,
          'nonfinite_step': jnp.where(finite, state['nonfinite_step'],
                                      jnp.minimum(state['nonfinite_step'], step))}, grad_norm


class Evaluator(Protocol):
  """In-training evaluation (HAP-VR's Evaluator, AVHash's Validator): metrics of host parameters, 'mAP' and
  'eval_seconds' among them."""

  def __call__(self, params) -> Mapping[str, Any]: ...


def itstime(step: int, every: int, total: Optional[int] = None) -> bool:
  """True at every `every`-th step (never when every <= 0) and at the last step `total`."""
  return (every > 0 and step % every == 0) or step == total


def mean_metrics(host: Sequence[Mapping[str, Any]], skip=()) -> dict:
  """The mean over steps of each of the step function's scalars (in their order), less `skip`."""
  return {k: float(np.mean([m[k] for m in host])) for k in host[0] if k not in skip}


@dataclasses.dataclass
class Schedule:
  """When things happen, as predicates of the step just taken (1..total)."""
  total: int
  log: Callable[[int], bool]
  checkpoint: Callable[[int], bool]
  evaluate: Callable[[int], bool]


class Loop:
  """One training run in `workdir`: its checkpoint manager, metric writer and stop signal.

  The state is a pytree with 'params' and 'nonfinite_step' (NO_STEP while every step has been finite)."""

  def __init__(self, workdir: str, *, keep_checkpoints: int, data_iter, model_config: dict):
    self.workdir = workdir
    self.data_iter = data_iter
    self.model_config = model_config
    self.writer = metric_writer.MetricWriter(workdir, 'metrics', streams=('train',))
    self.mngr = checkpoint.manager(workdir, max_to_keep=keep_checkpoints, item_names=('state', 'data'),
                                   writer=True)
    self.stop = preemption.StopSignal()
    self._config_written = False

  def restore_or_init(self, abstract_state, init_state: Callable[[], Any]):
    """(start step, state, resumed): the newest readable checkpoint, or `init_state()` from scratch. The
    logs are rewound to match."""
    start, state = checkpoint.restore_train(self.mngr, abstract_state, self.data_iter)
    resumed = state is not None
    if not resumed:
      start, state = 0, init_state()
    self.writer.rewind(start if resumed else None)
    return start, state, resumed

  def run(self, state, start: int, schedule: Schedule, *, train_fn, next_batch: Callable[[], Any],
          summarize: Callable[[int, list, float], tuple], evaluate: Optional[Callable[[int, Any], None]],
          nonfinite_hint: str):
    """Trains from `start` to schedule.total (or a stop signal); returns (step, last training row).

    summarize(step, host metrics of the steps since the last row, seconds) -> (row, console line);
    evaluate(step, host params): the system's evaluation, at step 0 of a fresh run and where the schedule
    says (its rows go to self.writer)."""
    pending, last, step = [], {}, start
    if start == 0 and evaluate is not None:
      evaluate(0, jax.device_get(state['params']))
      faults.point('train.evaluated')
    t_log = time.time()
    while step < schedule.total:
      faults.point('train.step')
      state, metrics = train_fn(state, next_batch())
      pending.append(metrics)
      step += 1
      at_log = schedule.log(step)
      # one process: stop at once; several: agree at a log step, which every process reaches
      stopping = (at_log or jax.process_count() == 1) and self.stop.requested()
      at_eval = evaluate is not None and schedule.evaluate(step)
      at_ckpt = schedule.checkpoint(step) or stopping
      if at_log or at_eval or at_ckpt:   # never log, evaluate or checkpoint past a non-finite step
        self._check_finite(state, nonfinite_hint)
      if at_log or stopping:
        now = time.time()
        last, line = summarize(step, jax.device_get(pending), now - t_log)
        self.writer.write_scalars(step, last, stream='train')
        print(line, flush=True)
        pending, t_log = [], now
      if at_eval:   # before the checkpoint: a kill in between repeats this evaluation on resume
        evaluate(step, jax.device_get(state['params']))
        faults.point('train.evaluated')
        t_log = time.time()   # keep evaluation time out of steps/s
      if at_ckpt:
        self._save(step, state)
        faults.point('train.checkpointed')
      if stopping:
        print(f'stopped by {self.stop.signal_name} at step {step}; checkpoint saved in {self.workdir}/ckpt; '
              'rerun the same command to resume', flush=True)
        break
    return step, last

  def _check_finite(self, state, hint: str) -> None:
    bad = int(jax.device_get(state['nonfinite_step']))
    if bad != NO_STEP:
      raise TrainingError(f'non-finite loss or gradient at step {bad}; the last checkpoint before it is kept in '
                          f'{self.workdir}/ckpt ({hint})')

  def _save(self, step: int, state) -> None:
    if not self._config_written:   # with the first checkpoint: the workdir becomes a checkpoint directory
      checkpoint.write_model_config(self.workdir, self.model_config)
      self._config_written = True
    checkpoint.save_train(self.mngr, step, state, self.data_iter, force=True)

  def close(self) -> None:
    try:
      self.mngr.wait_until_finished()
      self.mngr.close()
    finally:
      self.writer.close()
      self.stop.restore()

