"""The path finders behind hapvr_jax.localize: each turns a (normalised) similarity map into monotone paths of
(query frame, reference frame) cells and hands them to `cut`, which keeps the pieces that are copies.

Every finder has the signature finder(values [Tq, Tr], options, cut) -> list of segments; cut(path) takes an
[n, 2] array of cells, increasing in both coordinates, and returns the accepted segments (objects with
q_start, q_end, r_start, r_end). Finders that look for several paths mark the cells of each accepted segment's
rectangle as used, so that no later path reports the same copy again.
"""
from __future__ import annotations

import math

import numpy as np


def _top_k(values, o):
  """(reference frames [Tq, k], their values, node mask): each query frame's k best matches above threshold."""
  k = min(o.top_k, values.shape[1])
  ref = np.argpartition(-values, k - 1, axis=1)[:, :k]
  w = np.take_along_axis(values, ref, axis=1)
  return ref, w, w >= o.threshold


def _long_enough(path, o) -> bool:
  """Whether a path spans min_length frames in both videos (most chance paths do not: skip cutting them)."""
  return min(path[-1] - path[0]) + 1 >= o.min_length


def tn(values, o, cut):
  """Temporal network: heaviest chains of top-k nodes, each step moving 1..max_gap+1 frames forward in both
  videos and paying gap_penalty per frame beyond two (a step of two frames is a 2x or 0.5x copy)."""
  ref, w, node = _top_k(values, o)
  tq, k = ref.shape
  reach = o.max_gap + 1
  best = np.full((tq, k), -np.inf)
  back = np.full((tq, k), -1)
  for i in np.flatnonzero(node.any(axis=1)):
    lo = max(0, i - reach)
    m, a = np.full(k, -np.inf), np.zeros(k, dtype=np.int64)
    if i > lo:
      dq = (i - np.arange(lo, i))[:, None, None]
      dr = ref[i][None, None, :] - ref[lo:i, :, None]
      cost = o.gap_penalty * np.maximum(np.maximum(dq, dr) - 2, 0)
      val = np.where((dr >= 1) & (dr <= reach), best[lo:i, :, None] - cost, -np.inf).reshape(-1, k)
      a = val.argmax(axis=0)
      m = val[a, np.arange(k)]
    best[i] = np.where(node[i], w[i] + np.maximum(m, 0.0), -np.inf)
    back[i] = np.where(node[i] & (m > 0), lo * k + a, -1)
  # one pass, then paths from the heaviest ends down; a path stops where it meets a used node
  used = ~node
  found = []
  for end in np.argsort(-best, axis=None, kind='stable'):
    if used.flat[end]:
      continue
    chain = []
    while end >= 0 and not used.flat[end]:
      chain.append(end)
      used.flat[end] = True
      end = back.flat[end]
    path = np.stack([np.array(chain[::-1]) // k, ref.flat[chain[::-1]]], axis=1)
    segments = cut(path) if _long_enough(path, o) else []
    for s in segments:
      used |= ((np.arange(tq)[:, None] >= s.q_start) & (np.arange(tq)[:, None] < s.q_end)
               & (ref >= s.r_start) & (ref < s.r_end))
    found += segments
    if len(found) >= o.max_segments:
      break
  return found


def hv(values, o, cut):
  """Hough voting: top-k nodes vote, with their value, for the lines r = speed * q + offset through them
  (speeds 1/max_speed..max_speed, one frame of drift over the map between neighbouring speeds); the best line
  is read off as a path of the nodes near it, its nodes are withdrawn, and the next peak is taken."""
  ref, w, node = _top_k(values, o)
  tq, tr = values.shape
  q = np.broadcast_to(np.arange(tq)[:, None], ref.shape)[node]
  r, wt = ref[node], w[node]
  speeds = np.linspace(1 / o.max_speed, o.max_speed, math.ceil((o.max_speed - 1 / o.max_speed) * max(tq, tr)) + 1)
  shift = math.ceil(o.max_speed * tq) + 1
  nb = shift + tr + 1

  def votes(sel):  # (flat accumulator cell, weight) of the votes of the nodes in `sel`
    b = np.floor(r[sel] - speeds[:, None] * q[sel] + 0.5).astype(np.int64) + shift
    return (np.arange(speeds.size)[:, None] * nb + b).ravel(), np.broadcast_to(wt[sel], b.shape).ravel()

  acc = np.bincount(*votes(np.ones(q.size, dtype=bool)), minlength=speeds.size * nb).reshape(speeds.size, nb)
  pairs = acc[:, :-1] + acc[:, 1:]  # a rasterised line spreads its votes over two neighbouring offsets
  alive = np.ones(q.size, dtype=bool)
  # a copy's line carries about min_length * min_mean of votes; half of it allows for frames top_k missed
  bound = max(o.min_length * o.min_mean / 2, 1e-9)
  found, misses = [], 0
  # noise has many lines through three chance nodes: stop after a few peaks in a row that held no copy
  while misses < 3 and len(found) < o.max_segments:
    si, bi = np.unravel_index(np.argmax(pairs), pairs.shape)
    if pairs[si, bi] < bound:
      break
    s, b = speeds[si], bi - shift + 0.5
    # a faster copy matches each query frame to several reference frames: the line is that much wider
    near = alive & (np.abs(r - s * q - b) <= 1 + max(s, 1) / 2)
    before = len(found)
    for piece in _line_paths(q[near], r[near], wt[near], s, o.max_gap):
      found += cut(piece)
    misses = 0 if len(found) > before else misses + 1
    gone = near.copy()
    for seg in found:
      gone |= alive & (q >= seg.q_start) & (q < seg.q_end) & (r >= seg.r_start) & (r < seg.r_end)
    cells, weights = votes(gone)
    si, bi = np.divmod(cells, nb)
    np.subtract.at(pairs, (si[bi < nb - 1], bi[bi < nb - 1]), weights[bi < nb - 1])
    np.subtract.at(pairs, (si[bi > 0], bi[bi > 0] - 1), weights[bi > 0])
    alive &= ~gone
  return found


def _line_paths(q, r, wt, speed, max_gap):
  """The nodes near a line as monotone paths: the best node per frame of the line's longer axis, kept while
  both coordinates increase, split where more than max_gap frames of that axis have no node."""
  t = q if speed <= 1 else r
  order = np.lexsort((-wt, t))
  first = np.r_[True, np.diff(t[order]) > 0]
  paths, cur = [], []
  for n in order[first]:
    if cur and (q[n] <= cur[-1][0] or r[n] <= cur[-1][1]):
      continue
    if cur and max(q[n] - cur[-1][0], r[n] - cur[-1][1]) > max_gap + 1:
      paths.append(cur)
      cur = []
    cur.append((q[n], r[n]))
  return [np.array(p) for p in paths + [cur] if p]


def dp(values, o, cut):
  """Local alignment: best[i, j] = value - threshold + max(0, best at (i-1, j-1), (i-1, j-2), (i-2, j-1)), so
  a path earns on matching cells, pays on the others, restarts where its sum would go negative, and has a
  slope between 0.5 and 2. Paths are read back from the best-scoring ends of the single pass."""
  gain = values - o.threshold
  tq, tr = gain.shape
  best = np.zeros((tq + 2, tr + 2))  # two rows and columns of zeros in front: a path may start anywhere
  for i in range(tq):
    m = np.maximum(best[i + 1, 1:-1], best[i + 1, :-2])
    np.maximum(m, best[i, 1:-1], out=m)
    best[i + 2, 2:] = gain[i] + np.maximum(m, 0.0)
  body = best[2:, 2:]
  # a copy earns at least min_length * (min_mean - threshold); the end of a best path is a matching cell
  bound = max(o.min_length * (o.min_mean - o.threshold) / 2, 1e-9)
  ends = np.flatnonzero((body >= bound) & (gain > 0))
  used = np.zeros((tq, tr), dtype=bool)
  found = []
  for end in ends[np.argsort(-body.flat[ends], kind='stable')]:
    i, j = divmod(int(end), tr)
    if used[i, j]:
      continue
    path = []
    while i >= 0 and j >= 0 and not used[i, j]:
      path.append((i, j))
      used[i, j] = True
      b, g = best[i + 2, j + 2], gain[i, j]
      if b == g:  # the path started here
        break
      for di, dj in ((1, 1), (1, 2), (2, 1)):  # the same sums as the forward pass, so equality is exact
        if g + best[i + 2 - di, j + 2 - dj] == b:
          i, j = i - di, j - dj
          break
    path = np.array(path[::-1])
    segments = cut(path) if _long_enough(path, o) else []
    for s in segments:
      used[s.q_start:s.q_end, s.r_start:s.r_end] = True
    found += segments
    if len(found) >= o.max_segments:
      break
  return found


def dtw(values, o, cut):
  """Dynamic time warping with cost threshold - value and steps (1,0), (0,1), (1,1) from the first frame pair
  to the last; the one path is cut into copies."""
  c = o.threshold - values
  tq, tr = c.shape
  d = np.empty((tq, tr))
  d[0] = np.cumsum(c[0])
  m = np.empty(tr)
  for i in range(1, tq):
    m[0] = d[i - 1, 0]
    np.minimum(d[i - 1, :-1], d[i - 1, 1:], out=m[1:])
    # d[i, j] = c[i, j] + min(m[j], d[i, j-1]) unrolled along the row: a running minimum over cumulative sums
    total = np.cumsum(c[i])
    d[i] = total + np.minimum.accumulate(m - total + c[i])
  i, j = tq - 1, tr - 1
  path = [(i, j)]
  while i > 0 or j > 0:
    options = [(d[i - 1, j - 1], i - 1, j - 1)] if i > 0 and j > 0 else []
    options += [(d[i - 1, j], i - 1, j)] if i > 0 else []
    options += [(d[i, j - 1], i, j - 1)] if j > 0 else []
    _, i, j = min(options, key=lambda x: x[0])  # min keeps the first of equals: the diagonal
    path.append((i, j))
  return cut(np.array(path[::-1]))


FINDERS = {'tn': tn, 'hv': hv, 'dp': dp, 'dtw': dtw}
