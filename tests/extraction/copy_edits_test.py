"""Tests of extraction/copy_edits.py against hand-computed cases and NumPy float64 formulas."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from extraction import copy_edits as ce
from extraction import video_io


def flat(colour, n=2, size=(40, 24)):
  return np.broadcast_to(np.asarray(colour, np.uint8), (n, size[1], size[0], 3)).copy()


def test_frame_size_is_even_16_9():
  assert ce.frame_size(64) == (114, 64) and ce.frame_size(160) == (284, 160) and ce.frame_size(360) == (640, 360)
  with pytest.raises(ValueError, match='even'):
    ce.frame_size(63)


def test_speed_indices_hand_cases_and_formula():
  np.testing.assert_array_equal(ce.speed_indices(4, 8), [0, 0, 1, 1, 2, 2, 3, 3])   # half speed: each frame twice
  np.testing.assert_array_equal(ce.speed_indices(8, 4), [1, 3, 5, 7])               # double speed: every other
  np.testing.assert_array_equal(ce.speed_indices(5, 5), np.arange(5))
  for n, m in [(7, 3), (3, 7), (25, 13), (13, 25), (1, 4)]:
    expected = np.floor((np.arange(m, dtype=np.float64) + 0.5) * n / m).astype(int)
    got = ce.speed_indices(n, m)
    np.testing.assert_array_equal(got, expected)
    assert got[0] >= 0 and got[-1] <= n - 1 and np.all(np.diff(got) >= 0)
  with pytest.raises(ValueError):
    ce.speed_indices(0, 3)


def test_brightness_contrast_matches_the_float64_formula():
  x = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
  for b, c in [(20.0, 1.3), (-35.5, 0.7), (0.0, 1.0)]:
    expected = np.clip(np.round((x.astype(np.float64) - 128) * c + 128 + b), 0, 255)
    got = ce.brightness_contrast(x, b, c)
    assert got.dtype == np.uint8 and np.abs(got - expected).max() <= 1   # float32 may round a .5 the other way
  np.testing.assert_array_equal(ce.brightness_contrast(x, 0.0, 1.0), x)
  hand = ce.brightness_contrast(np.array([[[[128, 0, 200]]]], np.uint8), 10, 2.0)   # 138, clipped 0, clipped 255
  np.testing.assert_array_equal(hand[0, 0, 0], [138, 0, 255])


def test_geometry_edits_on_flat_colours():
  # four quadrants of different colours: each tile is one flat colour, row-major
  img = np.zeros((3, 40, 60, 3), np.uint8)
  colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10)]
  for k, colour in enumerate(colours):
    r, c = divmod(k, 2)
    img[:, r * 20:(r + 1) * 20, c * 30:(c + 1) * 30] = colour
  views = ce.tiles(img, (16, 10), grid=2)
  assert len(views) == 4
  for view, colour in zip(views, colours):
    assert view.shape == (3, 10, 16, 3)
    np.testing.assert_array_equal(view, flat(colour, 3, (16, 10)))
  # crop of the top-left quadrant, back to the frame size; flip moves the left colour right
  np.testing.assert_array_equal(ce.crop(img, (0, 0, 30, 20)), flat(colours[0], 3, (60, 40)))
  np.testing.assert_array_equal(ce.hflip(img)[:, :, :30], img[:, :, 30:])
  with pytest.raises(ValueError, match='not inside'):
    ce.crop(img, (0, 0, 61, 20))
  # cover: a 2:1 frame into a 1:1 window keeps the middle half (no scaling needed at 20x20), at any scale
  wide = np.zeros((1, 20, 40, 3), np.uint8)
  wide[:, :, 10:30] = 255
  np.testing.assert_array_equal(ce.cover(wide, (20, 20)), np.full((1, 20, 20, 3), 255, np.uint8))
  half = ce.cover(wide, (10, 10))
  assert half.shape == (1, 10, 10, 3) and np.all(half[:, :, 1:-1] == 255) and half.min() > 128


def test_picture_in_picture_and_text_stay_in_their_boxes():
  host, guest = flat((20, 30, 40)), flat((250, 200, 150))
  out = ce.picture_in_picture(guest, host, (5, 4, 25, 16))
  box = np.zeros(out.shape[1:3], bool)
  box[4:16, 5:25] = True
  assert np.all(out[:, box] == (250, 200, 150)) and np.all(out[:, ~box] == (20, 30, 40))
  with pytest.raises(ValueError, match='guest frames'):
    ce.picture_in_picture(guest[:1], host, (5, 4, 25, 16))
  frames = flat((0, 0, 0), size=(120, 40))
  out = ce.overlay_text(frames, 'Copy', (10, 8), 14, (255, 0, 0))
  ys, xs = np.nonzero(np.any(out[0] != 0, axis=-1))
  assert len(ys) > 20 and np.all(out[0][ys, xs, 1:] == 0)                     # red ink, nothing else
  assert ys.min() >= 8 and xs.min() >= 10 and ys.max() < 8 + 2 * 14 and xs.max() < 10 + 4 * 14
  assert np.any(np.all(out[0] == (255, 0, 0), axis=-1))                        # opaque where fully covered
  np.testing.assert_array_equal(out[0], out[1])


def test_synthetic_frames_are_a_fixed_moving_sequence():
  a = ce.synthetic_frames(range(6), (48, 32), seed=[7, 2])
  np.testing.assert_array_equal(ce.synthetic_frames([4, 5], (48, 32), seed=[7, 2]), a[4:6])
  assert a.shape == (6, 32, 48, 3) and a.std() > 10
  assert np.abs(a[5].astype(int) - a[0]).mean() > 0.5                          # it moves
  assert np.abs(ce.synthetic_frames([0], (48, 32), seed=[8, 2])[0].astype(int) - a[0]).mean() > 5


def test_encode_round_trip_times_and_determinism(tmp_path):
  t = np.arange(12)[:, None, None]
  yy, xx = np.mgrid[0:48, 0:80]
  frames = np.clip(100 + 60 * np.sin(xx / 9 + t / 3) + 40 * np.cos(yy / 7), 0, 255)   # smooth, moving
  frames = np.repeat(frames[..., None], 3, axis=-1).astype(np.uint8)
  paths = [str(tmp_path / f'{k}.mp4') for k in range(3)]
  ce.encode(paths[0], frames, fps=6)
  ce.encode(paths[1], frames, fps=6)
  ce.encode(paths[2], frames, fps=6, bitrate=4000)
  back, times = video_io.read_frames_fps(paths[0], fps=6, short_side=None, crop=None)
  np.testing.assert_allclose(times, np.arange(12) / 6)
  assert back.shape == frames.shape and np.abs(back.astype(int) - frames).mean() < 3
  digest = [hashlib.sha256(open(p, 'rb').read()).hexdigest() for p in paths]
  assert digest[0] == digest[1] and digest[2] != digest[0]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['0.mp4', '1.mp4', '2.mp4']   # no temporary left
  with pytest.raises(ValueError, match='even'):
    ce.encode(str(tmp_path / 'odd.mp4'), frames[:, :, :79], fps=6)
