"""The search report: one self-contained HTML page (no server, no network, images inline as data: URIs, so the
single file can be mailed) for looking at what a search found and where.

For each query: its frame strip (thumbnails at evenly spaced times, the time under each). For each result:
rank, id, path and scores; the localised segments as coloured spans on the query's time axis and on the
result's, joined by a band per segment, with the result's frame strip lined up under its axis; and the pair's
frame-similarity map as a heatmap (reference time across, query time down, both in seconds) with each
segment's box drawn on it in the segment's colour. A missing or undecodable video gets a placeholder.

The input is plain data, one dict per query:

  {'id': str, 'path': str | None, 'duration': float | None,
   'results': [{'rank': int, 'id': str, 'path': str | None, 'duration': float | None, 'score': float,
                'coarse_score': float, 'segments': [(q_start, q_end, r_start, r_end, score), ...],
                'sim_map': float [Tq, Tr] | None, 'map_fps': float}, ...]}

Times are seconds; map row i covers query time [i / map_fps, (i + 1) / map_fps), column j the same on the
reference. The heatmap's colours span similarity 0 to 1 (wider when the map goes outside) for every pair, so
maps can be compared at a glance. A duration left out is read from the video's header, else taken from the map
and the segments.
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

from common_jax import io_util
from common_jax import html_page as hp
from extraction import thumbnails, video_io
from hapvr_jax import report_style

N_FRAMES = 6          # thumbnails per strip
CELL = 116            # px per thumbnail cell: a strip, and each time axis, is N_FRAMES * CELL px wide
THUMB_H = 66
LABEL_W = 78          # the column left of the axes and strips that names them
AXIS_W = N_FRAMES * CELL
AXES_PAD = 18         # right of the axes, room for the last tick label
Q_BAR, R_BAR = (20.0, 32.0), (68.0, 80.0)   # (top, bottom) y of the query and reference bars
AXES_H = 98
HEAT_SIDE = 216       # the heatmap's longer side, px
HEAT_MARGIN = (46, 10, 62, 36)   # left, top, right, bottom
HEAT_LEVELS = 64                 # colours of the heatmap
COLOUR_RANGE = (0.0, 1.0)        # heatmap colours, widened to hold any value outside: the same for every pair,
                                 # so that a weak map looks weak (a page uses 0..its highest value: page_range)


def _duration(path: str | None, given, cache: dict) -> float | None:
  """The given duration, else the one in the file's header (read once per file), else None."""
  if given is not None and given > 0:
    return float(given)
  if not path:
    return None
  if ('duration', path) not in cache:
    try:
      cache['duration', path] = video_io.probe(path).duration or None
    except video_io.VideoError:
      cache['duration', path] = None
  return cache['duration', path]


def _extent(duration: float | None, map_spans, ends) -> float:
  """Seconds an axis covers: the video's duration (else the longest map), stretched to hold every segment."""
  base = duration if duration else max(map_spans, default=0.0)
  return float(max([base, *ends]))


def _placeholder(text: str, width: int, height: int) -> str:
  return (f'<div class="ph" style="width:{width}px;height:{height}px"><span>{hp.escape(text)}</span></div>')


def strip_html(label: str, path: str | None, extent: float, cache: dict) -> str:
  """The frame strip of `path` over [0, extent] seconds, with its label column and the times under it: frame
  k at time (k + 0.5) * extent / N_FRAMES, the centre of its cell, so the strip lines up with an axis of the
  same extent drawn above it."""
  if path is None:
    body = _placeholder('no video file given', AXIS_W, THUMB_H)
  elif extent <= 0:
    body = _placeholder(f'duration unknown: {path}', AXIS_W, THUMB_H)
  else:
    key = (path, round(extent, 3))
    if key not in cache:
      try:
        strip, times = thumbnails.frame_strip(path, N_FRAMES, CELL, THUMB_H, duration=extent)
        cache[key] = (hp.data_uri(strip, 'JPEG', quality=75), times)
      except video_io.VideoError as e:
        logging.warning('report: no frames for %s (%s)', path, e)
        cache[key] = (None, str(e))
    uri, times = cache[key]
    if uri is None:
      body = _placeholder(f'video not available: {times}', AXIS_W, THUMB_H)
    else:
      labels = ''.join(f'<span>{hp.seconds(t)} s</span>' for t in times)
      body = (f'<img class="strip" src="{uri}" width="{AXIS_W}" height="{THUMB_H}" alt="frames of '
              f'{hp.escape(path)}"><div class="times">{labels}</div>')
  return f'<div class="row"><div class="lab">{hp.escape(label)}</div><div>{body}</div></div>'


def axes_svg(segments, q_extent: float, r_extent: float) -> str:
  """The query axis above, the reference axis below, each segment a span on both joined by a band."""
  qs, rs = hp.TimeScale(LABEL_W, AXIS_W, q_extent), hp.TimeScale(LABEL_W, AXIS_W, r_extent)
  width = LABEL_W + AXIS_W + AXES_PAD
  parts = [f'<svg class="axes" width="{width}" height="{AXES_H}" viewBox="0 0 {width} {AXES_H}" '
           'xmlns="http://www.w3.org/2000/svg">']
  for (top, bottom), name, scale, below in ((Q_BAR, 'query', qs, False), (R_BAR, 'reference', rs, True)):
    parts.append(hp.svg_text(LABEL_W - 8, (top + bottom) / 2 + 4, name, anchor='end', cls='axlab'))
    parts.append(f'<rect x="{scale(0):.2f}" y="{top}" width="{AXIS_W}" height="{bottom - top}" class="bar"/>')
    parts.append(hp.svg_axis(scale, bottom if below else top, below=below, target=8, unit=' s'))
  for i, (q0, q1, r0, r1, _) in enumerate(segments):
    c = hp.colour(i)
    parts.append(f'<polygon class="band" fill="{c}" points="{qs(q0):.2f},{Q_BAR[1]} {qs(q1):.2f},{Q_BAR[1]} '
                 f'{rs(r1):.2f},{R_BAR[0]} {rs(r0):.2f},{R_BAR[0]}"/>')
    for scale, (top, bottom), a, b, axis in ((qs, Q_BAR, q0, q1, 'q'), (rs, R_BAR, r0, r1, 'r')):
      parts.append(f'<rect class="seg" data-seg="{i}" data-axis="{axis}" fill="{c}" x="{scale(a):.2f}" '
                   f'y="{top}" width="{scale(b) - scale(a):.2f}" height="{bottom - top}"/>')
  parts.append('</svg>')
  return ''.join(parts)


def page_range(queries: list[dict]) -> tuple[float, float]:
  """One colour scale for every heatmap of a page, from 0 (or below) to the page's highest similarity: maps
  compare at a glance, and the weak maps of an untrained network still show their structure."""
  maps = [np.asarray(r['sim_map'], np.float64) for q in queries for r in q.get('results') or ()
          if r.get('sim_map') is not None]
  values = np.concatenate([m[np.isfinite(m)] for m in maps]) if maps else np.zeros(0)
  if not values.size or values.max() <= 0:
    return COLOUR_RANGE
  return min(0.0, float(values.min())), float(values.max())


def heatmap_svg(sim_map, fps: float, segments, colour_range=COLOUR_RANGE) -> str:
  """The similarity map (reference across, query down) with each segment's box, axes in seconds."""
  if sim_map is None:
    return _placeholder('no similarity map', HEAT_SIDE, HEAT_SIDE)
  m = np.asarray(sim_map, np.float64)
  img, px, vmin, vmax = hp.heatmap(m, HEAT_SIDE, *colour_range, levels=HEAT_LEVELS)
  left, top, right, bottom = HEAT_MARGIN
  w, h = m.shape[1] * px, m.shape[0] * px
  xs, ys = hp.TimeScale(left, w, m.shape[1] / fps), hp.TimeScale(top, h, m.shape[0] / fps)
  width, height = left + w + right, top + h + bottom
  parts = [f'<svg class="heat" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.2f} {height:.2f}" '
           'xmlns="http://www.w3.org/2000/svg">',
           f'<image class="map" x="{left}" y="{top}" width="{w:.2f}" height="{h:.2f}" preserveAspectRatio="none" '
           f'href="{hp.data_uri(img, "PNG", palette=hp.palette(HEAT_LEVELS))}"/>',
           f'<rect x="{left}" y="{top}" width="{w:.2f}" height="{h:.2f}" class="frame"/>',
           hp.svg_axis(xs, top + h, target=4), hp.svg_axis(ys, left, horizontal=False, target=4),
           hp.svg_text(left + w / 2, top + h + 30, 'reference (s)', cls='axlab'),
           hp.svg_text(12, top + h / 2, 'query (s)', cls='axlab',
                       extra=f' transform="rotate(-90 12 {top + h / 2:.2f})"')]
  bar = hp.colormap(np.linspace(vmax, vmin, 64)[:, None], vmin, vmax)
  bx = left + w + 10
  parts += [f'<image x="{bx:.2f}" y="{top}" width="10" height="{h:.2f}" preserveAspectRatio="none" '
            f'href="{hp.data_uri(bar, "PNG")}"/>',
            hp.svg_text(bx + 14, top + 9, f'{vmax:.2f}', anchor='start', cls='tl'),
            hp.svg_text(bx + 14, top + h, f'{vmin:.2f}', anchor='start', cls='tl')]
  for i, (q0, q1, r0, r1, _) in enumerate(segments):
    x, y, bw, bh = xs(r0), ys(q0), xs(r1) - xs(r0), ys(q1) - ys(q0)
    box = f'x="{x:.2f}" y="{y:.2f}" width="{bw:.2f}" height="{bh:.2f}"'
    parts.append(f'<rect class="halo" {box}/><rect class="box" data-seg="{i}" stroke="{hp.colour(i)}" {box}/>')
    parts.append(hp.svg_text(x + 3, y + 11, i + 1, anchor='start', cls='boxlab',
                             extra=f' fill="{hp.colour(i)}"'))
  parts.append('</svg>')
  return ''.join(parts)


def segments_table(segments) -> str:
  if not segments:
    return '<p class="muted">No copied segment localised in this pair.</p>'
  rows = []
  for i, (q0, q1, r0, r1, score) in enumerate(segments):
    speed = f'{(r1 - r0) / (q1 - q0):.2f}x' if q1 > q0 else '-'
    rows.append(f'<tr><td><span class="sw" style="background:{hp.colour(i)}"></span>{i + 1}</td>'
                f'<td>query {hp.seconds(q0)}&ndash;{hp.seconds(q1)} s</td>'
                f'<td>reference {hp.seconds(r0)}&ndash;{hp.seconds(r1)} s</td>'
                f'<td>speed {speed}</td><td>score {score:.3f}</td></tr>')
  return f'<table class="segs">{"".join(rows)}</table>'


def result_html(r: dict, q_extent: float, cache: dict, colour_range=COLOUR_RANGE) -> str:
  segments = [tuple(float(v) for v in s) for s in r.get('segments') or ()]
  sim_map, fps = r.get('sim_map'), float(r.get('map_fps') or 1.0)
  duration = _duration(r.get('path'), r.get('duration'), cache)
  spans = [np.shape(sim_map)[1] / fps] if sim_map is not None else []
  r_extent = _extent(duration, spans, [s[3] for s in segments])
  path = r.get('path')
  where = hp.escape(path) if path else '<i>no file</i>'
  dur = f' &middot; {hp.seconds(duration)} s' if duration else ''
  n = len(segments)
  return (f'<div class="result"><div class="head"><span class="rank">#{hp.escape(r["rank"])}</span>'
          f'<span class="rid">{hp.escape(r["id"])}</span>'
          f'<span class="score">score <b>{float(r["score"]):.4f}</b></span>'
          f'<span class="coarse">coarse {float(r["coarse_score"]):.4f}</span>'
          f'<span class="nseg">{n} segment{"s" if n != 1 else ""}</span></div>'
          f'<div class="path">{where}{dur}</div><div class="body"><div class="left">'
          f'{axes_svg(segments, q_extent, r_extent)}{strip_html("", path, r_extent, cache)}'
          f'{segments_table(segments)}</div><div class="right">{heatmap_svg(sim_map, fps, segments, colour_range)}</div>'
          '</div></div>')


def query_html(index: int, q: dict, cache: dict, colour_range=COLOUR_RANGE) -> str:
  results = sorted(q.get('results') or (), key=lambda r: r['rank'])
  duration = _duration(q.get('path'), q.get('duration'), cache)
  spans = [np.shape(r['sim_map'])[0] / float(r.get('map_fps') or 1.0) for r in results
           if r.get('sim_map') is not None]
  ends = [float(s[1]) for r in results for s in r.get('segments') or ()]
  extent = _extent(duration, spans, ends)
  path = q.get('path')
  where = hp.escape(path) if path else '<i>no file</i>'
  dur = f' &middot; {hp.seconds(duration)} s' if duration else ''
  body = ''.join(result_html(r, extent, cache, colour_range) for r in results) or (
      '<p class="none">No results for this query.</p>')
  return (f'<section class="query" id="q{index}"><h2>Query <span class="qid">{hp.escape(q["id"])}</span></h2>'
          f'<div class="path">{where}{dur}</div>{strip_html("query", path, extent, cache)}{body}</section>')


def _fail(where: str, what: str):
  raise ValueError(f'report: {where}: {what}')


def _check_result(where: str, r: dict) -> None:
  for key in ('rank', 'id', 'score', 'coarse_score'):
    if key not in r:
      _fail(where, f'no {key!r}')
  m = r.get('sim_map')
  if m is not None:
    if np.ndim(m) != 2 or 0 in np.shape(m):
      _fail(where, f'sim_map must be a non-empty [Tq, Tr] array, got shape {np.shape(m)}')
    if not float(r.get('map_fps') or 0) > 0:
      _fail(where, f'map_fps must be positive with a sim_map, got {r.get("map_fps")!r}')
  for k, s in enumerate(r.get('segments') or ()):
    v = np.asarray(s, np.float64)
    if v.shape != (5,) or not np.all(np.isfinite(v)):
      _fail(where, f'segment {k} must be 5 finite numbers (q_start, q_end, r_start, r_end, score), got {s!r}')
    if v[0] < 0 or v[2] < 0 or v[1] < v[0] or v[3] < v[2]:
      _fail(where, f'segment {k} {tuple(s)[:4]}: times must be >= 0 with end >= start')


def check(queries: list[dict]) -> None:
  """ValueError naming the query and result of the first entry the page cannot show."""
  for i, q in enumerate(queries):
    if 'id' not in q:
      _fail(f'query {i}', "no 'id'")
    for r in q.get('results') or ():
      _check_result(f'query {q["id"]!r}, result {r.get("id", "?")!r}', r)


def write_report(out_dir: str, queries: list[dict], title: str = 'HAP-VR search') -> str:
  """Writes `out_dir`/index.html (atomically) for `queries` (see the module doc) and returns its path."""
  check(queries)
  cache = {}   # one probe per video and one decoding per video and time span, however often it is listed
  nav = ''.join(f'<li><a href="#q{i}">{hp.escape(q["id"])}</a> <span class="muted">'
                f'{len(q.get("results") or ())} results</span></li>' for i, q in enumerate(queries))
  colours = page_range(queries)
  sections = ''.join(query_html(i, q, cache, colours) for i, q in enumerate(queries))
  page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{hp.escape(title)}</title>'
          f'<style>{report_style.css(LABEL_W, CELL)}</style></head><body><h1>{hp.escape(title)}</h1>'
          f'<p class="muted">{len(queries)} quer{"y" if len(queries) == 1 else "ies"}</p><ul class="nav">{nav}</ul>'
          f'{sections}</body></html>\n')
  path = os.path.join(out_dir, 'index.html')
  with io_util.atomic_open(path, 'wb') as f:
    f.write(page.encode('utf-8'))
  return path
