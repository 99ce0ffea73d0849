"""Tiny synthetic videos for the decoding tests, written with PyAV (no ffmpeg binary needed).

Every frame's content says which frame it is, so a test can check which frame a decoder picked after any
scaling or centre crop:

* the top half of frame ``i`` is a flat colour that encodes ``i`` (`index_colour`); flat colours survive
  intra MPEG-4 / H.264 coding, YUV 4:2:0 and bicubic resampling to within a few levels, whatever the geometry;
* the bottom half is dark grey, so a test can also see the orientation (a display rotation moves the code).

`frame_index` reads the index back from the centre of the code half. The audio track (optional) is a sine
tone of a known frequency on every channel. Generating a few seconds at QVGA takes well under a second.
"""
from __future__ import annotations

import fractions
from typing import Optional, Tuple

import av
import numpy as np

_STEP = 30    # colour levels between two codes: decoding tolerates errors of up to +-10 levels per channel
_BASE = 15
_LEVELS = 8   # codes per channel: frame indices 0..511
BOTTOM = 60   # grey level of the bottom half


def index_colour(i: int) -> Tuple[int, int, int]:
  """The RGB colour encoding frame index ``i`` (three base-8 digits, one per channel)."""
  if not 0 <= i < _LEVELS ** 3:
    raise ValueError(f'frame index {i} cannot be encoded')
  return tuple(_BASE + _STEP * (i // _LEVELS ** c % _LEVELS) for c in range(3))


def frame_index(img: np.ndarray, where: str = 'top') -> int:
  """Decodes the frame index from an RGB uint8 [H, W, 3] frame whose code half is at ``where``.

  ``where`` is 'top' for an upright frame, or 'left' / 'right' / 'bottom' for a rotated one.
  Raises AssertionError when the sampled colour is not close to a code (wrong frame, garbage).
  """
  h, w = img.shape[:2]
  cy, cx = {'top': (h // 4, w // 2), 'bottom': (3 * h // 4, w // 2),
            'left': (h // 2, w // 4), 'right': (h // 2, 3 * w // 4)}[where]
  ry, rx = max(1, h // 16), max(1, w // 16)
  rgb = img[cy - ry:cy + ry + 1, cx - rx:cx + rx + 1].reshape(-1, 3).astype(np.float64).mean(0)
  digits = (rgb - _BASE) / _STEP
  rounded = np.round(digits)
  assert np.all(np.abs(digits - rounded) * _STEP <= 10) and np.all((rounded >= 0) & (rounded < _LEVELS)), (
      f'colour {rgb} at {where} is not a frame code')
  return int(sum(int(d) * _LEVELS ** c for c, d in enumerate(rounded)))


def make_frame(i: int, width: int, height: int) -> np.ndarray:
  """Frame ``i`` as RGB uint8 [height, width, 3]."""
  img = np.full((height, width, 3), BOTTOM, np.uint8)
  img[:height // 2] = index_colour(i)
  return img


def make_video(path: str, seconds: float = 4.0, fps: int = 25, size: Tuple[int, int] = (320, 240),
               audio_hz: Optional[float] = 440.0, audio_rate: int = 44100, channels: int = 2,
               codec: str = 'mpeg4', rotation: int = 0, amplitude: float = 0.5, gop: int = 1) -> str:
  """Writes an MP4 with ``round(seconds * fps)`` coded frames of ``size = (width, height)``.

  Frame ``i`` has pts ``i / fps`` and shows `make_frame(i)`. With ``audio_hz`` a sine tone of that frequency
  (amplitude ``amplitude`` on each of ``channels`` channels, AAC at ``audio_rate``) lasts ``seconds``.
  ``rotation`` (degrees counter-clockwise, a multiple of 90) is stored as the stream's display matrix, as
  phones do for portrait recordings. ``gop`` > 1 makes inter-coded videos (use 'libx264', whose colours stay
  within the code tolerance; it also reorders frames with B-frames). Returns ``path``.
  """
  width, height = size
  n = int(round(seconds * fps))
  with av.open(path, 'w', format='mp4') as out:
    vs = out.add_stream(codec, rate=fps)
    vs.width, vs.height, vs.pix_fmt = width, height, 'yuv420p'
    vs.time_base = fractions.Fraction(1, fps)
    vs.gop_size = gop  # default intra only: MPEG-4 inter coding lets flat colours drift beyond the tolerance
    if codec == 'mpeg4':
      vs.codec_context.options = {'qscale': '2'}
    else:
      vs.codec_context.options = {'crf': '5', 'preset': 'ultrafast', 'x264-params': 'bframes=2'}
    if rotation:
      vs.set_display_rotation(rotation)
    aus = None
    if audio_hz is not None:
      aus = out.add_stream('aac', rate=audio_rate)
      aus.layout = 'mono' if channels == 1 else 'stereo'
    for i in range(n):
      frame = av.VideoFrame.from_ndarray(make_frame(i, width, height), format='rgb24')
      frame.pts = i
      out.mux(vs.encode(frame))
    out.mux(vs.encode(None))
    if aus is not None:
      total = int(round(seconds * audio_rate))
      t = np.arange(total) / audio_rate
      tone = (amplitude * np.sin(2 * np.pi * audio_hz * t)).astype(np.float32)
      step = 1024
      for start in range(0, total, step):
        chunk = np.repeat(tone[None, start:start + step], channels, axis=0)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format='fltp',
                                           layout='mono' if channels == 1 else 'stereo')
        frame.sample_rate, frame.pts = audio_rate, start
        frame.time_base = fractions.Fraction(1, audio_rate)
        out.mux(aus.encode(frame))
      out.mux(aus.encode(None))
  return path


def make_corrupt(path: str, kind: str = 'garbage', source: Optional[str] = None) -> str:
  """Writes a broken file: 'garbage' (random bytes), 'empty' (0 bytes) or 'truncated' (the first third of
  ``source``, a valid video). Returns ``path``."""
  if kind == 'garbage':
    data = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
  elif kind == 'empty':
    data = b''
  elif kind == 'truncated':
    with open(source, 'rb') as f:
      full = f.read()
    data = full[:len(full) // 3]
  else:
    raise ValueError(f'unknown kind {kind!r}')
  with open(path, 'wb') as f:
    f.write(data)
  return path
