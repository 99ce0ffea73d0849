"""Evaluation at scale: a stopped engine run resumes to exactly the uninterrupted scores (reading only what is
left), a partial from other inputs is refused by name, interleaved processes add up to the one-process
result, and hapvr_jax.evaluate picks up a partial left in its workdir and removes it at the end."""
import logging
import os
import pickle

import h5py
import jax
import numpy as np
import pytest

from common_jax import checkpoint
from common_jax import mesh as mesh_lib
from common_jax import preemption
from configs import common as config_common
from hapvr_jax import engine as engine_lib
from hapvr_jax import engine_state
from hapvr_jax import evaluate
from hapvr_jax import features as features_lib
from hapvr_jax import model as model_lib
from tests import helpers

DIMS = 32
QUERIES = ['q0', 'q1']
DATABASE = [f'd{i}' for i in range(9)]


class _CountingFile(features_lib.FeatureFile):
  """Records the database videos the engine reads."""

  def __init__(self, *a, **kw):
    super().__init__(*a, **kw)
    self.read_ids = []

  def read(self, video_id):
    self.read_ids.append(video_id)
    return super().read(video_id)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = str(tmp_path_factory.mktemp('features') / 'feat.hdf5')
  lengths = dict(zip(QUERIES + DATABASE, [9, 14, 5, 8, 11, 16, 19, 25, 30, 37, 41]))
  with h5py.File(path, 'w') as f:
    for vid, n in lengths.items():
      f[vid] = helpers.unit_features(rng, (n, 4, DIMS))
  cfg = model_lib.ModelConfig(dims=DIMS, v_topk_rate=0.3)
  params = model_lib.init_params(cfg, seed=3)
  eng = engine_lib.Engine(cfg, params, mesh_lib.make_mesh((('data', 2),), jax.devices()[:2]),
                          engine_lib.EngineConfig(chunk_size=16, bucket_ratio=2.0, memory_budget_mb=0))
  ff = lambda: _CountingFile(path, dims=DIMS, min_len=8)
  reference = eng.score(ff(), QUERIES, DATABASE, progress=False)
  assert eng.stats['blocks'] >= 6        # memory_budget_mb=0: two targets (one per shard) per block
  return eng, ff, reference, params


def _stop_after(k):
  calls = []
  return lambda: calls.append(1) or len(calls) >= k


def test_stopped_run_resumes_to_the_same_scores_reading_only_what_is_left(setup, tmp_path, caplog):
  eng, ff, reference, _ = setup
  caplog.set_level(logging.INFO, logger='absl')
  state = str(tmp_path / 'partial')
  with pytest.raises(engine_state.Stopped, match=f'partial results saved in {state}'):
    eng.score(ff(), QUERIES, DATABASE, progress=False, state_dir=state, stop=_stop_after(3))
  assert os.listdir(state) == ['partial-0-of-1.npz']
  f = ff()
  scores = eng.score(f, QUERIES, DATABASE, progress=True, state_dir=state, save_every_s=0, log_every_s=0)
  np.testing.assert_array_equal(scores, reference)          # bit-identical
  total = eng.stats['chunk_pairs']
  assert 'resuming at ' in caplog.text and f'/ {total} pairs' in caplog.text and 'pairs/s, ETA' in caplog.text
  assert eng.stats['blocks_resumed'] == 3 and eng.stats['blocks_scored'] == eng.stats['blocks'] - 3
  chunks = eng.index_queries([f.read(q) for q in QUERIES])
  plan = eng.plan(f.lengths(DATABASE), chunks)
  left = {DATABASE[v] for _, its, _ in plan[3:] for v, _, _ in its}
  assert {v for v in f.read_ids if v.startswith('d')} == left
  assert left != set(DATABASE)                               # some videos were not read again
  # The finished run leaves a complete partial: a third run scores nothing and still returns the scores.
  np.testing.assert_array_equal(eng.score(ff(), QUERIES, DATABASE, progress=False, state_dir=state), reference)
  assert eng.stats['blocks_scored'] == 0


def test_a_partial_from_other_inputs_is_refused_by_name(setup, tmp_path):
  eng, ff, reference, params = setup
  state = str(tmp_path / 'partial')
  with pytest.raises(engine_state.Stopped):
    eng.score(ff(), QUERIES, DATABASE, progress=False, state_dir=state, stop=_stop_after(1))
  with pytest.raises(ValueError, match=r"database: was '9 ids.*now '8 ids.*delete .*partial to start over"):
    eng.score(ff(), QUERIES, DATABASE[:-1], progress=False, state_dir=state)
  other = jax.tree_util.tree_map(lambda x: x * 1.01, params)
  changed = engine_lib.Engine(eng.model_config, other, eng.mesh, eng.config)
  with pytest.raises(ValueError, match=r'params: was .sha1') as e:
    changed.score(ff(), QUERIES, DATABASE, progress=False, state_dir=state)
  assert 'database' not in str(e.value)
  with pytest.raises(ValueError, match='partial results of a run on 1 process'):
    eng.score(ff(), QUERIES, DATABASE, progress=False, state_dir=state, process_index=0, process_count=2)
  # The refused runs left the partial as it was: the original inputs still resume.
  np.testing.assert_array_equal(eng.score(ff(), QUERIES, DATABASE, progress=False, state_dir=state), reference)
  assert eng.stats['blocks_resumed'] == 1


class _Gathered(Exception):
  pass


def test_two_processes_interleave_blocks_and_add_up_to_one(setup, tmp_path):
  """Two "processes" run one after another in this interpreter; `combine` stands in for the all-gather."""
  eng, ff, reference, _ = setup
  state = str(tmp_path / 'partial')
  sent = {}

  def combine_as(k):
    def combine(sums, counts):
      sent[k] = sums.copy(), counts.copy()
      if 1 - k not in sent:          # the other process has not run yet: stop here, as if waiting for it
        raise _Gathered
      return sums + sent[1 - k][0], counts + sent[1 - k][1]
    return combine

  with pytest.raises(_Gathered):
    eng.score(ff(), QUERIES, DATABASE, progress=False, state_dir=state, process_index=1, process_count=2,
              combine=combine_as(1))
  scores = eng.score(ff(), QUERIES, DATABASE, progress=False, state_dir=state, process_index=0,
                     process_count=2, combine=combine_as(0))
  np.testing.assert_array_equal(scores, reference)
  assert eng.stats['blocks_scored'] == (eng.stats['blocks'] + 1) // 2 and eng.stats['processes'] == 2
  assert sorted(os.listdir(state)) == ['partial-0-of-2.npz', 'partial-1-of-2.npz']
  # Each process keeps its own partial: rerun, "process 1" resumes all of its blocks.
  scores = eng.score(ff(), QUERIES, DATABASE, progress=False, state_dir=state, process_index=1, process_count=2,
                     combine=combine_as(1))
  np.testing.assert_array_equal(scores, reference)
  assert eng.stats['blocks_scored'] == 0 and eng.stats['blocks_resumed'] == eng.stats['blocks'] // 2


def test_evaluate_resumes_a_partial_left_in_the_workdir(setup, tmp_path, monkeypatch):
  _, _, _, params = setup
  ann, features = helpers.write_fivr(tmp_path, ['qa', 'qb'], [f'v{i}' for i in range(10)], DIMS, frames_step=4)
  ckpt = checkpoint.save_params(str(tmp_path / 'ckpt'), params,
                                model_lib.ModelConfig(dims=DIMS, v_topk_rate=0.3).to_dict())
  c = config_common.hapvr_eval_config('fivr_5k')
  c.features, c.annotations, c.checkpoint = features, str(ann), ckpt
  c.progress, c.plots, c.store_similarities, c.compilation_cache = False, False, True, ''
  c.engine.chunk_size, c.engine.bucket_ratio, c.engine.memory_budget_mb = 16, 2.0, 0

  fresh = evaluate.evaluate(c, str(tmp_path / 'fresh'))
  workdir = str(tmp_path / 'out')
  monkeypatch.setattr(preemption.StopSignal, 'requested', lambda self, sync=True: True)
  with pytest.raises(engine_state.Stopped, match='stopped by .*after .* pairs; partial results saved'):
    evaluate.evaluate(c, workdir)
  monkeypatch.undo()
  assert os.path.exists(os.path.join(workdir, 'partial', 'model', 'partial-0-of-1.npz'))
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  metrics = evaluate.evaluate(c, workdir)
  assert metrics['resumed_blocks'] == 1 and fresh['resumed_blocks'] == 0
  for key in ('DSVR', 'CSVR', 'ISVR', 'DSVD'):
    assert metrics[key] == fresh[key]
  with open(os.path.join(workdir, 'similarities.pk'), 'rb') as f, \
       open(os.path.join(str(tmp_path / 'fresh'), 'similarities.pk'), 'rb') as g:
    assert pickle.load(f) == pickle.load(g)
  assert not os.path.exists(os.path.join(workdir, 'partial'))


def test_allgather_sum_keeps_float64_on_one_process():
  """The default `combine`: float64 and int64 travel as uint32 words, unrounded (JAX has no x64 here)."""
  sums = np.array([[1 + 1e-12, -3.25e300], [0.1, 2.0 ** -60]])
  counts = np.array([2 ** 40 + 1, 3], np.int64)
  s, c = engine_state.allgather_sum(sums, counts)
  assert s.dtype == np.float64 and c.dtype == np.int64
  np.testing.assert_array_equal(s, sums)
  np.testing.assert_array_equal(c, counts)


def test_aligned_empty_starts_on_the_boundary_a_cpu_device_uses_in_place():
  from hapvr_jax.engine_state import aligned_empty
  for shape, dtype in (((3, 5, 7), np.float32), ((1,), np.int32), ((2, 9, 64), np.float64)):
    x = aligned_empty(shape, dtype)
    assert x.shape == shape and x.dtype == dtype and x.ctypes.data % 64 == 0
  x = aligned_empty((4, 8, 9, 16), np.float32)
  x[:] = np.arange(x.size, dtype=np.float32).reshape(x.shape)
  np.testing.assert_array_equal(np.asarray(jax.device_put(x)), np.arange(x.size).reshape(x.shape))


def test_read_blocks_zeroes_the_padding_columns_of_an_uninitialised_buffer(setup, monkeypatch):
  """The reader fills each shard's columns end to end and zeroes only what is left: a buffer full of NaN
  (what an uninitialised one may hold) comes out with real frames in place and zeros after them."""
  import queue
  import threading
  ff = setup[1]()
  monkeypatch.setattr(engine_state, 'aligned_empty', lambda shape, dtype: np.full(shape, np.nan, dtype))
  its = [(0, 0, len(ff.read(DATABASE[0]))), (1, 0, len(ff.read(DATABASE[1])))]
  cols = sum(e - s for _, s, e in its) + 5
  out = queue.Queue()
  engine_state.read_blocks(ff, DATABASE, [(64, its, 2)], out, threading.Event(), 1, lambda length, n: cols)
  _, feats, frames, _, _ = out.get()
  assert out.get() is None and frames.tolist() == [cols - 5]
  np.testing.assert_array_equal(feats[0, :cols - 5], np.concatenate([ff.read(DATABASE[0]), ff.read(DATABASE[1])]))
  np.testing.assert_array_equal(feats[0, cols - 5:], 0)
