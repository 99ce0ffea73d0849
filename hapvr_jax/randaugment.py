"""RandAugment for whole uint8 clips, in NumPy, following torchvision's tensor semantics (no torchvision needed).

HAP-VR applies `torchvision.transforms.RandAugment(num_ops=2, magnitude=9)` to the strong view's [T, C, H, W] uint8
tensor, so the two sampled ops, magnitudes and signs are identical for every frame,
while data-dependent ops (Contrast, AutoContrast, Equalize) use each frame's own statistics. This module
reimplements that op list on a [T, H, W, 3] uint8 NumPy clip:

  op (signed?)   magnitude at bin b of 31          applied as (torchvision tensor kernel semantics)
  Identity        -
  ShearX/Y (+-)   linspace(0, 0.3)                 affine shear atan(m), centre (0, 0), nearest, fill 0
  TranslateX/Y(+-)linspace(0, 150/331 * W or H)    affine shift int(m) pixels, nearest, fill 0
  Rotate (+-)     linspace(0, 30) degrees          counter-clockwise about the centre, nearest, fill 0
  Brightness/Color/Contrast/Sharpness (+-) linspace(0, 0.9), factor 1 + m: float32 blend, clamp, truncate
  Posterize       8 - round(arange(31) / 7.5) bits  img & mask
  Solarize        linspace(1, 0) * 255 threshold    img >= thr -> 255 - img
  AutoContrast, Equalize                            per frame and channel

Affine ops reproduce `grid_sample(mode='nearest', align_corners=False, padding zeros)`: each output pixel centre is
mapped by the inverse matrix (in coordinates centred on the image) and rounded half-to-even to a source pixel.
Per-value ops (Brightness, Contrast, Posterize, Solarize, AutoContrast, Equalize) are computed as exact 256-entry
LUTs with those float32 formulas and applied with PIL's `point` per frame (fast C); Sharpness uses PIL's SMOOTH
kernel, which equals torchvision's degenerate image (checked in tests/hapvr/augment_test.py).
All randomness comes from a `np.random.Generator`, drawn in torchvision's order (op index, then sign).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

OPS = ('Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness', 'Color', 'Contrast',
       'Sharpness', 'Posterize', 'Solarize', 'AutoContrast', 'Equalize')
SIGNED = frozenset({'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness', 'Color', 'Contrast',
                    'Sharpness'})


def magnitude_of(op: str, bin_index: int, num_bins: int, height: int, width: int) -> float:
  """The unsigned magnitude torchvision's `_augmentation_space` gives `op` at `bin_index` (0 for magnitude-free ops)."""
  frac = bin_index / (num_bins - 1)
  if op in ('ShearX', 'ShearY'):
    return 0.3 * frac
  if op == 'TranslateX':
    return 150.0 / 331.0 * width * frac
  if op == 'TranslateY':
    return 150.0 / 331.0 * height * frac
  if op == 'Rotate':
    return 30.0 * frac
  if op in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
    return 0.9 * frac
  if op == 'Posterize':
    return float(8 - int(np.rint(bin_index / ((num_bins - 1) / 4))))
  if op == 'Solarize':
    return 255.0 * (1.0 - frac)
  return 0.0


def sample_ops(rng: np.random.Generator, height: int, width: int, num_ops: int = 2, magnitude: int = 9,
               num_bins: int = 31) -> list[dict]:
  """Draws `num_ops` (op, signed magnitude) pairs as torchvision does; JSON-able list of dicts."""
  out = []
  for _ in range(num_ops):
    op = OPS[int(rng.integers(len(OPS)))]
    m = magnitude_of(op, magnitude, num_bins, height, width)
    if op in SIGNED and int(rng.integers(2)):
      m = -m
    out.append({'op': op, 'magnitude': float(m)})
  return out


def apply_ops(clip: np.ndarray, ops: list[dict]) -> np.ndarray:
  for o in ops:
    clip = apply_op(clip, o['op'], o['magnitude'])
  return clip


# ------------------------------------------------------------------------------------------------ geometry

def _affine_nearest(clip, matrix):
  """Inverse-maps output pixel centres through `matrix` (2x3, centred coordinates); nearest, zero fill."""
  t, h, w, c = clip.shape
  yc, xc = np.meshgrid(np.arange(h) + 0.5 - h / 2, np.arange(w) + 0.5 - w / 2, indexing='ij')
  (a, b, cc), (d, e, f) = matrix
  ix = np.rint(a * xc + b * yc + cc + w / 2 - 0.5).astype(np.int64)
  iy = np.rint(d * xc + e * yc + f + h / 2 - 0.5).astype(np.int64)
  valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  flat = np.where(valid, iy * w + ix, 0).reshape(-1)
  out = np.take(clip.reshape(t, h * w, c), flat, axis=1)  # C-contiguous (fancy indexing may not be)
  out[:, ~valid.reshape(-1)] = 0
  return out.reshape(t, h, w, c)


def _affine(clip, m_shear_x=0.0, m_shear_y=0.0, tx=0.0, ty=0.0, rot_deg=0.0, corner_centre=False):
  """torchvision `_get_inverse_affine_matrix` for the special cases RandAugment uses (scale 1)."""
  _, h, w, _ = clip.shape
  rot = math.radians(rot_deg)
  sx, sy = math.atan(m_shear_x), math.atan(m_shear_y)
  a = math.cos(rot - sy) / math.cos(sy)
  b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
  c = math.sin(rot - sy) / math.cos(sy)
  d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
  m = [d, -b, 0.0, -c, a, 0.0]
  cx, cy = (-w * 0.5, -h * 0.5) if corner_centre else (0.0, 0.0)
  m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
  m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
  return _affine_nearest(clip, ((m[0], m[1], m[2]), (m[3], m[4], m[5])))


# ------------------------------------------------------------------------------------------------ colour

def _blend(img1, img2, ratio):
  """torchvision `_blend`: float32 ratio*img1 + (1-ratio)*img2, clamped to [0, 255], truncated to uint8."""
  out = img1.astype(np.float32)
  out *= np.float32(ratio)
  out += np.float32(1.0 - ratio) * np.asarray(img2, np.float32)
  np.clip(out, 0, 255, out=out)
  return out.astype(np.uint8)


def _apply_luts(clip, luts):
  """Per-frame, per-channel LUTs ([3, 256] shared or [T, 3, 256]) via PIL's point (fast C)."""
  luts = np.broadcast_to(np.asarray(luts, np.uint8), (clip.shape[0], 3, 256))
  out = np.empty_like(clip)
  for t, frame in enumerate(clip):
    out[t] = np.asarray(Image.fromarray(frame).point(luts[t].reshape(-1).tolist()))
  return out


def grayscale(clip):
  """torchvision rgb_to_grayscale for uint8: float32 weighted sum truncated to uint8; [T, H, W]."""
  r, g, b = (clip[..., i].astype(np.float32) for i in range(3))
  r *= np.float32(0.2989)
  r += np.float32(0.587) * g
  r += np.float32(0.114) * b
  return r.astype(np.uint8)


def _sharpness(clip, factor):
  """Blend with the degenerate image: interior = round(3x3 [1 1 1; 1 5 1; 1 1 1] / 13), border unchanged.

  PIL's ImageFilter.SMOOTH is exactly this kernel with round-half-up on a sum that is never a tie (13 is odd), and
  it leaves the border pixels unchanged, so it reproduces torchvision's `_blurred_degenerate_image`."""
  _, h, w, _ = clip.shape
  if h <= 2 or w <= 2:
    return clip
  degenerate = np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.SMOOTH)) for f in clip])
  return _blend(clip, degenerate, factor)


def _autocontrast_luts(clip):
  luts = np.empty((clip.shape[0], 3, 256), np.uint8)
  v = np.arange(256, dtype=np.float32)
  for t, frame in enumerate(clip):
    for c, (lo, hi) in enumerate(Image.fromarray(frame).getextrema()):
      if hi == lo:  # torchvision: non-finite scale -> identity
        lo, scale = np.float32(0), np.float32(1)
      else:
        lo, scale = np.float32(lo), np.float32(255.0) / np.float32(hi - lo)
      luts[t, c] = np.clip((v - lo) * scale, 0, 255).astype(np.uint8)
  return luts


def equalize_lut(hist):
  """PIL / torchvision equalize LUT from one channel's 256-bin histogram."""
  hist = np.asarray(hist, np.int64)
  nonzero = hist[hist > 0]
  step = (nonzero.sum() - nonzero[-1]) // 255 if nonzero.size else 0
  if step == 0:
    return np.arange(256, dtype=np.uint8)
  lut = (np.cumsum(hist) + step // 2) // step
  return np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(np.uint8)


def _equalize_luts(clip):
  luts = np.empty((clip.shape[0], 3, 256), np.uint8)
  for t, frame in enumerate(clip):
    hist = np.asarray(Image.fromarray(frame).histogram()).reshape(3, 256)
    for c in range(3):
      luts[t, c] = equalize_lut(hist[c])
  return luts


def apply_op(clip: np.ndarray, op: str, magnitude: float) -> np.ndarray:
  """One torchvision `_apply_op` on a uint8 [T, H, W, 3] clip (magnitude already signed)."""
  if op == 'Identity':
    return clip
  if op == 'ShearX':
    return _affine(clip, m_shear_x=magnitude, corner_centre=True)
  if op == 'ShearY':
    return _affine(clip, m_shear_y=magnitude, corner_centre=True)
  if op == 'TranslateX':
    return _affine(clip, tx=float(int(magnitude)))
  if op == 'TranslateY':
    return _affine(clip, ty=float(int(magnitude)))
  if op == 'Rotate':
    return _affine(clip, rot_deg=-magnitude)  # F.rotate passes -angle to the affine matrix
  v = np.arange(256, dtype=np.uint8)
  if op == 'Brightness':
    return _apply_luts(clip, [_blend(v, 0.0, 1.0 + magnitude)] * 3)
  if op == 'Color':
    return _blend(clip, grayscale(clip)[..., None], 1.0 + magnitude)
  if op == 'Contrast':
    means = grayscale(clip).reshape(clip.shape[0], -1).mean(axis=1, dtype=np.float64).astype(np.float32)
    return _apply_luts(clip, np.stack([[_blend(v, m, 1.0 + magnitude)] * 3 for m in means]))
  if op == 'Sharpness':
    return _sharpness(clip, 1.0 + magnitude)
  if op == 'Posterize':
    return _apply_luts(clip, [v & np.uint8((256 - 2 ** (8 - int(magnitude))) & 0xFF)] * 3)
  if op == 'Solarize':
    return _apply_luts(clip, [np.where(v >= magnitude, 255 - v, v)] * 3)
  if op == 'AutoContrast':
    return _apply_luts(clip, _autocontrast_luts(clip))
  if op == 'Equalize':
    return _apply_luts(clip, _equalize_luts(clip))
  raise ValueError(f'unknown RandAugment op {op!r}; known: {OPS}')
