"""Hamming ranking of binary hash codes: bit packing, XOR + popcount distances, chunked stable ranking.

AVHash's evaluation ranks the database for each query by the Hamming distance between sign codes,
computed in the original as ``d(q, x) = (L - q.x) / 2`` and sorted with an unstable ``torch.argsort``. Here:

* Codes are ±1 arrays ``[N, L]`` (``to_codes`` maps the tanh outputs; an exact 0, which the original's
  ``torch.sign`` keeps as 0, becomes +1 — practically never reached). ``pack`` stores bit ``+1 -> 1``
  with ``np.packbits`` (uint8 ``[N, ceil(L/8)]``, zero padding bits); ``hamming`` XORs the packed rows as uint64
  words (zero-padded to whole words, so the padding never counts) and sums ``np.bitwise_count``.
* **Tie order:** database items at equal distance keep their database order, i.e. the ranking
  is the stable sort on ``(distance, database index)``. Distances take only ``L + 1`` values, so ties are massive
  and the order matters; this one is reproducible on any device.
* Full rankings: ``chunk`` queries at a time. With ``top_k``, one query at a time: its k-th smallest distance t
  is found by bisection on counts (distances take L + 1 values), then every item closer than t and the first
  items at t in database order are kept — exactly the stable order, with nothing of database size sorted —
  so FCVID's 45,600 x 45,600 all-vs-all never materialises more than one row of the distance matrix.
  ``top_k=None`` returns the whole ranking ``[N_q, N_db]``; for mAP@all over large sets use
  ``metrics.evaluate``, which consumes the full rankings one query chunk at a time instead.

``hamming_inner`` is the original's inner-product formula (it accepts 0 entries, giving half-integer distances)
and serves as a reference. NumPy only (bench/avhash.py times the top-k against NumPy baselines).
"""
from __future__ import annotations

from typing import Optional

import numpy as np


class CodeError(ValueError):
  """Hash codes have the wrong shape, values or length; the message says which array and what is wrong."""


def to_codes(h) -> np.ndarray:
  """int8 ±1 codes from real-valued hash outputs: +1 where ``h >= 0``, else -1."""
  h = np.asarray(h)
  if h.ndim != 2:
    raise CodeError(f'hash outputs must be [N, L], got shape {h.shape}')
  return np.where(h >= 0, 1, -1).astype(np.int8)


def _check_codes(codes, what: str) -> np.ndarray:
  codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[1] == 0:
    raise CodeError(f'{what} codes must be [N, L] with L >= 1, got shape {codes.shape}')
  bad = (codes != 1) & (codes != -1)
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise CodeError(f'{what} codes must be ±1; row {row}, bit {col} is {codes[row, col]!r} '
                    f'({int(bad.sum())} bad entries)')
  return codes


def pack(codes) -> np.ndarray:
  """±1 codes ``[N, L]`` -> packed bits, uint8 ``[N, ceil(L/8)]`` (+1 -> bit 1, big-endian within a byte)."""
  codes = _check_codes(codes, 'input')
  return np.packbits(codes > 0, axis=1)


def _words(packed: np.ndarray) -> np.ndarray:
  """Packed uint8 rows as uint64 words ``[N, ceil(B/8)]``; the padding bytes are zero."""
  n, nbytes = packed.shape
  nwords = -(-nbytes // 8)
  buf = np.zeros((n, nwords * 8), np.uint8)
  buf[:, :nbytes] = packed
  return buf.view(np.uint64)


def _check_packed(packed, what: str) -> np.ndarray:
  packed = np.asarray(packed)
  if packed.ndim != 2 or packed.dtype != np.uint8:
    raise CodeError(f'{what} must be packed codes, uint8 [N, B]; got {packed.dtype} {packed.shape}')
  return packed


def _hamming_words(qw: np.ndarray, dw: np.ndarray, dtype=np.int32) -> np.ndarray:
  out = np.bitwise_count(qw[:, 0, None] ^ dw[None, :, 0]).astype(dtype, copy=False)
  for w in range(1, qw.shape[1]):
    out += np.bitwise_count(qw[:, w, None] ^ dw[None, :, w])
  return out


def hamming(q_packed, db_packed) -> np.ndarray:
  """Hamming distances int32 ``[N_q, N_db]`` between packed codes (XOR + popcount on uint64 words)."""
  q_packed = _check_packed(q_packed, 'query')
  db_packed = _check_packed(db_packed, 'database')
  if q_packed.shape[1] != db_packed.shape[1]:
    raise CodeError(f'query codes have {q_packed.shape[1]} bytes per code, database codes '
                    f'{db_packed.shape[1]}; the code lengths differ')
  return _hamming_words(_words(q_packed), _words(db_packed))


def hamming_inner(q_codes, db_codes) -> np.ndarray:
  """The original's formula ``(L - q.x) / 2`` as float64 ``[N_q, N_db]``; codes may contain 0."""
  q = np.asarray(q_codes, np.float64)
  d = np.asarray(db_codes, np.float64)
  if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
    raise CodeError(f'query {q.shape} and database {d.shape} codes must be [N, L] with the same L')
  return (q.shape[1] - q @ d.T) / 2


def _full_order(dist: np.ndarray) -> np.ndarray:
  # Small unsigned integers make numpy's stable sort a radix sort: O(N_db) per row.
  small = dist.astype(np.uint8 if dist.max(initial=0) < 256 else np.uint16)
  return np.argsort(small, axis=1, kind='stable')


class _RowScanner:
  """Top-k of one query row at a time over the whole database, by counting instead of sorting.

  The row's distances (XOR + popcount into reused buffers: one pass over the packed database, no temporaries
  of database size) take L + 1 values, so its k-th smallest distance t is found by bisection on counts
  (~log2(L + 1) passes over a uint8 row); the top-k are every item closer than t plus the first (k - #closer)
  items at t, both gathered in database order, then stably sorted by distance: exactly the stable order on
  (distance, index). Nothing of database size is sorted.
  """

  def __init__(self, dw: np.ndarray, nbits: int):
    self.dw = np.ascontiguousarray(dw.T)                   # [W, N]: one contiguous word row per pass
    self.nbits = nbits
    dtype = np.uint8 if nbits < 256 else np.uint16
    self.xor = np.empty(dw.shape[0], np.uint64)
    self.count = np.empty(dw.shape[0], np.uint8)
    self.dist = np.empty(dw.shape[0], dtype)

  def distances(self, qw_row: np.ndarray) -> np.ndarray:
    for w in range(self.dw.shape[0]):
      np.bitwise_xor(self.dw[w], qw_row[w], out=self.xor)
      if w == 0:
        np.bitwise_count(self.xor, out=self.count)
        self.dist[...] = self.count
      else:
        np.add(self.dist, np.bitwise_count(self.xor, out=self.count), out=self.dist)
    return self.dist

  def topk(self, qw_row: np.ndarray, k: int):
    d = self.distances(qw_row)
    lo, hi = 0, self.nbits
    while lo < hi:                                         # smallest t with #(d <= t) >= k
      mid = (lo + hi) // 2
      if np.count_nonzero(d <= mid) >= k:
        hi = mid
      else:
        lo = mid + 1
    below = np.flatnonzero(d < lo)
    at = np.flatnonzero(d == lo)[:k - below.size]
    idx = np.concatenate([below, at])
    dist = d[idx].astype(np.int32)
    order = np.argsort(dist, kind='stable')                # idx is ascending: ties stay in database order
    return idx[order], dist[order]


def _topk(q_packed: np.ndarray, db_packed: np.ndarray, k: int):
  scanner = _RowScanner(_words(db_packed), 8 * q_packed.shape[1])
  qw = _words(q_packed)
  order = np.empty((q_packed.shape[0], k), np.int64)
  dists = np.empty((q_packed.shape[0], k), np.int32)
  for r in range(qw.shape[0]):
    order[r], dists[r] = scanner.topk(qw[r], k)
  return order, dists


def rank_packed(q_packed, db_packed, top_k: Optional[int] = None, chunk: int = 1024,
                return_distances: bool = False):
  """``rank`` on already packed codes (see there)."""
  q_packed = _check_packed(q_packed, 'query')
  db_packed = _check_packed(db_packed, 'database')
  if q_packed.shape[1] != db_packed.shape[1]:
    raise CodeError(f'query codes have {q_packed.shape[1]} bytes per code, database codes '
                    f'{db_packed.shape[1]}; the code lengths differ')
  if chunk < 1:
    raise ValueError(f'chunk ({chunk}) must be >= 1')
  if top_k is not None and top_k < 1:
    raise ValueError(f'top_k must be >= 1 or None, got {top_k}')
  n_q, n_db = q_packed.shape[0], db_packed.shape[0]
  if n_db == 0:
    raise CodeError('the database is empty')
  if top_k is not None:
    idx, d = _topk(q_packed, db_packed, min(top_k, n_db))
    return (idx, d) if return_distances else idx
  qw, dw = _words(q_packed), _words(db_packed)
  order = np.empty((n_q, n_db), np.int64)
  dists = np.empty((n_q, n_db), np.int32) if return_distances else None
  for s in range(0, n_q, chunk):
    d = _hamming_words(qw[s:s + chunk], dw)
    order[s:s + chunk] = _full_order(d)
    if return_distances:
      dists[s:s + chunk] = np.take_along_axis(d, order[s:s + chunk], axis=1)
  return (order, dists) if return_distances else order


def rank(q_codes, db_codes, top_k: Optional[int] = None, chunk: int = 1024, return_distances: bool = False):
  """Database indices int64 ``[N_q, K]`` ranked by ascending Hamming distance, ties in database order.

  ``K = min(top_k, N_db)``, or ``N_db`` when ``top_k`` is None. Without ``top_k``: ``chunk`` queries at a time,
  XOR + popcount and a radix (stable) sort of each row. With ``top_k``: one query at a time, selection by
  counting (`_RowScanner`; memory ~10 bytes per database item, no sort of the database). With
  ``return_distances`` also returns the int32 distances of the ranked items.
  """
  q_codes = _check_codes(q_codes, 'query')
  db_codes = _check_codes(db_codes, 'database')
  if q_codes.shape[1] != db_codes.shape[1]:
    raise CodeError(f'query codes have L={q_codes.shape[1]} bits, database codes L={db_codes.shape[1]}')
  return rank_packed(pack(q_codes), pack(db_codes), top_k, chunk, return_distances)
