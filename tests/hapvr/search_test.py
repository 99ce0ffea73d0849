"""python -m hapvr_jax.search: `--shortlist=all` gives hapvr_jax.evaluate's similarities; a shortlist
re-ranks the coarse stage's best with the same scores; every bad input of a search is one error line, exit 2,
the index untouched."""
import csv
import json
import os
import pickle

import numpy as np
import pytest

from hapvr_jax import evaluate, index, search, synthetic
from configs import common as config_common
from tests import video_fixtures
from tests.hapvr.search_fixtures import make_checkpoint, make_resnet, run_error, tree_digest


def _search(out, *argv):
  assert search.main(list(argv) + [f'--output={out}', '--noprogress']) == 0
  with open(os.path.join(out, 'results.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  with open(os.path.join(out, 'results.csv')) as f:
    assert [(r['query'], int(r['rank']), r['id']) for r in csv.DictReader(f)] == \
        [(r['query'], r['rank'], r['id']) for r in rows]
  return rows


@pytest.fixture(scope='module')
def fivr(tmp_path_factory):
  """A synthetic FIVR-format corpus scored by hapvr_jax.evaluate, and an index of its feature file."""
  tmp = tmp_path_factory.mktemp('fivr')
  data = synthetic.make_fivr_corpus(str(tmp / 'data'), num_queries=1, num_database=10, dims=32, seed=1)
  ckpt = make_checkpoint(tmp / 'ckpt', dims=32, seed=3)
  c = config_common.hapvr_eval_config('fivr_5k')
  c.features, c.annotations, c.checkpoint = data['features'], data['annotations'], ckpt
  c.store_similarities, c.plots, c.progress, c.resume, c.compilation_cache = True, False, False, False, ''
  assert evaluate.run(c, str(tmp / 'eval')) == 0
  with open(tmp / 'eval' / 'similarities.pk', 'rb') as f:
    sims = pickle.load(f)
  ix = str(tmp / 'ix')
  assert index.main([f'--index={ix}', f'--features={data["features"]}', '--feature_dtype=float32',
                     '--noprogress']) == 0
  queries = tmp / 'queries.txt'
  queries.write_text('\n'.join(data['queries']) + '\n')
  return {'sims': sims, 'index': ix, 'ckpt': ckpt, 'queries': str(queries), 'data': data, 'tmp': tmp}


@pytest.fixture(scope='module')
def exhaustive(fivr, tmp_path_factory):
  return _search(tmp_path_factory.mktemp('all'), f'--index={fivr["index"]}', f'--checkpoint={fivr["ckpt"]}',
                 f'--queries={fivr["queries"]}', '--shortlist=all', '--top_k=1000')


def test_shortlist_all_equals_evaluate(fivr, exhaustive):
  data = fivr['data']
  assert len(exhaustive) == len(data['queries']) * (len(data['queries']) + len(data['database']))
  for r in exhaustive:
    if r['id'] in fivr['sims'][r['query']]:
      np.testing.assert_allclose(r['score'], fivr['sims'][r['query']][r['id']], atol=1e-6)
  for q in data['queries']:
    scores = [r['score'] for r in exhaustive if r['query'] == q]
    assert scores == sorted(scores, reverse=True)


def test_a_shortlist_re_ranks_the_coarse_best_with_the_same_scores(fivr, exhaustive, tmp_path):
  q = fivr['data']['queries'][0]
  full = [r for r in exhaustive if r['query'] == q]
  short = _search(tmp_path / 'short', f'--index={fivr["index"]}', f'--checkpoint={fivr["ckpt"]}',
                  f'--query_id={q}', '--shortlist=40%', '--top_k=3')
  assert [r['rank'] for r in short] == [1, 2, 3]
  best_coarse = sorted(full, key=lambda r: -r['coarse_score'])[:5]   # 40% of 11 videos: 5 candidates
  assert {r['id'] for r in short} <= {r['id'] for r in best_coarse}
  exact = {r['id']: r['score'] for r in full}
  for r in short:
    np.testing.assert_allclose(r['score'], exact[r['id']], atol=1e-6)
  floor = sorted(r['score'] for r in full)[-2]
  kept = _search(tmp_path / 'min', f'--index={fivr["index"]}', f'--checkpoint={fivr["ckpt"]}',
                 f'--query_id={q}', f'--min_score={floor}', '--shortlist=all')
  assert [r['id'] for r in kept] == [r['id'] for r in full][:2]


def test_bad_input_is_one_error_and_leaves_the_index_untouched(fivr, corpus, tmp_path, capsys):
  ix = fivr['index']
  bad_video = video_fixtures.make_corrupt(str(tmp_path / 'broken.mp4'))
  empty = str(tmp_path / 'empty')
  assert index.main([f'--index={empty}', f'--features={corpus["features"]}', '--noprogress']) == 0
  assert index.main([f'--index={empty}', '--remove=' + ','.join(f'v{k:02d}' for k in range(10))]) == 0
  wrong_dims = make_checkpoint(tmp_path / 'ckpt64', dims=64)
  q = f'--query_id={fivr["data"]["queries"][0]}'
  cases = [
      ([f'--index={ix}', f'--checkpoint={fivr["ckpt"]}', f'--query={bad_video}', '--resnet=unused'],
       'broken.mp4'),
      ([f'--index={empty}', f'--checkpoint={fivr["ckpt"]}', '--query_id=v00'], 'the index is empty'),
      ([f'--index={ix}', f'--checkpoint={fivr["ckpt"]}', '--query_id=nope'], "'nope' is not in the index"),
      ([f'--index={ix}', f'--checkpoint={wrong_dims}', q], '64-dim features but the index'),
      ([f'--index={ix}', f'--checkpoint={fivr["ckpt"]}', q, '--shortlist=0'], '--shortlist=0'),
      ([f'--index={tmp_path}/nothing', f'--checkpoint={fivr["ckpt"]}', q], 'nothing: index not found'),
  ]
  before = tree_digest(ix)
  for argv, culprit in cases:
    code, err = run_error(search.main, argv + [f'--output={tmp_path}/out', '--noprogress'], capsys)
    assert code == 2 and err.startswith('error: ') and len(err.splitlines()) == 1, err
    assert culprit in err, err
    assert tree_digest(ix) == before
    assert not os.path.exists(tmp_path / 'out' / 'results.jsonl')
  for name, damage in (('coarse.faiss', b'not a faiss index'), ('manifest.json', b'{"format": ')):
    copy = str(tmp_path / f'damaged_{name}')
    os.system(f'cp -r {ix} {copy}')
    with open(os.path.join(copy, name), 'wb') as f:
      f.write(damage)
    code, err = run_error(search.main, [f'--index={copy}', f'--checkpoint={fivr["ckpt"]}', q,
                                        f'--output={tmp_path}/out', '--noprogress'], capsys)
    assert code == 2 and f'{name}: corrupt' in err and len(err.splitlines()) == 1, err


def test_real_clips_an_edited_copy_finds_its_source_first(clips_index, tmp_path, capsys):
  queries = tmp_path / 'queries.txt'
  queries.write_text(''.join(f'{p}\n' for p in clips_index['copies'].values()))
  rows = _search(tmp_path, f'--index={clips_index["index"]}', f'--checkpoint={clips_index["checkpoint"]}',
                 f'--resnet={clips_index["resnet"]}', f'--queries={queries}', '--shortlist=2')
  out = capsys.readouterr().out
  assert 'rank' in out and 'coarse' in out and 'fine' in out   # the table and the stage timings
  for source, copy in clips_index['copies'].items():
    mine = [r for r in rows if r['query'] == os.path.splitext(os.path.basename(copy))[0]]
    assert mine[0]['id'] == source and mine[0]['path'] == os.path.join(clips_index['folder'], source + '.mp4')
    assert mine[0]['score'] > mine[1]['score'] and len(mine) == 2
  other, _ = make_resnet(tmp_path / 'other_resnet', pca_dims=16)   # not the backbone that built the index
  copy = next(iter(clips_index['copies'].values()))
  code, err = run_error(search.main, [f'--index={clips_index["index"]}', f'--checkpoint={clips_index["checkpoint"]}',
                                      f'--resnet={other}', f'--query={copy}', f'--output={tmp_path}/bad'], capsys)
  assert code == 2 and 'other_resnet: this backbone makes 16-dim features' in err and len(err.splitlines()) == 1


def test_queries_share_a_scoring_run_while_their_shortlists_overlap():
  from hapvr_jax.search import _batches
  lists = [[(v, 0.0) for v in vids] for vids in ('ab', 'ab', 'cd', 'ce')]
  assert _batches(lists, 2, 16) == [(0, 3), (3, 4)]   # a b c d: 4 videos <= 2 x 2; adding e makes 5
  assert _batches(lists, 2, 2) == [(0, 2), (2, 4)]    # at most 2 queries a run
  assert _batches(lists, 5, 16) == [(0, 4)]            # shortlists of all 5 videos: one run
  assert _batches([], 2, 16) == []


def test_cached_attention_scores_as_the_uncached_engine_and_a_read_only_index_searches(fivr, exhaustive,
                                                                                       tmp_path, monkeypatch):
  import types

  import jax
  from common_jax import checkpoint, mesh as mesh_lib
  from common_jax.index_dir import IndexDir
  from hapvr_jax import engine as engine_lib, index_attention, model as model_lib
  ix = IndexDir.open(fivr['index'], index.KIND)
  assert index_attention.is_cached(ix, checkpoint.load_params(fivr['ckpt'])[0])   # written by `exhaustive`
  params, cfg = checkpoint.load_params(fivr['ckpt'])
  cfg = model_lib.ModelConfig.from_dict(cfg)
  queries = search.query_features(ix, [(q, None) for q in fivr['data']['queries']], '')
  mesh = mesh_lib.make_mesh(devices=jax.local_devices())
  scores = []
  for indexed in (False, True):
    engine = engine_lib.Engine(cfg, params, mesh, engine_lib.EngineConfig(indexed_targets=indexed))
    weights = index_attention.refresh(ix, cfg, params) if indexed else None
    rows = search.search(ix, engine, queries, len(ix), top_k=1000, weights=weights)
    scores.append({(r['query'], r['id']): r['score'] for per_query in rows for r in per_query})
  assert scores[0].keys() == scores[1].keys() == {(r['query'], r['id']) for r in exhaustive}
  for pair, s in scores[0].items():
    assert abs(scores[1][pair] - s) <= 1e-6, pair
  with pytest.raises(ValueError, match='indexed_targets'):
    search.search(ix, engine, queries, len(ix))

  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied', args[0])
  copy = str(tmp_path / 'read_only')
  os.system(f'cp -r {fivr["index"]} {copy}')
  os.remove(os.path.join(copy, index_attention.ATTENTION_FILE))
  monkeypatch.setattr(index_attention, 'io_util', types.SimpleNamespace(atomic_open=refuse))
  q = fivr['data']['queries'][0]
  rows = _search(tmp_path / 'out', f'--index={copy}', f'--checkpoint={fivr["ckpt"]}', f'--query_id={q}',
                 '--shortlist=all', '--top_k=1000')
  assert not os.path.exists(os.path.join(copy, index_attention.ATTENTION_FILE))
  full = {r['id']: r['score'] for r in exhaustive if r['query'] == q}
  assert {r['id'] for r in rows} == full.keys()
  for r in rows:
    assert abs(r['score'] - full[r['id']]) <= 1e-6, r
