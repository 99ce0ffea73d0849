"""Bad config values, unknown config keys and unusable workdirs in the four config-driven programs
(hapvr_jax.main, hapvr_jax.evaluate, avhash_jax.main, avhash_jax.evaluate): one `error:` line naming the
field or path, exit code 2, and nothing written; a full disk during training keeps the finished checkpoints.

Most cases call each program's `run(config, workdir)` in this process; a few start the real commands."""
import contextlib
import errno
import json
import math
import os
import subprocess
import sys
import tempfile

import pytest
from absl import flags, logging
from ml_collections import config_flags

from avhash_jax import evaluate as avhash_evaluate
from avhash_jax import main as avhash_main
from avhash_jax import validate as avhash_validate
from common_jax import cli
from configs import activitynet, evve, fcvid, fivr_200k, fivr_5k, svd, vcdb
from hapvr_jax import evaluate as hapvr_evaluate
from hapvr_jax import main as hapvr_main
from hapvr_jax import validate as hapvr_validate

from tests.conftest import ROOT  # noqa: E402
def _avhash_eval_config():
  c = fcvid.get_config()
  c.update(image_h5='image.h5', audio_h5='audio.h5', test_list='test.txt', retrieval_list='train.txt')
  return c


# name -> (run(config, workdir), a valid config, where its work function is (replaced by one test))
PROGRAMS = {
    'hapvr_jax.main': (hapvr_main.run, lambda: vcdb.get_config('demo'),
                       'hapvr_jax.train.train_and_evaluate'),
    'hapvr_jax.evaluate': (hapvr_evaluate.run, lambda: fivr_5k.get_config('demo'),
                           'hapvr_jax.evaluate.evaluate'),
    'avhash_jax.main': (avhash_main.run, lambda: fcvid.get_config('demo'),
                        'avhash_jax.train.train_and_evaluate'),
    'avhash_jax.evaluate': (avhash_evaluate.run, _avhash_eval_config, 'avhash_jax.evaluate.evaluate'),
}


@pytest.fixture(autouse=True)
def _keep_verbosity():
  level = logging.get_verbosity()   # the training entry points lower it to WARNING
  yield
  logging.set_verbosity(level)


def _set(config, key, value):
  *parents, last = key.split('.')
  for p in parents:
    config = config[p]
  config[last] = value


def _run(capsys, program, config, workdir):
  """(exit code, stderr lines) of `program` run in this process."""
  with pytest.raises(SystemExit) as e:
    PROGRAMS[program][0](config, str(workdir))
  return e.value.code, capsys.readouterr().err.splitlines()


# ------------------------------------------------------------------------------------------- bad values
REPRODUCTIONS = [
    ('hapvr_jax.main', 'log_every', 0, 'must be a positive integer'),
    ('hapvr_jax.main', 'checkpoint_every', 0, 'must be a positive integer'),
    ('hapvr_jax.main', 'keep_checkpoints', 0, 'must be a positive integer'),
    ('hapvr_jax.main', 'total_steps', -1, 'must be a positive integer'),
    ('hapvr_jax.main', 'eval_every', -1, 'must be a non-negative integer (0: never evaluate)'),
    ('hapvr_jax.main', 'data.window', 0, 'must be an integer >= 4 (shorter clips have no comparator output)'),
    ('hapvr_jax.main', 'eval.engine.query_block', 0, 'must be a positive integer'),
    ('hapvr_jax.evaluate', 'engine.max_block_targets', 0, 'must be a positive integer'),
    ('hapvr_jax.evaluate', 'engine.query_block', 0, 'must be a positive integer'),
    ('hapvr_jax.evaluate', 'min_len', 2, "must be an integer >= 4 (or -1 for the checkpoint's)"),
    ('avhash_jax.main', 'batch_size', 0, 'must be a positive integer'),
    ('avhash_jax.main', 'log_every', 0, 'must be a positive integer'),
    ('avhash_jax.main', 'eval_every_epochs', 0, 'must be a positive integer'),
    ('avhash_jax.main', 'metric_chunk', 0, 'must be a positive integer'),
    ('avhash_jax.main', 'ks', (0,), 'must be a non-empty sequence of positive integers'),
    ('avhash_jax.main', 'checkpoint_every', -1, 'must be a non-negative integer (0: at epoch ends only)'),
    ('avhash_jax.evaluate', 'ks', (5, 0), 'must be a non-empty sequence of positive integers'),
    ('avhash_jax.evaluate', 'metric_chunk', 0, 'must be a positive integer'),
    ('avhash_jax.evaluate', 'eval_batch_size', -3, 'must be a positive integer'),
]


@pytest.mark.parametrize('program, key, value, what', REPRODUCTIONS)
def test_bad_value_is_one_line_and_writes_nothing(capsys, tmp_path, program, key, value, what):
  config = PROGRAMS[program][1]()
  _set(config, key, value)
  code, err = _run(capsys, program, config, tmp_path / 'run')
  assert code == 2 and err == [f'error: config.{key}={value!r}: {what}'], err
  assert not os.path.exists(tmp_path / 'run')


def _numeric_leaves(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from _numeric_leaves(value, f'{prefix}{key}.')
    elif isinstance(value, (int, float, tuple)) and not isinstance(value, bool):
      yield prefix + key, value


def _bad_values(value):
  """Values no size, period, count or rate accepts (-1 is "the checkpoint's"/"all devices" in places)."""
  if isinstance(value, tuple):   # ks, viv_lambda, mesh ((name, size), ...)
    first = value[0]
    if isinstance(first, tuple):
      return [((first[0], -2),) + value[1:]]
    return [(bad,) + value[1:] for bad in _bad_values(first)] + [()]
  if isinstance(value, float):
    return [-2.0, math.nan, math.inf]
  return [-2]


CONFIGS = [(vcdb, '', hapvr_validate.training), (vcdb, 'demo', hapvr_validate.training),
           (fivr_5k, '', hapvr_validate.evaluation), (fivr_5k, 'demo', hapvr_validate.evaluation),
           (fivr_200k, '', hapvr_validate.evaluation), (evve, '', hapvr_validate.evaluation),
           (svd, '', hapvr_validate.evaluation), (fcvid, '', avhash_validate.training),
           (fcvid, 'demo', avhash_validate.training), (activitynet, 'bits=16', avhash_validate.training)]


@pytest.mark.parametrize('module, variant, validate', CONFIGS,
                         ids=[f'{m.__name__.split(".")[-1]}:{v}' for m, v, _ in CONFIGS])
def test_every_numeric_field_is_checked(module, variant, validate):
  """Each shipped config passes its check, and a bad value in any of its numeric fields is named: a new field
  without a check fails here."""
  validate(module.get_config(variant or None))
  for key, value in _numeric_leaves(module.get_config(variant or None)):
    for bad in _bad_values(value):
      config = module.get_config(variant or None)
      _set(config, key, bad)
      with pytest.raises(cli.UsageError, match=f'^config\\.{key.replace(".", "[.]")}[.=]'):
        validate(config)


# ------------------------------------------------------------------------------------ unknown config keys
@pytest.mark.parametrize('config_file, override, expected', [
    ('vcdb.py', '--config.batch=3', "error: unknown config key 'batch' in --config.batch=3"),
    ('fcvid.py:demo', '--config.bach_size=3',
     "error: unknown config key 'bach_size' in --config.bach_size=3; did you mean 'batch_size' or "
     "'eval_batch_size'?"),
    ('vcdb.py', '--config.data.windw=3',
     "error: unknown config key 'data.windw' in --config.data.windw=3; did you mean 'window'?"),
    ('fcvid.py', '--config.lr.x=1', "error: unknown config key 'lr.x' in --config.lr.x=1"),
    ('vcdb.py', '--config.log_every=abc',   # a bad type keeps absl's message, which names the flag
     "error: flag --config.log_every=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_config_override_errors_name_the_key(capsys, config_file, override, expected):
  argv = ['prog', f'--config={os.path.join(ROOT, "configs", config_file)}', override]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', lock_config=True, flag_values=flag_values,
                                  sys_argv=argv)
  with pytest.raises(SystemExit) as e:
    cli.parse_config_flags(argv, flag_values)
  assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [expected]


# ---------------------------------------------------------------------------------------------- workdirs
@pytest.mark.parametrize('program', PROGRAMS)
def test_workdir_that_is_a_file(capsys, tmp_path, program):
  path = tmp_path / 'taken'
  path.write_text('mine')
  code, err = _run(capsys, program, PROGRAMS[program][1](), path)
  assert code == 2 and err == [f'error: {path}: exists and is not a directory'], err
  code, err = _run(capsys, program, PROGRAMS[program][1](), path / 'run')
  assert code == 2 and err == [f'error: {path}/run: cannot be created: {path} is a file'], err
  assert path.read_text() == 'mine'


@contextlib.contextmanager
def _tmpfs(options):
  """A fresh tmpfs mounted with `options` (root with CAP_SYS_ADMIN); skips the test where that is refused."""
  where = tempfile.mkdtemp(prefix='bad_config_tmpfs_')
  r = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', where], capture_output=True, text=True)
  if r.returncode:
    os.rmdir(where)
    pytest.skip(f'cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}')
  try:
    yield where
  finally:
    subprocess.run(['umount', '-l', where], check=False)
    os.rmdir(where)


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory this process cannot write: a read-only tmpfs, or (not root) a chmod 0555 folder. Root
  writes through file modes, so as root without a mount there is no way to make one: skip."""
  if os.geteuid() == 0:
    with _tmpfs('ro,size=64k') as where:
      yield where, 'read-only file system'
    return
  d = tmp_path / 'ro'
  d.mkdir(mode=0o555)
  yield str(d), 'permission denied'
  d.chmod(0o755)


@pytest.mark.parametrize('program', PROGRAMS)
def test_read_only_workdir(capsys, read_only_dir, program):
  where, why = read_only_dir
  code, err = _run(capsys, program, PROGRAMS[program][1](), where)
  assert code == 2 and err == [f'error: {where}: cannot be written ({why})'], err
  code, err = _run(capsys, program, PROGRAMS[program][1](), os.path.join(where, 'run'))
  assert code == 2 and err == [
      f'error: {where}/run: cannot be created: {where} cannot be written ({why})'], err
  assert os.listdir(where) == []


# ------------------------------------------------------------------------------------- file-system errors
@pytest.mark.parametrize('program', PROGRAMS)
def test_no_space_left_is_one_line_and_keeps_finished_work(capsys, tmp_path, monkeypatch, program):
  """An OSError(ENOSPC) in the middle of the work (injected in place of the work itself)."""
  workdir = tmp_path / 'run'
  full = str(workdir / 'ckpt' / '4' / 'state')

  def work(config, workdir, *args, **kwargs):
    os.makedirs(os.path.join(workdir, 'ckpt', '2'))   # finished before the disk filled up
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), full)

  monkeypatch.setattr(PROGRAMS[program][2], work)
  code, err = _run(capsys, program, PROGRAMS[program][1](), workdir)
  assert code == 2 and err == [f'error: {full}: No space left on device; free some space and rerun the same '
                               'command'], err
  assert os.path.isdir(workdir / 'ckpt' / '2')


def test_file_system_errors_wrapped_by_libraries():
  enospc = OSError(errno.ENOSPC, 'No space left on device', '/w/ckpt/4')
  wrapped = RuntimeError('checkpoint save failed')
  wrapped.__cause__ = enospc
  tensorstore = ValueError(   # as Orbax raises it for a full disk
      'RESOURCE_EXHAUSTED: Error writing local file "/w/ckpt/4.tmp/_sharding": Failed to write 4966 bytes to '
      "file 14: No space left on device [os_error_code='28']")
  full = 'No space left on device; free some space and rerun the same command'
  assert cli.file_system_error(enospc) == f'/w/ckpt/4: {full}'
  assert cli.file_system_error(wrapped) == f'/w/ckpt/4: {full}'
  assert cli.file_system_error(tensorstore) == f'/w/ckpt/4.tmp/_sharding: {full}'
  read_only = OSError(errno.EROFS, 'Read-only file system')   # no path: the workdir stands in
  assert cli.file_system_error(read_only, '/w') == '/w: Read-only file system'
  assert cli.file_system_error(ValueError('config.x=0: must be a positive integer')) is None
  assert cli.file_system_error(OSError(errno.EIO, 'Input/output error', '/w')) is None
  assert cli.file_system_error(RuntimeError('a bug')) is None


def _env():
  return dict(os.environ, PYTHONPATH=ROOT)   # the test's XLA_FLAGS, JAX_PLATFORMS and compilation cache


def _main(*args, **kwargs):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=300, **kwargs)


def test_real_commands(tmp_path):
  """The four commands, each with one of the errors above: the real programs' flag parsing and wiring."""
  taken = tmp_path / 'taken'
  taken.write_text('')
  cases = [
      (['hapvr_jax.main', '--config=configs/vcdb.py:demo', '--config.batch=3'],
       "error: unknown config key 'batch' in --config.batch=3"),
      (['hapvr_jax.evaluate', '--config=configs/fivr_5k.py:demo', '--config.engine.query_block=0'],
       'error: config.engine.query_block=0: must be a positive integer'),
      (['avhash_jax.main', '--config=configs/fcvid.py:demo', '--config.ks=(0,)'],
       'error: config.ks=(0,): must be a non-empty sequence of positive integers'),
      (['avhash_jax.evaluate', '--config=configs/fcvid.py', f'--workdir={taken}'],
       f'error: {taken}: exists and is not a directory'),
  ]
  for args, expected in cases:
    workdir = [] if any(a.startswith('--workdir') for a in args) else [f'--workdir={tmp_path / "run"}']
    r = _main(*args, *workdir)
    assert r.returncode == 2 and r.stderr.splitlines() == [expected], (args, r.stderr)
  assert not os.path.exists(tmp_path / 'run')


def _tiny_training(shards, steps):
  """The tiny training config of tests/hapvr/train_test.py."""
  c = vcdb.get_config('demo')
  c.demo.enabled = False
  c.model.dims = 24
  c.data.update(path=shards, window=8, sources_per_group=4, groups=2)
  c.update(total_steps=steps, log_every=1, checkpoint_every=2, eval_every=0, compilation_cache='')
  c.eval.features = ''
  return c


def test_disk_full_during_training(tmp_path):
  """A real full tmpfs under `python -m hapvr_jax.main`: the run that cannot write its checkpoint ends with
  one line and exit 2, the earlier checkpoint is kept, and once there is space training resumes from it."""
  from hapvr_jax import demo_data, train
  shards = demo_data.write_training_shards(demo_data.World(seed=1, dims=24), str(tmp_path / 'shards'),
                                           videos=24, window=8)
  with _tmpfs('size=16m') as where:
    workdir = os.path.join(where, 'run')
    assert train.train_and_evaluate(_tiny_training(shards, 2), workdir)['step'] == 2
    kept = os.path.join(workdir, 'ckpt', '2')
    before = {f: os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(kept) for f in fs}
    stat = os.statvfs(where)
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    subprocess.run(['mount', '-o', f'remount,size={used + 64 * 1024}', where], check=True)
    overrides = dict(demo__enabled=False, model__dims=24, data__path=shards, data__window=8,
                     data__sources_per_group=4, total_steps=4, log_every=1, checkpoint_every=2, eval_every=0,
                     eval__features='', compilation_cache='')
    r = _main('hapvr_jax.main', '--config=configs/vcdb.py:demo', f'--workdir={workdir}',
              *(f'--config.{k.replace("__", ".")}={v}' for k, v in overrides.items()))
    errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert r.returncode == 2 and len(errors) == 1 and r.stderr.splitlines()[-1] == errors[0], r.stderr
    assert errors[0].startswith(f'error: {workdir}') and errors[0].endswith(
        'No space left on device; free some space and rerun the same command'), r.stderr
    assert 'Traceback' not in r.stderr, r.stderr
    assert {f: os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(kept) for f in fs} == before
    subprocess.run(['mount', '-o', 'remount,size=16m', where], check=True)
    assert train.train_and_evaluate(_tiny_training(shards, 4), workdir)['step'] == 4
    with open(os.path.join(workdir, 'train.jsonl')) as f:
      steps = [json.loads(line)['step'] for line in f]
    assert steps.count(1) == 1 and steps[-1] == 4, steps   # resumed from step 2, not from scratch
