"""Pixel augmentations of HAP-VR's weak and strong views and of the pixel-level video-in-video composite, in NumPy/PIL.

Used at feature-extraction time: each stored view is one draw of these parameters applied to
a 56-frame segment, and the sampled parameters go into the shard metadata. Inputs are uint8 RGB clips
[T, H, W, 3] whose frames are already shorter-side-256 resized (as the original loads them); outputs are uint8
[T, 224, 224, 3] plus a JSON-able meta dict.

* `weak_view`: RandomResizedCrop(224, scale (0.8, 1), ratio (3/4, 4/3)) + horizontal flip p 0.5, one draw
  for the whole clip. Crop sampling follows torchvision (10 attempts on area and log-ratio, then a centre crop with
  the ratio clamped); the crop is resized with PIL's antialiased bilinear filter (what torchvision's
  BILINEAR + antialias is designed to match).
* `strong_view`: the same crop with scale (0.5, 1) and flip (clip-consistent), RandAugment(2, 9)
  clip-consistent (`randaugment.py`), then per frame: text overlay p 0.3, emoji overlay p 0.3, Gaussian
  blur p 0.5 with radius U(0.1, 2) (PIL ImageFilter.GaussianBlur), in that order, as augly's overlay_text /
  overlay_emoji / blur would.
  - `fonts`: TTF/OTF paths, e.g. `glob('<augly>/assets/fonts/*.ttf')`; default: PIL's built-in scalable font
    (`ImageFont.load_default(size=...)`, needs PIL's FreeType support). Characters are random printable ASCII.
  - `emojis`: RGBA image paths, e.g. `glob('<augly>/assets/twemojis/*/*.png')`; default: a synthetic emoji drawn with
    PIL (coloured face with eyes and a mouth, transparent background), so the product needs no assets.
* `viv_composite`: the guest clip resized into a box of side int(S * sqrt(1 - lam))
  centred on a uniform random pixel of the host, clipped to the frame (can shrink to about half), pasted
  into a copy of the host.

Quirk kept from torchvision: a 16:9 frame at short side 256 (256x455) cannot hold a crop of >= 0.8 of its area with
ratio <= 4/3, so the weak view of such videos is always the 256x341 centre crop (only the flip varies).
Free choices (augly's semantics otherwise): text is 4-10 random printable ASCII characters on one
line, font size int(size * short side); text and emoji top-left corners are uniform in [0, 1 - size) of the frame
(augly's relative x_pos/y_pos), the emoji height is int(size * H) with its aspect kept; an overlay is alpha-blended
with alpha = round(255 * opacity) (scaled by the emoji's own alpha). ViV box: [c - side//2, c - side//2 + side),
clipped.

All randomness comes from the `np.random.Generator` argument (or an int seed): equal seeds give equal frames and
meta. The meta records the generator state at entry (`rng_state`), so any view can be replayed exactly.
"""
from __future__ import annotations

import functools
import math
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from hapvr_jax import randaugment

SIZE = 224
_CHARS = np.array(list(string.ascii_letters + string.digits + string.punctuation))


def _as_rng(rng):
  seed = rng if isinstance(rng, (int, np.integer)) else None
  rng = np.random.default_rng(int(seed)) if seed is not None else rng
  return rng, {'seed': seed, 'rng_state': _jsonable(rng.bit_generator.state)}


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  return x.tolist() if isinstance(x, (np.ndarray, np.generic)) else x


def _check_clip(clip):
  clip = np.asarray(clip)
  if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
    raise ValueError(f'expected a uint8 [T, H, W, 3] clip, got {clip.dtype} {clip.shape}')
  return clip


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3)) -> dict:
  """torchvision RandomResizedCrop.get_params: top, left, height, width (+ whether the fallback was used)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      i = int(rng.integers(0, height - h + 1))
      j = int(rng.integers(0, width - w + 1))
      return {'top': i, 'left': j, 'height': h, 'width': w, 'fallback': False}
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return {'top': (height - h) // 2, 'left': (width - w) // 2, 'height': h, 'width': w, 'fallback': True}


def resize_frames(clip, out_h, out_w, box=None, flip=False):
  """PIL antialiased bilinear resize of every frame (optionally of the integer box (left, top, right, bottom)),
  then an optional horizontal flip."""
  out = np.empty((clip.shape[0], out_h, out_w, 3), np.uint8)
  for t, frame in enumerate(clip):
    img = Image.fromarray(frame).resize((out_w, out_h), Image.BILINEAR, box=box)
    out[t] = np.asarray(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img)
  return out


def _crop_flip(clip, rng, scale):
  crop = random_resized_crop_params(rng, clip.shape[1], clip.shape[2], scale)
  flip = bool(rng.random() < 0.5)
  box = (crop['left'], crop['top'], crop['left'] + crop['width'], crop['top'] + crop['height'])
  return resize_frames(clip, SIZE, SIZE, box, flip), {'crop': crop, 'flip': flip}


def weak_view(clip: np.ndarray, rng, scale=(0.8, 1.0)) -> tuple[np.ndarray, dict]:
  """Crop and flip on all frames: uint8 [T, 224, 224, 3] and meta {view, seed, rng_state, config, crop, flip}."""
  clip = _check_clip(clip)
  rng, meta = _as_rng(rng)
  out, m = _crop_flip(clip, rng, scale)
  return out, {'view': 'weak', **meta, 'config': {'scale': list(scale)}, **m}


# ------------------------------------------------------------------------------------------------ frame FT

@functools.lru_cache(maxsize=256)
def _font(path, size):
  return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=64)
def _emoji_file(path):
  return Image.open(path).convert('RGBA')


@functools.lru_cache(maxsize=8)
def _emoji_template(mouth):
  """A 256-px RGBA smiley: white face, dark outline/eyes/mouth, transparent outside; recoloured per use."""
  s = 256
  img = Image.new('RGBA', (s, s), (0, 0, 0, 0))
  d = ImageDraw.Draw(img)
  dark = (40, 30, 25, 255)
  d.ellipse((6, 6, s - 7, s - 7), fill=(255, 255, 255, 255), outline=dark, width=8)
  for cx in (0.35, 0.65):
    d.ellipse((s * (cx - .07), s * .28, s * (cx + .07), s * .46), fill=dark)
  if mouth == 'smile':
    d.arc((s * .27, s * .45, s * .73, s * .78), 20, 160, fill=dark, width=13)
  elif mouth == 'frown':
    d.arc((s * .27, s * .62, s * .73, s * .95), 200, 340, fill=dark, width=13)
  else:
    d.ellipse((s * .4, s * .58, s * .6, s * .8), fill=dark)
  return img


def synthetic_emoji(size: int, face_rgb, mouth: str) -> Image.Image:
  """An RGBA smiley of side `size`: face colour `face_rgb`, mouth 'smile' | 'frown' | 'open'; no asset files."""
  small = np.array(_emoji_template(mouth).resize((size, size), Image.BILINEAR), np.float32)
  small[..., :3] *= np.asarray(face_rgb, np.float32) / 255.0
  return Image.fromarray(np.rint(small).astype(np.uint8), 'RGBA')


def _text_overlay(img, rng, fonts):
  w, h = img.size
  frac = float(rng.uniform(0.2, 0.5))
  font_idx = int(rng.integers(len(fonts))) if fonts else None
  text = ''.join(rng.choice(_CHARS, int(rng.integers(4, 11))))
  opacity = float(rng.uniform(0.7, 1.0))
  colour = [int(v) for v in rng.integers(0, 256, 3)]
  x, y = int(rng.uniform(0, 1 - frac) * w), int(rng.uniform(0, 1 - frac) * h)
  font = _font(None if font_idx is None else fonts[font_idx], max(1, int(frac * min(w, h))))
  layer = Image.new('RGBA', img.size, (0, 0, 0, 0))
  ImageDraw.Draw(layer).text((x, y), text, font=font, fill=tuple(colour) + (int(round(opacity * 255)),))
  out = Image.alpha_composite(img.convert('RGBA'), layer).convert('RGB')
  bbox = layer.getbbox()
  return out, {'text': text, 'font': 'pil_default' if font_idx is None else str(fonts[font_idx]),
               'size': frac, 'opacity': opacity, 'colour': colour, 'xy': [x, y],
               'box': list(bbox) if bbox else None}


def _emoji_overlay(img, rng, emojis):
  w, h = img.size
  frac = float(rng.uniform(0.2, 0.5))
  opacity = float(rng.uniform(0.7, 1.0))
  x, y = int(rng.uniform(0, 1 - frac) * w), int(rng.uniform(0, 1 - frac) * h)
  eh = max(1, int(frac * h))
  if emojis:
    idx = int(rng.integers(len(emojis)))
    src = _emoji_file(emojis[idx])
    emoji = src.resize((max(1, int(src.width * eh / src.height)), eh), Image.BILINEAR)
    info = {'emoji': str(emojis[idx])}
  else:
    face = [int(v) for v in rng.integers(0, 256, 3)]
    mouth = ('smile', 'frown', 'open')[int(rng.integers(3))]
    emoji = synthetic_emoji(eh, face, mouth)
    info = {'emoji': 'synthetic', 'face': face, 'mouth': mouth}
  alpha = emoji.getchannel('A').point(np.rint(np.arange(256) * opacity).astype(int).tolist())
  out = img.copy()
  out.paste(emoji.convert('RGB'), (x, y), mask=alpha)
  return out, {**info, 'size': frac, 'opacity': opacity, 'xy': [x, y],
               'box': [x, y, min(w, x + emoji.width), min(h, y + emoji.height)]}


def frame_augment(frame: np.ndarray, rng, fonts=None, emojis=None, p_text=0.3, p_emoji=0.3, p_blur=0.5):
  """Overlays/blur on one uint8 [H, W, 3] frame: (frame, meta {text, emoji, blur}; None where not applied)."""
  do_text, do_emoji, do_blur = (rng.random(3) < np.array([p_text, p_emoji, p_blur])).tolist()
  meta = {'text': None, 'emoji': None, 'blur': None}
  if not (do_text or do_emoji or do_blur):
    return frame, meta
  img = Image.fromarray(frame)
  if do_text:
    img, meta['text'] = _text_overlay(img, rng, fonts)
  if do_emoji:
    img, meta['emoji'] = _emoji_overlay(img, rng, emojis)
  if do_blur:
    meta['blur'] = float(rng.uniform(0.1, 2.0))
    img = img.filter(ImageFilter.GaussianBlur(meta['blur']))
  return np.asarray(img), meta


def strong_view(clip: np.ndarray, rng, fonts=None, emojis=None, scale=(0.5, 1.0), num_ops=2, magnitude=9,
                num_bins=31, p_text=0.3, p_emoji=0.3, p_blur=0.5) -> tuple[np.ndarray, dict]:
  """The strong view: uint8 [T, 224, 224, 3] and meta {view, seed, rng_state, config, crop, flip,
  randaugment, frames}."""
  clip = _check_clip(clip)
  rng, meta = _as_rng(rng)
  out, m = _crop_flip(clip, rng, scale)
  ops = randaugment.sample_ops(rng, SIZE, SIZE, num_ops, magnitude, num_bins)
  out = randaugment.apply_ops(out, ops)
  out = np.array(out)  # writable copy
  frames = []
  for t in range(out.shape[0]):
    out[t], fm = frame_augment(out[t], rng, fonts, emojis, p_text, p_emoji, p_blur)
    frames.append(fm)
  config = {'scale': list(scale), 'num_ops': num_ops, 'magnitude': magnitude, 'num_bins': num_bins,
            'p_text': p_text, 'p_emoji': p_emoji, 'p_blur': p_blur}
  return out, {'view': 'strong', **meta, 'config': config, **m, 'randaugment': ops, 'frames': frames}


# ------------------------------------------------------------------------------------------------ ViV

def viv_box(rng, height: int, width: int, lam: float) -> dict:
  """The pixel box of the original ViV: side int(S*sqrt(1-lam)), centre uniform, clipped; [y0, y1) x [x0, x1)."""
  side_h, side_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
  cy, cx = int(rng.integers(height)), int(rng.integers(width))
  y0, x0 = cy - side_h // 2, cx - side_w // 2
  return {'centre': [cy, cx], 'side': [side_h, side_w],
          'y0': max(y0, 0), 'y1': min(y0 + side_h, height), 'x0': max(x0, 0), 'x1': min(x0 + side_w, width)}


def viv_composite(guest: np.ndarray, host: np.ndarray, lam: float, rng) -> tuple[np.ndarray, dict]:
  """Every guest frame resized (PIL bilinear, antialiased) into the box and pasted into a copy of the host frame."""
  guest, host = _check_clip(guest), _check_clip(host)
  if guest.shape[0] != host.shape[0]:
    raise ValueError(f'guest and host need the same frame count, got {guest.shape[0]} and {host.shape[0]}')
  rng, meta = _as_rng(rng)
  box = viv_box(rng, host.shape[1], host.shape[2], lam)
  out = host.copy()
  bh, bw = box['y1'] - box['y0'], box['x1'] - box['x0']
  if bh > 0 and bw > 0:
    out[:, box['y0']:box['y1'], box['x0']:box['x1']] = resize_frames(guest, bh, bw)
  return out, {'view': 'viv', **meta, 'lam': float(lam), 'box': box}
