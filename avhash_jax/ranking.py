"""Hamming ranking of binary hash codes: bit packing, XOR + popcount distances, chunked stable ranking.

AVHash's evaluation (spec §5.2) ranks the database for each query by the Hamming distance between sign codes,
computed in the original as ``d(q, x) = (L - q.x) / 2`` and sorted with an unstable ``torch.argsort``. Here:

* Codes are ±1 arrays ``[N, L]`` (``to_codes`` maps the tanh outputs; an exact 0, which the original's
  ``torch.sign`` keeps as 0, becomes +1 — practically never reached, spec §8.8). ``pack`` stores bit ``+1 -> 1``
  with ``np.packbits`` (uint8 ``[N, ceil(L/8)]``, zero padding bits); ``hamming`` XORs the packed rows as uint64
  words (zero-padded to whole words, so the padding never counts) and sums ``np.bitwise_count``.
* **Tie order (decision 6, §5.4):** database items at equal distance keep their database order, i.e. the ranking
  is the stable sort on ``(distance, database index)``. Distances take only ``L + 1`` values, so ties are massive
  and the order matters; this one is reproducible on any device.
* Memory is bounded by ``chunk`` queries at a time. With ``top_k`` the database is also scanned ``db_chunk`` items
  at a time and only the best ``top_k`` per query are kept (merged on the unique key ``distance * N_db + index``,
  which reproduces the stable order exactly), so FCVID's 45,600 x 45,600 all-vs-all never materialises the full
  distance matrix. ``top_k=None`` returns the whole ranking ``[N_q, N_db]``; for mAP@all over large sets use
  ``metrics.evaluate``, which consumes the full rankings one query chunk at a time instead.

``hamming_inner`` is the original's inner-product formula (it accepts 0 entries, giving half-integer distances)
and serves as a reference. NumPy only.
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


def _hamming_words(qw: np.ndarray, dw: np.ndarray) -> np.ndarray:
  out = np.zeros((qw.shape[0], dw.shape[0]), np.int32)
  for w in range(qw.shape[1]):
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


def _topk_rows(qw: np.ndarray, dw: np.ndarray, k: int, db_chunk: int):
  """Stable top-k (indices, distances) of each query row, scanning the database in chunks."""
  n_db = dw.shape[0]
  best = None
  for start in range(0, n_db, db_chunk):
    d = _hamming_words(qw, dw[start:start + db_chunk]).astype(np.int64)
    key = d * n_db + np.arange(start, start + d.shape[1], dtype=np.int64)  # unique: (distance, index) order
    best = key if best is None else np.concatenate([best, key], axis=1)
    if best.shape[1] > k:
      part = np.argpartition(best, k - 1, axis=1)[:, :k]
      best = np.take_along_axis(best, part, axis=1)
  best = np.sort(best, axis=1)
  return best % n_db, (best // n_db).astype(np.int32)


def rank_packed(q_packed, db_packed, top_k: Optional[int] = None, chunk: int = 1024,
                db_chunk: int = 16384, return_distances: bool = False):
  """``rank`` on already packed codes (see there)."""
  q_packed = _check_packed(q_packed, 'query')
  db_packed = _check_packed(db_packed, 'database')
  if q_packed.shape[1] != db_packed.shape[1]:
    raise CodeError(f'query codes have {q_packed.shape[1]} bytes per code, database codes '
                    f'{db_packed.shape[1]}; the code lengths differ')
  if chunk < 1 or db_chunk < 1:
    raise ValueError(f'chunk ({chunk}) and db_chunk ({db_chunk}) must be >= 1')
  if top_k is not None and top_k < 1:
    raise ValueError(f'top_k must be >= 1 or None, got {top_k}')
  n_q, n_db = q_packed.shape[0], db_packed.shape[0]
  if n_db == 0:
    raise CodeError('the database is empty')
  k = n_db if top_k is None else min(top_k, n_db)
  qw, dw = _words(q_packed), _words(db_packed)
  order = np.empty((n_q, k), np.int64)
  dists = np.empty((n_q, k), np.int32) if return_distances else None
  for s in range(0, n_q, chunk):
    q = qw[s:s + chunk]
    if top_k is None:
      d = _hamming_words(q, dw)
      order[s:s + chunk] = _full_order(d)
      if return_distances:
        dists[s:s + chunk] = np.take_along_axis(d, order[s:s + chunk], axis=1)
    else:
      idx, d = _topk_rows(q, dw, k, db_chunk)
      order[s:s + chunk] = idx
      if return_distances:
        dists[s:s + chunk] = d
  return (order, dists) if return_distances else order


def rank(q_codes, db_codes, top_k: Optional[int] = None, chunk: int = 1024, db_chunk: int = 16384,
         return_distances: bool = False):
  """Database indices int64 ``[N_q, K]`` ranked by ascending Hamming distance, ties in database order.

  ``K = min(top_k, N_db)``, or ``N_db`` when ``top_k`` is None. Queries are processed ``chunk`` at a time; with
  ``top_k`` the database is scanned ``db_chunk`` items at a time (peak memory ~ chunk x (top_k + db_chunk)).
  With ``return_distances`` also returns the int32 distances of the ranked items.
  """
  q_codes = _check_codes(q_codes, 'query')
  db_codes = _check_codes(db_codes, 'database')
  if q_codes.shape[1] != db_codes.shape[1]:
    raise CodeError(f'query codes have L={q_codes.shape[1]} bits, database codes L={db_codes.shape[1]}')
  return rank_packed(pack(q_codes), pack(db_codes), top_k, chunk, db_chunk, return_distances)
