"""Tests of AVHash ranking, metrics and data lists (avhash_jax.ranking / metrics / data_lists).

The metric reference is a hand-computed L=4 example and a brute-force NumPy implementation
written from the definitions: full Hamming matrix from sum(q != d), stable argsort per query, explicit loops.
"""
import pickle

import h5py
import numpy as np
import pytest

from avhash_jax import metrics, ranking
from input_pipeline.avhash import lists as data_lists


def _codes(rng, n, bits):
  return np.where(rng.random((n, bits)) < 0.5, 1, -1).astype(np.int8)


def _brute(q, ql, d, dl, ks):
  dist = (q[:, None, :] != d[None, :, :]).sum(-1)
  res = {}
  aps = {k: [] for k in list(ks) + ['all']}
  ssvh = {k: [] for k in ks}
  p = {k: [] for k in ks}
  r = {k: [] for k in ks}
  for i in range(len(q)):
    order = np.argsort(dist[i], kind='stable')
    rel = [dl[j] == ql[i] for j in order]
    n_rel = sum(dl == ql[i])
    for k in list(ks) + ['all']:
      kk = len(d) if k == 'all' else k
      hits, s = 0, 0.0
      for pos in range(1, min(kk, len(d)) + 1):
        if rel[pos - 1]:
          hits += 1
          s += hits / pos
      aps[k].append(s / hits if hits else 0.0)
      if k != 'all':
        ssvh[k].append(s / k)
        p[k].append(hits / k)
        r[k].append(hits / n_rel if n_rel else 0.0)
  for k in list(ks) + ['all']:
    res[f'mAP@{k}'] = np.mean(aps[k])
  for k in ks:
    res[f'mAP@{k}_ssvh'], res[f'P@{k}'], res[f'R@{k}'] = np.mean(ssvh[k]), np.mean(p[k]), np.mean(r[k])
  return res


def test_spec_hand_example():
  # Worked by hand: query ++++ (A); db ++++ (B), +++- (A), ---- (A), ++-- (B): d = 0,1,4,2 -> hits at ranks 2, 4.
  q = np.array([[1, 1, 1, 1]])
  db = np.array([[1, 1, 1, 1], [1, 1, 1, -1], [-1, -1, -1, -1], [1, 1, -1, -1]])
  order, dist = ranking.rank(q, db, return_distances=True)
  assert order.tolist() == [[0, 1, 3, 2]] and dist.tolist() == [[0, 1, 2, 4]]
  res = metrics.retrieval_metrics(order, [0], [1, 0, 0, 1], ks=(1, 2, 3, 4))
  np.testing.assert_allclose([res[f'mAP@{k}'] for k in (1, 2, 3, 4)], [0, 0.5, 0.5, 0.5])
  np.testing.assert_allclose([res[f'mAP@{k}_ssvh'] for k in (1, 2, 3, 4)], [0, 0.25, 1 / 6, 0.25])
  assert res['mAP@all'] == pytest.approx(0.5)
  assert res['P@4'] == pytest.approx(0.5) and res['R@2'] == pytest.approx(0.5)


@pytest.mark.parametrize('bits', [4, 13, 64, 72])
def test_packed_hamming_equals_mismatch_count(bits):
  rng = np.random.default_rng(bits)
  q, d = _codes(rng, 17, bits), _codes(rng, 29, bits)
  ref = (q[:, None, :] != d[None, :, :]).sum(-1)
  np.testing.assert_array_equal(ranking.hamming(ranking.pack(q), ranking.pack(d)), ref)
  np.testing.assert_array_equal(ranking.hamming_inner(q, d), ref)


@pytest.mark.parametrize('chunk', [1, 5, 64])
def test_chunked_rank_matches_stable_argsort(chunk):
  rng = np.random.default_rng(chunk)
  q, d = _codes(rng, 23, 6), _codes(rng, 150, 6)  # 6 bits, 150 items: heavy ties
  dist = (q[:, None, :] != d[None, :, :]).sum(-1)
  ref = np.argsort(dist, axis=1, kind='stable')
  np.testing.assert_array_equal(ranking.rank(q, d, chunk=chunk), ref)
  top, td = ranking.rank(q, d, top_k=20, chunk=chunk, return_distances=True)
  np.testing.assert_array_equal(top, ref[:, :20])
  np.testing.assert_array_equal(td, np.take_along_axis(dist, ref[:, :20], axis=1))
  assert ranking.rank(q, d, top_k=1000, chunk=chunk).shape == (23, 150)


@pytest.mark.parametrize('chunk', [1, 7, 200])
def test_evaluate_matches_brute_force(chunk):
  rng = np.random.default_rng(10 + chunk)
  q, d = _codes(rng, 31, 8), _codes(rng, 240, 8)
  ql, dl = rng.integers(0, 6, 31), rng.integers(0, 6, 240)
  dl[dl == 5] = 4  # class 5 has no database item: R@K = 0 and AP = 0 for those queries
  ks = (5, 10, 20, 40, 60, 80, 100, 200)
  ref = _brute(q, ql, d, dl, ks)
  res = metrics.evaluate(q, ql, d, dl, ks=ks, chunk=chunk)
  for k, v in ref.items():
    assert res[k] == pytest.approx(v, abs=1e-12), k
  top = metrics.evaluate(q, ql, d, dl, ks=ks, with_all=False, with_pr=False, chunk=chunk)
  assert all(top[k] == pytest.approx(res[k]) for k in top)
  # Multi-hot labels with one label each give the same numbers.
  mh = metrics.evaluate(q, metrics.multi_hot([[c] for c in ql], 6), d, metrics.multi_hot([[c] for c in dl], 6),
                        ks=ks, chunk=chunk)
  assert all(mh[k] == pytest.approx(res[k]) for k in ref)
  pr = res['pr']
  assert pr['k'].tolist() == [1, 21, 41, 61, 81, 101, 131, 161, 191, 201]
  ref_pr = _brute(q, ql, d, dl, tuple(pr['k']))
  np.testing.assert_allclose(pr['precision'], [ref_pr[f'P@{k}'] for k in pr['k']])
  np.testing.assert_allclose(pr['recall'], [ref_pr[f'R@{k}'] for k in pr['k']])


def test_self_match_not_removed():
  rng = np.random.default_rng(0)
  c, lab = _codes(rng, 50, 16), rng.integers(0, 3, 50)
  order, dist = ranking.rank(c, c, return_distances=True)
  assert (dist[:, 0] == 0).all() and (order[:, 0] == np.arange(50)).all()  # each query is its own first hit
  assert metrics.evaluate(c, lab, c, lab, ks=(1,))['P@1'] == 1.0


def test_plot_pr(tmp_path):
  rng = np.random.default_rng(1)
  res = metrics.evaluate(_codes(rng, 5, 8), rng.integers(0, 2, 5), _codes(rng, 500, 8), rng.integers(0, 2, 500))
  assert res['pr']['k'][-1] == 401
  metrics.plot_pr({'16 bits': res['pr']}, str(tmp_path / 'pr.png'))
  assert (tmp_path / 'pr.png').read_bytes()[:4] == b'\x89PNG' and len(list(tmp_path.iterdir())) == 1


def test_code_errors():
  with pytest.raises(ranking.CodeError, match='row 1, bit 2'):
    ranking.pack(np.array([[1, 1, 1], [1, -1, 0]]))
  with pytest.raises(ranking.CodeError, match='lengths differ'):
    ranking.hamming(ranking.pack(np.ones((2, 8))), ranking.pack(np.ones((2, 16))))


def _write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text)
  return p


def test_read_lists(tmp_path):
  ids, labels = data_lists.read_list(_write(tmp_path, 'f.txt', '--0K_j-zexM,76\n\nabc,1\nx,239\n'), 'fcvid')
  assert ids == ['--0K_j-zexM', 'abc', 'x'] and labels.tolist() == [75, 0, 238]
  p = _write(tmp_path, 'a.txt', 'v_DFAodsf1dWk,6943,10,10,10\nv_b,12,0,3\n')
  ids, labels = data_lists.read_list(p, 'activitynet')
  assert ids == ['v_DFAodsf1dWk', 'v_b'] and labels.tolist() == [10, 0]
  assert data_lists.read_list(p, 'activitynet', all_labels=True)[1] == [(10,), (0, 3)]


@pytest.mark.parametrize('dataset,text,match', [
    ('fcvid', 'a,1\nb,2,3\n', r'bad.txt:2: expected "video_id,label"'),
    ('fcvid', 'a,1\nb,0\n', r'bad.txt:2: label 0 outside 1..239'),
    ('fcvid', 'a,x\n', r'bad.txt:1: label .x. is not an integer'),
    ('fcvid', 'a,1\n\na,2\n', r'bad.txt:3: video .a. listed twice \(first at line 1\)'),
    ('activitynet', 'v_a,10,3\nv_b,10\n', r'bad.txt:2: expected "video_id,frame_count,label'),
    ('activitynet', 'v_a,10,200\n', r'bad.txt:1: label 200 outside 0..199'),
    ('activitynet', 'v_a,10,1,x\n', r'bad.txt:1: label .x. is not an integer'),
    ('activitynet', '\n\n', r'bad.txt: the list is empty'),
])
def test_list_errors(tmp_path, dataset, text, match):
  with pytest.raises(data_lists.ListError, match=match):
    data_lists.read_list(_write(tmp_path, 'bad.txt', text), dataset)


def test_missing_list_and_train_classes(tmp_path):
  with pytest.raises(data_lists.ListError, match='file not found'):
    data_lists.read_list(tmp_path / 'nope.txt', 'fcvid')
  assert data_lists.check_train_classes([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]) == {c: 2 for c in range(5)}
  with pytest.raises(data_lists.ListError, match='single training video .e.g. label 2'):
    data_lists.check_train_classes([0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 5], 'train.txt')
  with pytest.raises(data_lists.ListError, match='4 classes'):
    data_lists.check_train_classes([0, 0, 1, 1, 2, 2, 3, 3])


def _h5(path, videos):
  with h5py.File(path, 'w') as f:
    for vid, x in videos.items():
      f.create_group(vid).create_dataset('vectors', data=x)
  return str(path)


def test_av_features(tmp_path):
  good = np.random.default_rng(0).standard_normal((25, 768)).astype(np.float32)
  nan = good.copy()
  nan[3, 4] = np.nan
  img = _h5(tmp_path / 'img.h5', {'a': good, 'b': good[:24], 'c': nan, 'd': good})
  aud = _h5(tmp_path / 'aud.h5', {'a': good * 2, 'b': good, 'c': good})
  feats = data_lists.AVFeatures(img, aud)
  i, a = feats.read('a')
  np.testing.assert_array_equal(a, good * 2)
  assert i.dtype == np.float32 and i.shape == (25, 768)
  clone = pickle.loads(pickle.dumps(feats))
  np.testing.assert_array_equal(clone.read('a')[0], good)
  feats.check_ids(['a', 'b'], 'train.txt')
  with pytest.raises(data_lists.AVFeatureError, match=r"aud.h5: video 'd' from train.txt is not in the audio"):
    feats.check_ids(['a', 'd'], 'train.txt')
  with pytest.raises(data_lists.AVFeatureError, match=r"img.h5: video 'b' has shape \(24, 768\)"):
    feats.read('b')
  with pytest.raises(data_lists.AVFeatureError, match=r"img.h5: video 'c' has 1 NaN"):
    feats.read('c')
  with pytest.raises(data_lists.AVFeatureError, match=r"aud.h5: video 'd' is not in the audio file"):
    feats.read('d')
  with pytest.raises(data_lists.AVFeatureError, match='feature file not found'):
    data_lists.AVFeatures(img, str(tmp_path / 'none.h5'))


@pytest.mark.parametrize('bits,k', [(70, 1), (64, 37), (128, 300), (16, 300)])
def test_topk_selection_multiword_codes(bits, k):
  """The jitted top-k (bisection + in-order gather) equals the stable argsort over several 32-bit words,
  with padding bits (70), k = 1 and k = N_db."""
  rng = np.random.default_rng(bits)
  q, d = _codes(rng, 9, bits), _codes(rng, 300, bits)
  d[::7] = d[3]                                    # exact duplicates: ties at every distance
  dist = (q[:, None, :] != d[None, :, :]).sum(-1)
  ref = np.argsort(dist, axis=1, kind='stable')[:, :k]
  top, td = ranking.rank(q, d, top_k=k, chunk=4, return_distances=True)
  np.testing.assert_array_equal(top, ref)
  np.testing.assert_array_equal(td, np.take_along_axis(dist, ref, axis=1))
