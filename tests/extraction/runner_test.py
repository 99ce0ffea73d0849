"""The extraction driver: video lists, host split, packed batches, resumable HDF5 output, failure log."""
import json
import os

import h5py
import numpy as np
import pytest

from extraction import runner as extraction
from extraction import feature_writer


def test_video_list_formats_and_errors(tmp_path):
  (tmp_path / 'a.mp4').write_bytes(b'')
  (tmp_path / 'b.MKV').write_bytes(b'')
  (tmp_path / 'notes.txt').write_text('x')
  assert [v.video_id for v in extraction.read_video_list(video_dir=str(tmp_path))] == ['a', 'b']
  assert [v.video_id for v in extraction.read_video_list(video_dir=str(tmp_path), keep_extension=True)] == [
      'a.mp4', 'b.MKV']
  lst = tmp_path / 'list.txt'
  lst.write_text('# comment\nvids/x.mp4\nmyid\tvids/with space.mp4\n\n')
  got = extraction.read_video_list(str(lst))
  assert [(v.video_id, v.path) for v in got] == [('x', str(tmp_path / 'vids/x.mp4')),
                                                  ('myid', str(tmp_path / 'vids/with space.mp4'))]
  lst.write_text('a.mp4\nb/a.mp4\n')
  with pytest.raises(extraction.ListError, match="'a' appears twice"):
    extraction.read_video_list(str(lst))
  lst.write_text('x\ty\tz\n')
  with pytest.raises(extraction.ListError, match=r'list.txt:1: expected'):
    extraction.read_video_list(str(lst))
  with pytest.raises(extraction.ListError, match='exactly one'):
    extraction.read_video_list(str(lst), str(tmp_path))
  with pytest.raises(extraction.ListError, match='not found'):
    extraction.read_video_list(str(tmp_path / 'missing.txt'))


def test_select_shard_partitions_the_list():
  videos = [extraction.Video(str(i), f'{i}.mp4') for i in range(10)]
  parts = [extraction.select_shard(videos, 3, k) for k in range(3)]
  assert sorted(v.video_id for p in parts for v in p) == sorted(v.video_id for v in videos)
  assert [len(p) for p in parts] == [4, 3, 3]
  assert extraction.shard_path('/x/f.h5', 4, 1) == '/x/f-00001-of-00004.h5'
  assert extraction.shard_path('/x/f.h5', 1, 0) == '/x/f.h5'
  with pytest.raises(extraction.ListError, match='shard_index=3'):
    extraction.select_shard(videos, 3, 3)


def test_packed_runner_returns_each_video_whole_and_in_order():
  calls = []

  def fn(x):
    calls.append(x.shape)
    return x * 2, x.sum(axis=1)

  runner = extraction.PackedRunner(fn, batch_size=4)
  rng = np.random.default_rng(0)
  lengths = [3, 1, 6, 2, 5]
  inputs = {f'v{i}': rng.normal(size=(n, 3)).astype(np.float32) for i, n in enumerate(lengths)}
  out = []
  for key, x in inputs.items():
    out += runner.add(key, x)
  out += runner.flush()
  assert [k for k, _ in out] == list(inputs)
  for key, (doubled, sums) in out:
    np.testing.assert_array_equal(doubled, inputs[key] * 2)
    np.testing.assert_allclose(sums, inputs[key].sum(axis=1), rtol=1e-6)
  assert set(calls) == {(4, 3)} and len(calls) == 5   # 17 rows -> 5 batches of 4, one shape
  assert runner.padded_rows == 3
  with pytest.raises(ValueError, match='no frames'):
    runner.add('empty', np.zeros((0, 3)))


def _write(writer, vid, value):
  writer.write(vid, {'a': lambda f: f.create_dataset(vid, data=np.full((2, 3), value, np.float32)),
                     'b': lambda f: f.create_dataset(vid, data=np.full((4,), value, np.float32))})


def test_resumable_h5_resume_drops_uncommitted_and_commits_atomically(tmp_path):
  files = {'a': str(tmp_path / 'a.h5'), 'b': str(tmp_path / 'b.h5')}
  w = feature_writer.ResumableH5(files)
  _write(w, 'v1', 1.0)
  _write(w, 'v2', 2.0)
  # v3 reached file a but the run died before it was logged (and before file b).
  w._h5['a'].create_dataset('v3', data=np.zeros((2, 3), np.float32))
  w.close()
  assert not os.path.exists(files['a']) and os.path.exists(files['a'] + '.partial')
  w = feature_writer.ResumableH5(files)
  assert w.done == {'v1', 'v2'} and w.resumed == 2
  assert 'v3' not in w._h5['a']
  with pytest.raises(feature_writer.OutputError, match='already'):
    _write(w, 'v1', 1.0)
  _write(w, 'v3', 3.0)
  w.commit()
  assert not os.path.exists(files['a'] + '.partial') and not os.path.exists(files['a'] + '.done')
  with h5py.File(files['a']) as f:
    assert sorted(f) == ['v1', 'v2', 'v3'] and f['v3'][0, 0] == 3.0
  # A finished output is extended by a later run.
  w = feature_writer.ResumableH5(files)
  assert w.done == {'v1', 'v2', 'v3'}
  _write(w, 'v4', 4.0)
  w.commit()
  with h5py.File(files['b']) as f:
    assert sorted(f) == ['v1', 'v2', 'v3', 'v4']


def test_resumable_h5_corrupt_partial_is_moved_aside(tmp_path):
  path = str(tmp_path / 'x.h5')
  with open(path + '.partial', 'wb') as f:
    f.write(b'not hdf5 at all')
  with open(path + '.done', 'w') as f:
    f.write('v1\n')
  w = feature_writer.ResumableH5({'x': path})
  assert w.done == set() and os.path.exists(path + '.partial.corrupt')
  w.commit()


def test_run_records_failures_and_goes_on(tmp_path):
  videos = [extraction.Video(f'v{i}', f'/nowhere/v{i}.mp4') for i in range(6)]

  def decode(video):
    if video.video_id == 'v2':
      err = ValueError('cannot decode')
      err.reason = 'unreadable'
      raise err
    return np.full((int(video.video_id[1]) + 1, 2), float(video.video_id[1]), np.float32)

  runner = extraction.PackedRunner(lambda x: x + 1, 4)
  written = {}

  def write(video, out):
    if video.video_id == 'v4':
      raise ValueError('disk full')
    written[video.video_id] = out

  failures = extraction.FailureLog(str(tmp_path / 'fail.jsonl'))
  stats = extraction.run(videos, decode, lambda v, x: runner.add(v, x), write, runner.flush, done={'v0'},
                         failures=failures, workers=2)
  assert sorted(written) == ['v1', 'v3', 'v5']
  np.testing.assert_array_equal(written['v5'], np.full((6, 2), 6.0))
  assert stats['skipped_done'] == 1 and stats['extracted'] == 3 and stats['failed'] == 2
  failures.write()
  lines = [json.loads(x) for x in open(tmp_path / 'fail.jsonl')]
  assert [(x['id'], x['reason']) for x in lines] == [('v2', 'unreadable'), ('v4', 'ValueError')]
  assert '2 failed' in failures.summary()


def test_failed_batch_fails_exactly_the_videos_in_it(tmp_path):
  """A batch function that raises on one packed batch: every video with rows in that batch is logged as
  failed (none silently lost), the videos of the batches around it are written, and the run goes on."""
  videos = [extraction.Video(f'v{i}', f'v{i}.mp4') for i in range(6)]
  lengths = [3, 2, 3, 4, 1, 2]   # batches of 4 rows: [v0 v0 v0 v1] [v1 v2 v2 v2] [v3 v3 v3 v3] [v4 v5 v5 pad]

  def fn(x):
    if (x == 2.0).any():   # the second batch holds v2's rows (and v1's last one)
      raise RuntimeError('device fault')
    return x + 1

  runner = extraction.PackedRunner(fn, 4)
  written = {}
  failures = extraction.FailureLog(str(tmp_path / 'fail.jsonl'))
  stats = extraction.run(videos, lambda v: np.full((lengths[int(v.video_id[1])], 2), float(v.video_id[1]),
                                                   np.float32),
                         runner.add, lambda v, out: written.__setitem__(v.video_id, out), runner.flush,
                         failures=failures, workers=1)
  assert sorted(written) == ['v0', 'v3', 'v4', 'v5'], written
  np.testing.assert_array_equal(written['v5'], np.full((2, 2), 6.0))
  assert stats['extracted'] == 4 and stats['failed'] == 2
  failures.write()
  lines = [json.loads(x) for x in open(tmp_path / 'fail.jsonl')]
  assert sorted(x['id'] for x in lines) == ['v1', 'v2'] and all('device fault' in x['error'] for x in lines)


def test_packed_runner_batch_error_keeps_completed_videos():
  def fn(x):
    if (x < 0).any():
      raise ValueError('negative')
    return x

  runner = extraction.PackedRunner(fn, 2)
  assert runner.add('a', np.ones((1, 1))) == []
  with pytest.raises(extraction.BatchError) as e:
    runner.add('b', -np.ones((3, 1)))   # [a b] fails: a and b are dropped, b's other rows too
  assert e.value.keys == ['a', 'b'] and isinstance(e.value.cause, ValueError) and e.value.completed == []
  assert [k for k, _ in runner.add('c', np.ones((2, 1)))] == ['c']   # the runner goes on
  runner.add('f', np.ones((1, 1)))
  with pytest.raises(extraction.BatchError) as e:
    runner.add('g', np.array([[1.0], [1.0], [-1.0]]))   # [f g] completes f, then [g g] fails
  assert e.value.keys == ['g'] and [k for k, _ in e.value.completed] == ['f']
  assert runner.flush() == [] and runner.batches == 2


def test_link_files_reads_as_one_file(tmp_path):
  from hapvr_jax import features
  parts = []
  for k in range(2):
    path = str(tmp_path / f'f-{k:05d}-of-00002.h5')
    w = feature_writer.ResumableH5({'x': path})
    for i in range(k, 5, 2):
      w.write(f'v{i}', {'x': lambda f, i=i: f.create_dataset(f'v{i}', data=np.full((3, 9, 4), i, np.float32))})
    w.commit()
    parts.append(path)
  out = str(tmp_path / 'all.h5')
  assert feature_writer.main(['--output', out, *parts]) == 0
  ff = features.FeatureFile(out, dims=4)
  assert ff.ids() == {f'v{i}' for i in range(5)}
  np.testing.assert_array_equal(ff.read('v3'), np.full((3, 9, 4), 3, np.float32))
  with pytest.raises(feature_writer.OutputError, match="'v0' is in both"):
    feature_writer.link_files(str(tmp_path / 'dup.h5'), [parts[0], parts[0]])


def test_run_stops_after_the_video_in_flight_and_keeps_what_was_done():
  videos = [extraction.Video(f'v{i}', f'v{i}.mp4') for i in range(8)]
  written = []

  class Stop:
    def requested(self, sync=True):
      return len(written) >= 2

  runner = extraction.PackedRunner(lambda x: x, 2)
  stats = extraction.run(videos, lambda v: np.zeros((1, 1), np.float32), runner.add,
                         lambda v, out: written.append(v.video_id), runner.flush, stop=Stop(), workers=1)
  assert stats['stopped'] and written == ['v0', 'v1'] and stats['extracted'] == 2
