"""Where the copy is: the frame-similarity maps of the pairs a search reports, their copied segments in
seconds (hapvr_jax.localize), and the VSC 2022 CSVs of both (hapvr_jax.vsc).

A search scores every shortlisted pair through the evaluation engine, which keeps only the video-level score.
The few pairs it reports are scored again here, one at a time, by a jitted function that returns the two maps a
temporal alignment can read: the frame-to-frame map f2f [Tq, Tr] at the index's frame rate, and the comparator
CNN's output [Tq/4, Tr/4] (clipped to [-1, 1]) brought back to frame resolution by linear interpolation.
Lengths are padded to a few buckets (powers of two from 64) with masks, so a search compiles a handful of
shapes whatever its videos' lengths; the maps are cropped to the videos' own frames (a video shorter than the
network's min_len is tiled, and its first frames are the original ones).
"""
from __future__ import annotations

import numpy as np

from hapvr_jax import localize, vsc
from hapvr_jax.features import tile_min_len

MAPS = ('f2f', 'comparator')


def bucket(n: int, smallest: int = 64) -> int:
  """The padded length of an n-frame video: the next power of two (at least `smallest`, a multiple of 4)."""
  size = smallest
  while size < n:
    size *= 2
  return size


class PairMaps:
  """f2f and comparator maps of (query, reference) feature pairs under one network."""

  def __init__(self, model_config, params):
    self.config, self.params, self._fn = model_config, params, None

  def _compiled(self):
    if self._fn is None:
      import jax
      from hapvr_jax import similarity as sim_lib
      from hapvr_jax.model import SimilarityNetwork
      net = SimilarityNetwork(self.config)

      def fn(p, q, t, q_len, t_len):
        call = lambda *a, method: net.apply({'params': p}, *a, method=method)
        q, t = call(q[None], q_len, method=net.index_video), call(t[None], t_len, method=net.index_video)
        f2f = call(q, t, q_len, t_len, method=net.frame_to_frame)
        c, rows, cols = call(call(f2f, method=net.comparator_input), q_len, t_len, method=net.compare)
        c = sim_lib.hardtanh(c)
        return f2f[0, 0], c[0, 0], call(c, rows, cols, method=net.video_to_video)[0, 0]
      self._fn = jax.jit(fn)
    return self._fn

  def __call__(self, q: np.ndarray, t: np.ndarray) -> dict:
    """{'f2f': [nq, nt], 'comparator': [nq, nt]} float32 and the network's video 'score' for features
    q [nq, R, D] and t [nt, R, D]."""
    nq, nt = len(q), len(t)
    qt, tt = (tile_min_len(np.asarray(x, np.float32), self.config.min_len) for x in (q, t))
    qp, tp = (np.pad(x, ((0, bucket(len(x)) - len(x)), (0, 0), (0, 0))) for x in (qt, tt))
    f2f, comp, score = self._compiled()(self.params, qp, tp, np.int32(len(qt)), np.int32(len(tt)))
    # The comparator's valid cells (pooled twice by 2) interpolated back to one per frame; the rest is padding.
    comp = np.asarray(comp, np.float32)[:max(len(qt) // 4, 1), :max(len(tt) // 4, 1)]
    comp = localize.upsample(comp, 4, shape=(len(qt), len(tt))).astype(np.float32)
    return {'f2f': np.asarray(f2f, np.float32)[:nq, :nt], 'comparator': comp[:nq, :nt], 'score': float(score)}


MIN_SECONDS = 2.0   # the shortest copy reported (2 s scored best at 4 fps, within 0.01 of 2.5 s at 2 fps)
MAX_GAP_SECONDS = 1.0   # the longest run of weaker cells a copy bridges (1 s scored best at both 2 and 4 fps)


def segments(maps: dict, which: str, method: str, fps: float, **options) -> list:
  """Copied segments [(q_start, q_end, r_start, r_end, score)] in seconds, best first. Unless `min_length` and
  `max_gap` (frames) are given, they are MIN_SECONDS and MAX_GAP_SECONDS at this frame rate."""
  if which not in MAPS:
    raise ValueError(f'unknown map {which!r}; expected one of {MAPS}')
  options.setdefault('min_length', max(2, int(round(MIN_SECONDS * fps))))
  options.setdefault('max_gap', max(1, int(round(MAX_GAP_SECONDS * fps))))
  found = localize.align(maps[which], method=method, **options)
  return [tuple(round(v, 3) for v in s[:4]) + (float(s[4]),) for s in localize.to_seconds(found, fps, fps)]


def localize_results(results: list, query_features: dict, read_ref, pair_maps: PairMaps, fps: float,
                     which: str = 'f2f', method: str = 'tn', keep_maps: bool = False, **options) -> None:
  """Adds 'segments' to every reported row (and 'sim_map', the map aligned, with `keep_maps`), in place.

  results: [[row]] per query as hapvr_jax.search returns them; query_features: query id -> features;
  read_ref: reference id -> features."""
  for rows in results:
    for row in rows:
      maps = pair_maps(query_features[row['query']], read_ref(row['id']))
      row['segments'] = [list(s) for s in segments(maps, which, method, fps, **options)]
      if keep_maps:
        row['sim_map'] = maps[which]


def vsc_matches(results: list) -> list:
  """The matching-track rows of localised results: one per segment, its score the segment's."""
  return [vsc.Match(r['query'], r['id'], *s[:4], score=s[4]) for rows in results for r in rows
          for s in r.get('segments', [])]


def vsc_pairs(results: list) -> list:
  """The descriptor-track rows: one per reported pair, scored by the network's video similarity."""
  return [vsc.Pair(r['query'], r['id'], r['score']) for rows in results for r in rows]


def localize_index_results(ix, results: list, queries: list, model_config, params, which: str = 'f2f',
                           method: str = 'tn', keep_maps: bool = False) -> None:
  """localize_results for a search of an index (common_jax.index_dir.IndexDir): queries [(id, features, _)]."""
  localize_results(results, {qid: x for qid, x, _ in queries}, lambda v: ix.read(v, 'features'),
                   PairMaps(model_config, params), ix.config['fps'], which, method, keep_maps)


def report_queries(ix, results: list, items: list, queries: list) -> list:
  """The data of hapvr_jax.report's page: per query its video (a file, or the indexed video's) and results."""
  fps, out = ix.config['fps'], []
  for (qid, path), (_, x, _), rows in zip(items, queries, results):
    meta = ix.meta(qid) if path is None else {'path': path}
    out.append({'id': qid, 'path': meta.get('path') or None, 'duration': len(x) / fps, 'results': [
        dict(r, path=r['path'] or None, duration=ix.meta(r['id']).get('duration'), map_fps=fps) for r in rows]})
  return out
