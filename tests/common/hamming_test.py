"""common_jax.hamming: every exact backend gives the brute-force stable ranking (distance, then database
index), the approximate ones find planted near-copies, bad input is one clear error."""
import numpy as np
import pytest

from common_jax import hamming


def _brute(q, db, k):
  d = hamming.distances(q, db)
  order = np.lexsort((np.broadcast_to(np.arange(db.shape[0]), d.shape), d), axis=1)[:, :k]
  return np.take_along_axis(d, order, 1), order


@pytest.fixture(scope='module')
def codes():
  rng = np.random.default_rng(0)
  db = rng.integers(0, 256, (300, 2), dtype=np.uint8)   # 16 bits: ties everywhere
  return db, rng.integers(0, 256, (9, 2), dtype=np.uint8)


def test_distances_are_popcounts_of_the_xor(codes):
  db, q = codes
  bits = lambda x: np.unpackbits(x, axis=1).astype(int)
  want = (bits(q)[:, None, :] != bits(db)[None]).sum(-1)
  np.testing.assert_array_equal(hamming.distances(q, db), want)


@pytest.mark.parametrize('backend', ['numpy', 'jax', 'auto'])
@pytest.mark.parametrize('k', [1, 7, 300, 1000])
def test_stable_exact_backends_equal_brute_force(codes, backend, k):
  db, q = codes
  dist, idx = hamming.Searcher(db, backend).search(q, k)
  want_d, want_i = _brute(q, db, min(k, len(db)))
  np.testing.assert_array_equal(dist, want_d)
  np.testing.assert_array_equal(idx, want_i)
  assert dist.dtype == np.int32 and idx.dtype == np.int64


def test_faiss_flat_has_exact_distances_and_the_stable_order_of_what_it_returns(codes):
  db, q = codes
  dist, idx = hamming.Searcher(db, 'faiss_flat').search(q, 20)
  want_d, _ = _brute(q, db, 20)
  np.testing.assert_array_equal(dist, want_d)
  np.testing.assert_array_equal(np.take_along_axis(hamming.distances(q, db), idx, 1), dist)
  for row_d, row_i in zip(dist, idx):   # within one distance, database order
    for value in np.unique(row_d):
      assert (np.diff(row_i[row_d == value]) > 0).all()
  full_d, full_i = hamming.Searcher(db, 'faiss_flat').search(q, len(db))
  np.testing.assert_array_equal(full_i, _brute(q, db, len(db))[1])


@pytest.mark.parametrize('backend', ['faiss_hash', 'faiss_ivf'])
def test_approximate_backends_find_planted_near_copies(backend):
  rng = np.random.default_rng(1)
  db = rng.integers(0, 256, (2000, 8), dtype=np.uint8)
  picks = rng.choice(len(db), 20, replace=False)
  q = db[picks].copy()
  q[:, 3] ^= 0b100   # one bit flipped
  dist, idx = hamming.Searcher(db, backend, nprobe=64).search(q, 5)
  np.testing.assert_array_equal(idx[:, 0], picks)
  assert (dist[:, 0] == 1).all()


def test_auto_uses_faiss_flat_for_large_collections(codes, monkeypatch):
  db, q = codes
  assert hamming.auto_backend(10**6) == 'faiss_flat'
  assert hamming.auto_backend(1000) == 'numpy'
  monkeypatch.setattr(hamming, 'AUTO_FAISS_FROM', 10)
  s = hamming.Searcher(db, 'auto')
  s.search(q, 3)
  assert 'faiss_flat' in s._built


def test_bad_input_is_one_clear_error(codes):
  db, q = codes
  with pytest.raises(hamming.HammingError, match='uint8'):
    hamming.Searcher(db.astype(np.int32))
  with pytest.raises(hamming.HammingError, match='query codes have 8 bits, the index 16'):
    hamming.Searcher(db).search(q[:, :1], 3)
  with pytest.raises(hamming.HammingError, match='unknown Hamming backend'):
    hamming.Searcher(db, 'annoy')
  with pytest.raises(hamming.HammingError, match='k must be'):
    hamming.Searcher(db).search(q, 0)
  with pytest.raises(hamming.HammingError, match='no codes'):
    hamming.Searcher(db[:0]).search(q, 3)
