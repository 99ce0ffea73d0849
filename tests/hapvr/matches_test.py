"""hapvr_jax.matches and `search --localize / --report`: the pair maps equal the network's own (api.similarity),
the comparator map is its output repeated to frame resolution, a near copy is localised on its diagonal, and the
VSC CSVs hold what results.jsonl holds."""
import json
import os

import h5py
import numpy as np
import pytest

from hapvr_jax import api, index, localize, matches, search, vsc
from hapvr_jax.features import tiled_length


@pytest.mark.parametrize('nq, nt', [(5, 13), (22, 37)])
def test_pair_maps_equal_the_networks_maps(checkpoint32, nq, nt):
  rng = np.random.default_rng(nq)
  q, t = (rng.normal(size=(n, 9, 32)).astype(np.float32) for n in (nq, nt))
  model = api.load(checkpoint32)
  want = model.similarity(q, t)
  got = matches.PairMaps(model.config, model.params)(q, t)
  assert got['f2f'].shape == got['comparator'].shape == (nq, nt)
  np.testing.assert_allclose(got['f2f'], want.f2f[:nq, :nt], atol=1e-5)
  # the video score under padding and masks equals the unpadded network's
  assert got['score'] == pytest.approx(want.score, abs=1e-5)
  tq, tt = (tiled_length(n, model.config.min_len) for n in (nq, nt))
  # the comparator's output interpolated to one cell per frame of the (tiled) videos, cropped to their frames;
  # frames 0 and 1 sit before the centre of output cell 0 (at -3/8 and -1/8 of a cell): they take its value
  up = localize.upsample(want.comparator, 4, shape=(tq, tt))
  np.testing.assert_allclose(got['comparator'], up[:nq, :nt], atol=1e-5)
  np.testing.assert_allclose(got['comparator'][:2, :2], want.comparator[0, 0], atol=1e-5)
  assert matches.bucket(13) == 64 and matches.bucket(65) == 128 and matches.bucket(3, smallest=16) == 16


def test_search_localizes_a_near_copy_and_writes_the_vsc_csvs(corpus, checkpoint32, tmp_path):
  ix_path, out = str(tmp_path / 'ix'), tmp_path / 'out'
  assert index.main([f'--index={ix_path}', f'--features={corpus["features"]}', '--noprogress']) == 0
  assert search.main([f'--index={ix_path}', f'--checkpoint={checkpoint32}', '--query_id=v00', '--shortlist=all',
                      '--top_k=3', '--localize', f'--output={out}', '--noprogress']) == 0
  rows = [json.loads(line) for line in open(out / 'results.jsonl')]
  with h5py.File(corpus['features']) as f:
    n0 = len(f['v00'])
  # v01 is a noisy copy of v00 frame for frame (index fps 1): one segment on the diagonal, within a frame
  copy = next(r for r in rows if r['id'] == 'v01')
  assert copy['segments'], copy
  qs, qe, rs, re_, score = copy['segments'][0]
  assert abs(qs - 0) <= 1 and abs(qe - n0) <= 1 and abs(rs - 0) <= 1 and abs(re_ - n0) <= 1 and score > 0
  assert all(len(s) == 5 and s[0] <= s[1] and s[2] <= s[3] for r in rows for s in r['segments'])
  got = vsc.read_matches(str(out / 'matches.csv'))
  want = [(r['query'], r['id'], *s) for r in rows for s in r['segments']]
  assert [(m.query_id, m.ref_id, m.query_start, m.query_end, m.ref_start, m.ref_end, m.score) for m in got] == \
      pytest.approx(want) if want else not got
  pairs = vsc.read_pairs(str(out / 'candidates.csv'))
  assert [(p.query_id, p.ref_id) for p in pairs] == [(r['query'], r['id']) for r in rows]
  np.testing.assert_allclose([p.score for p in pairs], [r['score'] for r in rows], rtol=1e-6)


def test_search_report_names_every_result(corpus, checkpoint32, tmp_path):
  ix_path = str(tmp_path / 'ix')
  assert index.main([f'--index={ix_path}', f'--features={corpus["features"]}', '--noprogress']) == 0
  assert search.main([f'--index={ix_path}', f'--checkpoint={checkpoint32}', '--query_id=v02', '--shortlist=all',
                      '--top_k=4', f'--report={tmp_path}/report', f'--output={tmp_path}/out', '--noprogress']) == 0
  rows = [json.loads(line) for line in open(tmp_path / 'out' / 'results.jsonl')]
  page = open(os.path.join(tmp_path, 'report', 'index.html')).read()
  assert len(rows) == 4 and all(r['id'] in page and 'segments' in r for r in rows)


def test_segments_bridge_gaps_up_to_max_gap_seconds():
  # a 40-frame copy on the diagonal with 3 frames dropped in the middle (frames 20-22)
  sim = np.random.default_rng(0).normal(0.0, 0.05, (50, 60))
  idx = np.r_[5:25, 28:45]
  sim[idx, idx + 10] += 1.0
  maps = {'f2f': sim}
  # at 4 fps the gap is 0.75 s, bridged (max_gap 4 frames): one copy, frames [5, 45) of the query
  [(qs, qe, rs, re_, _)] = matches.segments(maps, 'f2f', 'tn', 4.0)
  assert (qs, qe, rs, re_) == (5 / 4, 45 / 4, 15 / 4, 55 / 4)
  # at 2 fps the same 3 frames are 1.5 s, more than MAX_GAP_SECONDS (max_gap 2 frames): two copies
  got = sorted(s[:4] for s in matches.segments(maps, 'f2f', 'tn', 2.0))
  assert got == [(2.5, 12.5, 7.5, 17.5), (14.0, 22.5, 19.0, 27.5)]
  assert matches.MAX_GAP_SECONDS == 1.0


def test_the_api_localizes_as_the_command_does(corpus, checkpoint32, tmp_path):
  with h5py.File(corpus['features']) as f:
    feats = {k: f[k][()] for k in f}
  ix_path = str(tmp_path / 'ix')
  assert index.main([f'--index={ix_path}', f'--features={corpus["features"]}', '--noprogress']) == 0
  assert search.main([f'--index={ix_path}', f'--checkpoint={checkpoint32}', '--query_id=v00', '--shortlist=all',
                      '--top_k=3', '--localize', f'--output={tmp_path}/out', '--noprogress']) == 0
  want = [json.loads(line) for line in open(tmp_path / 'out' / 'results.jsonl')]
  model = api.load(checkpoint32)
  hits = api.Index(ix_path, model).search('v00', top_k=3, localize='tn')
  assert [(h['id'], h['segments']) for h in hits] == [(w['id'], w['segments']) for w in want]
  # features stored as float16 by the index: the same frames give the same segments to within a frame
  got = model.localize(feats['v00'], feats['v01'])
  seg = next(w for w in want if w['id'] == 'v01')['segments']
  assert len(got) == len(seg) and np.allclose([s[:4] for s in got], [s[:4] for s in seg], atol=1.0)
