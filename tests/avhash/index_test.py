"""avhash_jax.index on feature files with a tiny model: the stored codes are the evaluator's, and every way of
reaching the same collection (one build, batches added later with removals, a build killed and resumed,
several hosts merged) leaves the same index; bad input is one error line with the index untouched."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from avhash_jax import evaluate
from avhash_jax import index as index_lib
from common_jax import checkpoint, hamming
from common_jax.index_dir import IndexDir
from input_pipeline.avhash.lists import AVFeatures
from tests.avhash.evaluate_test import MODEL, data  # noqa: F401 (the shared feature files and checkpoint)
from tests.conftest import ROOT


def _args(d, index, *extra):
  return [f'--index={index}', f'--image_features={d["image_h5"]}', f'--audio_features={d["audio_h5"]}',
          f'--checkpoint={d["ckpt"]}', '--batch=16', *extra]


def _state(path):
  """What a search sees: (ids, packed codes, metadata)."""
  ix = IndexDir.open(path, index_lib.KIND)
  ids, codes = index_lib.codes_of(ix)
  return ids, codes.tolist(), [ix.meta(v) for v in ids]


def _subset(d, tmp, ids, name):
  """Feature files holding only `ids`."""
  paths = (str(tmp / f'{name}_img.h5'), str(tmp / f'{name}_aud.h5'))
  for path, m in zip(paths, (0, 1)):
    with h5py.File(path, 'w') as f:
      for v in ids:
        f.create_group(v).create_dataset('vectors', data=d['feats'][v][m])
  return {**d, 'image_h5': paths[0], 'audio_h5': paths[1]}


@pytest.fixture(scope='module')
def built(data, tmp_path_factory):  # noqa: F811
  path = str(tmp_path_factory.mktemp('avidx') / 'index')
  assert index_lib.main(_args(data, path)) == 0
  return path


def test_codes_are_the_evaluators(data, built):  # noqa: F811
  ids, codes, meta = _state(built)
  assert ids == sorted(data['feats'])
  feats = AVFeatures(data['image_h5'], data['audio_h5'], frames=MODEL.tokens, dim=MODEL.hidden_size)
  want = evaluate.extract_codes(MODEL, data['params'], feats, ids, batch_size=8)
  np.testing.assert_array_equal(np.asarray(codes, np.uint8), hamming.pack(want))
  assert len({bytes(c) for c in np.asarray(codes, np.uint8)}) > 10   # the tiny model's codes differ
  assert meta[0]['source'] == os.path.abspath(data['image_h5'])
  assert index_lib.main(_args(data, built)) == 0                       # a rerun adds nothing
  assert _state(built)[0] == ids


def test_batches_added_later_and_removals_equal_one_build(data, built, tmp_path):  # noqa: F811
  ids = sorted(data['feats'])
  path = str(tmp_path / 'index')
  assert index_lib.main(_args(_subset(data, tmp_path, ids[::2] + ids[1:5:2], 'a'), path)) == 0
  assert index_lib.main(_args(data, path)) == 0
  assert index_lib.main([f'--index={path}', f'--remove={ids[3]},{ids[7]}']) == 0
  assert _state(path)[0] == [v for v in ids if v not in (ids[3], ids[7])]
  assert index_lib.main(_args(data, path)) == 0                        # re-adds the two removed videos
  assert _state(path)[:2] == _state(built)[:2]


def test_a_build_killed_at_any_point_resumes_to_the_same_index(data, built, tmp_path):  # noqa: F811
  path = str(tmp_path / 'index')
  cmd = [sys.executable, '-m', 'avhash_jax.index', *_args(data, path)]
  for point in ('avhash_index.batch@2', 'index_dir.segment_written@1'):
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, 'JAX_VR_KILL_AT': point}, capture_output=True,
                         text=True)
    assert run.returncode == -9, run.stderr
  assert 0 < len(IndexDir.open(path)) < len(data['feats'])
  run = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert _state(path)[:2] == _state(built)[:2]
  assert not [f for f in os.listdir(os.path.join(path, 'segments')) if f.endswith('.tmp')]


def test_hosts_build_parts_then_merge_to_the_same_index(data, built, tmp_path):  # noqa: F811
  path = str(tmp_path / 'index')
  for k in range(3):
    assert index_lib.main(_args(data, path, '--num_shards=3', f'--shard_index={k}')) == 0
  parts = [f'{path}-{k:05d}-of-00003' for k in range(3)]
  assert index_lib.main([f'--index={path}', f'--merge={",".join(parts)}']) == 0
  assert _state(path)[:2] == _state(built)[:2]


def _fails(argv, capsys, *words):
  with pytest.raises(SystemExit) as e:
    index_lib.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  for w in words:
    assert w in err[0], err[0]


def test_bad_input_is_one_error_line_and_the_index_untouched(data, built, tmp_path, capsys):  # noqa: F811
  log = open(os.path.join(built, 'log.jsonl'), 'rb').read()
  other = model_lib_config(bits=32)
  ckpt = checkpoint.save_params(str(tmp_path / 'ckpt32'), _init(other), other.to_dict())
  _fails(_args({**data, 'ckpt': ckpt}, built), capsys, built, 'bits: index has 16, given 32', 'checkpoint:')
  _fails([f'--index={built}', '--remove=nope'], capsys, "'nope' is not in the index")
  _fails(_args({**data, 'image_h5': str(tmp_path / 'missing.h5')}, built), capsys, 'missing.h5')
  _fails([f'--index={built}', f'--image_features={data["image_h5"]}'], capsys, 'give both')
  assert open(os.path.join(built, 'log.jsonl'), 'rb').read() == log
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'manifest.json').write_text('{"format": ')
  _fails([f'--index={broken}', '--remove=x'], capsys, 'manifest.json: corrupt')


def model_lib_config(**kw):
  import dataclasses
  return dataclasses.replace(MODEL, **kw)


def _init(config):
  from avhash_jax import model as model_lib
  return model_lib.init_params(config, seed=0)
