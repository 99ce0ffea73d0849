"""AVHash feature shards (input_pipeline.avhash.shards, make_av_shards): round trip against the HDF5 reader,
pickling, several shards, float16, validation errors and the CLI."""
import json
import os
import pickle
import subprocess
import sys

from array_record.python import array_record_module
import h5py
import numpy as np
import pytest

from input_pipeline.avhash import lists as data_lists
from input_pipeline.avhash import shards as av_shards
from input_pipeline.avhash import make_shards as make_av_shards

from tests.conftest import ROOT  # noqa: E402
T, D = 25, 16


def _h5(path, videos):
  with h5py.File(path, 'w') as f:
    for vid, x in videos.items():
      f.create_group(vid).create_dataset('vectors', data=x)
  return str(path)


def _features(tmp_path, n=7, seed=0):
  rng = np.random.default_rng(seed)
  ids = [f'v{i:02d}' for i in range(n)]
  img = {v: rng.standard_normal((T, D)).astype(np.float32) for v in ids}
  aud = {v: rng.standard_normal((T, D)).astype(np.float32) for v in ids}
  return _h5(tmp_path / 'img.h5', img), _h5(tmp_path / 'aud.h5', aud), ids


def _leftovers(tmp_path, name):
  return [n for n in os.listdir(tmp_path) if n.startswith(name) or n.startswith('.' + name)]


def test_round_trip_several_shards_and_pickle(tmp_path):
  img, aud, ids = _features(tmp_path)
  out = str(tmp_path / 'shards')
  summary = av_shards.convert_h5(img, aud, out, records_per_shard=3, progress=False)
  assert summary['videos'] == 7 and summary['shards'] == 3
  assert sorted(os.listdir(out)) == ['avhash.array_record-00000-of-00003', 'avhash.array_record-00001-of-00003',
                                     'avhash.array_record-00002-of-00003', 'index.json']
  with open(os.path.join(out, 'index.json')) as f:
    index = json.load(f)
  assert index['ids'] == ids and [s['records'] for s in index['shards']] == [3, 3, 1]
  assert (index['frames'], index['dim'], index['dtype']) == (T, D, 'float32')
  h5 = data_lists.AVFeatures(img, aud, T, D)
  feats = av_shards.open_features(img, aud, out, T, D)
  assert isinstance(feats, av_shards.AVShardFeatures) and feats.ids == ids and feats.shape == (T, D)
  for v in reversed(ids):  # random order, across shards
    for got, want in zip(feats.read(v), h5.read(v)):
      assert got.dtype == np.float32
      np.testing.assert_array_equal(got, want)
  clone = pickle.loads(pickle.dumps(feats))
  np.testing.assert_array_equal(clone.read('v04')[1], h5.read('v04')[1])
  feats.check_ids(ids[:3], 'train.txt')
  with pytest.raises(av_shards.AVShardError, match=r"shards: video 'zz' from train.txt is not in the shards "
                                                    r"\(1 of 2 ids missing\)"):
    feats.check_ids(['v00', 'zz'], 'train.txt')
  with pytest.raises(data_lists.AVFeatureError, match=rf"{out}: video 'zz' is not in the shards"):
    feats.read('zz')
  with pytest.raises(av_shards.AVShardError, match=r'\[25, 16\] \(index.json\) but \[25, 768\] was requested'):
    av_shards.AVShardFeatures(out, T, 768)
  assert isinstance(av_shards.open_features(img, aud, '', T, D), data_lists.AVFeatures)
  feats.close()
  clone.close()
  h5.close()


def test_float16_and_lists(tmp_path):
  img, aud, ids = _features(tmp_path)
  lst = tmp_path / 'train.txt'
  lst.write_text('v05,3\nv01,1\n')
  out = str(tmp_path / 'half')
  av_shards.convert_h5(img, aud, out, ids=['v02', 'v05'], lists=[str(lst)], dataset='fcvid', dtype='float16',
                       progress=False)
  feats = av_shards.AVShardFeatures(out)
  assert feats.ids == ['v02', 'v05', 'v01'] and feats.dtype == 'float16'
  h5 = data_lists.AVFeatures(img, aud, T, D)
  for v in feats.ids:
    for got, want in zip(feats.read(v), h5.read(v)):
      assert got.dtype == np.float32
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
  record = array_record_module.ArrayRecordReader(os.path.join(out, 'avhash.array_record-00000-of-00001')).read([0])
  assert 2 * 2 * T * D < len(record[0]) < 2 * 2 * T * D + 100  # two float16 arrays and the header
  lst.write_text('v01,1\nnope,2\n')
  with pytest.raises(data_lists.AVFeatureError, match=r"img.h5: video 'nope' from .*train.txt is not in the image"):
    av_shards.convert_h5(img, aud, str(tmp_path / 'bad'), lists=[str(lst)], dataset='fcvid', progress=False)
  assert not _leftovers(tmp_path, 'bad')


def test_writer_validation(tmp_path):
  good = np.ones((T, D), np.float32)
  nan = good.copy()
  nan[2, 3] = np.nan
  out = tmp_path / 'w'
  with av_shards.AVShardWriter(str(out)) as w:
    w.add('a', good, good)
    with pytest.raises(av_shards.AVShardError, match=r"video 'b' audio: 1 NaN/Inf values"):
      w.add('b', good, nan)
    with pytest.raises(av_shards.AVShardError, match=r"video 'b' image: shape \(24, 16\) differs from the expected"):
      w.add('b', good[:24], good)
    with pytest.raises(av_shards.AVShardError, match=r"video 'b' image: shape \(400,\); expected a non-empty 2-D"):
      w.add('b', good.ravel(), good)
    with pytest.raises(av_shards.AVShardError, match=r"video 'a' was added twice"):
      w.add('a', good, good)
  assert av_shards.AVShardFeatures(str(out)).ids == ['a']
  with pytest.raises(av_shards.AVShardError, match='output exists and is not an empty directory'):
    av_shards.AVShardWriter(str(out))
  with pytest.raises(av_shards.AVShardError, match='overflow float16'):
    with av_shards.AVShardWriter(str(tmp_path / 'h'), dtype='float16') as w:
      w.add('a', good * 1e6, good)
  with pytest.raises(RuntimeError, match='boom'):  # an exception inside the block removes everything
    with av_shards.AVShardWriter(str(tmp_path / 'x')) as w:
      w.add('a', good, good)
      raise RuntimeError('boom')
  assert not _leftovers(tmp_path, 'h') and not _leftovers(tmp_path, 'x')


def test_conversion_errors_leave_nothing(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((T, D)).astype(np.float32)
  nan = x.copy()
  nan[0, 0] = np.nan
  img = _h5(tmp_path / 'img.h5', {'a': x, 'b': x, 'c': x})
  aud = _h5(tmp_path / 'aud.h5', {'a': x, 'b': x, 'd': x})
  with pytest.raises(av_shards.AVShardError, match=r"different videos: 1 in .*img.h5 only \(e.g. 'c'\); "
                                                    r"1 in .*aud.h5 only \(e.g. 'd'\)"):
    av_shards.convert_h5(img, aud, str(tmp_path / 'out'), progress=False)
  img = _h5(tmp_path / 'img2.h5', {'a': x, 'b': nan})
  aud = _h5(tmp_path / 'aud2.h5', {'a': x, 'b': x})
  with pytest.raises(data_lists.AVFeatureError, match=r"img2.h5: video 'b' has 1 NaN/Inf"):
    av_shards.convert_h5(img, aud, str(tmp_path / 'out'), records_per_shard=1, progress=False)
  assert not _leftovers(tmp_path, 'out')


def test_broken_shard_directories(tmp_path):
  img, aud, ids = _features(tmp_path, n=4)
  out = tmp_path / 'shards'
  av_shards.convert_h5(img, aud, str(out), records_per_shard=2, progress=False)
  shard0, shard1 = (str(out / f'avhash.array_record-0000{i}-of-00002') for i in (0, 1))
  index = (out / 'index.json').read_text()

  (out / 'index.json').write_text(index[:len(index) // 2])
  with pytest.raises(av_shards.AVShardError, match=r'index.json: unreadable index'):
    av_shards.AVShardFeatures(str(out))
  (out / 'index.json').write_text(index.replace('"records": 4', '"records": 5'))
  with pytest.raises(av_shards.AVShardError, match=r'record counts do not match'):
    av_shards.AVShardFeatures(str(out))
  (out / 'index.json').write_text(index)

  data = open(shard1, 'rb').read()
  os.rename(shard1, shard1 + '.moved')
  with pytest.raises(av_shards.AVShardError, match=r'00001-of-00002: shard file listed in .*index.json is missing'):
    av_shards.AVShardFeatures(str(out))
  with open(shard1, 'wb') as f:
    f.write(data[:len(data) // 2])
  feats = av_shards.AVShardFeatures(str(out))
  np.testing.assert_array_equal(feats.read(ids[0])[0], data_lists.AVFeatures(img, aud, T, D).read(ids[0])[0])
  with pytest.raises(av_shards.AVShardError, match=r"00001-of-00002: not a readable ArrayRecord file "
                                                    r"\(corrupt or truncated\) \(reading video 'v02'\)"):
    feats.read(ids[2])
  with open(shard1, 'wb') as f:
    f.write(b'garbage' * 100)
  with pytest.raises(av_shards.AVShardError, match=r'00001-of-00002: not a readable ArrayRecord file \(corrupt'):
    av_shards.AVShardFeatures(str(out)).read(ids[3])
  bad = bytearray(data)
  bad[200:260] = bytes(60)  # inside the first record's chunk: the file opens, the read fails its checksum
  with open(shard1, 'wb') as f:
    f.write(bytes(bad))
  with pytest.raises(av_shards.AVShardError, match=r"00001-of-00002: record 0 \(video 'v02'\): cannot be read "
                                                    r'\(corrupt or truncated shard file; .*Corrupted'):
    av_shards.AVShardFeatures(str(out)).read('v02')
  os.remove(shard1)
  os.rename(shard1 + '.moved', shard1)

  os.rename(shard0, shard0 + '.x')  # swap the two shards: records no longer match the index
  os.rename(shard1, shard0)
  os.rename(shard0 + '.x', shard1)
  with pytest.raises(av_shards.AVShardError, match=r"record 0 \(video 'v00'\): holds video 'v02' but index.json"):
    av_shards.AVShardFeatures(str(out)).read('v00')
  os.remove(str(out / 'index.json'))
  with pytest.raises(av_shards.AVShardError, match=r'no index.json here'):
    av_shards.AVShardFeatures(str(out))


def test_decode_record_errors():
  x = np.zeros((2, 3), np.float32)
  data = av_shards.encode_av_record('a', x, x + 1, 'float32')
  vid, image, audio = av_shards.decode_av_record(data)
  assert vid == 'a' and image.shape == (2, 3) and (audio == 1).all()
  with pytest.raises(av_shards.AVShardError, match='here: not an AVHash feature record'):
    av_shards.decode_av_record(b'x' * 40, 'here')
  with pytest.raises(av_shards.AVShardError, match='payload bytes'):
    av_shards.decode_av_record(data[:-4], 'here')


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'input_pipeline.avhash.make_shards', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def test_cli(tmp_path, capsys):
  img, aud, ids = _features(tmp_path, n=5)
  lst = tmp_path / 'list.txt'
  lst.write_text('v01,1\nv03,2\n')
  out = str(tmp_path / 'out')
  r = _cli(f'--image_h5={img}', f'--audio_h5={aud}', f'--output={out}', '--records_per_shard=2', '--no_progress')
  assert r.returncode == 0, r.stderr
  assert '5 videos -> 3 shard file(s)' in r.stdout and av_shards.AVShardFeatures(out).ids == ids
  r = _cli(f'--image_h5={img}', f'--audio_h5={aud}', f'--output={out}')
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      f'error: {out}: output exists and is not an empty directory; refusing to overwrite it '
      '(remove it or choose another --output)']
  # in process (a fresh FlagValues per call: no global flags), with lists and float16
  assert make_av_shards.main([f'--image_h5={img}', f'--audio_h5={aud}', f'--output={tmp_path / "l"}',
                              f'--list={lst}', '--dataset=fcvid', '--dtype=float16', '--no_progress']) == 0
  assert av_shards.AVShardFeatures(str(tmp_path / 'l')).ids == ['v01', 'v03']
  with pytest.raises(SystemExit) as e:
    make_av_shards.main([f'--image_h5={img}', f'--audio_h5={tmp_path / "none.h5"}', f'--output={tmp_path / "m"}'])
  assert e.value.code == 2
  assert capsys.readouterr().err.strip().splitlines() == [f'error: {tmp_path / "none.h5"}: feature file not found']
  with pytest.raises(SystemExit) as e:
    make_av_shards.main([f'--image_h5={img}', f'--audio_h5={aud}', f'--output={tmp_path / "m"}', f'--list={lst}'])
  assert e.value.code == 2 and 'error: --list needs --dataset' in capsys.readouterr().err
  assert not _leftovers(tmp_path, 'm')
