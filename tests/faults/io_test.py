"""Extraction and evaluation under faults: SIGKILL at named moments (common_jax.faults) and a rerun give the
uninterrupted result; rewritten inputs, other settings, bad shapes, a full disk and bad flag values each end in
one clear error, with the finished work kept."""
import os
import pickle
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from common_jax import checkpoint, faults
from configs import common as config_common
from hapvr_jax import evaluate
from hapvr_jax import features as features_lib
from hapvr_jax import model as model_lib
from extraction import feature_writer

from tests import helpers
from tests.conftest import ROOT  # noqa: E402
DIMS = 32
SIGKILL = -9


def _run(module, args, kill_at=None, timeout=300):
  """`python -m module args` with the tests' environment (XLA flags, devices, compilation cache)."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop(faults.ENV, None)
  if kill_at:
    env[faults.ENV] = kill_at
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _last_error(stderr):
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), stderr
  return last


# ----------------------------------------------------------------------------------------------- evaluation

QUERIES, DATABASE = ['qa', 'qb'], [f'v{i}' for i in range(12)]
OVERRIDES = {'progress': False, 'plots': False, 'store_similarities': True, 'compilation_cache': '',
             'save_every_s': 0.0, 'engine.chunk_size': 16, 'engine.bucket_ratio': 2.0,
             'engine.memory_budget_mb': 0}


@pytest.fixture(scope='module')
def eval_setup(tmp_path_factory):
  """A FIVR-format benchmark, features, a checkpoint, and an uninterrupted evaluation's outputs."""
  tmp = tmp_path_factory.mktemp('eval')
  ann, features = helpers.write_fivr(tmp, QUERIES, DATABASE, DIMS, frames_step=3)
  cfg = model_lib.ModelConfig(dims=DIMS, v_topk_rate=0.3)
  ckpt = checkpoint.save_params(str(tmp / 'ckpt'), model_lib.init_params(cfg, seed=3), cfg.to_dict())
  base = {'features': features, 'annotations': str(ann), 'checkpoint': ckpt, **OVERRIDES}

  def config(**changes):
    c = config_common.hapvr_eval_config('fivr_5k')
    for k, v in {**base, **changes}.items():
      node, *rest = k.split('.')
      if rest:
        c[node][rest[0]] = v
      else:
        c[k] = v
    return c

  args = [f'--config.{k}={v}' for k, v in base.items()]
  fresh = str(tmp / 'fresh')
  metrics = evaluate.evaluate(config(), fresh)
  return config, args, features, metrics, _similarities(fresh)


def _similarities(workdir):
  with open(os.path.join(workdir, 'similarities.pk'), 'rb') as f:
    return pickle.load(f)


def _evaluate_killed_at(args, workdir, point):
  r = _run('hapvr_jax.evaluate', ['--config=configs/fivr_5k.py', f'--workdir={workdir}', *args], kill_at=point)
  assert r.returncode == SIGKILL, r.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, 'partial', 'model', 'partial-0-of-1.npz'))
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))


def test_evaluate_killed_after_a_save_resumes_and_refuses_features_rewritten_in_place(eval_setup, tmp_path):
  config, args, features, fresh_metrics, fresh_sims = eval_setup
  workdir = str(tmp_path / 'out')
  _evaluate_killed_at(args, workdir, 'evaluate.partial_saved@2')
  # The database videos' frames permuted in place: same ids, shapes, dtypes and file size, other scores.
  original = str(tmp_path / 'original.hdf5')
  shutil.copy(features, original)
  size = os.path.getsize(features)
  try:
    with h5py.File(features, 'r+') as f:
      for v in DATABASE:
        f[v][...] = f[v][()][::-1]
    assert os.path.getsize(features) == size
    with pytest.raises(ValueError, match=r'computed with other inputs \(features: was .sha1 .*, now .sha1 '):
      evaluate.evaluate(config(), workdir)
  finally:
    shutil.copy(original, features)
  metrics = evaluate.evaluate(config(), workdir)   # the original content again: resumes
  assert metrics['resumed_blocks'] == 2
  assert _similarities(workdir) == fresh_sims
  for key in ('DSVR', 'CSVR', 'ISVR', 'DSVD'):
    assert metrics[key] == fresh_metrics[key]
  assert not os.path.exists(os.path.join(workdir, 'partial'))


def test_evaluate_killed_mid_scoring_resumes_to_the_same_scores(eval_setup, tmp_path):
  config, args, _, fresh_metrics, fresh_sims = eval_setup
  workdir = str(tmp_path / 'out')
  _evaluate_killed_at(args, workdir, 'evaluate.block_scored@3')   # block 3 scored, not saved: redone
  metrics = evaluate.evaluate(config(), workdir)
  assert metrics['resumed_blocks'] == 2
  assert _similarities(workdir) == fresh_sims
  assert metrics['DSVR'] == fresh_metrics['DSVR'] and metrics['ISVD'] == fresh_metrics['ISVD']


def test_other_region_counts_and_groups_are_errors_naming_file_and_video(eval_setup, tmp_path):
  config, _, features, _, _ = eval_setup
  rng = np.random.default_rng(2)

  def with_v5(name, put):
    path = str(tmp_path / name)
    shutil.copy(features, path)
    with h5py.File(path, 'r+') as f:
      del f['v5']
      put(f)
    return path

  for name, bad in (('regions7.hdf5', helpers.unit_features(rng, (20, 7, DIMS))), ('flat.hdf5', helpers.unit_features(rng, (20, DIMS)))):
    path = with_v5(name, lambda f: f.create_dataset('v5', data=bad))
    with pytest.raises(features_lib.FeatureError) as e:
      evaluate.evaluate(config(features=path), str(tmp_path / 'out'))
    msg = str(e.value)
    assert path in msg and "'v5'" in msg and str(bad.shape) in msg and 'region' in msg, msg
    # Whichever video is read first, the mismatch is found (never broadcast, never silently tiled).
    for order in (['v5', 'v0'], ['v0', 'v5']):
      with pytest.raises(features_lib.FeatureError, match="'v5'.*'v0'|'v0'.*'v5'"):
        features_lib.FeatureFile(path, dims=DIMS).lengths(order)
  # A database id stored as a group is not silently dropped.
  path = with_v5('group.hdf5', lambda f: f.create_group('v5').create_dataset('vectors', data=helpers.unit_features(rng, (9, DIMS))))
  with pytest.raises(features_lib.FeatureError, match=r"group.hdf5: 'v5' is a group, not a feature dataset"):
    evaluate.evaluate(config(features=path), str(tmp_path / 'out'))


# ----------------------------------------------------------------------------------------------- extraction

@pytest.fixture(scope='module')
def extraction_setup(tmp_path_factory):
  """Three short generated videos, a tiny converted ResNet, and an uninterrupted extraction's output."""
  from tests import video_fixtures
  from backbones import registry, resnet
  from hapvr_jax import extract
  tmp = tmp_path_factory.mktemp('extraction')
  lines = []
  for i, seconds in enumerate((3, 2, 4)):
    path = video_fixtures.make_video(str(tmp / f'v{i}.mp4'), seconds=seconds, fps=4, size=(64, 48), audio_hz=None)
    lines.append(f'v{i}\t{path}\n')
  (tmp / 'list.txt').write_text(''.join(lines))
  cfg = resnet.Config.tiny()
  model = registry.save(str(tmp / 'resnet'), 'resnet50_irmac', resnet.init_params(cfg, 0), cfg)
  args = [f'--resnet={model}', f'--videos={tmp / "list.txt"}', '--batch_size=8', '--workers=1']
  reference = str(tmp / 'reference.h5')
  assert extract.main([*args, f'--output={reference}']) == 0
  return args, _read_all(reference)


def _read_all(path):
  with h5py.File(path, 'r') as f:
    return {k: f[k][()] for k in f}


def _assert_same(path, reference):
  got = _read_all(path)
  assert sorted(got) == sorted(reference)
  for k, x in reference.items():
    assert got[k].dtype == x.dtype and np.array_equal(got[k], x), k   # bit-identical
  assert not os.path.exists(path + '.partial') and not os.path.exists(path + '.done')


def _extract(args, capsys):
  """hapvr_jax.extract in this process: (exit code, last stderr line)."""
  from hapvr_jax import extract
  capsys.readouterr()
  try:
    code = extract.main(args)
  except SystemExit as e:
    code = e.code
  err = capsys.readouterr().err.strip().splitlines()
  return code, err[-1] if err else ''


def test_extraction_killed_after_a_commit_resumes_and_refuses_other_settings(extraction_setup, tmp_path, capsys):
  args, reference = extraction_setup
  out = str(tmp_path / 'feats.h5')
  r = _run('hapvr_jax.extract', [*args, f'--output={out}'], kill_at='extraction.video_committed@2')
  assert r.returncode == SIGKILL, r.stderr[-3000:]
  assert not os.path.exists(out) and open(out + '.done').read() == 'v0\nv1\n'
  # Resumed with other settings: refused by name, both values given, nothing touched.
  code, err = _extract([*args, f'--output={out}', '--fps=2', '--dtype=float16'], capsys)
  assert code == 2 and err.startswith('error: ') and 'feats.h5.partial' in err, err
  assert "dtype: was 'float32', this run has 'float16'" in err and "fps: was '1.0', this run has '2.0'" in err
  assert open(out + '.done').read() == 'v0\nv1\n'
  code, _ = _extract([*args, f'--output={out}'], capsys)
  assert code == 0
  _assert_same(out, reference)
  # A completed output is extended only with its own settings too.
  code, err = _extract([*args, f'--output={out}', '--fps=2'], capsys)
  assert code == 2 and "fps: was '1.0', this run has '2.0'" in err and 'feats.h5:' in err, err
  _assert_same(out, reference)


def test_extraction_killed_mid_write_redoes_that_video(extraction_setup, tmp_path, capsys):
  args, reference = extraction_setup
  out = str(tmp_path / 'feats.h5')
  r = _run('hapvr_jax.extract', [*args, f'--output={out}'], kill_at='extraction.video_written@3')
  assert r.returncode == SIGKILL, r.stderr[-3000:]
  with h5py.File(out + '.partial', 'r') as f:
    assert sorted(f) == ['v0', 'v1', 'v2']           # v2 written, never logged
  assert open(out + '.done').read() == 'v0\nv1\n'
  assert _extract([*args, f'--output={out}'], capsys)[0] == 0
  _assert_same(out, reference)


_TWO_FILES = '''
import sys
import numpy as np
from extraction import feature_writer
files = {'image': sys.argv[1] + '/img.h5', 'audio': sys.argv[1] + '/aud.h5'}
w = feature_writer.ResumableH5(files, {'fps': 1.0})
for i in range(4):
  if f'v{i}' not in w.done:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) * (i + 1)
    w.write(f'v{i}', {k: (lambda f, k=k, i=i: f.create_dataset(f'v{i}', data=x + len(k))) for k in files}, x.nbytes)
w.commit()
'''


def test_a_set_of_files_killed_between_its_files_is_repaired(tmp_path):
  """avhash_jax.extract's writer: the image file has the video, the audio file and the log do not."""
  def run(kill_at=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(faults.ENV, None)
    env.update({faults.ENV: kill_at} if kill_at else {})
    return subprocess.run([sys.executable, '-c', _TWO_FILES, str(tmp_path)], env=env, timeout=60)
  assert run('extraction.video_written@5').returncode == SIGKILL
  with h5py.File(tmp_path / 'img.h5.partial', 'r') as fi, h5py.File(tmp_path / 'aud.h5.partial', 'r') as fa:
    assert sorted(fi) == ['v0', 'v1', 'v2'] and sorted(fa) == ['v0', 'v1']
  assert run().returncode == 0
  for name in ('img', 'aud'):
    got = _read_all(str(tmp_path / f'{name}.h5'))
    assert sorted(got) == ['v0', 'v1', 'v2', 'v3']
    for i in range(4):
      want = np.arange(12, dtype=np.float32).reshape(3, 4) * (i + 1) + len('image' if name == 'img' else 'audio')
      assert np.array_equal(got[f'v{i}'], want)


def test_full_disk_stops_with_one_error_and_keeps_the_finished_videos(extraction_setup, tmp_path, capsys,
                                                                      monkeypatch):
  args, reference = extraction_setup
  out = str(tmp_path / 'feats.h5')
  real, calls = feature_writer.free_bytes, []

  def free_bytes(folder):   # room for two videos, then the disk is full
    calls.append(folder)
    return real(folder) if len(calls) <= 2 else feature_writer.MARGIN // 2
  monkeypatch.setattr(feature_writer, 'free_bytes', free_bytes)
  code, err = _extract([*args, f'--output={out}'], capsys)
  assert code == 2 and err.startswith(f'error: {out}.partial: no space left on device') and "'v2'" in err, err
  assert open(out + '.done').read() == 'v0\nv1\n' and not os.path.exists(out)
  monkeypatch.undo()
  assert _extract([*args, f'--output={out}'], capsys)[0] == 0
  _assert_same(out, reference)


def test_full_tmpfs_is_one_error_not_a_crash(extraction_setup, tmp_path, capsys):
  args, reference = extraction_setup
  mnt = tmp_path / 'small'
  mnt.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', str(mnt)], capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here (needs root)')
  try:
    filler = mnt / 'filler'
    with open(filler, 'wb') as f:   # leaves less than the margin free
      f.write(b'\0' * (feature_writer.free_bytes(str(mnt)) - feature_writer.MARGIN + 2**20))
    out = str(mnt / 'feats.h5')
    r = _run('hapvr_jax.extract', [*args, f'--output={out}'])
    assert r.returncode == 2, r.stderr[-3000:]
    assert _last_error(r.stderr).startswith(f'error: {out}.partial: no space left on device')
    assert os.path.exists(out + '.partial') and not os.path.exists(out)
    filler.unlink()
    assert _extract([*args, f'--output={out}'], capsys)[0] == 0
    _assert_same(out, reference)
  finally:
    subprocess.run(['umount', '-l', str(mnt)], check=False)


def _names_flag_and_bound(err, flag):
  """absl's wording: `error: flag --fps=0.0: must be a positive number`, `... -1 is not a non-negative integer`."""
  return (err.startswith(f'error: flag {flag.split("=")[0]}=') and
          any(bound in err for bound in ('must be a positive number', 'is not a positive integer',
                                         'is not a non-negative integer')))


@pytest.mark.parametrize('flag', ['--batch_size=0', '--fps=0', '--fps=nan', '--fps=inf', '--workers=0',
                                  '--num_shards=0', '--shard_index=-1', '--views=0', '--segments=-2', '--bank_size=-1'])
def test_hapvr_extract_flags_are_validated_before_any_work(tmp_path, capsys, flag):
  out = str(tmp_path / 'feats.h5')
  code, err = _extract(['--resnet=nowhere', '--videos=nowhere.txt', f'--output={out}', flag], capsys)
  assert code == 2 and _names_flag_and_bound(err, flag), err
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('flag', ['--batch_size=0', '--audio_batch_size=-4', '--audio_window=0', '--audio_window=nan',
                                  '--workers=-1'])
def test_avhash_extract_flags_are_validated_before_any_work(tmp_path, capsys, flag):
  from avhash_jax import extract
  with pytest.raises(SystemExit) as e:
    extract.main(['--clip=a', '--ast=b', f'--image_output={tmp_path}/i.h5', f'--audio_output={tmp_path}/a.h5',
                  '--videos=nowhere.txt', flag])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count('\n') == 1 and _names_flag_and_bound(err.strip(), flag), err
  assert os.listdir(tmp_path) == []


def test_shard_writers_refuse_zero_records_per_shard(tmp_path, capsys):
  from input_pipeline.avhash import make_shards as make_av_shards
  with pytest.raises(SystemExit) as e:
    make_av_shards.main(['--image_h5=a.h5', '--audio_h5=b.h5', f'--output={tmp_path}/s', '--records_per_shard=0'])
  assert e.value.code == 2 and 'error: flag --records_per_shard=0: 0 is not a positive integer' in (
      capsys.readouterr().err)
  r = _run('input_pipeline.hapvr.make_shards', ['--input=x', f'--output={tmp_path}/s', '--records_per_shard=0'])
  assert r.returncode == 2 and _last_error(r.stderr).startswith('error: flag --records_per_shard=0')
  assert os.listdir(tmp_path) == []


def test_linking_a_truncated_part_names_it(tmp_path, capsys):
  parts = [str(tmp_path / f'x-0000{k}-of-00002.h5') for k in range(2)]
  for k, part in enumerate(parts):
    with h5py.File(part, 'w') as f:
      f[f'v{k}'] = np.zeros((2, 3), np.float32)
  with open(parts[1], 'r+b') as f:
    f.truncate(os.path.getsize(parts[1]) // 2)
  out = str(tmp_path / 'all.h5')
  with pytest.raises(SystemExit) as e:
    feature_writer.main([f'--output={out}', *parts])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f'error: {parts[1]}: not a readable HDF5 file'), err
  assert not os.path.exists(out)
