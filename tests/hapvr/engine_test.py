"""The evaluation engine and the feature reader: batched, padded, chunked, sharded scoring equals the
per-pair computation of the original's loop; bad feature files fail with errors naming the culprit."""

import h5py
import jax
import numpy as np
import pytest

from common_jax import mesh as mesh_lib
from hapvr_jax import engine as engine_lib
from hapvr_jax import engine_shapes
from hapvr_jax import features as features_lib
from hapvr_jax import model as model_lib
from tests import helpers


@pytest.fixture(scope='module')
def feature_file(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = str(tmp_path_factory.mktemp('features') / 'feat.hdf5')
  lengths = {'q0': 3, 'q1': 9, 'q2': 22, 'd0': 2, 'd1': 5, 'd2': 8, 'd3': 13, 'd4': 17, 'd5': 30,
             'd6': 33, 'd7': 34, 'd8': 45, 'd9': 50}
  with h5py.File(path, 'w') as f:
    for vid, n in lengths.items():
      f[vid] = helpers.unit_features(rng, (n, 9, 64))
    f['flat'] = helpers.unit_features(rng, (12, 64))            # a [T, D] video is read as [T, 1, D] (alone)
  return path


@pytest.fixture(scope='module')
def network():
  cfg = model_lib.ModelConfig(dims=64, v_topk_rate=0.3)  # a large rate: top-k with k > 1 on short videos
  return cfg, model_lib.init_params(cfg, seed=3)


_REFERENCE = {}


def _per_pair_reference(cfg, params, ff, qid, did, chunk_size):
  """The original's strategy: index each video alone, score each 2048-frame chunk alone, average. (Jitted
  per shape: the same numbers as eager execution, 1e-10, in a third of the time.)"""
  if id(params) not in _REFERENCE:
    net = model_lib.SimilarityNetwork(cfg)
    _REFERENCE[id(params)] = (
        jax.jit(lambda x: net.apply({'params': params}, x[None], method=net.index_video)),
        jax.jit(lambda q, t: net.apply({'params': params}, q, t, method=net.calculate_video_similarity)[0, 0]))
  index, similarity = _REFERENCE[id(params)]
  q, t = index(ff.read(qid)), index(ff.read(did))
  scores = [float(similarity(q, t[:, s:e])) for s, e in engine_lib.split_chunks(t.shape[1], chunk_size)]
  return float(np.mean(scores))


def test_split_chunks_follows_the_original_and_folds_short_tails():
  assert engine_lib.split_chunks(10, 2048) == [(0, 10)]
  assert engine_lib.split_chunks(4096, 2048) == [(0, 2048), (2048, 4096)]
  assert engine_lib.split_chunks(4100, 2048) == [(0, 2048), (2048, 4096), (4096, 4100)]
  # A final chunk of 1-3 frames (no comparator output in the original: it crashes) joins the previous one.
  assert engine_lib.split_chunks(4099, 2048) == [(0, 2048), (2048, 4099)]
  assert engine_lib.split_chunks(4099, 2048, fold_short_tail=False)[-1] == (4096, 4099)
  assert engine_lib.split_chunks(5000, 0) == [(0, 5000)]


def test_bucket_lengths_are_multiples_of_four_and_cover():
  b = engine_lib.bucket_lengths(2051, 1.25)
  assert all(x % 4 == 0 for x in b) and b == sorted(b) and b[-1] >= 2051
  assert all(b[i + 1] / b[i] <= 1.25 + 4 / b[i] for i in range(len(b) - 1))
  assert engine_lib.bucket_of(9, b) >= 9 and engine_lib.bucket_of(8, b) == 8


def test_block_sizes_come_from_a_short_ladder():
  assert engine_shapes.ladder(30) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15, 17, 20, 23, 26, 30]
  block_size = engine_lib.block_size
  assert block_size(7, 64) == 7 and block_size(1, 16) == 1 and block_size(13, 16) == 13
  assert block_size(75, 64) == 39              # two blocks of 39 rather than 57 + 57 (64 is no ladder size)
  assert block_size(200, 64) == 50             # four full blocks
  assert block_size(3, 64, 8) == 8 and block_size(20, 64, 8) == 24 and block_size(20, 2, 8) == 8   # x shards


def test_small_buckets_merge_while_their_padding_costs_little():
  items = {8: ['a'] * 10, 12: ['b'] * 10, 40: ['c'] * 100}
  # 10 targets x 4 more frames x 100 query frames = 4,000 cells < 5,000: bucket 8 joins 12; then 20 x 28 x 100
  # = 56,000 cells: 12 stays
  assert engine_lib.merge_buckets(items, 100, 5000) == {12: ['a'] * 10 + ['b'] * 10, 40: ['c'] * 100}
  assert engine_lib.merge_buckets(items, 100, 4000) == items
  assert engine_lib.merge_buckets(items, 100, 1e9) == {40: ['a'] * 10 + ['b'] * 10 + ['c'] * 100}


def _partitions(n, block):
  """Every split of range(n) into contiguous runs of at most `block` (brute force, for small n)."""
  if n == 0:
    yield []
    return
  for k in range(1, min(block, n) + 1):
    for rest in _partitions(n - k, block):
      yield [(0, k)] + [(s + k, e + k) for s, e in rest]


def test_query_groups_are_the_cheapest_split_a_brute_force_finds():
  ladder_size = lambda k: engine_shapes.ladder(k)[-1]
  padded = lambda x: -(-x // 4) * 4
  rng = np.random.default_rng(0)
  for trial in range(40):
    lens = np.sort(rng.integers(4, 120, rng.integers(1, 11)))
    block, max_groups = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    max_groups = max(max_groups, -(-len(lens) // block))   # always feasible
    cost = lambda split: sum(ladder_size(e - s) * padded(int(lens[e - 1])) for s, e in split)
    brute = min((cost(p), len(p)) for p in _partitions(len(lens), block) if len(p) <= max_groups)
    got = engine_shapes.group_queries(lens, max_groups, block, padded)
    assert got[0][0] == 0 and got[-1][1] == len(lens) and all(a[1] == b[0] for a, b in zip(got, got[1:]))
    assert all(0 < e - s <= block for s, e in got) and len(got) <= max_groups
    assert (cost(got), len(got)) == brute, (trial, lens, block, max_groups, got)


def test_query_layout_covers_every_query_once_in_as_many_groups_as_length_classes():
  rng = np.random.default_rng(1)
  lens = rng.integers(10, 200, 37)
  config = engine_lib.EngineConfig(query_block=4)
  (part, offsets, n_rows, groups, rows), = engine_shapes.layout_queries(lens, config)
  assert sorted(rows) == list(range(37)) and sorted(part) == list(range(37))
  classes = engine_lib.bucket_lengths(int(lens.max()), config.query_bucket_ratio, config.min_bucket)
  per_class = np.unique([engine_lib.bucket_of(int(x), classes) for x in lens], return_counts=True)[1]
  assert len(groups) <= sum(-(-per_class // 4))
  padded_cells = sum(gather.size for gather, _, _ in groups)
  assert padded_cells < 1.15 * lens.sum()   # placed groups pad little (the length classes alone: ~1.2-1.4x)
  frames = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in range(len(part))])
  seen = []
  for gather, q_len, used in groups:
    assert gather.shape[0] == engine_shapes.ladder(used)[-1] and gather.shape[1] % 4 == 0
    for g in range(used):
      assert q_len[g] <= gather.shape[1] and (gather[g, q_len[g]:] == n_rows).all()
      seen += gather[g, :q_len[g]].tolist()
    assert (gather[used:] == n_rows).all()
  assert sorted(seen) == frames.tolist()
  assert [lens[part[k]] for k in range(len(part))] == sorted(lens)


def test_compiler_runs_in_order_and_drops_what_has_not_started():
  import threading
  started, release, order = threading.Event(), threading.Event(), []

  class Fn:   # stands in for a jitted function: lower(*args).compile()
    def __init__(self, name, wait=False):
      self.name, self.wait = name, wait

    def lower(self, *args):
      return self

    def compile(self):
      if self.wait:
        started.set()
        release.wait(5)
      order.append(self.name)
      return self.name

  c = engine_shapes.Compiler()
  c.submit('a', Fn('a', wait=True), 1)
  assert started.wait(5)
  c.submit('b', Fn('b'), 2)
  c.cancel_pending()                # 'a' is compiling, 'b' has not started
  assert 'a' in c and 'b' not in c
  release.set()
  assert c.get('a') == 'a' and c.waited >= 0
  c.submit('b', Fn('b'))            # a dropped shape can be queued again
  assert c.get('b') == 'b' and order == ['a', 'b']


def test_another_query_of_the_same_buckets_compiles_nothing(feature_file, network):
  """Compiled shapes follow the length ladders, not the query set: q0 (3 frames, tiled to 12) after q1 (9)."""
  cfg, params = network
  ff = features_lib.FeatureFile(feature_file, dims=64, min_len=8)
  eng = engine_lib.Engine(cfg, params, mesh_lib.make_mesh((('data', 2),), jax.devices()[:2]))
  db = ['d1', 'd3', 'd6']
  first = eng.score(ff, ['q1'], db, progress=False)
  jobs = len(eng._compiler._jobs)
  both = eng.score(ff, ['q0', 'q1'], db, progress=False)
  # 21 query rows (padded to 24) in a group of 2 queries: their indexing and the block call
  assert len(eng._compiler._jobs) == jobs + 2
  again = eng.score(ff, ['q0'], db, progress=False)
  assert len(eng._compiler._jobs) == jobs + 2
  np.testing.assert_allclose(both[1], first[0], atol=1e-6)
  np.testing.assert_allclose(both[0], again[0], atol=1e-6)
  ref = [_per_pair_reference(cfg, params, ff, 'q0', d, 0) for d in db]
  np.testing.assert_allclose(again[0], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize('chunk_size,merge_cells', [(0, 0), (16, engine_lib.EngineConfig.merge_cells)])
def test_engine_equals_per_pair_loop(feature_file, network, chunk_size, merge_cells):
  cfg, params = network
  ff = features_lib.FeatureFile(feature_file, dims=64, min_len=8)
  queries = ['q0', 'q1', 'q2']
  database = [f'd{i}' for i in range(10)]
  mesh = mesh_lib.make_mesh()          # 8 fake CPU devices: the target blocks are sharded 8 ways
  eng = engine_lib.Engine(cfg, params, mesh, engine_lib.EngineConfig(
      chunk_size=chunk_size, bucket_ratio=1.6, query_block=2, memory_budget_mb=1, merge_cells=merge_cells))
  scores = eng.score(ff, queries, database, progress=False)
  assert scores.shape == (3, 10)
  lengths = {length for length, _, _ in eng.plan(ff.lengths(database), eng.index_queries(
      [ff.read(q) for q in queries]))}
  if merge_cells:   # this small workload: every target padded to one length, one compiled shape
    assert len(lengths) == 1, lengths
  else:             # several buckets and blocks were exercised
    assert eng.stats['blocks'] > 2 and len(lengths) > 2, lengths
  ref = np.array([[_per_pair_reference(cfg, params, ff, q, d, chunk_size) for d in database] for q in queries])
  np.testing.assert_allclose(scores, ref, atol=1e-5, rtol=0)


def test_features_only_mode(feature_file, network):
  cfg, params = network
  ff = features_lib.FeatureFile(feature_file, dims=64, min_len=4)
  eng = engine_lib.Engine(cfg, params, mesh_lib.make_mesh((('data', 2),), jax.devices()[:2]),
                          engine_lib.EngineConfig(features_only=True))
  scores = eng.score(ff, ['q1'], ['d3', 'd9'], progress=False)
  net = model_lib.SimilarityNetwork(cfg)
  index = lambda x: net.apply({'params': params}, x[None], method=net.index_video)
  for j, d in enumerate(['d3', 'd9']):
    ref = net.apply({'params': params}, index(ff.read('q1')), index(ff.read(d)), None, None, False,
                    method=net.calculate_video_similarity)
    np.testing.assert_allclose(scores[0, j], ref[0, 0], atol=1e-5)


def test_bfloat16_engine_is_close_to_float32(feature_file, network):
  """The bf16 option changes scores by bf16 rounding only (a wrong cast or a dropped mask would not)."""
  cfg, params = network
  ff = features_lib.FeatureFile(feature_file, dims=64, min_len=8)
  mesh = mesh_lib.make_mesh((('data', 2),), jax.devices()[:2])
  make = lambda dtype: engine_lib.Engine(cfg, params, mesh, engine_lib.EngineConfig(dtype=dtype))
  db = ['d1', 'd5', 'd9']
  ref, low = make('float32').score(ff, ['q2'], db, progress=False), make('bfloat16').score(ff, ['q2'], db,
                                                                                          progress=False)
  assert low.dtype == np.float32 and np.abs(low - ref).max() < 0.05, (low, ref)
  assert np.abs(low - ref).max() > 0            # it did compute in bf16
  with pytest.raises(ValueError, match='engine.dtype'):
    engine_lib.EngineConfig(dtype='float16')


def test_min_len_tiling_doubles_like_the_original(feature_file):
  ff = features_lib.FeatureFile(feature_file, dims=64, min_len=8)
  x = ff.read('q0')                       # 3 frames -> 6 -> 12
  assert x.shape == (12, 9, 64)
  np.testing.assert_array_equal(x[:3], x[3:6])
  np.testing.assert_array_equal(x[:6], x[6:])
  assert list(ff.lengths(['q0', 'd0', 'd2', 'd3'])) == [12, 8, 8, 13]
  with pytest.raises(features_lib.FeatureError, match=r"'flat' has shape \(12, 64\).*'q0' has shape \(3, 9, 64\)"):
    ff.read('flat')                       # one region among videos of 9: never tiled silently
  assert features_lib.FeatureFile(feature_file, dims=64, min_len=8).read('flat').shape == (12, 1, 64)


@pytest.mark.parametrize('data, message', [
    (np.zeros((5, 9, 32), np.float32), 'feature dimension 32'),
    (np.zeros((5, 9, 64), np.int32), 'dtype int32'),
    (np.zeros((0, 9, 64), np.float32), 'is empty'),
    (np.full((5, 9, 64), np.nan, np.float32), 'NaN'),
    (np.zeros((5,), np.float32), 'shape (5,)'),
])
def test_bad_features_name_the_file_and_video(tmp_path, data, message):
  path = str(tmp_path / 'bad.hdf5')
  with h5py.File(path, 'w') as f:
    f['bad_video'] = data
  ff = features_lib.FeatureFile(path, dims=64, min_len=8)
  with pytest.raises(features_lib.FeatureError) as e:
    ff.read('bad_video')
  assert 'bad.hdf5' in str(e.value) and 'bad_video' in str(e.value) and message in str(e.value)


def test_not_an_hdf5_file(tmp_path):
  path = tmp_path / 'features.hdf5'
  path.write_text('not hdf5')
  with pytest.raises(features_lib.FeatureError, match='not a readable HDF5 file'):
    features_lib.FeatureFile(str(path)).ids()
  with pytest.raises(features_lib.FeatureError, match='not found'):
    features_lib.FeatureFile(str(tmp_path / 'missing.hdf5'))


def test_engine_stops_on_a_bad_database_video(tmp_path, network):
  cfg, params = network
  rng = np.random.default_rng(1)
  path = str(tmp_path / 'f.hdf5')
  with h5py.File(path, 'w') as f:
    f['q'] = helpers.unit_features(rng, (10, 9, 64))
    f['good'] = helpers.unit_features(rng, (10, 9, 64))
    bad = helpers.unit_features(rng, (10, 9, 64))
    bad[3, 2, 1] = np.inf
    f['broken'] = bad
  ff = features_lib.FeatureFile(path, dims=64, min_len=8)
  eng = engine_lib.Engine(cfg, params, mesh_lib.make_mesh())
  with pytest.raises(features_lib.FeatureError, match="'broken' has 1 NaN/Inf"):
    eng.score(ff, ['q'], ['good', 'broken'], progress=False)
