"""hapvr_jax.index_attention: the cached attention weights against NumPy float64, rebuilt when the index or the
checkpoint changes, reused otherwise, and computed in memory for an index that cannot be written to."""
import dataclasses
import os
import types

import numpy as np
import pytest

from common_jax import checkpoint
from common_jax.index_dir import IndexDir
from hapvr_jax import index, index_attention
from hapvr_jax import model as model_lib


def reference_weights(x, p):
  """sigmoid(tanh(x W + b) w) of every region vector, in float64."""
  att = p['attention']
  h = np.tanh(x.astype(np.float64) @ att['transform']['kernel'].astype(np.float64) + att['transform']['bias'])
  return 1 / (1 + np.exp(-(h @ att['context_vector']['kernel'].astype(np.float64))[..., 0]))


@pytest.fixture
def small(corpus, checkpoint32, tmp_path):
  ix_path = str(tmp_path / 'ix')
  assert index.main([f'--index={ix_path}', f'--features={corpus["features"]}', '--noprogress']) == 0
  params, cfg = checkpoint.load_params(checkpoint32)
  return IndexDir.open(ix_path, index.KIND), model_lib.ModelConfig.from_dict(cfg), params


def check(ix, weights, params):
  for vid in ix.ids():
    x = ix.read(vid, 'features')
    np.testing.assert_allclose(weights[vid], reference_weights(x, params), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(weights.apply(vid, x), x.astype(np.float32) * weights[vid][..., None])


def test_weights_match_numpy_and_calls_of_several_sizes(small, monkeypatch):
  ix, cfg, params = small
  monkeypatch.setattr(index_attention, 'FRAMES_PER_CALL', 16)   # videos split across calls, padded last call
  weights = index_attention.refresh(ix, cfg, params)
  check(ix, weights, params)
  assert sum(len(weights[v]) for v in ix.ids()) == sum(ix.meta(v)['frames'] for v in ix.ids())


def test_cache_is_reused_then_rebuilt_after_a_change_or_for_another_checkpoint(small, monkeypatch):
  ix, cfg, params = small
  path = ix.derived_path(index_attention.ATTENTION_FILE)
  index_attention.refresh(ix, cfg, params)
  assert os.path.exists(path) and index_attention.is_cached(ix, params)
  computed = []
  real = index_attention.compute
  monkeypatch.setattr(index_attention, 'compute', lambda *a: computed.append(1) or real(*a))
  check(ix, index_attention.refresh(ix, cfg, params), params)
  assert not computed   # read back, not recomputed
  ix.remove(['v03'])
  assert not index_attention.is_cached(ix, params)
  weights = index_attention.refresh(ix, cfg, params)
  assert computed == [1] and 'v03' not in weights.rows and index_attention.is_cached(ix, params)
  check(ix, weights, params)
  other = {**params, 'attention': {**params['attention'], 'transform': {
      **params['attention']['transform'], 'bias': params['attention']['transform']['bias'] + 0.5}}}
  assert not index_attention.is_cached(ix, other)
  check(ix, index_attention.refresh(ix, cfg, other), other)
  assert computed == [1, 1] and index_attention.is_cached(ix, other) and not index_attention.is_cached(ix, params)
  with open(path, 'wb') as f:
    f.write(b'torn')
  check(ix, index_attention.refresh(ix, cfg, other), other)   # an unreadable cache is rebuilt
  assert computed == [1, 1, 1] and index_attention.is_cached(ix, other)


def test_a_read_only_index_gets_the_weights_in_memory(small, monkeypatch):
  ix, cfg, params = small

  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied', args[0])
  monkeypatch.setattr(index_attention, 'io_util', types.SimpleNamespace(atomic_open=refuse))
  check(ix, index_attention.refresh(ix, cfg, params), params)
  assert not os.path.exists(ix.derived_path(index_attention.ATTENTION_FILE))
  assert index_attention.refresh(ix, dataclasses.replace(cfg, attention=False), params) is None
