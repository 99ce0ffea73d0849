"""python -m hapvr_jax.index: any way of reaching the same collection (one build, batches added later,
removals and re-adds, a build killed and resumed, several hosts merged) leaves the same index; bad input is
one error line and leaves the index untouched."""
import json
import os
import subprocess
import sys

import pytest

from common_jax.index_dir import IndexDir
from hapvr_jax import index
from tests.conftest import ROOT
from tests.hapvr.search_fixtures import run_error, snapshot, tree_digest

ALL = [f'v{k:02d}' for k in range(10)]


def _index(*argv):
  assert index.main(list(argv) + ['--noprogress']) == 0


def _cli(*argv, kill_at=None):
  env = dict(os.environ)
  env.pop('JAX_VR_KILL_AT', None)
  if kill_at:
    env['JAX_VR_KILL_AT'] = kill_at
  return subprocess.run([sys.executable, '-m', 'hapvr_jax.index', *argv, '--noprogress'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.fixture(scope='module')
def one_go(corpus, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('one_go') / 'ix')
  _index(f'--index={path}', f'--features={corpus["features"]}')
  return snapshot(path)


def test_one_build_holds_every_video_with_metadata(corpus, one_go):
  assert sorted(k for k in one_go if k != '<faiss>') == ALL
  meta = one_go['v03'][0]
  assert meta['path'] == f'{os.path.abspath(corpus["features"])}:v03' and meta['fps'] == 1.0
  assert meta['frames'] == meta['duration'] > 0


def test_batches_removals_and_re_adds_equal_one_build(corpus, one_go, tmp_path):
  path = str(tmp_path / 'ix')
  _index(f'--index={path}', f'--features={corpus["features"]}', '--batch=3')
  _index(f'--index={path}', '--remove=v02,v07,v09')
  ix = IndexDir.open(path)
  assert ix.ids() == [v for v in ALL if v not in ('v02', 'v07', 'v09')]
  assert snapshot(path)['<faiss>'] != one_go['<faiss>']
  _index(f'--index={path}', f'--features={corpus["features"]}', '--batch=2')   # adds the missing ones back
  assert snapshot(path) == one_go


@pytest.mark.parametrize('point', ['index_dir.segment_written@2', 'index_dir.committed@2'])
def test_a_killed_build_resumes_to_the_same_index(corpus, one_go, tmp_path, point):
  path = str(tmp_path / 'ix')
  args = [f'--index={path}', f'--features={corpus["features"]}', '--batch=3']
  killed = _cli(*args, kill_at=point)
  assert killed.returncode == -9, killed.stderr
  assert len(IndexDir.open(path)) == (3 if point.startswith('index_dir.segment') else 6)
  done = _cli(*args)
  assert done.returncode == 0, done.stderr
  assert snapshot(path) == one_go
  log = [json.loads(line) for line in open(os.path.join(path, 'log.jsonl'))]
  assert sorted(os.listdir(os.path.join(path, 'segments'))) == sorted(e['segment'] for e in log)   # no orphan


def test_a_torn_log_line_is_ignored_and_cut_off(corpus, one_go, tmp_path):
  path = str(tmp_path / 'ix')
  _index(f'--index={path}', f'--features={corpus["features"]}', '--batch=4')
  with open(os.path.join(path, 'log.jsonl'), 'ab') as f:
    f.write(b'{"op": "remove", "ids": ["v0')   # a kill in the middle of a commit
  assert len(IndexDir.open(path)) == 10
  _index(f'--index={path}', '--remove=v01')
  _index(f'--index={path}', f'--features={corpus["features"]}')
  assert snapshot(path) == one_go


def test_several_hosts_then_merge_equal_one_host(corpus, one_go, tmp_path):
  base = str(tmp_path / 'ix')
  for k in range(3):
    _index(f'--index={base}', f'--features={corpus["features"]}', '--num_shards=3', f'--shard_index={k}')
  parts = [f'{base}-{k:05d}-of-00003' for k in range(3)]
  assert sum(len(IndexDir.open(p)) for p in parts) == 10
  _index(f'--index={base}', f'--merge={",".join(parts)}')
  assert snapshot(base) == one_go


def test_bad_input_is_one_error_and_leaves_the_index_untouched(corpus, tmp_path, capsys):
  path = str(tmp_path / 'ix')
  _index(f'--index={path}', f'--features={corpus["features"]}')
  before = tree_digest(path)
  cases = [
      ([f'--features={corpus["features_64"]}'], '32-dim|dims: index has 32, given 64'),
      (['--remove=v01,nope'], "'nope' is not in the index"),
      ([f'--merge={tmp_path}/missing'], 'missing: index not found'),
      (['--video_dir=' + str(tmp_path)], '--resnet'),
  ]
  for extra, culprit in cases:
    code, err = run_error(index.main, [f'--index={path}', *extra, '--noprogress'], capsys)
    assert code == 2 and err.startswith('error: ') and len(err.splitlines()) == 1, err
    assert any(c in err for c in culprit.split('|')), err
    assert tree_digest(path) == before
  with open(os.path.join(path, 'manifest.json'), 'w') as f:
    f.write('{"format": "jax-vr-ind')
  code, err = run_error(index.main, [f'--index={path}', f'--features={corpus["features"]}'], capsys)
  assert code == 2 and 'manifest.json: corrupt' in err and len(err.splitlines()) == 1


def test_documented_commands_parse_and_help_shows_an_example(capsys):
  import importlib
  import re
  import shlex

  from common_jax import cli
  programs = ('hapvr_jax.index', 'hapvr_jax.search')
  texts = [open(os.path.join(ROOT, f)).read() for f in ('README.md', 'docs/hapvr_search.md')]
  texts += [importlib.import_module(p).__doc__ for p in programs]
  seen = set()
  for text in texts:
    for m in re.finditer(r'python -m (hapvr_jax\.(?:index|search))([^`\n]*)', text.replace('\\\n', ' ')):
      argv = shlex.split(m.group(2), comments=True)
      if argv and argv[0].startswith('--'):
        cli.parse_flags(importlib.import_module(m.group(1)).define_flags, argv)   # exits 2 on a bad command
        seen.add(m.group(1))
  assert seen == set(programs)
  for name in programs:
    with pytest.raises(SystemExit) as e:
      importlib.import_module(name).main(['--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0 and f'\n  python -m {name} --' in out and '\nrequired: --' in out


def test_a_kill_between_the_faiss_file_and_its_record_rebuilds_it(corpus, one_go, tmp_path):
  path = str(tmp_path / 'ix')
  _index(f'--index={path}', f'--features={corpus["features"]}')
  killed = _cli(f'--index={path}', '--remove=v04', kill_at='hapvr_index.coarse_saved')
  assert killed.returncode == -9
  ix = IndexDir.open(path)
  assert len(ix) == 9 and len(index.refresh_coarse(ix)) == 9   # the record said 10: rebuilt, not trusted
  _index(f'--index={path}', f'--features={corpus["features"]}')
  assert snapshot(path) == one_go


def test_the_ivfpq_option_finds_near_duplicates_and_small_collections_are_told_to_use_flat():
  import numpy as np
  from common_jax.float_index import FloatIndex, FloatIndexError
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1200, 32)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  ivf = FloatIndex.build(x, 'ivfpq')
  assert ivf.kind == 'ivfpq' and len(ivf) == 1200
  noisy = x[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
  _, rows = ivf.search(noisy, 5)
  assert np.mean([k in r for k, r in enumerate(rows)]) >= 0.9
  with pytest.raises(FloatIndexError, match='use the flat index'):
    FloatIndex.build(x[:100], 'ivfpq')
