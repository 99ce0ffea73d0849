"""The shared training-loop pieces: the period helper, the metric writer's lazy files and rewind, the fallback
past a damaged checkpoint, and a failed start that leaves nothing behind. (Kills of real runs:
fault_training_test.py.)"""
import glob
import json
import logging
import os

import jax
import numpy as np
import pytest

from common_jax import checkpoint
from common_jax import train_loop
from common_jax.metric_writer import MetricWriter


def test_itstime():
  assert [s for s in range(1, 11) if train_loop.itstime(s, 3, 10)] == [3, 6, 9, 10]
  assert [s for s in range(1, 11) if train_loop.itstime(s, 0, 10)] == [10]
  assert [s for s in range(1, 11) if train_loop.itstime(s, -1)] == []


def _events(directory):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(directory), purge_orphaned_data=False)   # so that a repeated step shows
  acc.Reload()
  return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def _steps(path):
  return [json.loads(line)['step'] for line in open(path)]


def test_metric_writer_opens_lazily_and_rewinds_to_a_checkpoint(tmp_path):
  w = MetricWriter(str(tmp_path / 'run'), 'metrics', streams=('train',))
  w.rewind(None)
  assert not os.path.exists(tmp_path / 'run')             # nothing until the first row
  for step in range(6):
    w.write_scalars(step, {'loss': float(step)}, stream='train')
    if step % 2 == 0:
      w.write_scalars(step, {'mAP': step / 10, 'model': 'trained'})
  w.close()
  with open(tmp_path / 'run' / 'train.jsonl', 'a') as f:
    f.write('{"step": 6, "lo')                            # a row cut short by a kill
  event_file = glob.glob(str(tmp_path / 'run' / 'tensorboard' / '*tfevents*'))[0]
  with open(event_file, 'ab') as f:
    f.write(b'\x20\0\0\0')                                # so is an event record

  # An attempt killed after the checkpoint of step 3 logged steps 4 and 5: the resumed run logs them again.
  w = MetricWriter(str(tmp_path / 'run'), 'metrics', streams=('train',))
  w.rewind(3)
  assert _steps(tmp_path / 'run' / 'train.jsonl') == [0, 1, 2, 3]
  assert _steps(tmp_path / 'run' / 'metrics.jsonl') == [0, 2]
  for step in (4, 5):
    w.write_scalars(step, {'loss': float(step)}, stream='train')
  w.write_scalars(4, {'mAP': 0.4, 'model': 'trained'})
  w.close()
  assert _steps(tmp_path / 'run' / 'train.jsonl') == [0, 1, 2, 3, 4, 5]
  assert _events(tmp_path / 'run' / 'tensorboard') == {'loss': [0, 1, 2, 3, 4, 5], 'mAP': [0, 2, 4]}

  w.rewind(None)                                          # a fresh start: no row of an earlier attempt
  assert sorted(os.listdir(tmp_path / 'run')) == []


def _state(value):
  return {'params': {'w': np.full((4, 3), value, np.float32)}, 'nonfinite_step': np.int32(train_loop.NO_STEP)}


def _abstract():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), _state(0))


def damage_checkpoint(directory, step):
  """What a bad disk or a stray copy does: the step's data files overwritten with garbage of the same size."""
  for path in glob.glob(os.path.join(directory, 'ckpt', str(step), 'state', '**', '*'), recursive=True):
    if os.path.isfile(path) and not path.endswith('.txt'):
      with open(path, 'r+b') as f:
        f.write(np.random.default_rng(0).bytes(os.path.getsize(path)))


def test_training_restore_falls_back_past_a_damaged_step(tmp_path, caplog):
  d = str(tmp_path)
  mngr = checkpoint.manager(d, max_to_keep=3, writer=True)
  for step in (1, 2, 3):
    checkpoint.save_train(mngr, step, _state(step), force=True)
  mngr.close()
  damage_checkpoint(d, 3)
  mngr = checkpoint.manager(d, max_to_keep=3, writer=True)
  with caplog.at_level(logging.WARNING):
    step, state = checkpoint.restore_train(mngr, _abstract())
  assert step == 2 and np.all(np.asarray(state['params']['w']) == 2)
  assert 'checkpoint step 3 in' in caplog.text and 'resuming from step 2' in caplog.text
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['1', '2', '3.corrupt']
  checkpoint.save_train(mngr, 3, _state(3), force=True)  # the step number is free again
  mngr.close()
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['1', '2', '3', '3.corrupt']

  # When no step reads back, the cause is as likely this run (another model) as the files: nothing is moved.
  for step in (1, 2, 3):
    damage_checkpoint(d, step)
  mngr = checkpoint.manager(d, max_to_keep=3, writer=True)
  with pytest.raises(checkpoint.CheckpointError, match=r'ckpt: checkpoint step 3 cannot be restored \(.+\); '
                     r'the older steps \[2, 1\] fail too'):
    checkpoint.restore_train(mngr, _abstract())
  mngr.close()
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['1', '2', '3', '3.corrupt']


def test_load_params_names_a_damaged_step(tmp_path):
  d = str(tmp_path / 'ck')
  checkpoint.save_params(d, {'w': np.ones(3, np.float32)}, {'dims': 3}, step=7)
  damage_checkpoint(d, 7)
  with pytest.raises(checkpoint.CheckpointError, match=f'{d}: checkpoint step 7 cannot be read \\(.+\\)'):
    checkpoint.load_params(d)
  with pytest.raises(checkpoint.CheckpointError, match='has no step 5'):
    checkpoint.load_params(d, step=5)


def test_a_run_that_fails_before_training_leaves_nothing(tmp_path):
  """Bad input found by the step-0 evaluation: no model config, no empty logs, no checkpoint folder."""
  workdir = str(tmp_path / 'run')
  loop = train_loop.Loop(workdir, keep_checkpoints=2, data_iter=iter(()), model_config={'dims': 3})

  def evaluate(step, params):
    raise ValueError('database video v7: 7 regions, 9 expected')
  try:
    start, state, resumed = loop.restore_or_init(_abstract(), lambda: _state(0))
    assert (start, resumed) == (0, False)
    schedule = train_loop.Schedule(4, log=lambda s: True, checkpoint=lambda s: True, evaluate=lambda s: False)
    with pytest.raises(ValueError, match='v7'):
      loop.run(state, start, schedule, train_fn=None, next_batch=None, summarize=None, evaluate=evaluate,
               nonfinite_hint='')
  finally:
    loop.close()
  assert not os.path.exists(workdir) or os.listdir(workdir) == []
