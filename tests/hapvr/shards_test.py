"""Training-view storage (input_pipeline.hapvr.shards and the input_pipeline.hapvr.make_shards CLI): ArrayRecord shards,
the HDF5 extraction format and the frame bank.

Round trips must be exact (float16 in, float16 out), across several shard files and HDF5 files; the stores
must survive pickling (Grain workers are spawned processes) before and after they opened files; and every bad
input must raise an error that names the culprit (file, video, segment, view or record). Shapes are tiny
(T=6, R=9, D=8, C=4) so the file runs in a few seconds.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from input_pipeline.hapvr import shards
from input_pipeline.hapvr.store import BANK_KEYS, MemoryStore

from tests.conftest import ROOT  # noqa: E402
T, R, D, C = 6, 9, 8, 4


def make_view(rng, meta=None, t=T):
  view = (rng.standard_normal((t, R, D)).astype(np.float16), rng.standard_normal((t, C)).astype(np.float16))
  return view if meta is None else view + (meta,)


def make_videos(n=5, segments=2, weak=1, strong=3, seed=0, prefix='v'):
  rng = np.random.default_rng(seed)
  return {f'{prefix}{i:02d}': [{'weak': [make_view(rng) for _ in range(weak)],
                                'strong': [make_view(rng, {'seed': i, 'segment': s, 'ops': ['blur', 3]})
                                           for _ in range(strong)]}
                               for s in range(segments)] for i in range(n)}


def make_bank(seed=0):
  rng = np.random.default_rng(seed)
  return {'black_regions': rng.standard_normal((2, R, D)), 'black_teacher': rng.standard_normal((2, C)),
          'noise_regions': rng.standard_normal((3, R, D)), 'noise_teacher': rng.standard_normal((3, C))}


def memory_store(videos, bank=None):
  """The reference: a MemoryStore of the same views (without their meta)."""
  plain = {vid: [{kind: [v[:2] for v in seg[kind]] for kind in seg} for seg in segs] for vid, segs in videos.items()}
  return MemoryStore(plain, None if bank is None else shards.check_bank(bank))


def write_shards(out, videos, **kw):
  with shards.ShardWriter(str(out), **kw) as writer:
    for vid, segments in videos.items():
      writer.add_video(vid, segments)
  return writer.summary


def assert_same_views(store, ref):
  """Same ids (any order), segments and views (bit-exact float16), same bank."""
  assert sorted(store.video_ids) == sorted(ref.video_ids)
  assert store.info == ref.info
  where = {vid: i for i, vid in enumerate(ref.video_ids)}
  for i, vid in enumerate(store.video_ids):
    segs, ref_segs = store.segments(i), ref.segments(where[vid])
    assert len(segs) == len(ref_segs)
    for seg, ref_seg in zip(segs, ref_segs):
      for kind in ('weak', 'strong'):
        assert len(getattr(seg, kind)) == len(getattr(ref_seg, kind))
        for key, ref_key in zip(getattr(seg, kind), getattr(ref_seg, kind)):
          for x, y in zip(store.load(key), ref.load(ref_key)):
            assert x.dtype == np.float16 and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
  if ref.bank() is None:
    assert store.bank() is None
  else:
    for k in BANK_KEYS:
      assert store.bank()[k].dtype == np.float16
      np.testing.assert_array_equal(store.bank()[k], ref.bank()[k])


# -------------------------------------------------------------------------------------------- round trips

def test_shard_round_trip(tmp_path):
  videos, bank = make_videos(), make_bank()
  summary = write_shards(tmp_path / 'out', videos, records_per_shard=7, bank=bank)
  assert (summary['videos'], summary['segments'], summary['views'], summary['shards']) == (5, 10, 40, 6)
  names = sorted(os.listdir(tmp_path / 'out'))
  assert names == (['bank.npz', 'dataset_info.json', 'features.json', 'shards.json']
                   + [f'vcdb-train.array_record-{i:05d}-of-00006' for i in range(6)])
  assert os.listdir(tmp_path) == ['out']  # no temporary folder left behind
  store = shards.ArrayRecordStore(str(tmp_path / 'out'))
  assert store.video_ids == list(videos) and store.num_records == 40
  assert_same_views(store, memory_store(videos, bank))
  store.verify(read=True)
  header = store.view_header(store.segments(2)[1].strong[0])
  assert header['video_id'] == 'v02' and header['kind'] == 'strong' and header['segment'] == 1
  assert header['meta'] == {'seed': 2, 'segment': 1, 'ops': ['blur', 3]}
  assert shards.open_store(str(tmp_path / 'out')).num_records == 40


def test_grain_reads_the_shards(tmp_path):
  import grain
  write_shards(tmp_path / 'out', make_videos(n=3), records_per_shard=5)
  store = shards.ArrayRecordStore(str(tmp_path / 'out'))
  source = grain.sources.ArrayRecordDataSource(store.shard_files)
  assert len(source) == store.num_records == 24
  header, regions, _ = shards.decode_record(source[9])
  assert header['video_id'] == 'v01' and regions.shape == (T, R, D)
  ds = grain.MapDataset.range(len(store)).map(lambda i: store.load(store.segments(i)[0].weak[0])[0])
  np.testing.assert_array_equal(ds[1], make_videos(n=3)['v01'][0]['weak'][0][0])


def test_tfds_metadata(tmp_path):
  """dataset_info.json / features.json: the protobuf JSON TFDS 4.9 reads (int64 as strings), this run's shards."""
  write_shards(tmp_path / 'out', make_videos(n=3), records_per_shard=5, name='demo')
  info = json.loads((tmp_path / 'out' / 'dataset_info.json').read_text())
  store = shards.ArrayRecordStore(str(tmp_path / 'out'))  # the extra files do not disturb the store
  split, = info.pop('splits')
  assert info.pop('description').startswith('HAP-VR training views')
  assert info == {'name': 'demo', 'version': '1.0.0', 'fileFormat': 'array_record',
                  'moduleName': 'input_pipeline.hapvr.shards'}
  assert split == {'name': 'train', 'filepathTemplate': '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
                   'shardLengths': ['5', '5', '5', '5', '4'],
                   'numBytes': str(sum(os.path.getsize(f) for f in store.shard_files))}
  assert [os.path.basename(f) for f in store.shard_files] == [
      f'demo-train.array_record-{i:05d}-of-00005' for i in range(5)]  # what the template names
  assert json.loads((tmp_path / 'out' / 'features.json').read_text()) == {
      'featuresDict': {}, 'pythonClassName': 'tensorflow_datasets.core.features.features_dict.FeaturesDict'}


def test_tfds_reads_the_shards_as_raw_bytes(tmp_path):
  """With tensorflow-datasets installed (not a dependency): both TFDS entry points, RAW_BYTES + decode_record."""
  tfds = pytest.importorskip('tensorflow_datasets')
  raw = tfds.decode.DeserializeMethod.RAW_BYTES
  out = tmp_path / 'data' / 'vcdb' / shards.TFDS_VERSION  # the layout tfds.data_source looks up by name
  write_shards(out, make_videos(n=3), records_per_shard=5, bank=make_bank())
  store = shards.ArrayRecordStore(str(out))
  builder = tfds.builder_from_directory(str(out))
  assert builder.info.splits['train'].shard_lengths == [5, 5, 5, 5, 4]
  source = builder.as_data_source('train', deserialize_method=raw)
  assert len(source) == store.num_records == 24
  for key in range(len(source)):
    header, regions, teacher = shards.decode_record(source[key])
    assert header == store.view_header(key)
    for x, y in zip((regions, teacher), store.load(key)):
      np.testing.assert_array_equal(x, y)
  sliced = tfds.data_source('vcdb', data_dir=str(tmp_path / 'data'), split='train[10:20]', deserialize_method=raw)
  assert len(sliced) == 10
  assert [shards.decode_record(sliced[i])[0] for i in range(10)] == [store.view_header(k) for k in range(10, 20)]


def test_hdf5_round_trip_and_pickling(tmp_path):
  a, b, bank = make_videos(n=3, prefix='a'), make_videos(n=2, seed=1, prefix='b'), make_bank()
  shards.write_hdf5_views(str(tmp_path / 'views' / 'part0.h5'), a, bank=bank)
  shards.write_hdf5_views(str(tmp_path / 'views' / 'part1.hdf5'), b)
  store = shards.open_store(str(tmp_path / 'views'))
  assert isinstance(store, shards.HDF5Store) and store.video_ids == list(a) + list(b)
  assert_same_views(store, memory_store({**a, **b}, bank))
  assert store.view_meta(store.segments(1)[0].strong[2]) == {'seed': 1, 'segment': 0, 'ops': ['blur', 3]}
  assert store.view_meta(0) == {}
  single = shards.open_store(str(tmp_path / 'views' / 'part1.hdf5'))
  assert single.video_ids == list(b)
  # picklable before and after a load opened the HDF5 handles
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(store)).load(5)[0], store.load(5)[0])
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(store)).load(30)[1], store.load(30)[1])


def test_shard_store_pickles(tmp_path):
  write_shards(tmp_path / 'out', make_videos(n=2), records_per_shard=3)
  store = shards.ArrayRecordStore(str(tmp_path / 'out'))
  fresh = pickle.loads(pickle.dumps(store))
  expected = store.load(4)  # opens the data source
  for copy in (fresh, pickle.loads(pickle.dumps(store))):
    for x, y in zip(copy.load(4), expected):
      np.testing.assert_array_equal(x, y)


def test_make_shards_cli(tmp_path):
  shards.write_hdf5_views(str(tmp_path / 'views' / 'a.h5'), make_videos(n=3, prefix='a'), bank=make_bank())
  shards.write_hdf5_views(str(tmp_path / 'views' / 'b.h5'), make_videos(n=2, seed=1, prefix='b'))
  out = tmp_path / 'shards'
  cmd = [sys.executable, '-m', 'input_pipeline.hapvr.make_shards', f'--input={tmp_path / "views"}', f'--output={out}',
         '--records_per_shard=6', '--name=demo']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert '5 videos, 10 segments, 40 views -> 7 shard file(s)' in proc.stdout
  assert os.path.isfile(out / 'demo-train.array_record-00006-of-00007') and os.path.isfile(out / 'bank.npz')
  store, ref = shards.open_store(str(out)), shards.HDF5Store(str(tmp_path / 'views'))
  assert isinstance(store, shards.ArrayRecordStore)
  assert_same_views(store, ref)
  assert store.view_header(3)['meta'] == ref.view_meta(3) == {'seed': 0, 'segment': 0, 'ops': ['blur', 3]}
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)  # output exists now
  lines = again.stderr.strip().splitlines()
  assert again.returncode == 2 and lines[-1].startswith('error: ') and str(out) in lines[-1]
  assert 'Traceback' not in again.stderr


def test_make_shards_stops_on_nan_and_leaves_nothing(tmp_path):
  videos = make_videos(n=3)
  videos['v01'][1]['strong'][2][0][3, 4, 5] = np.nan
  shards.write_hdf5_views(str(tmp_path / 'views.h5'), videos)
  with pytest.raises(shards.ShardError, match=r"views\.h5: video 'v01' segment 1 view 'strong_2': regions has 1 NaN"):
    shards.convert(str(tmp_path / 'views.h5'), str(tmp_path / 'out'))
  assert sorted(os.listdir(tmp_path)) == ['views.h5']


# ------------------------------------------------------------------------------------------- writer errors

@pytest.mark.parametrize('mutate, message', [
    (lambda seg: seg['strong'][1][0].__setitem__((0, 0, 0), np.inf),
     r"video 'bad' segment 0 strong view 1: regions has 1 NaN/Inf"),
    (lambda seg: seg['weak'].__setitem__(0, (np.zeros((T, R, D + 1)), np.zeros((T, C)))),
     r"video 'bad' segment 0 weak view 0: shapes regions \(6, 9, 9\), teacher \(6, 4\) differ from the first"),
    (lambda seg: seg['strong'].__setitem__(0, (np.zeros((T, R, D)), np.zeros((T + 1, C)))),
     r"video 'bad' segment 0 strong view 0: regions has 6 frames but teacher has 7"),
    (lambda seg: seg['strong'].__setitem__(0, (np.zeros((T, R, D), np.int32), np.zeros((T, C)))),
     r"video 'bad' segment 0 strong view 0: regions has dtype int32; expected float"),
    (lambda seg: seg['weak'].__setitem__(0, (np.zeros((T, R, D)), np.full((T, C), 1e6))),
     r"video 'bad' segment 0 weak view 0: teacher has 24 values that overflow float16"),
    (lambda seg: seg.__setitem__('strong', []),
     r"video 'bad' segment 0: needs at least one weak and one strong view \(has 1 weak, 0 strong\)"),
    (lambda seg: seg['weak'].__setitem__(0, make_view(np.random.default_rng(0), {'x': np.int64(3)})),
     r"video 'bad' segment 0 weak view 0: meta is not JSON-serialisable"),
])
def test_writer_rejects_bad_views(tmp_path, mutate, message):
  videos = make_videos(n=2)
  bad = make_videos(n=1, seed=3)['v00']
  mutate(bad[0])
  with pytest.raises(shards.ShardError, match=message):
    with shards.ShardWriter(str(tmp_path / 'out')) as writer:
      for vid, segments in videos.items():
        writer.add_video(vid, segments)
      writer.add_video('bad', bad)
  assert os.listdir(tmp_path) == []  # the temporary folder is removed


def test_writer_rejects_duplicates_and_existing_output(tmp_path):
  videos = make_videos(n=1)
  with pytest.raises(shards.ShardError, match=r"video 'v00' was added twice"):
    with shards.ShardWriter(str(tmp_path / 'out')) as writer:
      writer.add_video('v00', videos['v00'])
      writer.add_video('v00', videos['v00'])
  (tmp_path / 'out').mkdir()
  write_shards(tmp_path / 'out', videos)  # an empty folder is fine
  with pytest.raises(shards.ShardError, match=re.escape(str(tmp_path / 'out')) + r': output exists'):
    shards.ShardWriter(str(tmp_path / 'out'))
  with pytest.raises(shards.ShardError, match='no videos were added'):
    with shards.ShardWriter(str(tmp_path / 'empty')):
      pass
  bad_bank = dict(make_bank(), noise_teacher=np.zeros((3, C + 1)))
  with pytest.raises(shards.ShardError, match=r'bank: black and noise entries differ'):
    shards.ShardWriter(str(tmp_path / 'b'), bank=bad_bank)


# -------------------------------------------------------------------------------------------- read errors

def test_shard_directory_errors(tmp_path):
  out = tmp_path / 'out'
  write_shards(out, make_videos(n=2), records_per_shard=5, bank=make_bank())
  index = json.loads((out / 'shards.json').read_text())
  (tmp_path / 'missing').mkdir()
  with pytest.raises(shards.ShardError, match=r'missing: no shards\.json index'):
    shards.ArrayRecordStore(str(tmp_path / 'missing'))
  (out / 'shards.json').write_text(json.dumps(dict(index, version=99)))
  with pytest.raises(shards.ShardError, match=r'shards\.json: index version 99; this code reads version 1'):
    shards.ArrayRecordStore(str(out))
  (out / 'shards.json').write_text('{"format": "hapvr-view-shards", "version": 1')
  with pytest.raises(shards.ShardError, match=r'shards\.json: unreadable index'):
    shards.ArrayRecordStore(str(out))
  (out / 'shards.json').write_text(json.dumps(dict(index, info={'frames': 6})))
  with pytest.raises(shards.ShardError, match=r"shards\.json: malformed index \(KeyError: 'regions'\)"):
    shards.ArrayRecordStore(str(out))
  (out / 'shards.json').write_text(json.dumps(index))
  os.remove(out / 'vcdb-train.array_record-00002-of-00004')
  with pytest.raises(shards.ShardError, match=r'vcdb-train\.array_record-00002-of-00004: shard file listed in'):
    shards.ArrayRecordStore(str(out))
  os.remove(out / 'shards.json')
  with pytest.raises(shards.ShardError, match=r'has ArrayRecord shard files but no shards\.json'):
    shards.open_store(str(out))


def test_corrupt_records_are_named(tmp_path):
  from array_record.python import array_record_module
  out = tmp_path / 'out'
  write_shards(out, make_videos(n=2), records_per_shard=5)
  shard1 = out / 'vcdb-train.array_record-00001-of-00004'
  data = bytearray(shard1.read_bytes())  # records are stored uncompressed: flip a byte of record 0's header
  data[data.find(shards.MAGIC) + 20] ^= 0xFF
  shard1.write_bytes(bytes(data))
  store = shards.ArrayRecordStore(str(out))
  with pytest.raises(shards.ShardError, match=r'00001-of-00004: record 0 \(key 5\): cannot be read .*hash mismatch'):
    store.load(5)
  np.testing.assert_array_equal(store.load(6)[0], make_videos(n=2)['v00'][1]['strong'][1][0])
  # a shard whose records pass the file checksums but are not view records, or belong to another video
  shard2 = str(out / 'vcdb-train.array_record-00002-of-00004')
  records = [shards.ArrayRecordStore(str(out))._source()[k] for k in range(10, 15)]
  writer = array_record_module.ArrayRecordWriter(shard2, shards.DEFAULT_OPTIONS)
  bad_header = bytearray(records[1])
  bad_header[14] ^= 0xFF
  for record in (b'PK\x03\x04' + records[0][4:], bytes(bad_header), records[2][:-2], records[4], records[4]):
    writer.write(record)
  writer.close()
  store = shards.ArrayRecordStore(str(out))
  for key, message in ((10, r'record 0 \(key 10\): not a HAP-VR view record \(bad magic'),
                       (11, r'record 1 \(key 11\): unreadable record header'),
                       (12, r'record 2 \(key 12\): record has \d+ payload bytes'),
                       (13, r"record 3 \(key 13\): holds video 'v01' segment 1 strong view 1 but shards\.json says "
                            r"video 'v01' segment 1 strong view 0")):
    with pytest.raises(shards.ShardError, match=r'00002-of-00004: ' + message):
      store.load(key)


def test_hdf5_errors(tmp_path):
  def write(name, videos):
    shards.write_hdf5_views(str(tmp_path / name), videos)
    return str(tmp_path / name)

  videos = make_videos(n=2)
  videos['v01'][1]['weak'][0] = (np.zeros((T, R * D)), np.zeros((T, C)))
  with pytest.raises(shards.ShardError, match=r"rank\.h5: video 'v01' segment 1 view 'weak_0': regions has shape "
                                              r'\(6, 72\); expected rank 3'):
    shards.HDF5Store(write('rank.h5', videos))
  with pytest.raises(shards.ShardError, match=r"nostrong\.h5: video 'v00' segment 0 has no strong view"):
    shards.HDF5Store(write('nostrong.h5', {'v00': [{'weak': make_videos(n=1)['v00'][0]['weak']}]}))
  os.makedirs(tmp_path / 'dup')
  write('dup/a.h5', make_videos(n=2))
  write('dup/b.h5', make_videos(n=3, seed=1))
  with pytest.raises(shards.ShardError, match=r"video 'v00' is in both .*dup/a\.h5 and .*dup/b\.h5"):
    shards.HDF5Store(str(tmp_path / 'dup'))
  with h5py.File(tmp_path / 'dns.h5', 'w') as f:  # an evaluation feature file by mistake
    f['vid'] = np.zeros((T, R, D), np.float32)
  with pytest.raises(shards.ShardError, match=r'dns\.h5: /vid is a dataset; expected groups'):
    shards.HDF5Store(str(tmp_path / 'dns.h5'))
  with h5py.File(tmp_path / 'layout.h5', 'w') as f:
    f.create_group('vid/0/strong_x')
  with pytest.raises(shards.ShardError, match=r"layout\.h5: video 'vid' segment 0: unexpected member 'strong_x'"):
    shards.HDF5Store(str(tmp_path / 'layout.h5'))
  with pytest.raises(shards.ShardError, match=r'nowhere: not found'):
    shards.open_store(str(tmp_path / 'nowhere'))
