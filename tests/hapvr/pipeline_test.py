"""Input pipeline: temporal index ops, gather, feature-level ViV and labels, and the Grain pipeline.

References are independent float64 NumPy loops (ViV) or hand-computed cases (TSD, Y/M). The pipeline tests use
a MemoryStore whose features *encode* where they came from — regions[t, r, 0] = video number, [.., 1] = view
(0 weak, 1 strong), [.., 2] = frame t, and teacher[t] = (video, frame) — so batches can be traced back to videos.
"""
import json
import types

from absl import flags
import ml_collections
import numpy as np
import pytest

from input_pipeline.hapvr import pipeline
from input_pipeline.hapvr import temporal
from input_pipeline.hapvr import viv
from input_pipeline.hapvr.store import MemoryStore

L, WINDOW, R, D, C = 56, 28, 9, 8, 4
DRAWS = 300


def _rngs(n=DRAWS, seed=0):
  return [np.random.default_rng([seed, k]) for k in range(n)]


def _bank(kb=3, kn=5):
  """Bank entries encode (kind, entry): black channel 0 = -1, noise = -2; channel 2 / teacher 1 = entry id."""
  rng = np.random.default_rng(99)
  bank = {}
  for name, code, k in (('black', -1., kb), ('noise', -2., kn)):
    r, t = rng.normal(size=(k, R, D)), rng.normal(size=(k, C))
    r[..., 0], t[:, 0] = code, code
    r[..., 2], t[:, 1] = np.arange(k)[:, None], np.arange(k)
    bank[f'{name}_regions'], bank[f'{name}_teacher'] = r.astype(np.float16), t.astype(np.float16)
  return bank


# ------------------------------------------------------------------------------------------ temporal ops

def test_every_op_keeps_the_clip_invariant():
  for name in temporal.TT_OPS:
    lengths = set()
    for rng in _rngs(100):
      idx, kind = temporal.apply_op(rng, name, *temporal.segment(L), window=WINDOW)
      temporal.check_clip(idx, kind, L)
      assert idx.dtype == np.int32 and kind.dtype == np.int8
      lengths.add(len(idx))
    expected = dict(fast_forward={28, 19}, slow_motion={112}, reverse={56}, none={56},
                    pause=set(range(56, 56 + WINDOW // 4)))
    if name in expected:
      assert lengths == expected[name], name
    else:
      assert max(lengths) <= L and min(lengths) > 0


@pytest.mark.parametrize('length,window', [(56, 28), (20, 8), (5, 8), (8, 8), (3, 28)])
def test_weak_and_strong_clips_have_window_frames_in_range(length, window):
  names = set()
  for k, rng in enumerate(_rngs(200)):
    idx, kind = temporal.weak_clip(rng, length, window)
    temporal.check_clip(idx, kind, length)
    assert len(idx) == window and (kind == temporal.REAL).all()
    idx, kind, name = temporal.strong_clip(rng, length, window, synthetic_frames=k % 2 == 0)
    temporal.check_clip(idx, kind, length)
    assert len(idx) == window and name in temporal.TT_OPS
    if k % 2:
      assert (kind == temporal.REAL).all()
    names.add(name)
  assert names == set(temporal.TT_OPS)


def test_op_semantics():
  idx, kind = temporal.segment(L)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(temporal.reverse(rng, idx, kind)[0], np.arange(L)[::-1])
  np.testing.assert_array_equal(temporal.slow_motion(rng, idx, kind)[0], np.arange(L).repeat(2))
  np.testing.assert_array_equal(temporal.identity(rng, idx, kind)[0], np.arange(L))
  strides, durations, starts = set(), set(), set()
  for rng in _rngs():
    out = temporal.fast_forward(rng, idx, kind)[0]
    stride = out[1] - out[0]
    np.testing.assert_array_equal(out, np.arange(0, L, stride))
    strides.add(int(stride))
    out = temporal.pause(rng, idx, kind, window=WINDOW)[0]
    d = len(out) - L
    values, counts = np.unique(out, return_counts=True)
    np.testing.assert_array_equal(values, np.arange(L))
    assert (np.diff(out) >= 0).all()            # copies sit next to the paused frame
    if d:
      assert counts.max() == d + 1 and (counts > 1).sum() == 1
      starts.add(int(values[counts.argmax()]))
    durations.add(d)
  assert strides == {2, 3}
  assert durations == set(range(WINDOW // 4))     # 0..6 copies for window 28
  assert max(starts) == L - 2                     # randint(len - 1): the last frame never pauses


def _tsd_structure(idx, kind, length):
  """(w, kept, replaced, dropped) for the first w in 4..15 that explains a TSD output of arange(length)."""
  for w in range(4, 16):
    nseg = length // w
    if len(idx) % w or len(idx) // w > nseg:
      continue
    chunks, kinds = idx.reshape(-1, w), kind.reshape(-1, w)
    synth = (kinds != 0).all(1)
    real = [c for c, s in zip(chunks, synth) if not s]
    starts = [c[0] for c in real]
    if (kinds[~synth] == 0).all() and all(
        s % w == 0 and s + w <= nseg * w and np.array_equal(c, np.arange(s, s + w)) for s, c in zip(starts, real)) \
        and len(set(starts)) == len(starts):
      return w, len(real), int(synth.sum()), nseg - len(chunks)
  return None


@pytest.mark.parametrize('synthetic', [True, False])
def test_tsd_keeps_whole_equal_segments(synthetic):
  seen = dict(shuffled=0, dropped=0, black=0, noise=0)
  for rng in _rngs(400):
    idx, kind = temporal.tsd(rng, *temporal.segment(L), synthetic_frames=synthetic)
    structure = _tsd_structure(idx, kind, L)
    assert structure is not None, (idx, kind)
    w, kept, replaced, dropped = structure
    if replaced or dropped:                       # applied only if 0 < sum(m) < #segments
      assert 0 < dropped + 2 * replaced < L // w
    real = idx[idx >= 0]
    seen['shuffled'] += bool((np.diff(real) < 0).any())
    seen['dropped'] += dropped > 0
    seen['black'] += bool((kind == temporal.BLACK).any())
    seen['noise'] += bool((kind == temporal.NOISE).any())
  assert seen['shuffled'] and seen['dropped']
  assert bool(seen['black'] and seen['noise']) == synthetic


class ScriptedRng:
  """Replays TSD's draws in order: integers → w, then random() values from a queue."""

  def __init__(self, w, randoms, perm=None):
    self.w, self.randoms, self.perm = w, list(randoms), perm

  def integers(self, lo, hi=None, size=None):
    assert (lo, hi, size) == (4, 16, None)
    return self.w

  def random(self, size=None):
    value = np.asarray(self.randoms.pop(0), np.float64)
    assert value.shape == (() if size is None else np.empty(size).shape)
    return value

  def permutation(self, n):
    return np.asarray(self.perm)


def test_tsd_hand_cases():
  seg = temporal.segment(16)
  # m = [2, 2, 0, 0]: sum(m) = 4 = #segments, so nothing happens (a count of nonzero m would apply it).
  idx, kind = temporal.tsd(ScriptedRng(4, [.9, [.1, .1, .9, .9], [.9, .9, .1, .1]]), *seg)
  np.testing.assert_array_equal(idx, np.arange(16))
  # m = [2, 0, 0, 0]: segment 0 replaced; per frame black (u > .5) or noise.
  idx, kind = temporal.tsd(ScriptedRng(4, [.9, [.1, .9, .9, .9], [.9, .1, .1, .1], [[.9, .1, .9, .1]]]), *seg)
  np.testing.assert_array_equal(idx, [-1] * 4 + list(range(4, 16)))
  np.testing.assert_array_equal(kind, [1, 2, 1, 2] + [0] * 12)
  # m = [1, 2, 0, 0]: segment 0 dropped, segment 1 replaced.
  idx, kind = temporal.tsd(ScriptedRng(4, [.9, [.1, .1, .9, .9], [.1, .9, .1, .1], [[.1] * 4]]), *seg)
  np.testing.assert_array_equal(idx, [-1] * 4 + list(range(8, 16)))
  np.testing.assert_array_equal(kind, [2] * 4 + [0] * 8)
  # No bank: m = [2, 2, 0, 0] becomes [1, 1, 0, 0] before the test, so both segments are dropped.
  idx, kind = temporal.tsd(ScriptedRng(4, [.9, [.1, .1, .9, .9], [.9, .9, .1, .1]]), *seg, synthetic_frames=False)
  np.testing.assert_array_equal(idx, np.arange(8, 16))
  # 18 frames, w = 4: truncated to 16 (frames 16, 17 never appear), shuffled, nothing dropped.
  idx, kind = temporal.tsd(ScriptedRng(4, [.1, [.9] * 4, [.9] * 4], perm=[3, 2, 1, 0]), *temporal.segment(18))
  np.testing.assert_array_equal(idx, np.concatenate([np.arange(s, s + 4) for s in (12, 8, 4, 0)]))


def test_crop_offset_quirk_and_tiling():
  offsets = {int(temporal.weak_clip(rng, 10, 8)[0][0]) for rng in _rngs(400)}
  assert offsets == {0, 1}                        # 0..2 are valid; the last offset (2) is never drawn
  assert {int(temporal.weak_clip(rng, 8, 8)[0][0]) for rng in _rngs(50)} == {0}
  crops = {tuple(temporal.weak_clip(rng, 5, 8)[0]) for rng in _rngs(200)}   # 5 → doubled to 10
  assert crops == {(0, 1, 2, 3, 4, 0, 1, 2), (1, 2, 3, 4, 0, 1, 2, 3)}


def test_strong_clip_op_frequencies():
  counts = dict.fromkeys(temporal.TT_OPS, 0)
  for rng in _rngs(2000, seed=1):
    counts[temporal.strong_clip(rng, L, WINDOW)[2]] += 1
  for name, p in temporal.DEFAULT_TT_PROBS.items():
    assert abs(counts[name] / 2000 - p) < 0.04, counts
  only = temporal.strong_clip(np.random.default_rng(0), L, WINDOW, dict(reverse=1.))
  assert only[2] == 'reverse' and (np.diff(only[0]) == -1).all()
  with pytest.raises(ValueError, match='sum to 1'):
    temporal.strong_clip(np.random.default_rng(0), L, WINDOW, dict(reverse=.5))


def test_gather_is_consistent_for_regions_and_teacher():
  rng = np.random.default_rng(3)
  regions = rng.normal(size=(L, R, D)).astype(np.float16)
  teacher = rng.normal(size=(L, C)).astype(np.float16)
  regions[..., 0], teacher[:, 0] = np.arange(L)[:, None], np.arange(L)   # frame id in both
  bank = _bank()
  synthetic = 0
  for rng in _rngs(200):
    idx, kind, _ = temporal.strong_clip(rng, L, WINDOW)
    out_r, out_t = temporal.gather(regions, teacher, idx, kind, bank, rng)
    assert out_r.dtype == np.float16 and out_r.shape == (WINDOW, R, D) and out_t.shape == (WINDOW, C)
    real = kind == 0
    np.testing.assert_array_equal(out_r[real], regions[idx[real]])
    np.testing.assert_array_equal(out_t[real], teacher[idx[real]])
    for code, name in ((1, 'black'), (2, 'noise')):
      for j in np.flatnonzero(kind == code):
        synthetic += 1
        entry = int(out_t[j, 1])                   # regions and teacher come from the same bank entry
        np.testing.assert_array_equal(out_r[j], bank[f'{name}_regions'][entry])
        np.testing.assert_array_equal(out_t[j], bank[f'{name}_teacher'][entry])
  assert synthetic > 0
  idx, kind = np.array([0, -1], np.int32), np.array([0, 1], np.int8)
  with pytest.raises(ValueError, match='no bank'):
    temporal.gather(regions, teacher, idx, kind, None, rng)
  with pytest.raises(ValueError, match='invariant'):
    temporal.gather(regions, teacher, idx, np.array([0, 0], np.int8), bank, rng)


# ------------------------------------------------------------------------------------------------- ViV

def _viv_reference(regions, teacher, hosts, lams, blocks):
  """Explicit float64 loops over clips, frames and grid cells."""
  regions, teacher = regions.astype(np.float64), teacher.astype(np.float64)
  out_r, out_t = regions.copy(), teacher.copy()
  for i in range(regions.shape[0]):
    h = hosts[i]
    if h < 0:
      continue
    row0, col0 = blocks[i] // 2, blocks[i] % 2
    for t in range(regions.shape[1]):
      frame = regions[h, t].copy()                 # the pre-mix host
      for a in range(2):
        for c in range(2):
          cell = np.zeros(regions.shape[-1])
          for u in range(2):
            for v in range(2):
              cell += regions[i, t, 3 * (a + u) + (c + v)]
          cell /= 4
          frame[3 * (row0 + a) + (col0 + c)] = cell / np.sqrt(np.sum(cell ** 2))
      out_r[i, t] = frame
      gh = teacher[h, t] / np.sqrt(np.sum(teacher[h, t] ** 2))
      gg = teacher[i, t] / np.sqrt(np.sum(teacher[i, t] ** 2))
      blend = lams[i] * gh + (1 - lams[i]) * gg
      out_t[i, t] = blend / np.sqrt(np.sum(blend ** 2))
  return out_r, out_t


def test_viv_matches_float64_reference():
  rng = np.random.default_rng(5)
  regions = rng.normal(size=(5, 3, R, D)).astype(np.float16)
  teacher = rng.normal(size=(5, 3, C)).astype(np.float16)
  out_r, out_t, info = viv.mix(regions, teacher, np.random.default_rng(1), prob=1.)   # every host is mixed too
  assert info['mixed'] == 5 and out_r.dtype == np.float16 and out_t.dtype == np.float16
  ref_r, ref_t = _viv_reference(regions, teacher, info['hosts'], info['lams'], info['blocks'])
  np.testing.assert_allclose(out_r.astype(np.float64), ref_r, atol=1e-3)
  np.testing.assert_allclose(out_t.astype(np.float64), ref_t, atol=1e-3)
  for i, (h, b) in enumerate(zip(info['hosts'], info['blocks'])):
    row0, col0 = divmod(b, 2)
    outside = [3 * r + c for r in range(3) for c in range(3) if not (row0 <= r < row0 + 2 and col0 <= c < col0 + 2)]
    assert len(outside) == 5
    np.testing.assert_array_equal(out_r[i][:, outside], regions[h][:, outside])   # bit-exact host cells
  # float32 core against float64 (no fp16 rounding in between)
  r64, t64 = rng.normal(size=(2, 4, R, D)), rng.normal(size=(2, 4, C))
  for block in range(4):
    got_r, got_t = viv.mix_clip(r64[1], t64[1], r64[0], t64[0], .42, block)
    ref_r, ref_t = _viv_reference(r64, t64, [1, -1], [.42, 0.], [block, -1])
    np.testing.assert_allclose(got_r, ref_r[0], atol=1e-6)
    np.testing.assert_allclose(got_t, ref_t[0], atol=1e-6)
  same_r, same_t, info = viv.mix(regions, teacher, np.random.default_rng(1), prob=0.)
  assert info['mixed'] == 0 and (same_r == regions).all() and (same_t == teacher).all()


def test_viv_draws():
  hosts, lams, blocks = zip(*(viv.draw(rng, 64, .3, (.3, .7)) for rng in _rngs(100)))
  hosts, lams, blocks = np.stack(hosts), np.stack(lams), np.stack(blocks)
  mixed = hosts >= 0
  assert abs(mixed.mean() - .3) < .03
  assert (hosts != np.arange(64)).all()
  assert ((lams[mixed] >= .3) & (lams[mixed] < .7)).all() and (lams[~mixed] == 0).all()
  assert set(blocks[mixed]) == {0, 1, 2, 3} and (blocks[~mixed] == -1).all()
  assert set(hosts[mixed]) == set(range(64))
  assert (viv.draw(np.random.default_rng(0), 1, 1.)[0] == -1).all()     # no host for a single source


def test_labels_hand_cases():
  eye = np.eye(3)
  y, m = viv.labels([-1, -1, -1], [0, 0, 0], 3)
  np.testing.assert_array_equal(y, np.block([[eye, eye], [eye, eye]]))
  # Clip 0 mixed into host 2 (λ = .4). Clips: w0 w1 w2 s0 s1 s2.
  y, m = viv.labels([2, -1, -1], [.4, 0, 0], 3)
  np.testing.assert_allclose(m[3], [1, 0, .4])
  pos = {(0, 3), (1, 4), (2, 5), (2, 3), (3, 5)}           # w0~s0, w1~s1, w2~s2, w2~s0, s0~s2
  expected = np.eye(6)
  for a, b in pos:
    expected[a, b] = expected[b, a] = 1
  np.testing.assert_array_equal(y, expected)
  assert y.dtype == np.float32 and m.shape == (6, 3)
  # Clips 0 and 1 both mixed into host 2: s0 ~ s1 (they share a host), and both ~ w2, s2.
  y, _ = viv.labels([2, 2, -1], [.5, .6, 0], 3)
  for a, b in pos | {(1, 4), (2, 4), (4, 5), (3, 4)}:
    assert y[a, b] == y[b, a] == 1
  assert y[0, 1] == y[0, 4] == y[1, 3] == y[0, 2] == 0
  assert y.sum() == 6 + 2 * 8


# ---------------------------------------------------------------------------------------------- pipeline

PL, PWIN, VIDEOS, B, G = 20, 8, 16, 4, 2
BLOCK_CELLS = [{0, 1, 3, 4}, {1, 2, 4, 5}, {3, 4, 6, 7}, {4, 5, 7, 8}]


def _view(rng, video, view):
  regions, teacher = rng.normal(size=(PL, R, D)), rng.normal(size=(PL, C))
  regions[..., 0], regions[..., 1], regions[..., 2] = video, view, np.arange(PL)[:, None]
  teacher[:, 0], teacher[:, 1] = video, np.arange(PL)
  return regions, teacher


@pytest.fixture(scope='module')
def store():
  rng = np.random.default_rng(0)
  videos = {f'v{v:02d}': [dict(weak=[_view(rng, v, 0)], strong=[_view(rng, v, 1), _view(rng, v, 1)])
                          for _ in range(2)] for v in range(VIDEOS)}
  return MemoryStore(videos, _bank())


def _cfg(**kw):
  return ml_collections.ConfigDict({**dict(window=PWIN, sources_per_group=B, groups=G, workers=0), **kw})


def _take(store, cfg, n, **kw):
  it = pipeline.make_iterator(store, cfg, **kw)
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def _equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batch_format_and_traceability(store):
  mixed = 0
  for batch in _take(store, _cfg(viv_prob=.5), 4, seed=0):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        'regions': ((G, 2 * B, PWIN, R, D), np.float16), 'teacher': ((G, 2 * B, PWIN, C), np.float16),
        'y': ((G, 2 * B, 2 * B), np.float32), 'm': ((G, 2 * B, B), np.float32)}
    for g in range(G):
      r, t, m = batch['regions'][g], batch['teacher'][g], batch['m'][g]
      np.testing.assert_array_equal(batch['y'][g], (m @ m.T > 0).astype(np.float32))
      np.testing.assert_array_equal(m[:B], np.eye(B))
      weak_video = r[:B, 0, 0, 0]
      for i in range(B):                           # weak clip: one video, weak view, contiguous crop
        assert (r[i, ..., 0] == weak_video[i]).all() and (r[i, ..., 1] == 0).all()
        assert ((np.diff(r[i, :, 0, 2]) % PL) == 1).all()
        np.testing.assert_array_equal(t[i, :, :2], r[i, :, 0, [0, 2]].T)
      for i in range(B):
        row, s = m[B + i], B + i
        if (row > 0).sum() == 1:                   # unmixed strong clip: same video, a strong view
          real = r[s, :, 0, 0] >= 0
          assert (r[s, real, :, 0] == weak_video[i]).all() and (r[s, real, :, 1] == 1).all()
          np.testing.assert_array_equal(t[s, :, :2], r[s, :, 0, [0, 2]].T)   # same idx for both
        else:                                      # mixed: 5 cells keep the host's (pre-mix) video
          mixed += 1
          h = int(np.flatnonzero(row * (np.arange(B) != i))[0])
          assert .3 <= row[h] < .7 and row[i] == 1
          guest_cells = set(np.flatnonzero(~(r[s, :, :, 0] == weak_video[h]).all(0)))
          assert guest_cells in BLOCK_CELLS
  assert mixed > 0


def test_deterministic_given_seed(store):
  a = _take(store, _cfg(), 4, seed=7)
  assert _equal(a, _take(store, _cfg(), 4, seed=7))
  assert not _equal(a, _take(store, _cfg(), 4, seed=8))
  plain = types.SimpleNamespace(window=PWIN, sources_per_group=B, groups=G)   # attribute object, defaults
  assert _equal(a, _take(store, plain, 4, seed=7))


def test_resume_from_state_equals_uninterrupted(store):
  full = _take(store, _cfg(), 6, seed=3)
  it = pipeline.make_iterator(store, _cfg(), seed=3)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  it = pipeline.make_iterator(store, _cfg(), seed=3)
  it.set_state(state)
  resumed = [next(it) for _ in range(3)]
  it.close()
  assert _equal(full[3:], resumed)


def test_process_halves_make_the_single_process_batch(store):
  """Two processes' step batches, stacked in process order (as make_array_from_process_local_data places
  them), are bit-identical to the one-process stream: training does not depend on the process count."""
  single = _take(store, _cfg(), 4, seed=11)
  halves = [_take(store, _cfg(), 4, seed=11, process_index=p, process_count=2) for p in range(2)]
  for step in range(4):
    assert halves[0][step]['regions'].shape[0] == G // 2
    for key in single[step]:
      np.testing.assert_array_equal(np.concatenate([h[step][key] for h in halves]), single[step][key])
  # Each epoch still visits every source once (G·B sources per step; VIDEOS per epoch).
  order = [int(v) for b in _take(store, _cfg(), 2 * VIDEOS // (G * B), seed=11)
           for g in range(G) for v in b['regions'][g, :B, 0, 0, 0]]
  assert sorted(order[:VIDEOS]) == sorted(order[VIDEOS:]) == list(range(VIDEOS))


def test_config_validation(store):
  with pytest.raises(ValueError, match='cfg.groups'):
    pipeline.make_dataset(store, _cfg(), seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r'16 videos.*cfg.sources_per_group'):
    pipeline.make_dataset(store, _cfg(sources_per_group=17), seed=0, process_index=1, process_count=2)
  with pytest.raises(ValueError, match='sum to 1'):
    pipeline.make_dataset(store, _cfg(tt_probs=dict(tsd=.9)), seed=0)


def test_without_bank_no_synthetic_frames(store):
  rng = np.random.default_rng(0)
  nobank = MemoryStore({f'v{v}': [dict(weak=[_view(rng, v, 0)], strong=[_view(rng, v, 1)])] for v in range(8)})
  cfg = _cfg(tt_probs=dict(tsd=1.), viv_prob=0.)
  for batch in _take(nobank, cfg, 3, seed=0):
    assert (batch['regions'][..., 0] >= 0).all()
  assert any((b['regions'][..., 0] < 0).any() for b in _take(store, cfg, 3, seed=0))


@pytest.fixture
def parsed_flags():
  """Grain workers read absl flags; mark them parsed for this test only."""
  if flags.FLAGS.is_parsed():
    yield
    return
  flags.FLAGS.mark_as_parsed()
  yield
  flags.FLAGS.unparse_flags()


def test_workers_need_parsed_flags(store):
  if flags.FLAGS.is_parsed():
    pytest.skip('absl flags already parsed in this process')
  with pytest.raises(ValueError, match='absl'):
    pipeline.make_dataset(store, _cfg(workers=2), seed=5)


def test_worker_processes_give_the_same_stream(store, parsed_flags):
  expected = _take(store, _cfg(), 3, seed=5)
  it = pipeline.make_iterator(store, _cfg(workers=2), seed=5)
  try:
    got = [next(it) for _ in range(2)]
    state = it.get_state()
  finally:
    it.close()
  assert _equal(expected[:2], got)
  it = pipeline.make_iterator(store, _cfg(workers=2), seed=5)
  try:
    it.set_state(state)
    assert _equal(expected[2:], [next(it)])
  finally:
    it.close()
