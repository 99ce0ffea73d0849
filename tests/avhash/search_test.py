"""avhash_jax.search: the ranking of --query_id / --queries is the brute-force stable Hamming ranking, a query
video is coded through the same extractor and checkpoint as the index (tiny CLIP/AST backbones on generated
videos), results.jsonl/csv and the table are written, and every bad input is one error line."""
import csv
import json
import os

import numpy as np
import pytest

from avhash_jax import index as index_lib
from avhash_jax import search
from common_jax import hamming
from common_jax.index_dir import IndexDir
from tests.avhash.evaluate_test import data  # noqa: F401 (the shared feature files and checkpoint)


def test_videos_are_indexed_and_a_query_video_finds_itself(av_videos, tmp_path, capsys):
  ix = IndexDir.open(av_videos['index'])
  assert ix.ids() == ['long', 'silent', 'tone']                 # the unreadable one is a failure, not an error
  meta = ix.meta('long')
  assert meta['path'] == av_videos['paths']['long'] and meta['duration'] == pytest.approx(5.0, abs=0.2)
  assert meta['fps'] == 8 and meta['frames'] == 40
  assert not os.path.exists(os.path.join(av_videos['index'], index_lib.WORK))
  out = str(tmp_path / 'out')
  assert search.main([f'--index={av_videos["index"]}', f'--query={av_videos["paths"]["long"]}', f'--output={out}',
                      *av_videos['common']]) == 0
  rows = [json.loads(line) for line in open(os.path.join(out, 'results.jsonl'))]
  assert [r['rank'] for r in rows] == [1, 2, 3]
  mine = next(r for r in rows if r['id'] == 'long')
  assert mine['distance'] == 0 and mine['score'] == 1.0 and mine['path'] == av_videos['paths']['long']
  with open(os.path.join(out, 'results.csv')) as f:
    assert list(csv.DictReader(f))[0]['id'] == rows[0]['id']
  printed = capsys.readouterr().out
  assert 'rank' in printed and 'timings: open' in printed and 'query codes' in printed


@pytest.fixture(scope='module')
def feature_index(data, tmp_path_factory):  # noqa: F811
  path = str(tmp_path_factory.mktemp('avsearch_f') / 'index')
  assert index_lib.main([f'--index={path}', f'--image_features={data["image_h5"]}',
                         f'--audio_features={data["audio_h5"]}', f'--checkpoint={data["ckpt"]}']) == 0
  return path


def _results(folder):
  return [json.loads(line) for line in open(os.path.join(folder, 'results.jsonl'))]


@pytest.mark.parametrize('backend', ['numpy', 'faiss_flat'])
def test_query_ids_rank_by_stable_hamming_distance(feature_index, tmp_path, backend):
  ids, codes = index_lib.codes_of(IndexDir.open(feature_index))
  listing = tmp_path / 'queries.txt'
  listing.write_text(f'{ids[4]}\n# a comment\n{ids[9]}\n')
  assert search.main([f'--index={feature_index}', f'--queries={listing}', '--top_k=5', f'--output={tmp_path}',
                      f'--backend={backend}']) == 0
  rows = _results(tmp_path)
  for q in (4, 9):
    d = hamming.distances(codes[q:q + 1], codes)[0]
    order = [j for j in np.lexsort((np.arange(len(ids)), d)) if j != q][:5]
    got = [r for r in rows if r['query'] == ids[q]]
    assert [r['distance'] for r in got] == [int(d[j]) for j in order]
    if backend == 'numpy':
      assert [r['id'] for r in got] == [ids[j] for j in order]
  assert search.main([f'--index={feature_index}', f'--query_id={ids[4]}', '--top_k=50', '--min_score=0.75',
                      f'--output={tmp_path}']) == 0
  assert all(r['score'] >= 0.75 and r['distance'] <= 4 for r in _results(tmp_path))


def _fails(argv, capsys, *words):
  with pytest.raises(SystemExit) as e:
    search.main(argv)
  assert e.value.code == 2
  err = [line for line in capsys.readouterr().err.strip().splitlines() if 'video/s' not in line]  # progress
  assert len(err) == 1 and err[0].startswith('error: '), err
  for w in words:
    assert w in err[0], err[0]


def test_bad_queries_are_one_error_line(av_videos, data, tmp_path, capsys):  # noqa: F811
  ix = f'--index={av_videos["index"]}'
  _fails([ix, f'--query={av_videos["paths"]["broken"]}', *av_videos['common']], capsys, 'broken.mp4',
         'cannot read the query video')
  _fails([ix, f'--query={tmp_path / "none.mp4"}', *av_videos['common']], capsys, 'none.mp4: query video not found')
  _fails([ix, '--query_id=nope'], capsys, "video id 'nope' is not in the index")
  _fails([ix, '--query_id=tone', '--query=x.mp4'], capsys, 'exactly one of')
  _fails([ix, f'--query={av_videos["paths"]["tone"]}', f'--checkpoint={data["ckpt"]}',
          f'--clip={av_videos["clip"]}', f'--ast={av_videos["ast"]}'], capsys, 'not the checkpoint the index',
         'checkpoint:')
  listing = tmp_path / 'q.txt'
  listing.write_text('tone\nmissing_thing\n')
  _fails([ix, f'--queries={listing}'], capsys, 'q.txt:2', 'missing_thing')
  empty = str(tmp_path / 'empty')
  IndexDir.create(empty, index_lib.KIND, {'bits': 16})
  _fails([f'--index={empty}', '--query_id=x'], capsys, 'the index is empty')
  _fails([f'--index={tmp_path / "nowhere"}', '--query_id=x'], capsys, 'index not found')
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'manifest.json').write_text('[1, 2')
  _fails([f'--index={broken}', '--query_id=x'], capsys, 'manifest.json: corrupt')
