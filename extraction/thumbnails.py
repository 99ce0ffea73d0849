"""Frame strips: a few frames of a video at evenly spaced times, shrunk to thumbnails and laid side by side in
one image, for pages that show what a video contains."""
from __future__ import annotations

import numpy as np
from PIL import Image

from extraction import video_io


def fit(img: np.ndarray, width: int, height: int) -> np.ndarray:
  """`img` shrunk (or enlarged) to fit a width x height box, aspect ratio kept (PIL's antialiasing filter)."""
  h, w = img.shape[:2]
  scale = min(width / w, height / h)
  size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
  return np.asarray(Image.fromarray(img).resize(size, resample=Image.Resampling.LANCZOS))


def compose(frames, cell: int, height: int, background=(32, 32, 32), gap: int = 4) -> np.ndarray:
  """Frames side by side, each fitted into a (cell - gap) x height box centred in a cell of `cell` px, so
  frame k's centre lies at x = (k + 0.5) * cell: uint8 [height, len(frames) * cell, 3]."""
  strip = np.empty((height, len(frames) * cell, 3), np.uint8)
  strip[:] = background
  for k, frame in enumerate(frames):
    thumb = fit(np.asarray(frame, np.uint8), cell - gap, height)
    top, left = (height - thumb.shape[0]) // 2, k * cell + (cell - thumb.shape[1]) // 2
    strip[top:top + thumb.shape[0], left:left + thumb.shape[1]] = thumb
  return strip


def frame_strip(path: str, n: int, cell: int, height: int, duration: float | None = None):
  """(strip image as `compose` makes it, float64 [n] times) of `n` frames of the video at `path` at the
  centres of n equal slices of its duration (from the header when not given). Raises video_io.VideoError
  for a missing or undecodable file."""
  if duration is None or not duration > 0:
    duration = video_io.probe(path).duration
  times = video_io.uniform_times(duration, n)
  return compose(video_io.read_frames_at(path, times), cell, height), times
