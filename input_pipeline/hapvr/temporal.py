"""Online temporal augmentation (the original's crops and TT transforms) as index operations on a stored segment.

A clip is two equal-length arrays, never the features themselves:

  idx   int32 [n]  source frame index into the L-frame segment, or -1 for a synthetic frame
  kind  int8  [n]  REAL (0), BLACK (1) or NOISE (2)

with the invariant kind == REAL <=> idx >= 0. Every op maps (idx, kind) to a new (idx, kind) and keeps the
invariant, so one index operation is later applied identically to the region features [L, R, D] and to the
teacher features [L, C] of the same view (`gather`). All randomness comes from the `np.random.Generator`
argument, so a clip is a deterministic function of the generator state.

The ops follow S2VS's `temporal_trans.py` / `augmentations.py` (the code HAP-VR reuses):

  tsd            segment length w ~ U{4..15}; truncate to a multiple of w (a single segment if L < w); shuffle
                 the segment order with p = .5; per segment m = 1[u < .3]·(1 + 1[u' > .5]). Only if
                 0 < Σm < #segments — Σm is the sum of the *values* (an m = 2 segment counts twice), exactly as
                 `np.sum(dropout_mask)` in the original — m = 1 segments are dropped and every frame of an m = 2
                 segment is replaced by a black (p .5) or noise (p .5) frame, drawn per frame as the original's
                 `_drop_content` loop does. Truncation and shuffling happen whether or not the condition holds.
                 With `synthetic_frames=False` (no black/noise bank) m = 2 is turned into m = 1
                 *before* the Σm test, i.e. TSD becomes pure shuffle-and-drop; no black/noise frame is produced.
  fast_forward   keep every f-th frame, f ~ U{2, 3}
  slow_motion    repeat every frame twice
  reverse        reverse the frame order
  pause          start ~ U{0..n-2}; insert d ~ U{0..window//4 - 1} copies of frame `start` before it
                 (`randint(max_len)` with max_len = window//4 = 7: 0–6 copies, as the original draws it)
  identity       no change ('none' in the TT probabilities)

`temporal_crop` is the original `random_temporal_crop`: tile by *doubling* (concatenate the clip with itself)
until it has at least `window` frames, then crop at offset ~ U{0..max(n - window, 1) - 1}; the last valid
offset is never drawn (kept on purpose: it costs nothing and keeps the original's crops).
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import numpy as np

REAL, BLACK, NOISE = 0, 1, 2
TT_OPS = ('tsd', 'fast_forward', 'slow_motion', 'reverse', 'pause', 'none')
DEFAULT_TT_PROBS = dict(tsd=.5, fast_forward=.1, slow_motion=.1, reverse=.1, pause=.1, none=.1)
TSD_WINDOW = (4, 16)       # w ~ U{4..15} (numpy's exclusive upper bound, as the original randint)
TSD_SHUFFLE, TSD_DROP, TSD_CONTENT = .5, .3, .5

Clip = Tuple[np.ndarray, np.ndarray]


def segment(length: int) -> Clip:
  """The untouched segment: idx = 0..length-1, all frames real."""
  if length < 1:
    raise ValueError(f'segment length must be >= 1, got {length}')
  return np.arange(length, dtype=np.int32), np.zeros(length, np.int8)


def check_clip(idx, kind, length: Optional[int] = None):
  """Raises ValueError unless (idx, kind) is a well-formed clip (over a segment of `length` frames)."""
  idx, kind = np.asarray(idx), np.asarray(kind)
  if idx.ndim != 1 or idx.shape != kind.shape:
    raise ValueError(f'clip idx/kind must be 1-D of equal length, got {idx.shape} and {kind.shape}')
  if not np.array_equal(kind == REAL, idx >= 0):
    raise ValueError('clip invariant kind == REAL <=> idx >= 0 is violated')
  if not np.isin(kind, (REAL, BLACK, NOISE)).all() or (idx < -1).any():
    raise ValueError('clip holds an unknown frame kind or an index below -1')
  if length is not None and (idx >= length).any():
    raise ValueError(f'clip index {idx.max()} is out of range for a {length}-frame segment')


def tsd(rng: np.random.Generator, idx, kind, *, synthetic_frames: bool = True) -> Clip:
  """Temporal shuffle-dropout (see the module docstring)."""
  n = len(idx)
  w = int(rng.integers(*TSD_WINDOW))
  if n >= w:
    n = n - n % w
  else:
    w = n
  seg_idx, seg_kind = idx[:n].reshape(-1, w), kind[:n].reshape(-1, w)
  if rng.random() < TSD_SHUFFLE:
    order = rng.permutation(len(seg_idx))
    seg_idx, seg_kind = seg_idx[order], seg_kind[order]
  nseg = len(seg_idx)
  m = (rng.random(nseg) < TSD_DROP).astype(np.int64)
  m *= 1 + (rng.random(nseg) > TSD_CONTENT)
  if not synthetic_frames:
    m = np.minimum(m, 1)
  if 0 < m.sum() < nseg:
    seg_idx, seg_kind = seg_idx.copy(), seg_kind.copy()
    replaced = m == 2
    if replaced.any():
      black = rng.random((int(replaced.sum()), w)) > .5
      seg_idx[replaced] = -1
      seg_kind[replaced] = np.where(black, BLACK, NOISE)
    seg_idx, seg_kind = seg_idx[m != 1], seg_kind[m != 1]
  return seg_idx.reshape(-1), seg_kind.reshape(-1)


def fast_forward(rng: np.random.Generator, idx, kind) -> Clip:
  """Keep every 2nd or 3rd frame (starting with the first)."""
  f = int(rng.integers(2, 4))
  return idx[::f], kind[::f]


def slow_motion(rng: np.random.Generator, idx, kind) -> Clip:
  """Repeat every frame twice (the generator is unused; kept for a uniform signature)."""
  del rng
  return np.repeat(idx, 2), np.repeat(kind, 2)


def reverse(rng: np.random.Generator, idx, kind) -> Clip:
  del rng
  return idx[::-1].copy(), kind[::-1].copy()


def pause(rng: np.random.Generator, idx, kind, *, window: int) -> Clip:
  """At start ~ U{0..n-2}, insert U{0..window//4 - 1} copies of the frame at `start`."""
  start = int(rng.integers(max(len(idx) - 1, 1)))
  dur = int(rng.integers(max(window // 4, 1)))
  return (np.insert(idx, start, np.repeat(idx[start], dur)),
          np.insert(kind, start, np.repeat(kind[start], dur)))


def identity(rng: np.random.Generator, idx, kind) -> Clip:
  del rng
  return idx.copy(), kind.copy()


def temporal_crop(rng: np.random.Generator, idx, kind, window: int) -> Clip:
  """Tile by doubling until >= window frames, then crop `window` at U{0..max(n - window, 1) - 1}."""
  if len(idx) == 0:
    raise ValueError('cannot crop an empty clip')
  while len(idx) < window:
    idx, kind = np.concatenate([idx, idx]), np.concatenate([kind, kind])
  offset = int(rng.integers(max(len(idx) - window, 1)))
  return idx[offset:offset + window], kind[offset:offset + window]


def weak_clip(rng: np.random.Generator, length: int, window: int) -> Clip:
  """Weak view: a random temporal crop of `window` frames from the `length`-frame segment."""
  return temporal_crop(rng, *segment(length), window)


def tt_probabilities(probs: Optional[Mapping[str, float]] = None) -> np.ndarray:
  """Probabilities in TT_OPS order; missing ops get 0. They must be >= 0 and sum to 1."""
  probs = DEFAULT_TT_PROBS if probs is None else dict(probs)
  unknown = set(probs) - set(TT_OPS)
  if unknown:
    raise ValueError(f'unknown temporal ops {sorted(unknown)} in tt_probs; known: {TT_OPS}')
  p = np.array([float(probs.get(name, 0.)) for name in TT_OPS])
  if (p < 0).any() or abs(p.sum() - 1.) > 1e-6:
    raise ValueError(f'tt_probs must be non-negative and sum to 1, got {dict(zip(TT_OPS, p))}')
  return p / p.sum()


def apply_op(rng: np.random.Generator, name: str, idx, kind, *, window: int,
             synthetic_frames: bool = True) -> Clip:
  """Applies the TT op `name` (one of TT_OPS) to a clip."""
  if name == 'tsd':
    return tsd(rng, idx, kind, synthetic_frames=synthetic_frames)
  if name == 'pause':
    return pause(rng, idx, kind, window=window)
  ops = dict(fast_forward=fast_forward, slow_motion=slow_motion, reverse=reverse, none=identity)
  if name not in ops:
    raise ValueError(f'unknown temporal op {name!r}; known: {TT_OPS}')
  return ops[name](rng, idx, kind)


def strong_clip(rng: np.random.Generator, length: int, window: int,
                probs: Optional[Mapping[str, float]] = None, *,
                synthetic_frames: bool = True) -> Tuple[np.ndarray, np.ndarray, str]:
  """Strong view: one TT op on the whole segment, then crop/tile to `window`.

  Returns (idx, kind, name of the op applied).
  """
  p = tt_probabilities(probs)
  name = TT_OPS[int(rng.choice(len(TT_OPS), p=p))]
  idx, kind = apply_op(rng, name, *segment(length), window=window, synthetic_frames=synthetic_frames)
  idx, kind = temporal_crop(rng, idx, kind, window)
  return idx, kind, name


def gather(regions: np.ndarray, teacher: np.ndarray, idx, kind, bank: Optional[Mapping[str, np.ndarray]],
           rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
  """Materialises a clip: regions [n, R, D], teacher [n, C] in the input dtypes.

  Real frames are gathered at `idx`. Each black/noise frame takes one uniformly drawn bank entry of its kind,
  the same entry for its regions and its teacher features, so that both describe one frame. Without a bank
  (None) a clip holding
  synthetic frames is an error: build it with `synthetic_frames=False`.
  """
  idx, kind = np.asarray(idx), np.asarray(kind)
  check_clip(idx, kind, len(regions))
  if len(teacher) != len(regions):
    raise ValueError(f'regions ({len(regions)} frames) and teacher ({len(teacher)} frames) differ in length')
  safe = np.where(idx >= 0, idx, 0)
  out_r, out_t = regions[safe], teacher[safe]
  for code, name in ((BLACK, 'black'), (NOISE, 'noise')):
    sel = np.flatnonzero(kind == code)
    if not len(sel):
      continue
    if bank is None:
      raise ValueError(f'clip has {len(sel)} {name} frames but the store has no bank; '
                       'build strong clips with synthetic_frames=False')
    bank_r, bank_t = bank[f'{name}_regions'], bank[f'{name}_teacher']
    entry = rng.integers(len(bank_r), size=len(sel))
    out_r[sel] = bank_r[entry]
    out_t[sel] = bank_t[entry]
  return out_r, out_t
