"""python -m hapvr_jax.make_copies: the ground truth says where the copied frames really went (decoded queries
against decoded references), the same seed gives the same bytes, short inputs are skipped and a bad input is
one error line. The corpus tests use the shared real clips (skipped without ../shared); tiny frames keep
each build near a second."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from extraction import video_io
from hapvr_jax import copy_corpus as cc
from hapvr_jax import make_copies
from tests import video_fixtures as vf
from tests.conftest import SHARED

CLIPS = os.path.join(SHARED, 'data', 'videos')
FPS = 5
TINY = ['--size=64', f'--fps={FPS}', '--refs=2', '--ref_min=5', '--ref_max=8', '--min_segment=1.5',
        '--max_segment=3', '--max_gap=2']
# frame-level agreement, as the median absolute difference over a frame's pixels (robust to overlaid text):
# a matching frame after undoing the edits stays within MATCH levels (x264 at crf 18, or the low-bitrate
# edit, plus resampling), where other footage differs by tens of levels
MATCH = 16.0


def clips():
  if not os.path.isdir(CLIPS):
    pytest.skip('../shared/data/videos is not present')
  return CLIPS


def build(tmp, *extra):
  assert make_copies.main([f'--output={tmp}', *TINY, *extra]) == 0
  with open(os.path.join(tmp, 'edits.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('copies'))
  return out, build(out, f'--videos={clips()}', '--seed=1', '--queries=10', '--no_copy=1', '--two_segments=0.5')


def decode(path):
  return video_io.read_frames_fps(path, fps=FPS, short_side=None, crop=None)[0].astype(np.float64)


def resized(frames, size):
  return np.stack([np.asarray(Image.fromarray(np.clip(np.round(f), 0, 255).astype(np.uint8))
                              .resize(tuple(size), Image.Resampling.BILINEAR)) for f in frames]).astype(np.float64)


def expected_view(ref_frames, edits, size):
  """The reference frames as the query shows them, the edits applied in NumPy/PIL (text is left out: the
  median ignores it; a picture-in-picture is compared inside its box only)."""
  e = ref_frames
  if 'crop' in edits:
    left, top, right, bottom = edits['crop']['box']
    e = resized(e[:, top:bottom, left:right], size)
  if 'hflip' in edits:
    e = e[:, :, ::-1]
  if 'brightness_contrast' in edits:
    p = edits['brightness_contrast']
    e = np.clip((e - 128) * p['contrast'] + 128 + p['brightness'], 0, 255)
  return e


def frame_errors(query, expected, edits):
  """Median absolute difference of each query frame from its expected frame."""
  if 'pip' in edits:
    left, top, right, bottom = edits['pip']['box']
    query, expected = query[:, top:bottom, left:right], resized(expected, (right - left, bottom - top))
  return np.median(np.abs(query - expected).reshape(len(query), -1), axis=1)


def test_ground_truth_is_where_the_frames_went(corpus):
  out, records = corpus
  with open(os.path.join(out, 'ground_truth.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [(r['query_id'], r['ref_id']) for r in rows] == [(q['query_id'], s['ref_id']) for q in records
                                                          for s in q['segments']]
  assert {e for q in records if q['copy'] for e in q['edits']} == set(cc.EDITS)   # the seed tries every edit
  assert sum(not q['copy'] for q in records) == 1 and any(len(q['segments']) == 2 for q in records)
  refs = {r: decode(os.path.join(out, 'refs', f'{r}.mp4')) for r in ('R000001', 'R000002')}
  for q, row in ((q, row) for q in records for row in rows if row['query_id'] == q['query_id']):
    query = decode(os.path.join(out, 'queries', f'{q["query_id"]}.mp4'))
    ref = refs[row['ref_id']]
    h, w = ref.shape[1:3]
    assert query.shape[1:3] == tuple(q['size'][::-1]) and len(query) == round(q['seconds'] * FPS)
    query = resized(query, (w, h)) if query.shape[1:3] != (h, w) else query   # undo the rescale
    q0, q1 = round(float(row['query_start']) * FPS), round(float(row['query_end']) * FPS)
    r0, r1 = round(float(row['ref_start']) * FPS), round(float(row['ref_end']) * FPS)
    # query time t maps to reference time r0 + (t - q0) * speed: the frame shown at slot j is the one whose
    # interval holds the slot's centre
    idx = r0 + np.floor((np.arange(q1 - q0) + 0.5) * (r1 - r0) / (q1 - q0)).astype(int)
    expected = expected_view(ref[idx], q['edits'], (w, h))
    errors = frame_errors(query[q0:q1], expected, q['edits'])
    assert errors.max() <= MATCH, (q['query_id'], q['edits'], errors)
    if q1 - q0 != r1 - r0:   # a speed change: each query frame is closest to the reference frame the map gives
      near = np.arange(max(0, r0 - 3), min(len(ref), r1 + 3))
      candidates = expected_view(ref[near], q['edits'], (w, h))
      table = np.array([frame_errors(query[q0:q1], c[None].repeat(q1 - q0, 0), q['edits']) for c in candidates])
      best = near[np.argmin(table, axis=0)]
      # still footage has several equally good frames: the mapped one is among the best (within a level)
      mapped_error = table[idx - near[0], np.arange(q1 - q0)]
      assert np.all(mapped_error <= table.min(axis=0) + 1), (q['query_id'], best, idx)
      assert np.mean(np.abs(best - idx) <= 1) >= 0.5, (q['query_id'], best, idx)
    # to the frame: the same comparison one or two frames earlier or later agrees worse on average
    for shift in (-2, -1, 1, 2):
      if 0 <= q0 + shift and q1 + shift <= len(query):
        shifted = frame_errors(query[q0 + shift:q1 + shift], expected, q['edits']).mean()
        assert shifted > errors.mean(), (q['query_id'], shift, shifted, errors.mean())
  for q in records:   # the query with no copy shows no reference frame, edited as its edits say
    if not q['copy']:
      query = decode(os.path.join(out, 'queries', f'{q["query_id"]}.mp4'))
      query = resized(query, (w, h)) if query.shape[1:3] != (h, w) else query
      for ref in refs.values():
        views = expected_view(ref, {k: v for k, v in q['edits'].items() if k != 'pip'}, (w, h))[:, ::2, ::2]
        best = min(np.median(np.abs(f[::2, ::2] - views).reshape(len(views), -1), axis=1).min() for f in query)
        assert best > MATCH, (q['query_id'], best)   # no frame passes the test the copies pass


def code(frame):
  """The frame index a coded frame shows; -1 for other footage (synthetic filler)."""
  try:
    return vf.frame_index(frame)
  except AssertionError:
    return -1


def test_speed_changes_map_time_exactly(tmp_path):
  """Footage whose frames show their own index (tests.video_fixtures) played through whole-frame tiles: every
  query frame in a copied segment is the reference frame that the time map gives, at any speed."""
  vf.make_video(str(tmp_path / 'coded.mp4'), seconds=16.0, audio_hz=None, size=(320, 240))
  records = build(str(tmp_path / 'out'), f'--videos={tmp_path / "coded.mp4"}', '--tiles=1', '--seed=2',
                  '--edits=speed,rescale', '--max_edits=2', '--queries=6', '--no_copy=0')
  speeds = [s['speed'] for q in records for s in q['segments']]
  assert min(speeds) < 0.75 and max(speeds) > 1.4, speeds   # the seed draws clear slow-downs and speed-ups
  codes = {}
  for q in records:
    shown = [code(f) for f in decode(str(tmp_path / 'out' / 'queries' / f'{q["query_id"]}.mp4'))]
    for s in q['segments']:
      if s['ref_id'] not in codes:
        ref = decode(str(tmp_path / 'out' / 'refs' / f'{s["ref_id"]}.mp4'))
        codes[s['ref_id']] = np.array([vf.frame_index(f) for f in ref])
      q0, q1 = round(s['query_start'] * FPS), round(s['query_end'] * FPS)
      r0, r1 = round(s['ref_start'] * FPS), round(s['ref_end'] * FPS)
      idx = r0 + np.floor((np.arange(q1 - q0) + 0.5) * (r1 - r0) / (q1 - q0)).astype(int)
      np.testing.assert_array_equal(shown[q0:q1], codes[s['ref_id']][idx])
      # the frames around the segment are other footage: never a frame of the copied stretch
      outside = shown[max(0, q0 - 2):q0] + shown[q1:q1 + 2]
      assert not set(outside) & set(codes[s['ref_id']][r0:r1].tolist()), (outside, q['query_id'])


def test_layout_lists_and_ids(corpus):
  out, records = corpus
  with open(os.path.join(out, 'refs.txt')) as f:
    assert f.read() == 'refs/R000001.mp4\nrefs/R000002.mp4\n'
  with open(os.path.join(out, 'queries.txt')) as f:
    assert f.read().split() == [f'queries/Q{k:06d}.mp4' for k in range(1, 12)]
  assert sorted(os.listdir(out)) == ['edits.jsonl', 'ground_truth.csv', 'queries', 'queries.txt', 'refs',
                                     'refs.txt']   # no temporary left behind
  assert [q['query_id'] for q in records] == [f'Q{k:06d}' for k in range(1, 12)]


def test_same_seed_same_bytes(tmp_path):
  bikes = os.path.join(clips(), 'bikes.mp4')

  def digests(d):
    build(str(d), f'--videos={bikes}', '--seed=5', '--queries=3', '--no_copy=1')
    return {os.path.relpath(os.path.join(r, n), d): hashlib.sha256(open(os.path.join(r, n), 'rb').read()).digest()
            for r, _, names in os.walk(d) for n in names}
  a, b = digests(tmp_path / 'a'), digests(tmp_path / 'b')
  assert a == b and len(a) == 4 + 2 + 4   # the lists, the ground truth, edits.jsonl; references; queries
  # and another seed, another corpus: a different plan
  refs, filler = cc.plan_references([50] * 4, cc.Settings(fps=FPS, ref_seconds=(5.0, 8.0)), seed=5)
  other = cc.plan_references([50] * 4, cc.Settings(fps=FPS, ref_seconds=(5.0, 8.0)), seed=6)
  assert (refs, filler) != other


def test_references_never_reuse_a_frame():
  lengths = [40, 25, 60, 9]
  refs, filler = cc.plan_references(lengths, cc.Settings(fps=FPS, refs=3, ref_seconds=(5.0, 8.0)), seed=1)
  used = [(p.strand, i) for r in refs for p in r.pieces for i in range(p.start, p.start + p.length)]
  spare = [(p.strand, i) for p in filler if p.strand != cc.SYNTHETIC for i in range(p.start, p.start + p.length)]
  assert len(set(used)) == len(used) == sum(r.length for r in refs) and not set(used) & set(spare)
  assert all(5 * FPS <= r.length <= 8 * FPS for r in refs) and filler[-1].strand == cc.SYNTHETIC
  assert all(0 <= i < lengths[k] for k, i in used + spare)
  with pytest.raises(ValueError, match='need .* s of footage; the videos give 26.8 s'):
    cc.plan_references(lengths, cc.Settings(fps=FPS, refs=5, ref_seconds=(7.0, 8.0)), seed=1)


def test_short_input_is_skipped_with_a_reason(tmp_path, caplog):
  short = vf.make_video(str(tmp_path / 'short.mp4'), seconds=0.6, audio_hz=None, size=(160, 96))
  long = vf.make_video(str(tmp_path / 'long.mp4'), seconds=12.0, audio_hz=None, size=(160, 96))
  with open(tmp_path / 'list.txt', 'w') as f:
    f.write('short.mp4\nlong.mp4\n')
  with caplog.at_level(logging.WARNING):
    records = build(str(tmp_path / 'out'), f'--videos={tmp_path / "list.txt"}', '--queries=2', '--no_copy=0',
                    '--ref_max=6')
  assert any(f'skipped {short}: 0.60 s' in r.getMessage() and '--min_segment=1.5' in r.getMessage()
             for r in caplog.records)
  sources = ' '.join(s for q in records for s in q['filler'])
  assert 'short.mp4' not in sources and len(records) == 2 and os.path.isfile(long)


@pytest.mark.parametrize('kind', ['missing', 'garbage', 'empty-folder'])
def test_bad_videos_is_one_error_and_nothing_written(tmp_path, capsys, kind):
  out = tmp_path / 'out'
  if kind == 'missing':
    spec, culprit = str(tmp_path / 'nope.mp4'), 'nope.mp4: no such file'
  elif kind == 'garbage':
    vf.make_video(str(tmp_path / 'good.mp4'), seconds=3.0, audio_hz=None, size=(160, 96))
    spec, culprit = str(tmp_path), vf.make_corrupt(str(tmp_path / 'bad.mp4')) + ': unreadable'
  else:
    (tmp_path / 'none').mkdir()
    spec, culprit = str(tmp_path / 'none'), 'names no video file'
  with pytest.raises(SystemExit) as e:
    make_copies.main([f'--videos={spec}', f'--output={out}', *TINY])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count('\n') == 1 and err.startswith('error: ') and culprit in err, err
  assert not out.exists()
