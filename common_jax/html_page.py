"""Pieces of self-contained HTML pages: escaped text, images as data: URIs (one file holds everything, so a page
can be mailed or opened without a server), heatmaps coloured in NumPy, and SVG time axes.

Geometry is plain arithmetic on seconds: `TimeScale` maps a time to an x (or y) pixel, and every SVG element
that stands for a time span is placed with it, so a test can recompute any coordinate from the times.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io

import numpy as np
from PIL import Image

# Segment colours: distinct on a light page and, with a white halo, on the heatmap's colour map.
PALETTE = ('#e6194b', '#f58231', '#3cb44b', '#4363d8', '#911eb4', '#f032e6', '#9a6324', '#000075')


def escape(text) -> str:
  """Text for an HTML/SVG text node or a quoted attribute."""
  return html.escape(str(text), quote=True)


def colour(i: int) -> str:
  return PALETTE[i % len(PALETTE)]


def data_uri(img: np.ndarray, fmt: str = 'JPEG', quality: int = 80, palette: np.ndarray | None = None) -> str:
  """A uint8 [H, W, 3] RGB image as a data: URI (JPEG for photographs, PNG for flat or exact images); with a
  uint8 [N, 3] `palette`, `img` is [H, W] indices into it (a palette PNG: a third of the bytes of RGB)."""
  buf = io.BytesIO()
  kwargs = {'quality': quality, 'optimize': True} if fmt == 'JPEG' else {'optimize': True}
  image = Image.fromarray(np.ascontiguousarray(img, np.uint8))
  if palette is not None:   # an 'L' image with a palette becomes a 'P' one
    image.putpalette(np.asarray(palette, np.uint8).ravel().tolist())
  image.save(buf, format=fmt, **kwargs)
  mime = 'image/jpeg' if fmt == 'JPEG' else 'image/png'
  return f'data:{mime};base64,' + base64.b64encode(buf.getvalue()).decode('ascii')


def palette(levels: int = 256, name: str = 'viridis') -> np.ndarray:
  """uint8 [levels, 3]: matplotlib's colour map `name` at `levels` evenly spaced points of [0, 1]."""
  from matplotlib import colormaps
  return (colormaps[name](np.linspace(0, 1, levels))[:, :3] * 255 + 0.5).astype(np.uint8)


def levels_of(values: np.ndarray, vmin: float, vmax: float, levels: int) -> np.ndarray:
  """int64 indices 0..levels-1 of `values` on [vmin, vmax] (nearest level, clipped)."""
  span = vmax - vmin if vmax > vmin else 1.0
  return np.round(np.clip((np.asarray(values, np.float64) - vmin) / span, 0, 1) * (levels - 1)).astype(np.int64)


def colormap(values: np.ndarray, vmin: float, vmax: float, name: str = 'viridis') -> np.ndarray:
  """uint8 [..., 3] colours of `values` on matplotlib's colour map `name`, [vmin, vmax] -> [0, 1] (clipped)."""
  return palette(256, name)[levels_of(values, vmin, vmax, 256)]


def heatmap(m: np.ndarray, max_side: int, lo: float | None = None, hi: float | None = None,
            levels: int = 64) -> tuple[np.ndarray, float, float, float]:
  """A 2-D map as an image for a plot at most `max_side` px on a side, with square cells.

  Returns (uint8 [h, w] indices into palette(levels), px per cell, vmin, vmax): `levels` colours are as many
  as the eye tells apart on a small heatmap, and keep a noisy map's PNG small. A small map is enlarged by a
  whole number of px per cell (crisp cells, exact positions); a large one is reduced by max-pooling blocks of
  cells (a thin bright diagonal survives, an average would fade it) and is drawn stretched to px per cell *
  the map size.
  Colours span [lo, hi] widened to hold every value (None: the map's own minimum or maximum)."""
  m = np.asarray(m, np.float64)
  finite = m[np.isfinite(m)]
  vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
  vmin, vmax = min(vmin, lo) if lo is not None else vmin, max(vmax, hi) if hi is not None else vmax
  m = np.where(np.isfinite(m), m, vmin)
  side = max(m.shape)
  if side <= max_side:
    k = max_side // side
    img = levels_of(np.repeat(np.repeat(m, k, 0), k, 1), vmin, vmax, levels).astype(np.uint8)
    return img, float(k), vmin, vmax
  block = -(-side // max_side)
  rows, cols = -(-m.shape[0] // block) * block, -(-m.shape[1] // block) * block
  padded = np.pad(m, ((0, rows - m.shape[0]), (0, cols - m.shape[1])), mode='edge')
  pooled = padded.reshape(rows // block, block, cols // block, block).max(axis=(1, 3))
  return levels_of(pooled, vmin, vmax, levels).astype(np.uint8), max_side / side, vmin, vmax


@dataclasses.dataclass(frozen=True)
class TimeScale:
  """Seconds [0, extent] onto pixels [origin, origin + length]."""
  origin: float
  length: float
  extent: float

  def __call__(self, t: float) -> float:
    return self.origin + (self.length * float(t) / self.extent if self.extent > 0 else 0.0)


def tick_step(extent: float, target: int = 6) -> float:
  """A 1-2-5 step (seconds) giving about `target` ticks over [0, extent]."""
  if extent <= 0:
    return 1.0
  raw = extent / target
  power = 10 ** np.floor(np.log10(raw))
  return float(next(s * power for s in (1, 2, 5, 10) if s * power >= raw))


def ticks(extent: float, target: int = 6) -> np.ndarray:
  step = tick_step(extent, target)
  return np.arange(0, extent + step * 1e-6, step) if extent > 0 else np.zeros(1)


def seconds(t: float) -> str:
  """A time in seconds as the page writes it: 0.1 s resolution below a minute, whole seconds above."""
  return f'{t:.1f}' if abs(t) < 60 else f'{t:.0f}'


def tick_label(t: float, step: float) -> str:
  return f'{t:.0f}' if step >= 1 else f'{t:.1f}'


def svg_text(x: float, y: float, text, anchor: str = 'middle', cls: str = '', extra: str = '') -> str:
  c = f' class="{cls}"' if cls else ''
  return f'<text x="{x:.2f}" y="{y:.2f}" text-anchor="{anchor}"{c}{extra}>{escape(text)}</text>'


def svg_axis(scale: TimeScale, y: float, horizontal: bool = True, below: bool = True, tick_len: float = 4,
             target: int = 6, unit: str = '') -> str:
  """Tick marks and labels (seconds, followed by `unit`) of `scale` along a line at `y` (x for a vertical
  axis)."""
  step, parts = tick_step(scale.extent, target), []
  for t in ticks(scale.extent, target):
    p = scale(t)
    if horizontal:
      end = y + (tick_len if below else -tick_len)
      parts.append(f'<line x1="{p:.2f}" y1="{y:.2f}" x2="{p:.2f}" y2="{end:.2f}" class="tick"/>')
      parts.append(svg_text(p, end + (10 if below else -3), tick_label(t, step) + unit, cls='tl'))
    else:
      parts.append(f'<line x1="{y - tick_len:.2f}" y1="{p:.2f}" x2="{y:.2f}" y2="{p:.2f}" class="tick"/>')
      parts.append(svg_text(y - tick_len - 2, p + 3.5, tick_label(t, step), anchor='end', cls='tl'))
  return ''.join(parts)
