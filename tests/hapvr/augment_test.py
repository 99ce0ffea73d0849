"""Tests of hapvr_jax/augment.py and hapvr_jax/randaugment.py: torchvision/augly semantics re-derived by hand."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from hapvr_jax import augment
from hapvr_jax import randaugment as ra


def _clip(t=4, h=256, w=341, seed=0):
  """A smooth, textured clip (gradients + noise), frames all different."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1)
  return np.clip(base[None] + rng.integers(-20, 21, (t, h, w, 3)), 0, 255).astype(np.uint8)


NO_FT = dict(p_text=0.0, p_emoji=0.0, p_blur=0.0)


# ------------------------------------------------------------------------------------------------ views

def test_shapes_dtypes_and_json_round_trip():
  clip = _clip()
  weak, mw = augment.weak_view(clip, 1)
  strong, ms = augment.strong_view(clip, 2, p_text=1.0, p_emoji=1.0, p_blur=1.0)
  viv, mv = augment.viv_composite(weak, strong, 0.5, 3)
  for frames, meta in ((weak, mw), (strong, ms), (viv, mv)):
    assert frames.shape == (4, 224, 224, 3) and frames.dtype == np.uint8
    assert json.loads(json.dumps(meta)) == meta
  assert mw['seed'] == 1 and set(mw) >= {'crop', 'flip', 'rng_state'}
  assert len(ms['randaugment']) == 2 and len(ms['frames']) == 4
  assert all(f['text'] and f['emoji'] and f['blur'] for f in ms['frames'])
  with pytest.raises(ValueError):
    augment.weak_view(clip.astype(np.float32), 0)


def test_determinism_and_replay_from_meta():
  clip = _clip()
  for fn in (augment.weak_view, augment.strong_view):
    a, ma = fn(clip, 7)
    b, mb = fn(clip, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert {k: v for k, v in ma.items() if k != 'seed'} == {k: v for k, v in mb.items() if k != 'seed'}
    rng = np.random.default_rng()
    rng.bit_generator.state = ma['rng_state']  # replay from the stored state
    np.testing.assert_array_equal(fn(clip, rng)[0], a)
  outs = [augment.strong_view(clip, s)[0] for s in range(3)]
  assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])


def test_clip_consistency_identical_frames():
  clip = np.repeat(_clip(1), 5, axis=0)
  seen = set()
  for seed in range(12):
    for fn, kw in ((augment.weak_view, {}), (augment.strong_view, NO_FT)):
      out, meta = fn(clip, seed, **kw)
      seen.update(o['op'] for o in meta.get('randaugment', []))
      for t in range(1, 5):
        np.testing.assert_array_equal(out[t], out[0])
  assert len(seen) >= 8  # many ops exercised (including per-frame data-dependent ones)


def test_frame_ft_changes_only_overlay_boxes():
  clip = np.repeat(_clip(1), 6, axis=0)
  base, _ = augment.strong_view(clip, 5, **NO_FT)
  out, meta = augment.strong_view(clip, 5, p_text=1.0, p_emoji=1.0, p_blur=0.0)
  texts = {f['text']['text'] for f in meta['frames']}
  assert len(texts) > 1  # FT sampled per frame
  for t, fm in enumerate(meta['frames']):
    inside = np.zeros((224, 224), bool)
    for key in ('text', 'emoji'):
      if fm[key]['box']:
        x0, y0, x1, y1 = fm[key]['box']
        inside[y0:y1, x0:x1] = True
    diff = np.any(out[t] != base[t], axis=-1)
    assert diff.any() and not (diff & ~inside).any()


def test_blur_and_assets(tmp_path):
  frame = _clip(1, 224, 224)[0]
  out, m = augment.frame_augment(frame, np.random.default_rng(0), p_text=0, p_emoji=0, p_blur=1)
  assert 0.1 <= m['blur'] <= 2.0
  from PIL import ImageFilter
  ref = np.asarray(Image.fromarray(frame).filter(ImageFilter.GaussianBlur(m['blur'])))
  np.testing.assert_array_equal(out, ref)
  # user-supplied emoji PNG (RGBA) and TTF font
  png = tmp_path / 'e.png'
  rgba = np.zeros((40, 20, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[..., 3] = 255
  Image.fromarray(rgba, 'RGBA').save(png)
  fonts = []
  try:
    import matplotlib
    ttf = os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf', 'DejaVuSans.ttf')
    fonts = [ttf] if os.path.exists(ttf) else []
  except ImportError:
    pass
  out, m = augment.frame_augment(frame, np.random.default_rng(1), fonts or None, [str(png)], 1, 1, 0)
  e = m['emoji']
  x0, y0, x1, y1 = e['box']
  assert e['emoji'] == str(png) and y1 - y0 == int(e['size'] * 224) and abs((x1 - x0) - (y1 - y0) / 2) <= 1
  alpha = round(255 * e['opacity']) / 255
  assert abs(int(out[y0 + 2, x0 + 2, 0]) - round(255 * alpha + frame[y0 + 2, x0 + 2, 0] * (1 - alpha))) <= 1
  if fonts:
    assert m['text']['font'] == fonts[0]
  em = augment.synthetic_emoji(64, (250, 200, 0), 'smile')
  a = np.asarray(em)
  assert em.mode == 'RGBA' and a.shape == (64, 64, 4) and a[0, 0, 3] == 0 and a[32, 12, 3] == 255


# ------------------------------------------------------------------------------------------------ crop

def test_random_resized_crop_bounds_and_fallback():
  rng = np.random.default_rng(0)
  for (h, w), scale in (((256, 341), (0.5, 1.0)), ((256, 341), (0.8, 1.0)), ((300, 256), (0.08, 1.0))):
    fallbacks = 0
    for _ in range(500):
      c = augment.random_resized_crop_params(rng, h, w, scale)
      assert 0 <= c['top'] and c['top'] + c['height'] <= h and 0 <= c['left'] and c['left'] + c['width'] <= w
      if c['fallback']:
        fallbacks += 1
        continue
      area = c['height'] * c['width'] / (h * w)
      tol = (c['height'] + c['width'] + 1) / (h * w)  # rounding of both sides
      assert scale[0] - tol <= area <= scale[1] + tol
      r = c['width'] / c['height']
      assert 3 / 4 * (1 - 1 / c['height']) - 1 / c['height'] <= r <= 4 / 3 * (1 + 1 / c['height']) + 1 / c['height']
    assert fallbacks < 100  # 256x341 with scale >= 0.8 needs ratio > ~1.07: ~10% fall back
  # 16:9 frames at short side 256 cannot hold 0.8 of the area at ratio <= 4/3: always the centre crop
  c = augment.random_resized_crop_params(rng, 256, 455, (0.8, 1.0))
  assert c == {'top': 0, 'left': 57, 'height': 256, 'width': 341, 'fallback': True}
  c = augment.random_resized_crop_params(rng, 2000, 256, (0.8, 1.0))
  assert c == {'top': (2000 - 341) // 2, 'left': 0, 'height': 341, 'width': 256, 'fallback': True}
  clip = _clip(2, 256, 455)
  out, meta = augment.weak_view(clip, 0)
  ref = np.stack([np.asarray(Image.fromarray(f).resize((224, 224), Image.BILINEAR, box=(57, 0, 398, 256)))
                  for f in clip])
  np.testing.assert_array_equal(out, ref[:, :, ::-1] if meta['flip'] else ref)
  flips = [augment.weak_view(clip[:1], s)[1]['flip'] for s in range(40)]
  assert 5 < sum(flips) < 35


# ------------------------------------------------------------------------------------------------ RandAugment

def test_magnitudes_at_bin_9_and_sampling():
  m = {op: ra.magnitude_of(op, 9, 31, 224, 224) for op in ra.OPS}
  assert m['ShearX'] == pytest.approx(0.09) and m['Rotate'] == pytest.approx(9.0)
  assert m['Brightness'] == pytest.approx(0.27) and m['Posterize'] == 7.0
  assert m['Solarize'] == pytest.approx(178.5) and int(m['TranslateX']) == 30 and m['Identity'] == 0.0
  assert [ra.magnitude_of('Posterize', b, 31, 1, 1) for b in (0, 3, 4, 30)] == [8, 8, 7, 4]
  rng = np.random.default_rng(0)
  draws = [o for _ in range(400) for o in ra.sample_ops(rng, 224, 224)]
  assert {o['op'] for o in draws} == set(ra.OPS)
  for o in draws:
    assert abs(o['magnitude']) == pytest.approx(m[o['op']])
    if o['op'] not in ra.SIGNED:
      assert o['magnitude'] >= 0
  assert any(o['magnitude'] < 0 for o in draws if o['op'] == 'Rotate')


def test_pointwise_ops_by_hand():
  x = np.array([[[[0, 3, 100], [178, 179, 255]]]], np.uint8)  # [1, 1, 2, 3]
  np.testing.assert_array_equal(ra.apply_op(x, 'Identity', 0.0), x)
  np.testing.assert_array_equal(ra.apply_op(x, 'Solarize', 178.5), [[[[0, 3, 100], [178, 76, 0]]]])  # >= 178.5 inverted
  np.testing.assert_array_equal(ra.apply_op(x, 'Posterize', 7.0), [[[[0, 2, 100], [178, 178, 254]]]])
  np.testing.assert_array_equal(ra.apply_op(x, 'Posterize', 4.0), x & 0xF0)
  np.testing.assert_array_equal(ra.apply_op(x, 'Brightness', 0.5), [[[[0, 4, 150], [255, 255, 255]]]])
  np.testing.assert_array_equal(ra.apply_op(x, 'Brightness', -0.5), [[[[0, 1, 50], [89, 89, 127]]]])
  red = np.array([[[[255, 0, 0], [100, 100, 100]]]], np.uint8)
  # torchvision grayscale truncates: 0.2989*255 = 76.2 -> 76; 0.9999*100 -> 99
  np.testing.assert_array_equal(ra.apply_op(red, 'Color', -1.0), [[[[76, 76, 76], [99, 99, 99]]]])
  np.testing.assert_array_equal(ra.apply_op(red, 'Color', 1.0), [[[[255, 0, 0], [101, 101, 101]]]])
  # Contrast blends with the frame's mean grayscale ((76 + 99) / 2 = 87.5)
  np.testing.assert_array_equal(ra.apply_op(red, 'Contrast', -0.5), [[[[171, 43, 43], [93, 93, 93]]]])
  ac = np.array([[[[50, 0, 7], [100, 10, 7], [150, 20, 7]]]], np.uint8)  # per channel: (50..150), (0..20), const
  np.testing.assert_array_equal(ra.apply_op(ac, 'AutoContrast', 0.0), [[[[0, 0, 7], [127, 127, 7], [255, 255, 7]]]])


def test_data_dependent_ops_match_pil_per_frame():
  clip = _clip(3, 64, 80)
  clip[1] //= 3  # frames with different statistics
  eq = ra.apply_op(clip, 'Equalize', 0.0)
  ac = ra.apply_op(clip, 'AutoContrast', 0.0)
  for t in range(3):
    img = Image.fromarray(clip[t])
    np.testing.assert_array_equal(eq[t], np.asarray(ImageOps.equalize(img)))
    d = np.abs(ac[t].astype(int) - np.asarray(ImageOps.autocontrast(img)))
    assert d.max() <= 1 and (d > 0).mean() < 0.01
  # Sharpness: torchvision's degenerate image (round(3x3 [1 1 1;1 5 1;1 1 1]/13), border kept), blended
  f = clip.astype(np.int64)
  acc = sum(f[:, dy:dy + 62, dx:dx + 78] for dy in range(3) for dx in range(3)) + 4 * f[:, 1:-1, 1:-1]
  deg = clip.astype(np.float32)
  deg[:, 1:-1, 1:-1] = np.rint(acc / 13)
  for factor in (0.0, 1.27, 0.73):
    ref = np.clip(np.float32(factor) * clip.astype(np.float32) + np.float32(1 - factor) * deg, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(ra.apply_op(clip, 'Sharpness', factor - 1.0), ref)


def test_geometric_ops_by_hand():
  clip = _clip(2, 224, 224)
  out = ra.apply_op(clip, 'TranslateX', 30.45)  # int(30.45) = 30 pixels to the right, zero fill
  np.testing.assert_array_equal(out[:, :, 30:], clip[:, :, :-30])
  assert not out[:, :, :30].any()
  out = ra.apply_op(clip, 'TranslateY', -30.45)  # 30 pixels up
  np.testing.assert_array_equal(out[:, :-30], clip[:, 30:])
  assert not out[:, -30:].any()
  out = ra.apply_op(clip, 'ShearX', 0.09)  # out[v, u] = in[v, rint(u + 0.09 (v + 0.5))], about the top edge
  np.testing.assert_array_equal(out[:, 0], clip[:, 0])
  np.testing.assert_array_equal(out[:, 100, :215], clip[:, 100, 9:])
  assert not out[:, 100, 215:].any()
  out = ra.apply_op(clip, 'ShearY', -0.09)  # out[v, u] = in[rint(v - 0.09 (u + 0.5)), u]
  np.testing.assert_array_equal(out[:, 9:, 100], clip[:, :215, 100])
  np.testing.assert_array_equal(ra.apply_op(clip, 'Rotate', 90.0), np.rot90(clip, 1, axes=(1, 2)))  # CCW
  out = ra.apply_op(clip, 'Rotate', 9.0)
  pil = np.stack([np.asarray(Image.fromarray(f).rotate(9.0, Image.NEAREST)) for f in clip])
  assert (np.all(out == pil, axis=-1)).mean() > 0.97  # PIL rounds half-pixels differently at a few places
  assert not out[:, 0, 0].any()


# ------------------------------------------------------------------------------------------------ ViV

def test_viv_box_geometry():
  rng = np.random.default_rng(0)
  clipped = 0
  for _ in range(2000):
    lam = rng.uniform(0.3, 0.7)
    b = augment.viv_box(rng, 224, 224, lam)
    side = int(224 * math.sqrt(1 - lam))
    assert b['side'] == [side, side]
    cy, cx = b['centre']
    assert b['y0'] == max(cy - side // 2, 0) and b['y1'] == min(cy - side // 2 + side, 224)
    assert b['x0'] == max(cx - side // 2, 0) and b['x1'] == min(cx - side // 2 + side, 224)
    for lo, hi in ((b['y0'], b['y1']), (b['x0'], b['x1'])):
      assert 0 <= lo < hi <= 224 and hi - lo >= side - side // 2 - 1  # clipped to about half at worst
    clipped += (b['y1'] - b['y0'], b['x1'] - b['x0']) != (side, side)
  assert 0.3 < clipped / 2000 < 0.99  # clipping is common, as in the original


def test_viv_composite_pastes_resized_guest():
  guest, host = _clip(3, 224, 224, seed=1), _clip(3, 224, 224, seed=2)
  host_copy = host.copy()
  out, meta = augment.viv_composite(guest, host, 0.4, 11)
  np.testing.assert_array_equal(host, host_copy)
  b = meta['box']
  ref = np.stack([np.asarray(Image.fromarray(g).resize((b['x1'] - b['x0'], b['y1'] - b['y0']), Image.BILINEAR))
                  for g in guest])
  np.testing.assert_array_equal(out[:, b['y0']:b['y1'], b['x0']:b['x1']], ref)
  mask = np.ones((224, 224), bool)
  mask[b['y0']:b['y1'], b['x0']:b['x1']] = False
  np.testing.assert_array_equal(out[:, mask], host[:, mask])
  assert meta['lam'] == 0.4 and json.loads(json.dumps(meta)) == meta
  with pytest.raises(ValueError):
    augment.viv_composite(guest[:2], host, 0.4, 0)
