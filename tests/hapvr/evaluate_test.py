"""End to end: a checkpoint in the original format -> hapvr_jax.convert -> hapvr_jax.evaluate reproduces the
original pipeline (the PyTorch reference scored pair by pair, with the original's min_len tiling and target
chunking), on real FIVR-5K ids and annotations when ../shared is present; bad input fails cleanly."""
import json
import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from tests.references import hapvr_torch as ref  # noqa: E402
from configs import common as config_common  # noqa: E402
from hapvr_jax import convert, evaluate  # noqa: E402
from hapvr_jax import datasets
from tests import helpers

from tests.conftest import ROOT  # noqa: E402
DIMS = 64


def _write_features(path, ids, rng, relatives=()):
  """Random features; each (query, target) in `relatives` makes the target a noisy copy of the query."""
  feats = {v: helpers.unit_features(rng, (int(rng.integers(3, 31)), 9, DIMS)) for v in ids}   # < 32: one chunk
  feats[ids[-1]] = helpers.unit_features(rng, (70, 9, DIMS))   # longer than the test chunk size: chunked and averaged
  for q, t in relatives:
    feats[t] = helpers.unit_features(rng, feats[q].shape) * 0.3 + feats[q]
  with h5py.File(path, 'w') as f:
    for v, x in feats.items():
      f[v] = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return path


def _checkpoint(tmp_path, seed=0, hapvr=True):
  torch.manual_seed(seed)
  net = ref.SimilarityNetworkRef(dims=DIMS, f_topk_rate=0.1, v_topk_rate=0.2 if hapvr else 0.1,
                                 f2f_sim_module='TopKChamfer' if hapvr else 'Chamfer',
                                 v2v_sim_module='TopKChamfer' if hapvr else 'Chamfer',
                                 s2vs_naming=not hapvr).eval()
  pth = str(tmp_path / 'model.pth')
  ref.make_original_checkpoint(pth, net, hapvr=hapvr)
  out = str(tmp_path / 'converted')
  assert convert.main([f'--torch_checkpoint={pth}', f'--output={out}']) == 0
  return net, out


def _reference_scores(net, features, queries, database, min_len, chunk):
  with torch.no_grad(), h5py.File(features, 'r') as f:
    load = lambda v: net.index_video(torch.from_numpy(ref.tile_min_len(f[v][()], min_len)))
    qs = [load(q) for q in queries]
    out = np.zeros((len(queries), len(database)))
    for j, d in enumerate(database):
      t = load(d)
      for i, q in enumerate(qs):
        out[i, j] = float(ref.original_style_similarity(net, q, t, chunk=chunk))
  return out


def _config(dataset, **overrides):
  c = config_common.hapvr_eval_config(dataset)
  c.progress = False
  c.compilation_cache = ''
  c.engine.chunk_size = 32
  c.engine.bucket_ratio = 2.0
  for k, v in overrides.items():
    c[k] = v
  return c


def test_converted_checkpoint_reproduces_the_reference_on_real_fivr_ids(tmp_path, annotations_dir):
  bench = datasets.load_benchmark('fivr_5k', annotations_dir)
  rng = np.random.default_rng(0)
  queries = bench.queries[:6]                     # the other 44 queries are missing from the file
  related = []
  with open(os.path.join(annotations_dir, 'fivr_audio.pickle'), 'rb') as f:
    annotation = pickle.load(f)['annotation']
  db_set = set(bench.database)
  for q in queries:
    related += [(q, v) for label in ('ND', 'DS', 'CS') for v in annotation[q].get(label, [])[:2] if v in db_set]
  database = sorted({t for _, t in related} | set(rng.choice(bench.database, 20, replace=False)))
  features = _write_features(str(tmp_path / 'fivr_5k.hdf5'), list(queries) + database, rng, related)
  net, ckpt = _checkpoint(tmp_path)
  workdir = str(tmp_path / 'out')
  metrics = evaluate.evaluate(_config('fivr_5k', features=features, checkpoint=ckpt,
                                      annotations=annotations_dir, store_similarities=True), workdir)

  expected = _reference_scores(net, features, queries, database, min_len=8, chunk=32)
  with open(os.path.join(workdir, 'similarities.pk'), 'rb') as f:
    sims = pickle.load(f)
  assert list(sims) == list(queries) and all(list(sims[q]) == database for q in queries)
  got = np.array([[sims[q][d] for d in database] for q in queries])
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)      # per-pair similarities to 1e-4
  want = bench.evaluate(expected, list(queries), database)
  for key in ('DSVR', 'CSVR', 'ISVR', 'DSVD', 'CSVD', 'ISVD', 'DSVR_h', 'ISVD_h'):
    assert abs(metrics[key] - want[key]) < 1e-3, key                  # metrics to 1e-3
  assert metrics['num_missing_queries'] == 44
  assert metrics['num_database'] == len(database)
  assert metrics['DSVR'] > 0.5                                       # the planted copies are found
  with open(os.path.join(workdir, 'metrics.json')) as f:
    assert json.load(f)['DSVR'] == pytest.approx(metrics['DSVR'])
  assert os.path.exists(os.path.join(workdir, 'pr_curves.png'))


def test_s2vs_checkpoint_on_synthetic_evve(tmp_path):
  """S2VS naming + Chamfer/Chamfer + min_len 4, on an EVVE-format annotation file."""
  rng = np.random.default_rng(1)
  queries, database = ['qa', 'qb', 'qc'], [f'db{i}' for i in range(12)]
  annotation = {'event1': ({'qa', 'qb'}, {'db0', 'db1', 'db2'}, set()), 'event2': ({'qc'}, {'db3'}, set())}
  ann_dir = tmp_path / 'ann'
  ann_dir.mkdir()
  with open(ann_dir / 'evve.pickle', 'wb') as f:
    pickle.dump({'annotation': annotation, 'queries': queries, 'database': database}, f)
  features = _write_features(str(tmp_path / 'evve.hdf5'), queries + database, rng,
                             [('qa', 'db0'), ('qb', 'db1'), ('qc', 'db3')])
  net, ckpt = _checkpoint(tmp_path, seed=1, hapvr=False)
  metrics = evaluate.evaluate(_config('evve', features=features, checkpoint=ckpt, annotations=str(ann_dir)),
                              str(tmp_path / 'out'))
  assert metrics['min_len'] == 4
  expected = _reference_scores(net, features, queries, database, min_len=4, chunk=32)
  want = datasets.load_benchmark('evve', str(ann_dir)).evaluate(expected, queries, database)
  assert abs(metrics['EVVE_mAP'] - want['EVVE_mAP']) < 1e-6
  assert abs(metrics['EVVE_uAP'] - want['EVVE_uAP']) < 1e-6


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'hapvr_jax.evaluate', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_rejects_an_unknown_config_key(tmp_path):
  r = _run_cli('--config=configs/fivr_5k.py', f'--workdir={tmp_path}', '--config.no_such_key=1')
  assert r.returncode == 2, r.stderr
  assert 'no_such_key' in r.stderr and r.stderr.strip().splitlines()[-1].startswith('error:')
  assert not os.path.exists(tmp_path / 'metrics.json')


def test_cli_bad_features_leave_no_metrics(tmp_path):
  rng = np.random.default_rng(2)
  ann = tmp_path / 'ann'
  ann.mkdir()
  split = {'queries': ['q1'], 'database': {'d1', 'd2'}}
  with open(ann / 'fivr_audio.pickle', 'wb') as f:
    pickle.dump({'5k': split, '200k': split, 'annotation': {'q1': {'ND': ['d1']}}}, f)
  (ann / 'fivr_easy_duplicates.txt').write_text('d2\n')
  path = str(tmp_path / 'f.hdf5')
  with h5py.File(path, 'w') as f:
    f['q1'] = helpers.unit_features(rng, (10, 9, DIMS))
    f['d1'] = helpers.unit_features(rng, (10, 9, DIMS))
    f['d2'] = np.full((6, 9, DIMS), np.nan, np.float32)
  _, ckpt = _checkpoint(tmp_path)
  workdir = tmp_path / 'out'
  workdir.mkdir()
  (workdir / 'metrics.json').write_text('{"stale": true}')   # an earlier run's results must not survive
  r = _run_cli('--config=configs/fivr_5k.py', f'--workdir={workdir}', f'--config.features={path}',
               f'--config.annotations={ann}', f'--config.checkpoint={ckpt}', '--config.progress=False')
  assert r.returncode == 2
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error:') and 'f.hdf5' in last and "'d2'" in last and 'NaN' in last
  assert not os.path.exists(workdir / 'metrics.json')


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  ann = tmp_path / 'ann'
  ann.mkdir()
  with open(ann / 'evve.pickle', 'wb') as f:
    pickle.dump({'annotation': {'e': ({'q'}, {'d'}, set())}, 'queries': ['q'], 'database': ['d']}, f)
  path = str(tmp_path / 'f.hdf5')
  with h5py.File(path, 'w') as f:
    f['q'] = helpers.unit_features(np.random.default_rng(0), (8, 9, 512))
  with pytest.raises(ValueError, match='model_config.json is missing'):
    evaluate.evaluate(_config('evve', features=path, annotations=str(ann), checkpoint=str(tmp_path)),
                      str(tmp_path / 'out'))


def test_svd_labelled_pairs_protocol(tmp_path):
  """SVD without the distractor list: each query against its own labelled candidates, and metrics.json says so."""
  rng = np.random.default_rng(3)
  ann = tmp_path / 'ann'
  ann.mkdir()
  pairs = [('q1.mp4', 'a.mp4', 1), ('q1.mp4', 'b.mp4', 0), ('q1.mp4', 'c.mp4', 0),
           ('q2.mp4', 'd.mp4', 0), ('q2.mp4', 'e.mp4', 1), ('q2.mp4', 'a.mp4', 0)]
  (ann / 'test_groundtruth').write_text(''.join(f'{q} {c} {l}\n' for q, c, l in pairs))
  ids = ['q1.mp4', 'q2.mp4', 'a.mp4', 'b.mp4', 'c.mp4', 'd.mp4', 'e.mp4']
  features = _write_features(str(tmp_path / 'svd.hdf5'), ids, rng, [('q1.mp4', 'a.mp4'), ('q2.mp4', 'e.mp4')])
  net, ckpt = _checkpoint(tmp_path, seed=2)
  metrics = evaluate.evaluate(_config('svd', features=features, checkpoint=ckpt, annotations=str(ann)),
                              str(tmp_path / 'out'))
  assert 'labelled pairs only' in metrics['protocol']
  database = sorted(ids[2:])
  expected = _reference_scores(net, features, ['q1.mp4', 'q2.mp4'], database, min_len=8, chunk=32)
  want = datasets.load_benchmark('svd', str(ann)).evaluate(expected, ['q1.mp4', 'q2.mp4'], database)
  assert abs(metrics['mAP'] - want['mAP']) < 1e-6 and abs(metrics['uAP'] - want['uAP']) < 1e-6
