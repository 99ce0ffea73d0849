"""The shared modules: mesh helper, checkpoint module, metric writer, atomic writes, config variants."""
import json
import os

import jax
import numpy as np
import pytest

from common_jax import checkpoint, io_util, mesh as mesh_lib
from common_jax.metric_writer import MetricWriter
from configs import common as config_common


def test_mesh_uses_every_device_and_auto_axes():
  mesh = mesh_lib.make_mesh()
  assert mesh.shape == {'data': 8}
  mesh2 = mesh_lib.make_mesh((('data', -1), ('model', 2)))
  assert mesh2.shape == {'data': 4, 'model': 2}
  assert mesh_lib.batch_size_multiple(mesh2) == 4
  x = jax.device_put(np.arange(16.), mesh_lib.batch_sharding(mesh2))
  assert len(x.addressable_shards) == 8 and x.addressable_shards[0].data.shape == (4,)
  with pytest.raises(ValueError, match='does not divide'):
    mesh_lib.make_mesh((('data', 3),))
  with pytest.raises(ValueError, match='at most one axis'):
    mesh_lib.make_mesh((('data', -1), ('model', -1)))


def test_params_checkpoint_round_trip(tmp_path):
  params = {'a': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}, 'b': np.ones(4, np.float32)}
  checkpoint.save_params(str(tmp_path / 'ck'), params, {'dims': 3})
  loaded, cfg = checkpoint.load_params(str(tmp_path / 'ck'))
  assert cfg == {'dims': 3}
  np.testing.assert_array_equal(loaded['a']['kernel'], params['a']['kernel'])
  np.testing.assert_array_equal(loaded['b'], params['b'])
  assert checkpoint.latest_step(str(tmp_path / 'ck')) == 0
  with pytest.raises(checkpoint.CheckpointError, match='model_config.json is missing'):
    checkpoint.load_params(str(tmp_path))
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'model_config.json').write_text('{}')
  with pytest.raises(checkpoint.CheckpointError, match='no ckpt/ folder'):
    checkpoint.load_params(str(tmp_path / 'empty'))


def test_a_single_step_is_read_without_orbax_as_orbax_reads_it(tmp_path):
  rng = np.random.default_rng(0)
  params = {'net': {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                             'bias': np.zeros(4, np.float32)}},
            'table': rng.integers(0, 9, (5,)).astype(np.int32), 'half': rng.normal(size=(7,)).astype(np.float16)}
  d = str(tmp_path / 'ck')
  checkpoint.save_params(d, params, {'dims': 3})
  fast = checkpoint.read_single_step(d)
  slow, _ = checkpoint.load_params(d, step=0)   # a step given: through Orbax
  assert jax.tree.structure(fast) == jax.tree.structure(slow) == jax.tree.structure(params)
  for a, b, c in zip(jax.tree.leaves(fast), jax.tree.leaves(slow), jax.tree.leaves(params)):
    assert a.dtype == b.dtype == c.dtype and a.shape == b.shape == c.shape
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  checkpoint.save_params(d, params, {'dims': 3}, step=1)   # two steps: which is the latest is Orbax's call
  assert checkpoint.read_single_step(d) is None


def test_metric_writer_writes_jsonl_and_tensorboard_events(tmp_path):
  with MetricWriter(str(tmp_path)) as w:
    w.write_scalars(0, {'loss': 1.5, 'lr': 1e-4})
    w.write_scalars(10, {'loss': float('nan'), 'note': 'text'})
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert lines[0] == {'step': 0, 'loss': 1.5, 'lr': 1e-4}
  assert lines[1]['step'] == 10 and lines[1]['loss'] == 'nan' and lines[1]['note'] == 'text'
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(str(tmp_path / 'tensorboard'))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars('loss')][0] == (0, 1.5)
  assert events.Scalars('lr')[0].value == pytest.approx(1e-4)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  target = tmp_path / 'out.json'
  with pytest.raises(RuntimeError):
    with io_util.atomic_open(str(target)) as f:
      f.write('partial')
      raise RuntimeError('interrupted')
  assert os.listdir(tmp_path) == []
  io_util.write_json(str(target), {'a': 1})
  assert json.loads(target.read_text()) == {'a': 1} and os.listdir(tmp_path) == ['out.json']


def test_config_variants():
  c = config_common.hapvr_eval_config('fivr_5k', 'demo')
  assert c.demo.enabled and c.dataset == 'fivr_5k'
  assert not config_common.hapvr_eval_config('svd').demo.enabled
  with pytest.raises(ValueError, match="unknown config variant 'nope'"):
    config_common.hapvr_eval_config('evve', 'nope')
  assert config_common.parse_arg('n=3,flag', n=1, flag=False).to_dict() == {'n': 3, 'flag': True}
