"""Video editing operations for building copy-detection material: decode to frames, the edits that copy
benchmarks apply to a copied segment, synthetic filler footage, and encoding, with PyAV (no ffmpeg binary).

Frames are uint8 [T, H, W, 3] RGB arrays at one constant rate: frame i shows time i / fps, which is how
`encode` stamps them and how `video_io.read_frames_fps` at the same rate gives them back.

  frames = decode(path, fps=10, short_side=320)                    # the fps filter's frames (video_io)
  views = tiles(frames, size=(284, 160), grid=2)                    # 4 disjoint regions, each at `size`
  edited = brightness_contrast(hflip(crop(frames, box)), 20, 1.2)   # edits keep the frame size
  encode('out.mp4', edited, fps=10, bitrate=50_000)                 # written under a temporary name

Sizes are (width, height). Resampling is PIL's bilinear filter (antialiased when shrinking). A speed change
is a frame mapping (`speed_indices`): output frame j shows source frame floor((j + 0.5) * n / m), so an n-frame
segment played in m frames covers it end to end and output time t maps to source time t * n / m.
"""
from __future__ import annotations

import fractions
import os
from typing import Iterable, Sequence

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common_jax import io_util
from extraction import video_io

Size = tuple[int, int]


def frame_size(short_side: int, aspect: float = 16 / 9) -> Size:
  """(width, height) of a landscape frame: height ``short_side``, width the nearest even number to
  short_side * aspect (H.264 in 4:2:0 needs even sizes)."""
  if short_side < 8 or short_side % 2:
    raise ValueError(f'frame height {short_side} must be even and at least 8')
  return 2 * int(round(short_side * aspect / 2)), short_side


def decode(path: str, fps: float, short_side: int | None = None) -> np.ndarray:
  """Frames of ``path`` at a constant ``fps`` (video_io.read_frames_fps: the fps filter's choice of frames),
  shorter side scaled to ``short_side`` (None: native size). Raises video_io.VideoError for a broken file."""
  frames, _ = video_io.read_frames_fps(path, fps=fps, short_side=short_side, crop=None)
  return frames


def resize(frames: np.ndarray, size: Size) -> np.ndarray:
  """Every frame resized to ``size`` = (width, height)."""
  if frames.shape[2:0:-1] == tuple(size):
    return frames
  return np.stack([np.asarray(Image.fromarray(f).resize(tuple(size), Image.Resampling.BILINEAR)) for f in frames])


def cover(frames: np.ndarray, size: Size) -> np.ndarray:
  """Scaled so that ``size`` fits inside, then the centre ``size`` window (floor offsets): no bars, no
  distortion."""
  h, w = frames.shape[1:3]
  scale = max(size[0] / w, size[1] / h)
  sw, sh = max(size[0], int(round(w * scale))), max(size[1], int(round(h * scale)))
  scaled = resize(frames, (sw, sh))
  top, left = (sh - size[1]) // 2, (sw - size[0]) // 2
  return np.ascontiguousarray(scaled[:, top:top + size[1], left:left + size[0]])


def tiles(frames: np.ndarray, size: Size, grid: int = 2) -> list[np.ndarray]:
  """The ``grid`` x ``grid`` disjoint regions of the frames (row-major; region edges at floor(k * side /
  grid)), each brought to ``size`` with `cover`: one clip gives grid**2 sequences that share no pixel."""
  h, w = frames.shape[1:3]
  ys, xs = [k * h // grid for k in range(grid + 1)], [k * w // grid for k in range(grid + 1)]
  return [cover(frames[:, ys[r]:ys[r + 1], xs[c]:xs[c + 1]], size) for r in range(grid) for c in range(grid)]


def crop(frames: np.ndarray, box: Sequence[int]) -> np.ndarray:
  """The ``box`` = (left, top, right, bottom) window of every frame, resized back to the frame size."""
  left, top, right, bottom = map(int, box)
  h, w = frames.shape[1:3]
  if not (0 <= left < right <= w and 0 <= top < bottom <= h):
    raise ValueError(f'crop box {tuple(box)} is not inside a {w}x{h} frame')
  return resize(np.ascontiguousarray(frames[:, top:bottom, left:right]), (w, h))


def hflip(frames: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(frames[:, :, ::-1])


def brightness_contrast(frames: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
  """round((x - 128) * contrast + 128 + brightness), clipped to [0, 255]."""
  out = (frames.astype(np.float32) - 128.0) * np.float32(contrast) + np.float32(128.0 + brightness)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except (OSError, ImportError, TypeError):   # a PIL without FreeType has only its fixed bitmap font
    return ImageFont.load_default()


def overlay_text(frames: np.ndarray, text: str, xy: Sequence[int], font_size: int,
                 colour: Sequence[int] = (255, 255, 255)) -> np.ndarray:
  """``text`` drawn at the top-left corner ``xy`` (pixels) of every frame, opaque, in PIL's default font at
  ``font_size`` pixels; text that runs past the frame edge is cut."""
  h, w = frames.shape[1:3]
  mask = Image.new('L', (w, h), 0)
  ImageDraw.Draw(mask).text(tuple(int(v) for v in xy), text, fill=255, font=_font(int(font_size)))
  alpha = (np.asarray(mask, np.float32) / 255.0)[None, :, :, None]
  out = frames.astype(np.float32) * (1 - alpha) + np.asarray(colour, np.float32) * alpha
  return np.round(out).astype(np.uint8)


def picture_in_picture(guest: np.ndarray, host: np.ndarray, box: Sequence[int]) -> np.ndarray:
  """Each ``guest`` frame shrunk into the ``box`` = (left, top, right, bottom) of the matching ``host`` frame."""
  left, top, right, bottom = map(int, box)
  h, w = host.shape[1:3]
  if len(guest) != len(host):
    raise ValueError(f'{len(guest)} guest frames for {len(host)} host frames')
  if not (0 <= left < right <= w and 0 <= top < bottom <= h):
    raise ValueError(f'picture-in-picture box {tuple(box)} is not inside a {w}x{h} frame')
  out = host.copy()
  out[:, top:bottom, left:right] = resize(guest, (right - left, bottom - top))
  return out


def speed_indices(n: int, m: int) -> np.ndarray:
  """Source frame of each of ``m`` output frames that play ``n`` source frames (speed n / m):
  floor((j + 0.5) * n / m), computed in integers."""
  if n < 1 or m < 1:
    raise ValueError(f'a speed change needs at least one frame in and out (got {n} -> {m})')
  return ((2 * np.arange(m, dtype=np.int64) + 1) * n) // (2 * m)


def synthetic_frames(indices: Iterable[int], size: Size, seed: int) -> np.ndarray:
  """Procedural footage, frames ``indices`` of an endless sequence fixed by ``seed``: a slowly drifting
  colour gradient with a few discs moving on smooth paths. It looks like no real video, so it can fill a
  query without matching any reference."""
  rng = np.random.default_rng(seed)
  base, drift = rng.uniform(30, 220, (2, 3)), rng.uniform(0.01, 0.05, 3)
  discs = rng.uniform(0, 1, (4, 7))   # centre x/y, radius, phase x/y, colour level, frequency
  w, h = size
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  out = []
  for t in indices:
    mix = 0.5 + 0.5 * np.sin(drift * t)[:, None, None]
    ramp = (xx / max(w - 1, 1) + yy / max(h - 1, 1))[None] / 2
    img = (base[0][:, None, None] * (1 - ramp) * mix + base[1][:, None, None] * ramp * (1 - mix) + 20)
    for cx, cy, r, px, py, level, f in discs:
      x = w * (cx + 0.3 * np.sin(0.05 * (1 + f) * t + 6.3 * px))
      y = h * (cy + 0.3 * np.cos(0.04 * (1 + f) * t + 6.3 * py))
      inside = (xx - x) ** 2 + (yy - y) ** 2 < (0.05 + 0.15 * r) ** 2 * h * w
      img[:, inside] = 255 * level
    out.append(np.clip(img.transpose(1, 2, 0), 0, 255).astype(np.uint8))
  return np.stack(out) if out else np.zeros((0, h, w, 3), np.uint8)


def encode(path: str, frames: np.ndarray, fps: int, crf: int = 18, bitrate: int | None = None,
           preset: str = 'veryfast') -> None:
  """H.264 MP4 (yuv420p) of ``frames``, frame i at time i / fps; constant quality ``crf``, or the average
  ``bitrate`` in bits/s when given. The same frames and settings give the same bytes.
  The file is written under a temporary name and renamed when complete."""
  h, w = frames.shape[1:3]
  if w % 2 or h % 2 or not len(frames):
    raise ValueError(f'{path}: cannot encode {len(frames)} frames of {w}x{h} (H.264 4:2:0 needs even sizes)')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with io_util.atomic_open(path, 'wb') as f, av.open(f, 'w', format='mp4') as out:
    stream = out.add_stream('libx264', rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, 'yuv420p'
    stream.time_base = fractions.Fraction(1, fps)
    # x264's macroblock-tree assembly reads memory it never wrote for some frame sizes, so with it on the same
    # frames do not always give the same bytes
    options = {'preset': preset, 'x264-params': 'mbtree=0'}
    if bitrate:
      stream.bit_rate = int(bitrate)
    else:
      options['crf'] = str(crf)
    stream.codec_context.options = options
    for i, img in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format='rgb24')
      frame.pts = i
      out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
