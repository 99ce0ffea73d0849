"""Temporal alignment on synthetic similarity maps with planted copies, hand-computed paths and scores."""
import statistics

import numpy as np
import pytest

from hapvr_jax import localize
from hapvr_jax.localize import Segment

METHODS = sorted(localize.METHODS)


def plant(copies, shape=(120, 150), noise=0.05, seed=0):
  """A map of Gaussian background (std `noise`) plus, for each copy (q0, r0, nq, nr, amplitude), a straight
  line from (q0, r0) covering query frames [q0, q0 + nq) and reference frames [r0, r0 + nr), one cell per frame
  of the longer of the two (nr / nq is the copy's speed)."""
  sim = np.random.default_rng(seed).normal(0.0, noise, shape)
  for q0, r0, nq, nr, amplitude in copies:
    t = np.arange(max(nq, nr))
    sim[q0 + t * nq // t.size, r0 + t * nr // t.size] += amplitude
  return sim


def boxes(segments):
  return sorted((s.q_start, s.q_end, s.r_start, s.r_end) for s in segments)


def assert_recovered(segments, copies):
  want = sorted((q0, q0 + nq, r0, r0 + nr) for q0, r0, nq, nr, _ in copies)
  got = boxes(segments)
  assert len(got) == len(want), (got, want)
  for g, w in zip(got, want):
    assert np.abs(np.subtract(g, w)).max() <= 1, (got, want)  # within one frame on every edge


def xfail_for(request, method, reasons):
  """Marks the case as a known failure of `method` (strict: the body still runs and must fail)."""
  if method in reasons:
    request.applymarker(pytest.mark.xfail(reason=reasons[method], strict=True))


ONE = [(20, 60, 40, 40, 1.0)]


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('case, copies, noise', [
    ('one', ONE, 0.05),
    ('half speed', [(20, 30, 60, 30, 1.0)], 0.05),   # the reference advances one frame per two query frames
    ('double speed', [(20, 30, 30, 60, 1.0)], 0.05),
    ('noise', [(10, 20, 40, 40, 1.0), (70, 80, 30, 60, 1.0)], 0.2),  # z about 5: cells dip below threshold
])
def test_recovers_planted_copies(method, case, copies, noise):
  assert_recovered(localize.align(plant(copies, noise=noise), method), copies)


@pytest.mark.parametrize('method', METHODS)
def test_two_copies_in_order_ranked_by_strength(method):
  copies = [(10, 20, 30, 30, 0.6), (60, 80, 40, 40, 1.0)]
  segments = localize.align(plant(copies), method)
  assert_recovered(segments, copies)
  assert segments[0].q_start in (59, 60, 61) and segments[0].score > segments[1].score


@pytest.mark.parametrize('method', METHODS)
def test_two_copies_in_swapped_order(request, method):
  # the query shows a late part of the reference, then an early one: no single monotone path holds both
  xfail_for(request, method, {'dtw': 'dtw follows one monotone path through the whole map: it keeps one of the copies'})
  copies = [(10, 90, 30, 30, 1.0), (60, 10, 40, 40, 1.0)]
  assert_recovered(localize.align(plant(copies), method), copies)


@pytest.mark.parametrize('method', METHODS)
def test_a_copy_that_changes_speed_is_one_segment(request, method):
  xfail_for(request, method, {'hv': 'hv finds straight lines: it reports the 1x and 2x halves as two segments'})
  sim = plant([(20, 30, 30, 30, 1.0), (50, 60, 30, 60, 1.0)])  # 30 frames at 1x, then 30 at 2x
  assert_recovered(localize.align(sim, method), [(20, 30, 60, 90, 1.0)])


@pytest.mark.parametrize('method', METHODS)
def test_thick_band_gives_one_segment(method):
  # neighbouring frames look alike, so a real copy is a band a few cells wide: still one segment
  sim = plant(ONE)
  t = np.arange(40)
  sim[20 + t, 59 + t] += 0.6
  sim[20 + t, 61 + t] += 0.6
  assert_recovered(localize.align(sim, method), ONE)


@pytest.mark.parametrize('method', METHODS)
def test_no_copy_no_segment(method):
  for seed in range(3):
    assert localize.align(plant([], noise=1.0, seed=seed), method) == []
  assert localize.align(np.full((60, 80), 0.9), method) == []           # uniformly high
  assert localize.align(0.9 + plant([], noise=1e-3), method) == []      # uniformly high, a little noise


@pytest.mark.parametrize('method', METHODS)
def test_thresholds_are_scale_free(method):
  # a network with untrained weights gives small values at a scale of its own: only z-scores are compared
  sim = plant([(10, 20, 40, 40, 1.0)], noise=0.2)
  base = localize.align(sim, method)
  moved = localize.align(0.003 * sim + 0.5, method)
  assert boxes(moved) == boxes(base) and len(base) == 1
  assert moved[0].score == pytest.approx(base[0].score, rel=1e-6)


@pytest.mark.parametrize('method', METHODS)
def test_rows_and_columns_that_resemble_everything_are_background(method):
  # query frames 30-49 resemble every reference frame (say, black frames) and reference frames 100-109
  # every query frame: after centring rows and columns only the copy stands out
  sim = 0.05 * plant([(20, 60, 40, 40, 5.0)], noise=1.0)
  sim[30:50] += 0.5
  sim[:, 100:110] += 0.4
  assert_recovered(localize.align(sim, method), [(20, 60, 40, 40, 5.0)])


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('copy', [(20, 10, 25, 100, 1.0), (10, 20, 100, 25, 1.0)], ids=['4x', '0.25x'])
def test_a_copy_faster_or_slower_than_max_speed_is_not_reported(method, copy):
  sim = plant([copy], shape=(130, 130))
  assert localize.align(sim, method) == []
  if method != 'dp':  # dp's steps (1,1), (1,2), (2,1) hold it to speeds 0.5..2 whatever max_speed says
    [s] = localize.align(sim, method, max_speed=4)
    q0, r0, nq, nr, _ = copy
    # four frames of one video match each frame of the other, so an end may be off by up to four frames
    assert np.abs(np.subtract((s.q_start, s.q_end, s.r_start, s.r_end), (q0, q0 + nq, r0, r0 + nr))).max() <= 4


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('speed', ['1x', '2x', '0.5x'])
def test_upsampled_quarter_resolution_map(request, method, speed):
  # the comparator's output is at 1/4 of the frame rate, its noise is smooth once upsampled and the copy's
  # ends fade over a frame of the small map: a copy is found within two frames of the small map (7 frames)
  if speed != '1x':  # (both fail on most seeds, not all)
    xfail_for(request, method, {'hv': 'the upsampled staircase of a 2x or 0.5x copy is no straight line'})
  if speed == '2x':
    xfail_for(request, method, {'dtw': 'dtw sweeps along the rows of a wide 2x ridge, past the speed limit'})
  nq, nr = {'1x': (10, 10), '2x': (10, 20), '0.5x': (20, 10)}[speed]
  small = plant([(5, 15, nq, nr, 1.0)], shape=(30, 40), noise=0.15, seed=3)
  # its smooth noise needs the stricter threshold 3: at the default 2.5 dp's 2x path runs on by one more frame
  segments = localize.align(localize.upsample(small, 4), method, threshold=3.0)
  assert len(segments) == 1
  box = segments[0].q_start, segments[0].q_end, segments[0].r_start, segments[0].r_end
  assert np.abs(np.subtract(box, (20, 20 + 4 * nq, 60, 60 + 4 * nr))).max() <= 7, box


def test_upsample_against_scipy():
  from scipy import ndimage
  small = np.random.default_rng(5).normal(size=(6, 9))
  want = ndimage.zoom(small, 4, order=1, mode='nearest', grid_mode=True)
  np.testing.assert_allclose(localize.upsample(small, 4), want, atol=1e-12)
  np.testing.assert_allclose(localize.upsample(small, 4, shape=(22, 33)), want[:22, :33], atol=1e-12)
  assert localize.upsample(small, 1).tolist() == small.tolist()
  with pytest.raises(ValueError, match='factor'):
    localize.upsample(small, 0)


# a hand-computed path: diagonal cells (1,1)..(6,6) of an 8x8 map, one of them (0.6) under the threshold 0.7
DIAGONAL = [0.9, 0.8, 1.0, 0.6, 0.9, 0.8]
RAW = dict(normalize=False, threshold=0.7, min_mean=0.5, min_length=3)


def tiny_map():
  sim = np.zeros((8, 8))
  sim[np.arange(1, 7), np.arange(1, 7)] = DIAGONAL
  return sim


@pytest.mark.parametrize('method', METHODS)
def test_hand_computed_path_score(method):
  # one weak cell is bridged (max_gap 1): mean 5.0 / 6 over 6 frames, score = mean * 6 / (6 + min_length 3)
  [s] = localize.align(tiny_map(), method, max_gap=1, **RAW)
  assert (s.q_start, s.q_end, s.r_start, s.r_end) == (1, 7, 1, 7)
  assert s.score == pytest.approx(5.0 / 6 * 6 / 9, abs=1e-12)
  # no bridging (max_gap 0): cells 1-3 (mean 0.9, score 0.9 * 3 / 6) remain; cells 5-6 are too short
  [s] = localize.align(tiny_map(), method, max_gap=0, **RAW)
  assert (s.q_start, s.q_end, s.r_start, s.r_end, s.score) == (1, 4, 1, 4, pytest.approx(0.45, abs=1e-12))
  assert localize.align(tiny_map(), method, max_gap=1, **dict(RAW, min_mean=0.9)) == []  # mean 0.83 < 0.9


@pytest.mark.parametrize('method', METHODS)
def test_a_stray_match_past_the_end_is_not_chained(request, method):
  # diagonal (1,1)..(6,6) at 1.0 and two matching cells (7, 11), (8, 12) a step of (1, 5) beyond it: a path
  # could reach them bridging four weak cells (max_gap 4), but they are off the copy's line (tn pays
  # 3 * gap_penalty for the step, more than they bring)
  xfail_for(request, method, {'dtw': 'dtw must reach the last frame pair: its one path takes any matching cell on the way'})
  sim = np.zeros((12, 16))
  sim[np.arange(1, 7), np.arange(1, 7)] = 1.0
  sim[7, 11] = sim[8, 12] = 0.9
  [s] = localize.align(sim, method, **dict(RAW, threshold=0.5))
  assert (s.q_start, s.q_end, s.r_start, s.r_end, s.score) == (1, 7, 1, 7, pytest.approx(1.0 * 6 / 9))


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('first', [0.8, 1.0])
def test_a_lone_weak_match_does_not_start_a_segment(method, first):
  # cells (3,3)..(8,8) at 1.0, (2,2) at 0.3 (under the threshold 0.5) and a lone matching cell (1,1): at 0.8
  # (under min_mean 0.9) it is trimmed off; at 1.0 it starts the segment, mean (1 + 0.3 + 6) / 8
  sim = np.zeros((10, 10))
  sim[np.arange(1, 9), np.arange(1, 9)] = [first, 0.3] + [1.0] * 6
  [s] = localize.align(sim, method, normalize=False, threshold=0.5, min_mean=0.9, min_length=3, max_gap=1)
  if first < 0.9:
    assert (s.q_start, s.q_end, s.r_start, s.r_end, s.score) == (3, 9, 3, 9, pytest.approx(6 / 9))
  else:
    assert (s.q_start, s.q_end, s.r_start, s.r_end, s.score) == (1, 9, 1, 9, pytest.approx(7.3 / 8 * 8 / 11))


def test_densify_fills_steps_with_the_cells_around_the_line():
  # step (1, 2): the midpoint (0.5, 1) lies between cells (0, 1) and (1, 1); step (3, 1): (2, 2.33), (3, 2.67)
  lo, hi = localize._densify(np.array([[0, 0], [1, 2], [4, 3]]))
  assert lo.tolist() == [[0, 0], [0, 1], [1, 2], [2, 2], [3, 2], [4, 3]]
  assert hi.tolist() == [[0, 0], [1, 1], [1, 2], [2, 3], [3, 3], [4, 3]]


def test_normalize_against_a_loop_reference():
  sim = np.random.default_rng(3).normal(size=(7, 5))
  rows = [[v - statistics.median(row) for v in row] for row in sim.tolist()]
  cols = [statistics.median(col) for col in zip(*rows)]
  c = [[v - m for v, m in zip(row, cols)] for row in rows]
  mad = statistics.median(abs(v) for row in c for v in row)
  np.testing.assert_allclose(localize.normalize(sim), np.array(c) / (1.4826 * mad), rtol=1e-12)
  # background all exact after centring (MAD 0): the spread falls back to 1.2533 * mean |c| = 1.2533 / 9
  z = localize.normalize(np.array([[1., 2, 3], [4, 5, 6], [7, 8, 10]]))
  np.testing.assert_allclose(z, [[0, 0, 0], [0, 0, 0], [0, 0, 9 / 1.2533]], atol=1e-12)
  assert not localize.normalize(np.full((4, 6), 0.7)).any()


def test_methods_table_and_seconds():
  sim = plant(ONE)
  assert METHODS == ['dp', 'dtw', 'hv', 'tn']
  assert localize.METHODS['hv'](sim) == localize.align(sim, 'hv')
  assert localize.align(sim) == localize.align(sim, 'tn')
  # frame i covers [i / fps, (i + 1) / fps): frames [10, 20) at 10 fps are 1.0-2.0 s, [5, 15) at 5 fps 1-3 s
  assert localize.to_seconds([Segment(10, 20, 5, 15, 0.5)], 10.0, 5.0) == [(1.0, 2.0, 1.0, 3.0, 0.5)]
  with pytest.raises(ValueError, match='r_fps'):
    localize.to_seconds([], 25.0, 0.0)


@pytest.mark.parametrize('method, options, message', [
    ('nope', {}, "unknown alignment method 'nope'"),
    ('dp', {'top_k': 3}, 'no option top_k'),
    ('tn', {'min_length': 0}, 'min_length=0'),
    ('tn', {'max_speed': 0.5}, 'max_speed=0.5'),
    ('hv', {'threshold': float('nan')}, 'threshold=nan'),
    ('tn', {'top_k': 2.5}, 'top_k=2.5 must be an integer'),
    ('hv', {'min_mean': '4'}, "min_mean='4' must be a finite number"),
    ('dtw', {'normalize': 'no'}, "normalize='no' must be True or False"),
    ('dp', {'normalize': False}, 'threshold must be given with normalize=False'),
])
def test_bad_method_or_option(method, options, message):
  with pytest.raises(ValueError, match=message):
    localize.align(plant(ONE), method, **options)


def test_bad_map():
  with pytest.raises(ValueError, match='2-D'):
    localize.align(np.zeros(30))
  with pytest.raises(ValueError, match='NaN'):
    localize.align(np.full((30, 30), np.nan))
  assert localize.align(np.zeros((3, 40))) == []  # shorter than min_length: nothing to find
