"""Masked similarity reductions of the ViSiL/HAP-VR similarity network, as pure jnp functions.

Two levels use the same family of reductions:

* frame to frame: a region-by-region dot-product tensor is reduced over the target regions (max, top-k mean,
  or mean) and then averaged over the query regions;
* video to video: the comparator's [Tq', Tt'] map is reduced over target time and averaged over query time.

`kind` is one of 'Chamfer', 'TopKChamfer', 'Max', 'Average'. The top-k size follows the original exactly:
k = max(round(n * rate), 1) with Python's round-half-to-even on the float64 product, where n is the (valid)
size of the reduced axis. Validity is expressed with prefix lengths (padding always sits at the end), so
padded inputs reproduce the unpadded result exactly.
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

KINDS = ('Chamfer', 'TopKChamfer', 'Max', 'Average')


def topk_size(n: int, rate: float) -> int:
  """The original's k for an axis of n valid entries: max(round(n * rate), 1) (half to even)."""
  return max(round(n * rate), 1)


def topk_table(max_len: int, rate: float) -> np.ndarray:
  """k for every valid length 0..max_len, computed on the host in float64 as the original does."""
  return np.array([topk_size(n, rate) for n in range(max_len + 1)], np.int32)


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f'unknown similarity module {kind!r}; expected one of {KINDS}')
  return kind


@jax.custom_jvp
def max_last(x):
  """max over the last axis whose gradient goes to a single index (the first maximum), as torch's max/topk
  route it (so the gradients at ties are the original's); jnp.max would split it among tied maxima.
  The forward pass is a plain max."""
  return jnp.max(x, axis=-1)


@max_last.defjvp
def _max_last_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  idx = jnp.argmax(x, axis=-1)[..., None]
  return jnp.max(x, axis=-1), jnp.take_along_axis(dx, idx, axis=-1)[..., 0]


def _length_mask(length, size):
  """Boolean [..., size] mask: index < length (length broadcasts over leading axes)."""
  return jnp.arange(size) < jnp.asarray(length)[..., None]


def reduce_rows(s, row_len, col_len, kind: str, rate: float = 0.1, symmetric: bool = False):
  """Chamfer-family reduction of s[..., I, J] to s[...]: reduce over J (target), average over I (query).

  row_len / col_len: valid lengths of the I and J axes, broadcastable to s.shape[:-2] (None = all valid).
  With `symmetric`, the result is the mean of the I->J and J->I directions (the original's symmetric flag;
  unlike the original, the symmetric top-k uses `rate` rather than a hard-coded 0.3).
  """
  check_kind(kind)
  n_i, n_j = s.shape[-2], s.shape[-1]
  lead = s.shape[:-2]
  row_len = jnp.broadcast_to(jnp.asarray(n_i if row_len is None else row_len, jnp.int32), lead)
  col_len = jnp.broadcast_to(jnp.asarray(n_j if col_len is None else col_len, jnp.int32), lead)
  valid = _length_mask(row_len, n_i)[..., :, None] & _length_mask(col_len, n_j)[..., None, :]

  if kind == 'Max':
    return jnp.max(jnp.where(valid, s, -jnp.inf), axis=(-2, -1))
  if kind == 'Average':
    total = jnp.sum(jnp.where(valid, s, 0.), axis=(-2, -1))
    return total / (row_len * col_len).astype(s.dtype)

  def one_direction(x, valid, n_rows_valid, n_cols, n_cols_valid):
    # x[..., rows, cols]: reduce cols (max or top-k mean over valid cols), average over valid rows.
    masked = jnp.where(valid, x, -jnp.inf)
    if kind == 'Chamfer':
      per_row = max_last(masked)
    else:
      table = topk_table(n_cols, rate)
      k_max = int(table.max())
      top = lax.top_k(masked, k_max)[0]                      # [..., rows, k_max], descending
      k = jnp.asarray(table)[n_cols_valid][..., None, None]   # per-pair k from the valid length
      keep = jnp.arange(k_max) < k
      per_row = jnp.sum(jnp.where(keep, top, 0.), axis=-1) / k[..., 0].astype(x.dtype)
    row_valid = _length_mask(n_rows_valid, x.shape[-2])
    per_row = jnp.where(row_valid, per_row, 0.)
    return jnp.sum(per_row, axis=-1) / n_rows_valid.astype(x.dtype)

  forward = one_direction(s, valid, row_len, n_j, col_len)
  if not symmetric:
    return forward
  st = jnp.swapaxes(s, -1, -2)
  backward = one_direction(st, jnp.swapaxes(valid, -1, -2), col_len, n_i, row_len)
  return (forward + backward) / 2


ONE_MATMUL_ROWS = 4096   # query rows (frames x regions) up to which every query region shares one matmul


def query_slices(frames: int, regions: int) -> int:
  """Slices of the query frames in frame_to_frame: one matmul over all query regions while frames x regions
  is small (a few short queries: the targets are read once, the matmul has rows enough to run at speed),
  else `regions` slices, which bound the live product by frames x target frames x regions."""
  return 1 if frames * regions <= ONE_MATMUL_ROWS else regions


TILED_ROWS = 1024          # a slice with at least this many rows whose product would exceed TILED_BYTES is
TILED_BYTES = 32 * 2**20  # computed a few targets at a time (lax.map), each tile's product about TILE_BYTES:
TILE_BYTES = 4 * 2**20    # small enough to be reduced from cache rather than written to memory and read back


def _tiled(q, t, k: int, kind: str, precision):
  """_all_regions over groups of targets whose region product fits TILE_BYTES, in a loop (lax.map)."""
  a, s, r = q.shape[:3]
  b, tt, r_t, d = t.shape
  per_target = 4 * a * s * r * tt * r_t
  if a * s * r < TILED_ROWS or per_target * b <= TILED_BYTES:
    return _all_regions(q, t, k, kind, precision)
  tb = max(1, min(b, TILE_BYTES // per_target))
  groups = -(-b // tb)
  tiles = jnp.pad(t, ((0, groups * tb - b), (0, 0), (0, 0), (0, 0))).reshape(groups, tb, tt, r_t, d)
  out = lax.map(lambda x: _all_regions(q, x, k, kind, precision), tiles)   # [groups, A, S, tb, Tt]
  return jnp.moveaxis(out, 0, 2).reshape(a, s, groups * tb, tt)[:, :, :b]


def _all_regions(q, t, k: int, kind: str, precision):
  """[A, S, B, Tt] of q [A, S, R, D] and t [B, Tt, R, D]: the [S*R, Tt*R] region dot products of every frame
  pair in one matmul, reduced over target regions (max or top-k mean), then over query regions."""
  a, s, r, d = q.shape
  b, tt = t.shape[:2]
  x = lax.dot_general(q.reshape(a * s * r, d), t.reshape(b * tt * r, d), (((1,), (1,)), ((), ())),
                      precision=precision).reshape(a, s, r, b, tt, t.shape[2])
  red = max_last(x) if k == 1 else jnp.mean(lax.top_k(x, k)[0], axis=-1)   # [A, S, R, B, Tt]
  return jnp.max(red, axis=2) if kind == 'Max' else jnp.mean(red, axis=2)


def frame_to_frame(q, t, kind: str, rate: float, symmetric: bool = False, precision=lax.Precision.HIGHEST):
  """Region-level similarity of every query frame to every target frame.

  q: [A, Tq, R, D] and t: [B, Tt, R, D] (already indexed). Returns f2f [A, B, Tq, Tt]: for each frame pair,
  the region-by-region dot products [R, R] reduced over target regions and averaged over query regions.
  The products are one matmul per slice of query frames (query_slices) with the query regions as rows, over
  a few targets at a time where the product would be large (_tiled).
  Frame validity is not needed here: padded frames are zero vectors and the caller masks their cells.
  """
  check_kind(kind)
  if kind == 'Average':   # mean over both region axes of <q_o, t_p> = <mean_o q, mean_p t>
    qm, tm = jnp.mean(q, axis=-2), jnp.mean(t, axis=-2)
    return jnp.einsum('aid,bjd->abij', qm, tm, precision=precision)
  if kind == 'Max' or (kind in ('Chamfer', 'TopKChamfer') and not symmetric):
    k = 1 if kind in ('Chamfer', 'Max') else topk_size(t.shape[-2], rate)
    a, tq, r = q.shape[:3]
    step = -(-tq // query_slices(a * tq, r))
    parts = [_tiled(q[:, s:s + step], t, k, kind, precision) for s in range(0, tq, step)]
    total = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return jnp.transpose(total, (0, 2, 1, 3))
  # Symmetric Chamfer / TopK-Chamfer over regions: build the full [.., R, R] block and reduce both ways.
  s = jnp.einsum('aiod,bjpd->abijop', q, t, precision=precision)
  return reduce_rows(s, None, None, kind, rate, symmetric=True)


def hardtanh(x):
  return jnp.clip(x, -1., 1.)
