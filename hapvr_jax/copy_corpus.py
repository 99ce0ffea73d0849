"""The plan of a copy-detection corpus (what `python -m hapvr_jax.make_copies` renders): which footage makes each
reference, where each query's copied segments come from and go, which edits each query gets, and the ground
truth that follows, all drawn from one seed before any frame is made.

Footage comes as *strands*: frame sequences at the corpus rate that share no pixel (the disjoint tiles of
each input clip, extraction.copy_edits.tiles). References concatenate consecutive pieces of randomly ordered
strands and never reuse a frame, so a copied segment has exactly one place of origin. What the references
leave over (pieces of at least one second), plus synthetic footage, is the *filler* of the queries: the
footage around a copied segment, the host of a picture-in-picture and the whole of a query without a copy;
a filler piece shorter than the gap it fills is looped.

A query is: filler, copied segment, [filler, second copied segment,] filler. Segment k shows reference frames
ref_start .. ref_start + n - 1 in m query frames from query_start (m = n without a speed change; query frame
j shows reference frame ref_start + floor((j + 0.5) n / m)), so its ground truth is query seconds
[query_start, query_start + m) / fps against reference seconds [ref_start, ref_start + n) / fps. A query
without a copy is drawn the same way (same length distribution, same edits, applied where the copy would
be) with filler in place of the copy, so neither its length nor its edits give it away.
"""
from __future__ import annotations

import dataclasses
import string

import numpy as np

from hapvr_jax import vsc

# the order in which a query's edits are applied
EDITS = ('speed', 'crop', 'hflip', 'brightness_contrast', 'pip', 'text', 'rescale', 'low_bitrate')
SYNTHETIC = -1   # the strand index of synthetic filler


@dataclasses.dataclass(frozen=True)
class Settings:
  fps: int = 10
  size: tuple[int, int] = (284, 160)       # (width, height) of references and unscaled queries
  refs: int = 4
  ref_seconds: tuple[float, float] = (10.0, 20.0)
  queries: int = 12                        # queries with a copy
  no_copy: int = 4                         # queries without one
  segment_seconds: tuple[float, float] = (2.0, 6.0)   # reference time copied into a query, per segment
  max_gap: float = 4.0                     # seconds of filler before, between and after the segments
  two_segments: float = 0.25               # probability that a query holds two copied segments
  edits: tuple[str, ...] = EDITS           # the edits drawn from
  max_edits: int = 3


@dataclasses.dataclass(frozen=True)
class Piece:
  strand: int       # index into the strands, or SYNTHETIC
  start: int        # first frame
  length: int       # frames; 0 for synthetic filler, which never ends


@dataclasses.dataclass
class Reference:
  ref_id: str
  pieces: list[Piece]

  @property
  def length(self) -> int:
    return sum(p.length for p in self.pieces)


@dataclasses.dataclass(frozen=True)
class Segment:
  ref: int            # index into the references
  ref_start: int
  ref_frames: int     # n
  query_start: int
  query_frames: int   # m


@dataclasses.dataclass(frozen=True)
class Filler:
  source: int         # index into the filler pieces
  offset: int         # first frame, counted from the piece's start (looped)
  frames: int
  edited: bool = False   # stands where a copy would be (a query without a copy): it gets the query's edits


@dataclasses.dataclass
class Query:
  query_id: str
  parts: list          # Filler, or an int: the index of a segment
  segments: list[Segment]
  edits: dict          # name -> parameters, in EDITS order
  size: tuple[int, int]

  @property
  def length(self) -> int:
    return sum(p.frames if isinstance(p, Filler) else self.segments[p].query_frames for p in self.parts)


def plan_references(strand_lengths: list[int], settings: Settings, seed: int):
  """(references, filler pieces): references of ref_seconds each from consecutive pieces of the strands in a
  seeded order, each frame used once; the pieces left over (>= 1 s) and synthetic footage are the filler.
  ValueError when the strands hold too little footage."""
  rng = np.random.default_rng([seed, 0])
  fps = settings.fps
  lengths = [int(round(rng.uniform(*settings.ref_seconds) * fps)) for _ in range(settings.refs)]
  have = sum(strand_lengths)
  if sum(lengths) > have:
    raise ValueError(f'--refs={settings.refs} references of {settings.ref_seconds[0]:g}-{settings.ref_seconds[1]:g} s '
                     f'need {sum(lengths) / fps:.1f} s of footage; the videos give {have / fps:.1f} s '
                     '(fewer or shorter references, more --tiles or more videos)')
  order, used = [int(k) for k in rng.permutation(len(strand_lengths))], 0
  pos = {k: 0 for k in order}
  refs = []
  for i, need in enumerate(lengths):
    pieces = []
    while need:
      k = order[used]
      take = min(need, strand_lengths[k] - pos[k])
      pieces.append(Piece(k, pos[k], take))
      pos[k], need = pos[k] + take, need - take
      used += pos[k] == strand_lengths[k]
    refs.append(Reference(f'R{i + 1:06d}', pieces))
  filler = [Piece(k, pos[k], strand_lengths[k] - pos[k]) for k in sorted(order)
            if strand_lengths[k] - pos[k] >= fps]
  return refs, filler + [Piece(SYNTHETIC, 0, 0)]


def _even(x: float) -> int:
  return max(16, 2 * int(round(x / 2)))


def draw_edits(rng, settings: Settings, names) -> dict:
  """Parameters of the edits ``names`` for frames of settings.size (pixel boxes are (left, top, right, bottom))."""
  w, h = settings.size
  out = {}
  for name in EDITS:
    if name not in names:
      continue
    if name == 'speed':
      p = {'speed': float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))}
    elif name == 'crop':
      keep = rng.uniform(0.6, 0.9)
      cw, ch = int(round(w * keep)), int(round(h * keep))
      left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
      p = {'box': [left, top, left + cw, top + ch]}
    elif name == 'hflip':
      p = {}
    elif name == 'brightness_contrast':
      p = {'brightness': round(float(rng.uniform(-40, 40)), 2), 'contrast': round(float(rng.uniform(0.6, 1.4)), 3)}
    elif name == 'pip':
      s = rng.uniform(0.4, 0.7)
      bw, bh = int(round(w * s)), int(round(h * s))
      left, top = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
      p = {'box': [left, top, left + bw, top + bh]}
    elif name == 'text':
      chars = list(string.ascii_letters + string.digits)
      font = max(6, int(round(h * rng.uniform(0.12, 0.25))))
      p = {'text': ''.join(rng.choice(chars, int(rng.integers(4, 13)))), 'font_size': font,
           'xy': [int(rng.integers(0, w // 2 + 1)), int(rng.integers(0, max(1, h - font)))],
           'colour': [int(c) for c in rng.integers(0, 256, 3)]}
    elif name == 'rescale':
      f = rng.uniform(0.5, 1.5)
      p = {'size': [_even(w * f), _even(h * f)]}
    elif name == 'low_bitrate':   # bits per pixel and frame: 0.02-0.06 is well below what the crf gives
      # x264 takes whole kbit/s: tiny frames get at least 4
      p = {'bitrate': max(4000, int(round(rng.uniform(0.02, 0.06) * w * h * settings.fps)))}
    else:
      raise ValueError(f'unknown edit {name!r} (known: {", ".join(EDITS)})')
    out[name] = p
  return out


def plan_query(index: int, copy: bool, refs: list[Reference], filler: list[Piece], settings: Settings,
               seed: int) -> Query:
  """Query number ``index`` (0-based; id Q{index+1:06d}), from a generator of its own so that its draws do
  not depend on the other queries."""
  rng = np.random.default_rng([seed, 1, index])
  fps = settings.fps
  names = []
  if settings.edits and settings.max_edits:
    count = min(len(settings.edits), int(rng.integers(1, settings.max_edits + 1)))
    names = rng.choice(list(settings.edits), count, replace=False).tolist()
  edits = draw_edits(rng, settings, names)
  speed = edits.get('speed', {}).get('speed', 1.0)
  n_segments = 2 if rng.random() < settings.two_segments else 1

  def gap(low):
    n = int(round(rng.uniform(low, settings.max_gap) * fps))
    k = int(rng.integers(len(filler)))
    period = filler[k].length or 10 ** 6
    return Filler(k, int(rng.integers(period)), n)

  parts, segments, t = [], [], 0
  for s in range(n_segments):
    g = gap(0.0 if s == 0 else min(1.0, settings.max_gap))
    if g.frames:
      parts.append(g)
    t += g.frames
    r = int(rng.integers(len(refs)))
    n = min(refs[r].length, max(1, int(round(rng.uniform(*settings.segment_seconds) * fps))))
    start = int(rng.integers(refs[r].length - n + 1))
    m = max(1, int(round(n / speed)))
    segments.append(Segment(r, start, n, t, m))
    parts.append(s)
    t += m
  g = gap(0.0)
  if g.frames:
    parts.append(g)
  if 'pip' in edits:   # the footage that hosts the shrunk copy
    k = int(rng.integers(len(filler)))
    edits['pip']['host'] = k
    edits['pip']['offset'] = int(rng.integers(filler[k].length or 10 ** 6))
  if not copy:   # the same draws, filler where the copy would be
    host = []
    for sg in segments:
      k = int(rng.integers(len(filler)))
      host.append(Filler(k, int(rng.integers(filler[k].length or 10 ** 6)), sg.query_frames, edited=True))
    parts = [host[p] if isinstance(p, int) else p for p in parts]
    segments = []
  size = tuple(edits['rescale']['size']) if 'rescale' in edits else settings.size
  return Query(f'Q{index + 1:06d}', parts, segments, edits, size)


def plan_queries(refs, filler, settings: Settings, seed: int) -> list[Query]:
  """settings.queries queries with a copy and settings.no_copy without, in a seeded order of ids."""
  total = settings.queries + settings.no_copy
  without = set(np.random.default_rng([seed, 3]).permutation(total)[:settings.no_copy].tolist())
  return [plan_query(i, i not in without, refs, filler, settings, seed) for i in range(total)]


def ground_truth(queries: list[Query], refs: list[Reference], fps: int) -> list[vsc.Match]:
  return [vsc.Match(q.query_id, refs[s.ref].ref_id, s.query_start / fps, (s.query_start + s.query_frames) / fps,
                    s.ref_start / fps, (s.ref_start + s.ref_frames) / fps)
          for q in queries for s in q.segments]
