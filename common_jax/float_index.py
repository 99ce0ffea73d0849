"""Inner-product search over float vectors with FAISS, for the coarse stage of a search: an exact index
(IndexFlatIP) for small collections, IVF-PQ for millions of videos; written atomically, and a corrupt file is
named in one error."""
from __future__ import annotations

import contextlib

import numpy as np

from common_jax import io_util


class FloatIndexError(ValueError):
  """A corrupt or unusable FAISS index: one clear line naming the file."""


@contextlib.contextmanager
def _omp_threads(n: int):
  """FAISS on `n` OpenMP threads (0: unchanged). Training a small index on several threads of a busy
  machine spends seconds in OpenMP's spin-waits (measured: 12.6 s on 2 threads, 0.05 s on one)."""
  import faiss
  before = faiss.omp_get_max_threads()
  if n:
    faiss.omp_set_num_threads(n)
  try:
    yield
  finally:
    faiss.omp_set_num_threads(before)


class FloatIndex:
  """Inner-product search over float vectors with FAISS: exact (IndexFlatIP) for small collections,
  IVF-PQ (approximate, ~`pq_m` bytes a vector) for millions. Rows are the positions of the vectors given
  to `build`; the file is written atomically and a corrupt one is named in one error."""

  def __init__(self, index, kind: str):
    self.index, self.kind = index, kind

  @classmethod
  def build(cls, vectors: np.ndarray, kind: str = 'flat', nlist: int = 0, pq_m: int = 0,
            nprobe: int = 16) -> 'FloatIndex':
    import faiss
    x = np.ascontiguousarray(vectors, np.float32)
    with _omp_threads(1 if len(x) < 200_000 else 0):
      return cls._build(faiss, x, kind, nlist, pq_m, nprobe)

  @classmethod
  def _build(cls, faiss, x, kind, nlist, pq_m, nprobe) -> 'FloatIndex':
    d = x.shape[1]
    if kind == 'flat':
      index = faiss.IndexFlatIP(d)
    elif kind == 'ivfpq':
      nlist = nlist or max(1, min(int(4 * np.sqrt(len(x))), len(x) // 39))   # FAISS wants ~39 points a list
      pq_m = pq_m or next(m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0 and m <= d // 2 or m == 1)
      if len(x) < max(nlist * 39, 256):
        raise FloatIndexError(f'an IVF-PQ index needs at least {max(nlist * 39, 256)} videos to train '
                            f'({len(x)} given); use the flat index for small collections')
      nbits = int(min(8, max(4, np.log2(len(x) / 39))))   # PQ codebooks of 2**nbits need ~39x training points
      index = faiss.index_factory(d, f'IVF{nlist},PQ{pq_m}x{nbits}', faiss.METRIC_INNER_PRODUCT)
      index.do_polysemous_training = False   # Hamming pre-filtering codes, unused here: most of the training time
      index.train(x)
      index.nprobe = nprobe
    else:
      raise FloatIndexError(f'coarse index kind {kind!r}; expected flat or ivfpq')
    index.add(x)
    return cls(index, kind)

  def __len__(self) -> int:
    return int(self.index.ntotal)

  def search(self, queries: np.ndarray, k: int):
    """(scores [Q, k], rows [Q, k]) best first; rows are -1 past the end."""
    q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
    with _omp_threads(1 if len(self) * len(q) < 10_000_000 else 0):
      return self.index.search(q, max(1, min(k, len(self))))

  def save(self, path: str) -> None:
    import faiss
    with io_util.atomic_open(path, 'wb') as f:
      f.write(faiss.serialize_index(self.index).tobytes())

  @classmethod
  def load(cls, path: str) -> 'FloatIndex':
    import faiss
    try:
      with open(path, 'rb') as f:
        data = np.frombuffer(f.read(), np.uint8)
      index = faiss.deserialize_index(data)
    except FileNotFoundError:
      raise
    except (RuntimeError, OSError, ValueError) as e:
      del e   # FAISS's message names its own source file, not the index file
      raise FloatIndexError(f'{path}: corrupt FAISS index; delete it and it is rebuilt from the stored '
                          'features') from None
    return cls(index, 'ivfpq' if isinstance(index, faiss.IndexIVF) else 'flat')
