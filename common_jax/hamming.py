"""Hamming top-k over packed binary codes, behind one interface, with the fastest backend per size.

Codes are packed bits, uint8 ``[N, nbits / 8]`` (``np.packbits`` of the +1 bits). ``Searcher(db, backend)``
answers ``search(queries, k) -> (distances int32 [Q, k], indices int64 [Q, k])``, nearest first, ties in
database order. Backends:

  numpy       the project's own packed-bit top-k: XOR + popcount on uint64 words, a chunk of queries at a
              time, then a selection on the key (distance, index): exact, stable, no index to build
  jax         the same in one jitted program (lax.population_count + lax.top_k, which keeps the lower index
              first among equals): exact, stable
  faiss_flat  faiss.IndexBinaryFlat: exact distances; which of several items tied at the k-th distance are
              kept is FAISS's choice, the returned rows are then put in (distance, index) order
  faiss_hash  faiss.IndexBinaryMultiHash: approximate (finds items within `radius` bits of the query on
              one of `nhash` bit substrings), for very large collections
  faiss_ivf   faiss.IndexBinaryIVF: approximate (the `nprobe` nearest of `nlist` clusters), trained on the
              database itself

``backend='auto'`` picks the fastest exact backend for the collection size, measured by
``python -m bench.index_scale --part=avhash`` on a shared 2-core CPU (64-bit codes, top 100; single query /
per query of a batch of 100):

  10k codes   numpy 0.14 ms / 0.19 ms    faiss_flat 24-64 ms / 0.02-2.1 ms (OpenMP start-up per call)
  100k codes  numpy 1.1-1.2 ms / 2.0-2.2 ms    faiss_flat 0.17-0.18 ms / 0.46-1.2 ms
  1M codes    numpy 31 ms / 16-25 ms    faiss_flat 1.2-1.3 ms / 5-7 ms

so the project's NumPy scan below AUTO_FAISS_FROM codes and IndexBinaryFlat from there on. The JAX program
was slower than both on CPU at every size (1.5-17 ms a query at 10k-100k; lax.top_k on CPU) and is kept for
accelerators; the approximate backends are never chosen by 'auto' (IndexBinaryIVF trains for 30 s at 100k
codes, and both miss exact neighbours).
"""
from __future__ import annotations

import functools

import numpy as np

EXACT = ('numpy', 'jax', 'faiss_flat')
BACKENDS = EXACT + ('faiss_hash', 'faiss_ivf')
# Measured with `python -m bench.index_scale --part=avhash`: NumPy and IndexBinaryFlat cross between 10k and 100k
AUTO_FAISS_FROM = 50_000


class HammingError(ValueError):
  """Codes of the wrong type or shape, an unknown backend, a bad k; the message says which."""


def pack(codes) -> np.ndarray:
  """±1 (or 0/1) codes [N, L] -> packed uint8 [N, ceil(L/8)], bit 1 for a positive entry."""
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise HammingError(f'codes must be [N, L], got shape {codes.shape}')
  return np.packbits(codes > 0, axis=1)


def check_packed(packed, what: str = 'codes', nbytes: int | None = None) -> np.ndarray:
  packed = np.asarray(packed)
  if packed.ndim != 2 or packed.dtype != np.uint8:
    raise HammingError(f'{what} must be packed bits, uint8 [N, B]; got {packed.dtype} {packed.shape}')
  if nbytes is not None and packed.shape[1] != nbytes:
    raise HammingError(f'{what} have {8 * packed.shape[1]} bits, the index {8 * nbytes}')
  return np.ascontiguousarray(packed)


def words(packed: np.ndarray, word=np.uint64) -> np.ndarray:
  """Packed rows as machine words [N, W], zero padding (which never counts in a XOR)."""
  size = np.dtype(word).itemsize
  n, nbytes = packed.shape
  buf = np.zeros((n, -(-nbytes // size) * size), np.uint8)
  buf[:, :nbytes] = packed
  return buf.view(word)


def distances(q_packed, db_packed) -> np.ndarray:
  """All Hamming distances int32 [Q, N]."""
  qw, dw = words(check_packed(q_packed, 'queries')), words(check_packed(db_packed, 'database'))
  out = np.zeros((qw.shape[0], dw.shape[0]), np.int32)
  for w in range(qw.shape[1]):
    out += np.bitwise_count(qw[:, w, None] ^ dw[None, :, w])
  return out


def auto_backend(n: int) -> str:
  return 'faiss_flat' if n >= AUTO_FAISS_FROM else 'numpy'


class Searcher:
  """Top-k by Hamming distance over one database of packed codes (see the module docstring)."""

  def __init__(self, db_packed, backend: str = 'auto', nhash: int = 4, radius: int = 2, nlist: int = 0,
               nprobe: int = 8):
    self.db = check_packed(db_packed, 'database codes')
    self.n, self.nbytes = self.db.shape
    if backend not in BACKENDS + ('auto',):
      raise HammingError(f'unknown Hamming backend {backend!r}; expected auto or one of {", ".join(BACKENDS)}')
    self.backend = backend
    self.exact = backend in EXACT + ('auto',)
    self._options = dict(nhash=nhash, radius=radius, nlist=nlist, nprobe=nprobe)
    self._built = {}

  def _impl(self, backend):
    """The backend's data structure, built on first use."""
    if backend not in self._built:
      if backend == 'numpy':
        self._built[backend] = np.ascontiguousarray(words(self.db).T)      # [W, N]: one contiguous row a word
      elif backend == 'jax':
        import jax.numpy as jnp
        self._built[backend] = jnp.asarray(words(self.db, np.uint32))
      else:
        self._built[backend] = self._faiss(backend, **self._options)
    return self._built[backend]

  def _faiss(self, backend, nhash, radius, nlist, nprobe):
    import faiss
    d = 8 * self.nbytes
    if backend == 'faiss_flat':
      index = faiss.IndexBinaryFlat(d)
    elif backend == 'faiss_hash':
      index = faiss.IndexBinaryMultiHash(d, nhash, d // nhash)
      index.nflip = radius
    else:
      # at most 1,024 lists trained on at most 64 codes a list: k-means over 1M codes into 4,000 lists took
      # over 5 minutes on 2 cores, this about a second
      nlist = nlist or max(1, min(1024, int(4 * np.sqrt(max(self.n, 1)))))
      sample = self.db[np.random.default_rng(0).permutation(self.n)[:64 * nlist]] if self.n > 64 * nlist else self.db
      index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(d), d, nlist)
      index.train(sample if len(sample) >= nlist else np.resize(self.db, (nlist, self.nbytes)))
      index.nprobe = nprobe
    if self.n:
      index.add(self.db)
    return index

  def search(self, q_packed, k: int):
    """(distances int32 [Q, k'], indices int64 [Q, k']), k' = min(k, N), nearest first, ties by index.

    An approximate backend may find fewer than k' items for a query: the row is then padded with index -1
    and distance nbits + 1."""
    q = check_packed(q_packed, 'query codes', self.nbytes)
    if k < 1:
      raise HammingError(f'k must be >= 1, got {k}')
    if self.n == 0:
      raise HammingError('the index holds no codes')
    k = min(k, self.n)
    backend = auto_backend(self.n) if self.backend == 'auto' else self.backend
    if backend == 'numpy':
      return self._numpy(q, k)
    if backend == 'jax':
      return self._jax(q, k)
    dist, idx = self._impl(backend).search(q, k)
    missing = idx < 0
    dist = np.where(missing, 8 * self.nbytes + 1, dist).astype(np.int32)
    key = dist.astype(np.int64) * (self.n + 1) + np.where(missing, self.n, idx)
    order = np.argsort(key, axis=1, kind='stable')
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1).astype(np.int64)

  def _numpy(self, q, k, chunk_items: int = 1 << 22):
    qw, dw = words(q), self._impl('numpy')
    rows = max(1, chunk_items // max(self.n, 1))
    dist_out = np.empty((len(q), k), np.int32)
    idx_out = np.empty((len(q), k), np.int64)
    span = np.arange(self.n, dtype=np.int64)
    for s in range(0, len(q), rows):
      part = qw[s:s + rows]
      d = np.bitwise_count(part[:, 0, None] ^ dw[0][None]).astype(np.int64)
      for w in range(1, dw.shape[0]):
        d += np.bitwise_count(part[:, w, None] ^ dw[w][None])
      key = d * self.n + span                                # (distance, index): one integer, all distinct
      if k < self.n:
        key = np.partition(key, k - 1, axis=1)[:, :k]
      key.sort(axis=1)
      dist_out[s:s + rows], idx_out[s:s + rows] = np.divmod(key, self.n)
    return dist_out, idx_out

  def _jax(self, q, k):
    import jax.numpy as jnp
    dist, idx = _jax_fn()(jnp.asarray(words(q, np.uint32)), self._impl('jax'), k)
    return np.asarray(dist, np.int32), np.asarray(idx, np.int64)


@functools.lru_cache(maxsize=None)
def _jax_fn():
  """The jitted top-k, built on first use (JAX is imported only when the backend is used)."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  def topk(qw, dw, k):
    d = jnp.zeros((qw.shape[0], dw.shape[0]), jnp.int32)
    for w in range(qw.shape[1]):
      d = d + lax.population_count(qw[:, w, None] ^ dw[None, :, w]).astype(jnp.int32)
    neg, idx = lax.top_k(-d, k)                               # lax.top_k: the lower index first among equals
    return -neg, idx
  return jax.jit(topk, static_argnums=2)
