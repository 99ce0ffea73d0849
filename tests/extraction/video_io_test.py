"""Tests of extraction/video_io.py on synthetic videos whose frames encode their own index."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.conftest import SHARED
from extraction import video_io as vio
from tests import video_fixtures as vf

REAL = os.path.join(SHARED, 'data', 'videos', 'video1.mp4')


def fps_filter_model(n_frames: int, in_fps: float, out_fps: float = 1.0) -> list:
  """ffmpeg's fps filter for a constant-rate input: slot n takes the last frame i with
  round_half_up(i / in_fps * out_fps) <= n; slots run until the rounded end of the last frame."""
  slot = np.floor(np.arange(n_frames) / in_fps * out_fps + 0.5)
  n_out = int(np.floor(n_frames / in_fps * out_fps + 0.5))
  return [int(np.nonzero(slot <= n)[0][-1]) for n in range(n_out)]


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
  d = tmp_path_factory.mktemp('videos')
  return {
      'land': vf.make_video(str(d / 'land.mp4'), seconds=4.52, size=(320, 240)),
      'port': vf.make_video(str(d / 'port.mp4'), seconds=2.0, size=(240, 320), audio_hz=None),
      'rot': vf.make_video(str(d / 'rot.mp4'), seconds=2.0, size=(320, 240), audio_hz=None, rotation=90),
      'gop': vf.make_video(str(d / 'gop.mp4'), seconds=8.0, size=(160, 120), codec='libx264', gop=12,
                           audio_hz=None),
      'mono': vf.make_video(str(d / 'mono.mp4'), seconds=3.0, audio_hz=1000.0, audio_rate=22050, channels=1),
      'dir': str(d),
  }


@pytest.mark.parametrize('seconds,expected', [(4.4, [12, 37, 62, 87]), (4.52, [12, 37, 62, 87, 112])])
def test_one_fps_picks_the_fps_filter_frames(tmp_path, seconds, expected):
  path = vf.make_video(str(tmp_path / 'v.mp4'), seconds=seconds, audio_hz=None)
  frames, times = vio.read_frames_fps(path)
  assert expected == fps_filter_model(int(round(seconds * 25)), 25.0)
  assert [vf.frame_index(f) for f in frames] == expected
  np.testing.assert_allclose(times, np.arange(len(expected)))


def test_other_rates(videos):
  frames, times = vio.read_frames_fps(videos['land'], fps=2.0, short_side=None, crop=None)
  assert frames.shape[1:] == (240, 320, 3)
  assert [vf.frame_index(f) for f in frames] == fps_filter_model(113, 25.0, 2.0)
  np.testing.assert_allclose(times, np.arange(len(frames)) / 2)


def test_short_side_and_crop_geometry(videos):
  # 320x240 -> scale=-2:256 -> 341.33 rounds to the nearest even width, 342 (ffmpeg's rule)
  frames, _ = vio.read_frames_fps(videos['land'], crop=None)
  assert frames.shape[1:] == (256, 342, 3)
  frames, _ = vio.read_frames_fps(videos['port'], crop=None)
  assert frames.shape[1:] == (342, 256, 3)
  assert [vf.frame_index(f) for f in frames] == [12, 37]
  for key in ('land', 'port'):
    frames, _ = vio.read_frames_fps(videos[key])
    assert frames.shape[1:] == (224, 224, 3) and frames.dtype == np.uint8
    full, _ = vio.read_frames_fps(videos[key], crop=None)
    top, left = (full.shape[1] - 224) // 2, (full.shape[2] - 224) // 2
    np.testing.assert_array_equal(frames, full[:, top:top + 224, left:left + 224])
    vf.frame_index(frames[0])  # the code survives scaling and cropping


def test_display_rotation_is_applied(videos):
  frames, _ = vio.read_frames_fps(videos['rot'], crop=None)  # 320x240 coded, rotated 90 deg counter-clockwise
  assert frames.shape[1:] == (342, 256, 3)
  assert [vf.frame_index(f, 'left') for f in frames] == [12, 37]
  picked = vio.read_frames_at(videos['rot'], [0.5])
  assert picked.shape == (1, 320, 240, 3) and vf.frame_index(picked[0], 'left') == 12


def test_read_frames_at_picks_last_frame_not_after_t(videos):
  times = [-1.0, 0.0, 0.039, 0.04, 1.3, 2.0, 4.47, 4.48, 99.0]
  frames = vio.read_frames_at(videos['land'], times)
  assert frames.shape == (9, 240, 320, 3)
  assert [vf.frame_index(f) for f in frames] == [0, 0, 0, 1, 32, 50, 111, 112, 112]
  shuffled = vio.read_frames_at(videos['land'], times[::-1])
  np.testing.assert_array_equal(shuffled, frames[::-1])
  small = vio.read_frames_at(videos['land'], [1.0], size=224)
  assert small.shape == (1, 224, 298, 3)  # int(224 * 320 / 240) = 298, as CLIPImageProcessor


def test_seeking_gives_the_sequential_frames(videos):
  times = vio.uniform_times(8.0, k=6)
  seq = vio.read_frames_at(videos['gop'], times, seek_gap=None)
  sought = vio.read_frames_at(videos['gop'], times, seek_gap=0.2)
  np.testing.assert_array_equal(seq, sought)
  assert [vf.frame_index(f) for f in seq] == [int(np.floor(t * 25 + 1e-9)) for t in times]


def test_uniform_times_and_clip_geometry():
  np.testing.assert_allclose(vio.uniform_times(10.0, 4), [1.25, 3.75, 6.25, 8.75])
  img = np.zeros((2, 240, 320, 3), np.uint8)
  img[:, :, 159:161] = 255  # a centred vertical line stays centred
  out = vio.clip_frames(img)
  assert out.shape == (2, 224, 224, 3)
  assert out[0, 100, 111:113].min() > 100 and out[0, 100, :100].max() == 0


def test_audio_is_16k_mono_with_the_tone(videos):
  for key, hz in (('land', 440.0), ('mono', 1000.0)):
    wave = vio.read_audio(videos[key])
    seconds = 4.52 if key == 'land' else 3.0
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / 16000 - seconds) < 0.05  # AAC priming adds at most one frame
    peak = np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / len(wave)
    assert abs(peak - hz) < 2.0
    mid = wave[8000:24000]
    assert 0.45 < np.abs(mid).max() < 0.55  # channel mean keeps the 0.5 amplitude


def test_audio_windows_and_chunks():
  rate, wave = 100, np.arange(1000, dtype=np.float32)  # 10 s at 100 Hz
  wins = vio.audio_windows(wave, [0.5, 5.0, 9.9, 20.0], rate=rate, window=2.0)
  assert [len(w) for w in wins] == [150, 200, 110, 0]
  assert wins[0][0] == 0 and wins[1][0] == 400 and wins[1][-1] == 599 and wins[2][-1] == 999
  chunks = vio.equal_chunks(wave, k=3)
  assert [len(c) for c in chunks] == [333, 333, 334]
  np.testing.assert_array_equal(np.concatenate(chunks), wave)


def test_probe(videos):
  info = vio.probe(videos['land'])
  assert info.width == 320 and info.height == 240 and info.fps == 25.0
  assert info.num_frames == 113 and abs(info.duration - 4.52) < 0.05 and info.has_audio and info.audio_rate == 44100
  assert not vio.probe(videos['port']).has_audio


def test_errors(videos, tmp_path):
  with pytest.raises(vio.VideoError) as e:
    vio.read_audio(videos['port'])
  assert e.value.reason == 'no_audio' and e.value.path == videos['port']
  cases = {'missing': ('not_found', str(tmp_path / 'nope.mp4')),
           'empty': ('empty', vf.make_corrupt(str(tmp_path / 'e.mp4'), 'empty')),
           'garbage': ('unreadable', vf.make_corrupt(str(tmp_path / 'g.mp4'), 'garbage')),
           'truncated': ('unreadable', vf.make_corrupt(str(tmp_path / 't.mp4'), 'truncated', videos['land']))}
  for name, (reason, path) in cases.items():
    for fn in (vio.probe, vio.read_frames_fps, lambda p: vio.read_frames_at(p, [1.0]), vio.read_audio):
      with pytest.raises(vio.VideoError) as e:
        fn(path)
      assert e.value.reason == reason, name
      assert path in str(e.value)


def test_truncated_data_with_header_first(videos, tmp_path):
  import av
  fast = str(tmp_path / 'fast.mp4')  # moov first: the header survives, the media data is cut
  with av.open(videos['land']) as src, av.open(fast, 'w', options={'movflags': 'faststart'}) as dst:
    streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
    for packet in src.demux():
      if packet.dts is not None:
        packet.stream = streams[packet.stream.index]
        dst.mux(packet)
  cut = vf.make_corrupt(str(tmp_path / 'cut.mp4'), 'truncated', fast)
  for fn in (vio.read_frames_fps, lambda p, **k: vio.read_frames_at(p, [4.0], **k), vio.read_audio):
    with pytest.raises(vio.VideoError) as e:
      fn(cut)
    assert e.value.reason == 'truncated'
  frames, _ = vio.read_frames_fps(cut, allow_truncated=True)
  assert 1 <= len(frames) < 5 and vf.frame_index(frames[0]) == 12


def test_real_video():
  if not os.path.isfile(REAL):
    pytest.skip('../shared/data/videos/video1.mp4 is not present')
  info = vio.probe(REAL)
  frames, times = vio.read_frames_fps(REAL)
  assert frames.shape == (int(np.floor(info.duration + 0.5)), 224, 224, 3)
  np.testing.assert_allclose(times, np.arange(len(frames)))
  assert frames.std() > 10  # real content, not a blank decode
  picked = vio.read_frames_at(REAL, vio.uniform_times(info.duration))
  assert picked.shape == (25, info.height, info.width, 3)
  np.testing.assert_array_equal(picked, vio.read_frames_at(REAL, vio.uniform_times(info.duration), seek_gap=0.1))
  wave = vio.read_audio(REAL)
  assert abs(len(wave) / 16000 - info.duration) < 0.1 and np.isfinite(wave).all()
