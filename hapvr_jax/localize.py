"""Temporal alignment: a pair's frame-similarity map [Tq, Tr] -> the copied segments it shows.

A copied segment is a path through the map from (q_start, r_start) to (q_end - 1, r_end - 1) along which the
similarity is high, with a slope between 1/max_speed and max_speed (the copy may play slower or faster). Four
methods find such paths (hapvr_jax.localize_paths):

  'tn'   temporal network: the top_k reference frames of each query frame are nodes, edges join nodes that
         move forward in both videos by at most max_gap + 1 frames, and the heaviest paths are copies.
  'hv'   Hough voting: matching cells vote for lines r = speed * q + offset; each peak line is scanned for
         runs of matching cells. Finds straight (constant-speed) copies only.
  'dp'   dynamic programming: the best-scoring monotone path with steps (1,1), (1,2), (2,1) where each cell
         earns (value - threshold), restarted wherever the sum drops below zero (local alignment).
  'dtw'  dynamic time warping: one global path from the first to the last frame pair, cut into copies where
         it runs through matching cells. One path, so it cannot find copies in swapped order.

All methods share the same last step: the path is filled in frame by frame, cut into pieces of matching
cells (value >= threshold) separated by at most max_gap weaker cells, trimmed to start and end on two
matching cells in a row or on one of at least min_mean, and a piece is a segment when it spans at least
min_length frames in both videos, its speed is in range and its mean value is at least min_mean.

Thresholds are scale-free by default: the map is first centred by the median of its rows and then of its
columns (a query frame that resembles everything, or a uniformly high map, becomes zero) and divided by a
robust spread of the whole map (1.4826 * median absolute deviation), so values are z-scores and the defaults
threshold=2.5, min_mean=3 mean "well above this pair's own background". With normalize=False the thresholds
apply to the raw similarities and must be given.

A map computed at a lower frame rate (the comparator's output, at 1/4) should be brought to frame resolution
with upsample(), which interpolates linearly: nearest-neighbour blocks turn 2x copies into staircases.

The default is 'tn', the method of the VSC 2022 baseline. On the synthetic maps of the tests (one copy, two
copies in either order, speeds 0.5x and 2x, additive noise, a band a few cells wide, rows or columns that
resemble everything, pure noise, uniformly high maps) tn, hv and dp all recover every planted copy within one
frame and report nothing where nothing was planted; dtw loses one of two copies in swapped order and runs on
to stray matching cells, hv cuts a copy that changes speed, and on upsampled quarter-resolution maps hv
(0.5x, 2x) and dtw (2x) usually fail while tn and dp stay within two frames of the small map. tn and dp are
equal on all of these; tn is kept as the default because, unlike dp, it can follow copies faster than 2x
(max_speed). On copy corpora of real clips (bench/localisation.py, docs/hapvr_search.md) tn, hv and dp are
within 0.02 matching µAP of each other and dtw well below. A 300 x 300 map takes about 5-20 ms of CPU with any
method.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from hapvr_jax import localize_paths


@dataclasses.dataclass(frozen=True)
class Segment:
  """Query frames [q_start, q_end) match reference frames [r_start, r_end) (end exclusive)."""
  q_start: int
  q_end: int
  r_start: int
  r_end: int
  score: float


@dataclasses.dataclass(frozen=True)
class Options:
  """The options of align(); the ones marked with a method are used by that method only."""
  normalize: bool = True      # robust z-scores of the map (see the module docstring); False: raw values
  threshold: float | None = None  # a cell matches when its value >= threshold (default 2.5 when normalised)
  min_mean: float | None = None   # a segment's mean value along its path (default 3.0 when normalised)
  min_length: int = 5         # frames, in both videos
  max_gap: int = 4            # weaker cells in a row that a segment may bridge (dropped or edited frames)
  max_speed: float = 2.0      # the reference may play up to this much faster or slower (dp: at most 2)
  max_segments: int = 10
  top_k: int = 5              # tn, hv: reference frames kept per query frame
  gap_penalty: float = 1.0    # tn: cost per frame of a step longer than two frames


_COMMON = ('normalize', 'threshold', 'min_mean', 'min_length', 'max_gap', 'max_speed', 'max_segments')
_OWN = {'tn': ('top_k', 'gap_penalty'), 'hv': ('top_k',), 'dp': (), 'dtw': ()}
# tn's best matching µAP on copy corpora of real clips (bench/localisation.py: 3 and 4 lose recall; min_mean
# 2.5 scored 0.02 higher but lets through pieces of copies faster than max_speed)
NORMALIZED_DEFAULTS = {'threshold': 2.5, 'min_mean': 3.0}
_RULES = {  # option: (must be an integer, test, what it must be)
    'threshold': (False, math.isfinite, 'a finite number'),
    'min_mean': (False, math.isfinite, 'a finite number'),
    'min_length': (True, lambda v: v >= 1, 'an integer >= 1'),
    'max_gap': (True, lambda v: v >= 0, 'an integer >= 0'),
    'max_speed': (False, lambda v: 1 <= v < math.inf, 'a finite number >= 1'),
    'max_segments': (True, lambda v: v >= 1, 'an integer >= 1'),
    'top_k': (True, lambda v: v >= 1, 'an integer >= 1'),
    'gap_penalty': (False, lambda v: 0 <= v < math.inf, 'a finite number >= 0'),
}


def option_names(method: str) -> tuple:
  """The options that `method` takes."""
  return _COMMON + _OWN[method]


def _options(method: str, given: dict) -> Options:
  if method not in _OWN:
    raise ValueError(f'unknown alignment method {method!r} (known: {", ".join(sorted(_OWN))})')
  allowed = _COMMON + _OWN[method]
  unknown = sorted(set(given) - set(allowed))
  if unknown:
    raise ValueError(f'method {method!r} has no option {", ".join(unknown)} (its options: {", ".join(allowed)})')
  o = Options(**given)
  if not isinstance(o.normalize, (bool, np.bool_)):
    raise ValueError(f'option normalize={o.normalize!r} must be True or False')
  for name in ('threshold', 'min_mean'):
    if getattr(o, name) is None:
      if not o.normalize:
        raise ValueError(f'option {name} must be given with normalize=False (raw similarity units)')
      o = dataclasses.replace(o, **{name: NORMALIZED_DEFAULTS[name]})
  for name, (integer, ok, want) in _RULES.items():
    v = getattr(o, name)
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(v, bool) or not isinstance(v, kinds) or not ok(v):
      raise ValueError(f'option {name}={v!r} must be {want}')
  return o


def normalize(sim: np.ndarray) -> np.ndarray:
  """Robust z-scores: minus the row medians, then minus the column medians, over 1.4826 * MAD of the map.

  A map whose centred values are all equal (a uniform map) comes back as zeros: it shows no copy.
  """
  c = sim - np.median(sim, axis=1, keepdims=True)
  c -= np.median(c, axis=0, keepdims=True)
  spread = 1.4826 * np.median(np.abs(c))
  if spread <= 1e-12 * (1.0 + np.abs(sim).max()):
    # mostly exact background (e.g. a clean synthetic map): fall back to the mean absolute deviation
    spread = 1.2533 * np.abs(c).mean()
  if spread <= 1e-12 * (1.0 + np.abs(sim).max()):
    return np.zeros_like(c)
  return c / spread


def _score(mean: float, length: float, min_length: int) -> float:
  # The score ranks segments across pairs for a micro-average precision, so it must mean the same in every
  # pair: the mean value along the path (z-scores by default, comparable whatever the pair's scale) says how
  # clear the copy is; the factor length / (length + min_length) discounts segments near the minimum length,
  # which chance alignments reach more easily, without letting long copies outrank clearer short ones.
  return float(mean * length / (length + min_length))


def _densify(path: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The path with each step longer than one frame filled in frame by frame along the straight line between
  its ends, so that every method measures a segment on the same kind of path. A filled-in point usually
  falls between two cells: both are returned (the cells below and above it), the caller takes the better."""
  if len(path) < 2:
    return path, path
  d = np.diff(path, axis=0)
  n = np.maximum(np.abs(d).max(axis=1), 1)
  if (n == 1).all():
    return path, path
  step = np.repeat(np.arange(len(d)), n)
  k = (np.arange(step.size) - np.repeat(np.cumsum(n) - n, n))[:, None]
  lo = path[step] + (k * d[step]) // n[step, None]
  hi = path[step] - (-k * d[step]) // n[step, None]
  return np.concatenate([lo, path[-1:]]), np.concatenate([hi, path[-1:]])


def _cutter(values: np.ndarray, o: Options):
  """cut(path) -> the segments in a monotone path of (q, r) cells, each scored; see the module docstring."""
  def cut(path):
    path, other = _densify(np.asarray(path, dtype=np.int64).reshape(-1, 2))
    v = np.maximum(values[path[:, 0], path[:, 1]], values[other[:, 0], other[:, 1]])
    match = v >= o.threshold
    hit = np.flatnonzero(match)
    if hit.size == 0:
      return []
    breaks = np.flatnonzero(np.diff(hit) > o.max_gap + 1)
    # a lone matching cell across a gap is often chance: a segment starts and ends on two matching cells in
    # a row or on one cell of at least min_mean
    pair = np.r_[match[:-1] & match[1:], False]  # k: cells k and k + 1 both match
    strong = v >= o.min_mean
    can_start, can_end = np.flatnonzero(pair | strong), np.flatnonzero(np.r_[False, pair[:-1]] | strong)
    out = []
    for a, b in zip(hit[np.r_[0, breaks + 1]], hit[np.r_[breaks, hit.size - 1]]):
      starts, ends = can_start[(can_start >= a) & (can_start <= b)], can_end[(can_end >= a) & (can_end <= b)]
      if starts.size == 0 or ends[-1] < starts[0]:
        continue
      a, b = starts[0], ends[-1]
      (q0, r0), (q1, r1) = path[a], path[b]
      nq, nr = q1 - q0 + 1, r1 - r0 + 1
      mean = float(v[a:b + 1].mean())
      # one frame of slack on the speed: a rasterised line's span is off by up to one frame
      if (min(nq, nr) >= o.min_length and mean >= o.min_mean and nr <= o.max_speed * nq + 1
          and nq <= o.max_speed * nr + 1):
        out.append(Segment(int(q0), int(q1 + 1), int(r0), int(r1 + 1),
                           _score(mean, (nq + nr) / 2, o.min_length)))
    return out
  return cut


def align(sim: np.ndarray, method: str = 'tn', **options) -> list[Segment]:
  """The copied segments shown by the similarity map `sim` [Tq, Tr], best score first (see Options)."""
  o = _options(method, options)
  sim = np.asarray(sim)
  if sim.ndim != 2 or not np.issubdtype(sim.dtype, np.number):
    raise ValueError(f'align: the similarity map must be a 2-D numeric array, got shape {sim.shape} {sim.dtype}')
  sim = sim.astype(np.float64)
  if not np.isfinite(sim).all():
    raise ValueError('align: the similarity map has NaN or infinite values')
  if min(sim.shape) < o.min_length:
    return []
  values = normalize(sim) if o.normalize else sim
  segments = localize_paths.FINDERS[method](values, o, _cutter(values, o))
  return sorted(segments, key=lambda s: -s.score)[:o.max_segments]


METHODS = {name: functools.partial(align, method=name) for name in localize_paths.FINDERS}


def upsample(sim: np.ndarray, factor: int, shape: tuple[int, int] | None = None) -> np.ndarray:
  """A map computed at 1/factor of the frame rate, linearly interpolated to frame resolution (default shape
  factor * its own). Full-resolution frame f sits at (f + 0.5) / factor - 0.5 of the small map, clamped at the
  ends. Linear rather than nearest: blocks of equal cells turn a 2x copy into a staircase that tn and hv
  break into pieces, while interpolation keeps a ridge along the copy."""
  sim = np.asarray(sim, dtype=np.float64)
  if int(factor) != factor or factor < 1 or sim.ndim != 2 or 0 in sim.shape:
    raise ValueError(f'upsample: need a non-empty 2-D map and an integer factor >= 1, got {sim.shape}, {factor!r}')
  shape = shape or (factor * sim.shape[0], factor * sim.shape[1])
  for axis, size in enumerate(shape):
    x = np.clip((np.arange(size) + 0.5) / factor - 0.5, 0, sim.shape[axis] - 1)
    i0 = np.floor(x).astype(np.int64)
    t = np.expand_dims(x - i0, 1 - axis)
    i1 = np.minimum(i0 + 1, sim.shape[axis] - 1)
    sim = np.take(sim, i0, axis=axis) * (1 - t) + np.take(sim, i1, axis=axis) * t
  return sim


def to_seconds(segments, q_fps: float, r_fps: float) -> list[tuple[float, float, float, float, float]]:
  """(query_start, query_end, ref_start, ref_end, score) in seconds; frame i covers [i / fps, (i + 1) / fps)."""
  for name, fps in (('q_fps', q_fps), ('r_fps', r_fps)):
    if not (math.isfinite(fps) and fps > 0):
      raise ValueError(f'to_seconds: {name}={fps!r} must be a positive frame rate')
  return [(s.q_start / q_fps, s.q_end / q_fps, s.r_start / r_fps, s.r_end / r_fps, s.score) for s in segments]
