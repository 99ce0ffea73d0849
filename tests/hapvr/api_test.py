"""hapvr_jax.api: the similarity of two videos is the search's score, with its frame-to-frame map and
comparator output; api.Index edits and searches the index format of the programs; the README's example runs
as written on the real clips."""
import json
import os
import re

import h5py
import numpy as np
import pytest

from common_jax.index_dir import IndexDirError
from hapvr_jax import api, index, search
from hapvr_jax.features import tiled_length
from tests.conftest import ROOT
from tests.hapvr.search_fixtures import make_checkpoint


def _features(path):
  with h5py.File(path, 'r') as f:
    return {k: f[k][()] for k in f}


def test_similarity_and_index_match_the_programs(corpus, checkpoint32, tmp_path):
  feats = _features(corpus['features'])
  cli_index = str(tmp_path / 'cli')
  assert index.main([f'--index={cli_index}', f'--features={corpus["features"]}', '--noprogress']) == 0
  assert search.main([f'--index={cli_index}', f'--checkpoint={checkpoint32}', '--query_id=v00',
                      '--shortlist=all', '--top_k=100', f'--output={tmp_path}', '--noprogress']) == 0
  with open(tmp_path / 'results.jsonl') as f:
    want = [json.loads(line) for line in f]

  model = api.load(checkpoint32)
  sim = model.similarity(feats['v00'], feats['v01'])
  np.testing.assert_allclose(sim.score, next(r['score'] for r in want if r['id'] == 'v01'), atol=1e-5)
  ta, tb = (tiled_length(len(feats[v]), model.config.min_len) for v in ('v00', 'v01'))
  assert sim.f2f.shape == (ta, tb) and sim.comparator.shape == (ta // 4, tb // 4)
  assert np.all(np.abs(sim.comparator) <= 1)

  ix = api.Index(str(tmp_path / 'api'), model)
  assert ix.add(feats) == sorted(feats) and len(ix) == 10
  assert ix.add(feats) == []    # nothing new
  hits = ix.search('v00', top_k=100)
  assert (tmp_path / 'api' / 'attention.npz').exists()   # the index's attention, cached as the command caches it
  assert [(h['id'], h['rank']) for h in hits] == [(r['id'], r['rank']) for r in want]
  np.testing.assert_allclose([h['score'] for h in hits], [r['score'] for r in want], atol=1e-6)
  by_features = ix.search(feats['v00'], top_k=3, shortlist=2)
  assert [h['id'] for h in by_features] == [r['id'] for r in want if r['id'] in ('v00', 'v01')][:2]
  ix.remove(['v01'])
  assert 'v01' not in ix.ids() and len(api.Index(str(tmp_path / 'api'), model)) == 9
  with pytest.raises(IndexDirError, match='not in the index'):
    ix.remove(['v01'])
  with pytest.raises(IndexDirError, match='64-dim features but the index'):
    api.Index(str(tmp_path / 'api'), api.load(make_checkpoint(tmp_path / 'ckpt64', dims=64)))


def _readme_example():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  section = text[text.index('## HAP-VR from Python'):]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_the_readme_example_runs_as_written(clips_index, tmp_path, monkeypatch, capsys):
  work = tmp_path / 'work'
  (work / 'ckpt').mkdir(parents=True)
  os.symlink(clips_index['checkpoint'], work / 'ckpt' / 'hapvr')
  os.symlink(clips_index['resnet'], work / 'ckpt' / 'resnet50_irmac')
  (tmp_path / 'shared' / 'data').mkdir(parents=True)
  os.symlink(clips_index['folder'], tmp_path / 'shared' / 'data' / 'videos')
  code = _readme_example()
  assert len(code.strip().splitlines()) <= 10
  monkeypatch.chdir(work)
  exec(compile(code, 'README.md', 'exec'), {'__name__': '__readme__'})   # noqa: S102
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith('score ') and 'f2f map (' in lines[0]
  assert lines[1].split()[:2] == ['1', 'bikes']   # the query is in the index
  assert lines[-1] == f'{len(clips_index["copies"]) - 1} videos left'
