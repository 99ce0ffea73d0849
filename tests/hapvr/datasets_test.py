"""Tests of hapvr_jax.datasets.

Hand-computed APs, a slow dict-based re-implementation of the original's loops on random synthetic
annotations, scikit-learn parity of the SVD AP, malformed annotation files, and the real annotations when
../shared has them.
"""
import json
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

from hapvr_jax import datasets as bm
from hapvr_jax.datasets import AnnotationError, average_precision, load_benchmark

REAL = Path(__file__).resolve().parents[3] / 'shared' / 'data' / 'annotations'
FIVR_TASKS = {'DSVR': ('ND', 'DS'), 'CSVR': ('ND', 'DS', 'CS'), 'ISVR': ('ND', 'DS', 'CS', 'IS')}
DETECTION = {'DSVR': 'DSVD', 'CSVR': 'CSVD', 'ISVR': 'ISVD'}


# ----------------------------------------------------------------------------------- annotation writers
def write_fivr(root, queries, database, annotation, easy):
  split = {'queries': list(queries), 'database': set(database)}
  with open(root / 'fivr_audio.pickle', 'wb') as f:
    pickle.dump({'5k': split, '200k': split, 'annotation': annotation}, f)
  (root / 'fivr_easy_duplicates.txt').write_text(''.join(f'{v}\n' for v in easy))


def write_evve(root, events, queries, database):
  with open(root / 'evve.pickle', 'wb') as f:
    pickle.dump({'annotation': events, 'queries': list(queries), 'database': list(database)}, f)


def write_svd(root, pairs, distractors=None):
  (root / 'test_groundtruth').write_text(''.join(f'{q} {c} {y}\n' for q, c, y in pairs))
  if distractors is not None:
    (root / 'unlabeled-data-id').write_text(''.join(f'{d}\n' for d in distractors))


def dense(similarities, query_ids, db_ids):
  return np.array([[similarities[q][d] for d in db_ids] for q in query_ids])


# ----------------------------------------------------------- slow reference: the original's dict-based loops
def ref_metric(y_true, y_score, gt_len):
  """FIVR calculate_metric with Python's stable sort instead of an unstable argsort."""
  order = sorted(range(len(y_score)), key=lambda i: -y_score[i])
  hits, total = 0, 0.0
  for rank, i in enumerate(order, 1):
    if y_true[i]:
      hits += 1
      total += hits / rank
  return total / gt_len if gt_len else float('nan')


def ref_fivr(annotation, queries, database, easy, similarities, loaded):
  """fivr.py's loops. similarities = {query: {target: score}} in load order (as evaluation.py builds it),
  loaded = every loaded id."""
  all_db, out = set(database) & loaded, {}
  for db, ext in ((all_db, ''), (all_db - set(easy), '_h')):
    for task, labels in FIVR_TASKS.items():
      aps, pooled_true, pooled_score, gt_total = [], [], [], 0
      for q in sorted(similarities):
        if q not in queries:
          continue
        gt = set(v for label in labels for v in annotation[q].get(label, [])) & db - {q}
        y_true, y_score = [], []
        for target, sim in similarities[q].items():
          if target != q and target in db:
            y_true.append(int(target in gt))
            y_score.append(sim)
        if gt:
          aps.append(ref_metric(y_true, y_score, len(gt)))
        pooled_true += y_true
        pooled_score += y_score
        gt_total += len(gt)
      out[task + ext] = float(np.mean(aps)) if aps else float('nan')
      out[DETECTION[task] + ext] = ref_metric(pooled_true, pooled_score, gt_total)
  return out


def ref_trapezoid(ranks, nres):
  """INRIA score_ap_from_ranks_1."""
  if nres == 0 or not ranks:
    return 0.0
  ap = 0.0
  for ntp, rank in enumerate(ranks):
    precision_0 = 1.0 if rank == 0 else ntp / rank
    ap += (precision_0 + (ntp + 1) / (rank + 1)) / nres / 2.0
  return ap


def ref_evve(events, queries, similarities, loaded):
  query_to_event = {q: e for e, (qs, _, _) in events.items() for q in qs}
  aps, pooled_true, pooled_score, gt_total, per_event = [], [], [], 0, {}
  for q in queries:
    if q not in similarities:
      continue
    targets = similarities[q]
    pos = events[query_to_event[q]][1] & loaded
    ranking = sorted(targets, key=lambda t: targets[t], reverse=True)  # stable, as in evve.py
    ranks = [ri for ri, t in enumerate(ranking) if t in pos]
    aps.append(ref_trapezoid(ranks, len(pos)))
    per_event.setdefault(query_to_event[q], []).append(aps[-1])
    gt_total += len(pos)
    for t, s in targets.items():
      pooled_true.append(t in pos)
      pooled_score.append(s)
  out = {'EVVE_mAP': float(np.mean(aps)), 'EVVE_uAP': ref_metric(pooled_true, pooled_score, gt_total)}
  out.update({f'EVVE_mAP/{e}': float(np.mean(v)) for e, v in per_event.items()})
  return out


def ref_stepwise(y_true, y_score):
  """scikit-learn's AP: one threshold per distinct score, sum of (recall step) * precision."""
  pairs = sorted(zip(y_score, y_true), key=lambda p: -p[0])
  n_pos, ap, tp, recall, i = sum(y_true), 0.0, 0, 0.0, 0
  while n_pos and i < len(pairs):
    j = i
    while j < len(pairs) and pairs[j][0] == pairs[i][0]:
      tp, j = tp + pairs[j][1], j + 1
    ap, recall, i = ap + (tp / n_pos - recall) * tp / j, tp / n_pos, j
  return ap


def ref_svd(labels, distractors, similarities, db_ids):
  """svd.py's loops; the pool lists a query's candidates in database order (our tie order), not file order."""
  aps, pooled_true, pooled_score, where = [], [], [], {d: j for j, d in enumerate(db_ids)}
  for q in sorted(labels):
    if q not in similarities:
      continue
    candidates = []
    for target, label in labels[q].items():
      if target in where:
        candidates.append((where[target], label, similarities[q][target]))
    for target in distractors:
      if target in where:
        candidates.append((where[target], 0, similarities[q][target]))
    y_true, y_score = [c[1] for c in sorted(candidates)], [c[2] for c in sorted(candidates)]
    aps.append(ref_stepwise(y_true, y_score))
    pooled_true += y_true
    pooled_score += y_score
  return {'mAP': float(np.mean(aps)), 'uAP': ref_metric(pooled_true, pooled_score, sum(pooled_true))}


def assert_metrics(got, want):
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-9, nan_ok=True), key


# ---------------------------------------------------------------------------------- hand-computed cases
def test_average_precision_by_hand():
  y, s = [1, 0, 1, 0], [0.9, 0.8, 0.5, 0.5]
  # stable order: pos(.9), neg(.8), pos(.5), neg(.5) -> (1/1 + 2/3) / 2
  assert average_precision(y, s) == pytest.approx(5 / 6)
  # the tie (.5, .5) keeps input order: the negative first pushes the positive to rank 4: (1 + 2/4) / 2
  assert average_precision([1, 0, 0, 1], [0.9, 0.8, 0.5, 0.5]) == pytest.approx(0.75)
  assert average_precision(y, s, gt_len=4) == pytest.approx(5 / 12)  # two relevant videos never retrieved
  # trapezoid, positives at 0-based ranks 0 and 2: (1 + 1)/2/2 + (1/2 + 2/3)/2/2
  assert average_precision(y, s, kind='trapezoid') == pytest.approx(0.5 + 7 / 24)
  # stepwise, thresholds .9 (P 1, R 1/2), .8 (no recall step), .5 (P 2/4, R 1): 1/2 * 1 + 1/2 * 1/2
  assert average_precision(y, s, kind='stepwise') == pytest.approx(0.75)
  # .9 {neg}: R 0; .8 {pos}: P 1/2, R 1/2; .5 {neg, pos}: P 2/4, R 1 -> 1/2 * 1/2 + 1/2 * 1/2, any tie order
  assert average_precision([0, 1, 0, 1], [0.9, 0.8, 0.5, 0.5], kind='stepwise') == pytest.approx(0.5)
  assert average_precision([0, 1, 1, 0], [0.9, 0.8, 0.5, 0.5], kind='stepwise') == pytest.approx(0.5)
  assert average_precision([0, 0], [0.3, 0.1], kind='stepwise') == 0.0  # as sklearn 1.9: no positive -> 0
  assert np.isnan(average_precision([0, 0], [0.3, 0.1]))
  precision, recall = bm.pr_curve([0, 1, 0, 1], [0.9, 0.8, 0.5, 0.5])
  np.testing.assert_allclose(precision, [0, 1 / 2, 1 / 3, 2 / 4])
  np.testing.assert_allclose(recall, [0, 0.5, 0.5, 1])


@pytest.fixture
def fivr_hand(tmp_path):
  annotation = {'q1': {'ND': ['a'], 'DS': ['c'], 'CS': ['e'], 'IS': ['x']},  # x is not in the database
                'q2': {'ND': ['b'], 'CS': ['q1']}}
  write_fivr(tmp_path, ['q2', 'q1'], ['a', 'b', 'c', 'd', 'e', 'q1'], annotation, ['a'])
  return load_benchmark('fivr_5k', tmp_path)


def test_fivr_by_hand(fivr_hand):
  db = ['a', 'b', 'c', 'd', 'e', 'q1']
  sims = np.array([[.9, .8, .5, .7, .1, 1.0],  # q1: its own 1.0 is dropped; ranking a b d c e
                   [.2, .3, .3, .3, .0, .6]])  # q2: ranking q1 b c d a e (stable ties b, c, d)
  m = fivr_hand.evaluate(sims, ['q1', 'q2'], db)
  assert fivr_hand.queries == ['q1', 'q2'] and fivr_hand.name == 'FIVR-5K'
  # DSVR: q1 GT {a, c} at ranks 1, 4 -> (1 + 2/4)/2 = .75; q2 GT {b} at rank 2 -> .5 (ties c, d, b: 1/4)
  assert m['DSVR'] == pytest.approx((0.75 + 0.5) / 2)
  # CSVR/ISVR: q1 {a, c, e} ranks 1, 4, 5 -> (1 + 2/4 + 3/5)/3 = .7; q2 {b, q1} ranks 1, 2 -> 1
  assert m['CSVR'] == pytest.approx(0.85) and m['ISVR'] == pytest.approx(0.85)
  # pooled, ties by (query, database):
  # q1a .9+ | q1b .8 | q1d .7 | q2q1 .6 | q1c .5+ | q2b .3+ | q2c .3 | q2d .3 | q2a .2 | q1e .1 | q2e 0
  assert m['DSVD'] == pytest.approx((1 + 2 / 5 + 3 / 6) / 3)
  assert m['CSVD'] == pytest.approx((1 + 2 / 4 + 3 / 5 + 4 / 6 + 5 / 10) / 5)  # with q2q1 and q1e relevant
  # hard: 'a' leaves the database. q1: b d c e -> DSVR {c} 1/3, CSVR {c, e} (1/3 + 2/4)/2; q2 unchanged
  assert m['DSVR_h'] == pytest.approx((1 / 3 + 0.5) / 2)
  assert m['CSVR_h'] == pytest.approx(((1 / 3 + 0.5) / 2 + 1) / 2)
  assert (m['num_queries'], m['num_missing_queries'], m['num_database']) == (2, 0, 6)
  assert json.loads(json.dumps(m)) == m  # plain python values only


def test_fivr_loaded_query_counts_in_ground_truth(fivr_hand):
  # q1 is loaded as a query but not as a database video: it stays in all_db (database ∩ loaded ids), so it is
  # in q2's CSVR ground truth without being a candidate. q2: b .3 ranks first -> CSVR AP = (1/1) / 2.
  m = fivr_hand.evaluate(np.array([[.9, .8, .5, .7, .1], [.2, .3, .3, .3, .0]]), ['q1', 'q2'], list('abcde'))
  assert m['CSVR'] == pytest.approx(((1 + 2 / 4 + 3 / 5) / 3 + 0.5) / 2)
  m = fivr_hand.evaluate(np.array([[.2, .3, .3, .3, .0]]), ['q2'], list('abcde'))  # q1 not loaded at all
  assert m['CSVR'] == 1.0 and m['num_missing_queries'] == 1


def test_evve_by_hand(tmp_path):
  events = {'ev1': ({'q1'}, {'a', 'c'}, set()), 'ev2': ({'q2', 'q3'}, {'b'}, set())}
  write_evve(tmp_path, events, ['q3', 'q1', 'q2'], ['d', 'c', 'b', 'a'])
  evve = load_benchmark('evve', tmp_path)
  assert evve.database == ['a', 'b', 'c', 'd']
  sims = np.array([[.5, .9, .5, .1],  # q1: b a c d (tie a, c in database order) -> positives at ranks 1, 2
                   [.3, .2, .1, .2],  # q2: a b d c (tie b, d) -> b at rank 1
                   [.0, .9, .1, .2]])  # q3: b first -> rank 0
  m = evve.evaluate(sims, ['q1', 'q2', 'q3'], ['a', 'b', 'c', 'd'])
  q1 = (0 + 1 / 2) / 2 / 2 + (1 / 2 + 2 / 3) / 2 / 2  # 5/12
  q2 = (0 + 1 / 2) / 2  # a tie order d, b would give 1/6
  assert m['EVVE_mAP/ev1'] == pytest.approx(q1)
  assert m['EVVE_mAP/ev2'] == pytest.approx((q2 + 1.0) / 2)
  assert m['EVVE_mAP'] == pytest.approx((q1 + q2 + 1.0) / 3)  # mean over queries, not over events
  # pooled: q1b .9, q3b .9+ (tie: q1 first), q1a .5+, q1c .5+, q2a .3, q2b .2+, ... -> ranks 2, 3, 4, 6 of 4
  assert m['EVVE_uAP'] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4 + 4 / 6) / 4)


def test_svd_by_hand(tmp_path):
  pairs = [('q1', 'a', 1), ('q1', 'b', 0), ('q1', 'c', 1), ('q2', 'd', 1), ('q2', 'a', 0)]
  write_svd(tmp_path, pairs, ['x', 'y'])
  svd = load_benchmark('svd', tmp_path)
  db = ['a', 'b', 'c', 'd', 'x', 'y']
  assert svd.database == db and svd.queries == ['q1', 'q2']
  sims = np.array([[.8, .8, .3, .99, .5, .3],  # q1 candidates a b c x y (d belongs to q2)
                   [.9, 1., .0, .4, .4, .1]])  # q2 candidates a d x y
  m = svd.evaluate(sims, ['q1', 'q2'], db)
  # q1 thresholds: .8 {a+, b} P 1/2 R 1/2; .5 {x}; .3 {c+, y} P 2/5 R 1 -> .25 + .2
  # q2 thresholds: .9 {a}; .4 {d+, x} P 1/3 R 1 -> 1/3
  assert m['mAP'] == pytest.approx((0.45 + 1 / 3) / 2)
  # pooled: q2a .9, q1a .8+, q1b .8, q1x .5, q2d .4+, q2x .4, q1c .3+, q1y .3, q2y .1 -> (1/2 + 2/5 + 3/7)/3
  assert m['uAP'] == pytest.approx((1 / 2 + 2 / 5 + 3 / 7) / 3)
  assert m['protocol'] == 'labelled pairs + 2 of 2 distractors'
  (tmp_path / 'unlabeled-data-id').unlink()
  svd = load_benchmark('svd', tmp_path)
  m = svd.evaluate(sims[:1, :4], ['q1'], db[:4])  # q1: a b c -> .8 {a+, b} P 1/2 R 1/2; .3 {c+} P 2/3 R 1
  assert m['mAP'] == pytest.approx(0.25 + 1 / 3)
  assert 'labelled pairs only' in m['protocol'] and m['num_missing_queries'] == 1


# ------------------------------------------------------------------------- random data vs the slow reference
def random_loading(rng, queries, database, drop_q, drop_db, decimals=1):
  """Drops some queries (shuffling the rest) and database videos; scores rounded to force ties."""
  query_ids = [q for q in queries if rng.random() > drop_q]
  rng.shuffle(query_ids)
  db_ids = sorted(d for d in database if rng.random() > drop_db)
  sims = np.round(np.asarray([[rng.random() for _ in db_ids] for _ in query_ids]), decimals)
  similarities = {q: dict(zip(db_ids, map(float, row))) for q, row in zip(query_ids, sims)}
  return query_ids, db_ids, sims, similarities


@pytest.mark.parametrize('seed', range(4))
def test_fivr_matches_reference(tmp_path, seed):
  rng = random.Random(seed)
  queries = [f'q{i:02d}' for i in range(12)]
  database = [f'v{i:03d}' for i in range(150)] + queries[:4]
  pool = database + ['x1', 'x2', 'x3']  # x*: annotated but not in the database
  annotation = {q: {label: rng.sample(pool, rng.randint(1, 8)) for label in ('ND', 'DS', 'CS', 'IS', 'DA')
                    if rng.random() < 0.7} for q in queries}
  annotation['q00']['ND'] = ['q00', 'q01', 'v000']  # the query itself and another query
  annotation['q05'] = {'IS': ['v001']}
  annotation['q06'] = {}
  easy = rng.sample(database, 25) + ['x1']
  write_fivr(tmp_path, queries, database, annotation, easy)
  fivr = load_benchmark('fivr_5k', tmp_path)
  decimals = 1 + 2 * (seed % 2)  # 3 decimals: more distinct positive scores than candidates per row
  query_ids, db_ids, sims, similarities = random_loading(rng, queries, database, 0.2, 0.15, decimals)
  db_ids = [d for d in db_ids if d != 'q01']  # q01 may be loaded as a query only
  sims = dense(similarities, query_ids, db_ids)
  similarities = {q: {d: s[d] for d in db_ids} for q, s in similarities.items()}
  got = fivr.evaluate(sims.astype(np.float32) if seed % 2 else sims, query_ids, db_ids)
  want = ref_fivr(annotation, queries, database, easy, similarities, set(query_ids) | set(db_ids))
  assert_metrics(got, want)
  assert got['num_queries'] == len(query_ids) and got['num_database'] == len(db_ids)


@pytest.mark.parametrize('seed', range(4))
def test_evve_matches_reference(tmp_path, seed):
  rng = random.Random(seed)
  queries = [f'q{i:02d}' for i in range(30)]
  database = [f'v{i:03d}' for i in range(120)] + ['q00', 'q01']  # two queries are also database videos
  events, shuffled = {}, rng.sample(queries, len(queries))
  for e in range(4):
    events[f'ev{e}'] = (set(shuffled[e::4]), set(rng.sample(database, rng.randint(3, 30))), set())
  write_evve(tmp_path, events, queries, database)
  evve = load_benchmark('evve', tmp_path)
  decimals = 1 + 2 * (seed % 2)
  query_ids, db_ids, sims, similarities = random_loading(rng, queries, database, 0.2, 0.15, decimals)
  got = evve.evaluate(sims, query_ids, db_ids)
  assert_metrics(got, ref_evve(events, queries, similarities, set(query_ids) | set(db_ids)))
  assert got['num_missing_queries'] == len(queries) - len(query_ids)


@pytest.mark.parametrize('seed', range(4))
def test_svd_matches_reference(tmp_path, seed):
  rng = random.Random(seed)
  labelled, distractors = [f'c{i:03d}.mp4' for i in range(80)], [f'u{i:03d}.mp4' for i in range(60)]
  labels = {f'q{i:02d}.mp4': {c: int(rng.random() < 0.3) for c in rng.sample(labelled, rng.randint(2, 12))}
            for i in range(15)}
  labels['q00.mp4'] = {c: 0 for c in labels['q00.mp4']}  # no positive at all
  write_svd(tmp_path, [(q, c, y) for q, t in labels.items() for c, y in t.items()], distractors)
  svd = load_benchmark('svd', tmp_path)
  decimals = 1 + 2 * (seed % 2)
  query_ids, db_ids, sims, similarities = random_loading(rng, svd.queries, svd.database, 0.2, 0.15, decimals)
  got = svd.evaluate(sims, query_ids, db_ids)
  assert_metrics(got, ref_svd(labels, distractors, similarities, db_ids))
  assert got['protocol'] == f'labelled pairs + {len(set(db_ids) & set(distractors))} of 60 distractors'


def test_stepwise_ap_matches_sklearn():
  metrics = pytest.importorskip('sklearn.metrics')
  rng = np.random.default_rng(0)
  for trial in range(200):
    n = int(rng.integers(1, 40))
    y, s = rng.random(n) < rng.random(), rng.integers(0, 6, n) / 5.0  # heavy ties
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # sklearn warns when y has no positive
      want = metrics.average_precision_score(y, s)
    assert average_precision(y, s, kind='stepwise') == pytest.approx(want, abs=1e-12), trial


# ----------------------------------------------------------------------------------------------- bad inputs
def test_bad_annotations(tmp_path):
  with pytest.raises(ValueError, match='fivr_5k, fivr_200k, evve, svd'):
    load_benchmark('cc_web', tmp_path)
  with pytest.raises(AnnotationError, match='fivr_audio.pickle.*not found'):
    load_benchmark('fivr_200k', tmp_path)
  (tmp_path / 'evve.pickle').write_bytes(b'\x80\x04 certainly not a pickle')
  with pytest.raises(AnnotationError, match='evve.pickle.*unpickled'):
    load_benchmark('evve', tmp_path)
  write_evve(tmp_path, {'ev': ({'q1'}, {'a'}, set())}, ['q1', 'q2'], ['a'])
  with pytest.raises(AnnotationError, match=r"evve.pickle.*no event.*'q2'"):
    load_benchmark('evve', tmp_path)
  with open(tmp_path / 'fivr_audio.pickle', 'wb') as f:
    pickle.dump({'5k': {'queries': ['q']}, 'annotation': {}}, f)
  with pytest.raises(AnnotationError, match="fivr_audio.pickle.*'5k' must be a dict"):
    load_benchmark('fivr_5k', tmp_path)
  write_fivr(tmp_path, ['q'], ['a'], {'q': {'ND': ['a']}}, [])
  (tmp_path / 'fivr_easy_duplicates.txt').unlink()
  with pytest.raises(AnnotationError, match='fivr_easy_duplicates.txt.*not found'):
    load_benchmark('fivr_5k', tmp_path)
  (tmp_path / 'fivr_easy_duplicates.txt').write_text('a\nb c\n')
  with pytest.raises(AnnotationError, match='fivr_easy_duplicates.txt: line 2'):
    load_benchmark('fivr_5k', tmp_path)
  (tmp_path / 'test_groundtruth').write_text('q.mp4 a.mp4 1\n\nq.mp4 b.mp4\n')
  with pytest.raises(AnnotationError, match='test_groundtruth: line 3: expected'):
    load_benchmark('svd', tmp_path)
  (tmp_path / 'test_groundtruth').write_text('q.mp4 a.mp4 1\nq.mp4 b.mp4 2\n')
  with pytest.raises(AnnotationError, match='test_groundtruth: line 2: label must be 0 or 1'):
    load_benchmark('svd', tmp_path)
  (tmp_path / 'test_groundtruth').write_text('q.mp4 a.mp4 1\n')
  (tmp_path / 'unlabeled-data-id').write_text('u1\nu2 u3\n')
  with pytest.raises(AnnotationError, match='unlabeled-data-id: line 2'):
    load_benchmark('svd', tmp_path)


def test_bad_scores(fivr_hand):
  with pytest.raises(ValueError, match='shape'):
    fivr_hand.evaluate(np.zeros((2, 3)), ['q1', 'q2'], ['a', 'b'])
  with pytest.raises(ValueError, match='not in the benchmark'):
    fivr_hand.evaluate(np.zeros((1, 1)), ['q1'], ['zz'])
  with pytest.raises(ValueError, match='NaN'):
    fivr_hand.evaluate(np.full((1, 1), np.nan), ['q1'], ['a'])


def test_pr_curves_and_plot(tmp_path, fivr_hand):
  sims = np.array([[.9, .8, .5, .7, .1, 1.0], [.2, .3, .3, .3, .0, .6]])  # as in test_fivr_by_hand
  curves = fivr_hand.pr_curves(sims, ['q1', 'q2'], ['a', 'b', 'c', 'd', 'e', 'q1'])
  assert sorted(curves) == ['FIVR-5K CSVD', 'FIVR-5K DSVD', 'FIVR-5K ISVD']
  precision, recall = curves['FIVR-5K DSVD']  # relevant pairs at pooled ranks 1, 5, 6 of 3
  np.testing.assert_allclose(precision, [1, 2 / 5, 3 / 6])
  np.testing.assert_allclose(recall, [1 / 3, 2 / 3, 1])
  pytest.importorskip('matplotlib')
  path = tmp_path / 'pr.png'
  bm.plot_pr_curves({**curves, 'toy': bm.pr_curve([1, 0, 1], [0.9, 0.5, 0.4])}, str(path))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and not Path(f'{path}.tmp').exists()


# ----------------------------------------------------------------------------------------- real annotations
@pytest.fixture(scope='module')
def real():
  if not REAL.is_dir():
    pytest.skip(f'no real annotations at {REAL}')
  return REAL


def perfect_fivr_scores(fivr, score_of_level):
  """sims[q, v] = score_of_level[lowest task level of v's labels for q], 0 for videos outside the GT."""
  col = {d: j for j, d in enumerate(fivr.database)}
  sims = np.zeros((len(fivr.queries), len(fivr.database)), np.float32)
  for i, q in enumerate(fivr.queries):
    for vid, level in fivr.gt[q].items():
      if vid in col:
        sims[i, col[vid]] = score_of_level[level]
  return sims


def test_real_fivr_5k_counts_and_perfect_scores(real):
  fivr = load_benchmark('fivr_5k', real)
  assert (len(fivr.queries), len(fivr.database), len(fivr.easy_duplicates)) == (50, 5000, 4873)
  for t, (retrieval, detection) in enumerate(bm._TASKS):  # 1 for the task's GT (levels <= t), 0 otherwise
    m = fivr.evaluate(perfect_fivr_scores(fivr, [1, int(t >= 1), int(t >= 2)]), fivr.queries, fivr.database)
    for task in (retrieval, detection, retrieval + '_h', detection + '_h'):
      assert m[task] == pytest.approx(1.0), task


def test_real_fivr_200k_counts_and_perfect_scores(real):
  fivr = load_benchmark('fivr_200k', real)
  assert (len(fivr.queries), len(fivr.database)) == (100, 225960)
  # 3 for ND/DS, 2 for CS, 1 for IS: every task's GT outranks the rest, so one evaluation checks all twelve
  m = fivr.evaluate(perfect_fivr_scores(fivr, [3, 2, 1]), fivr.queries, fivr.database)
  for task in ('DSVR', 'CSVR', 'ISVR', 'DSVD', 'CSVD', 'ISVD'):
    assert m[task] == pytest.approx(1.0) and m[task + '_h'] == pytest.approx(1.0), task


def test_real_fivr_5k_random_matches_reference(real):
  fivr = load_benchmark('fivr_5k', real)
  with open(real / 'fivr_audio.pickle', 'rb') as f:
    annotation = pickle.load(f)['annotation']
  rng = random.Random(0)
  query_ids, db_ids, sims, similarities = random_loading(rng, fivr.queries, fivr.database, 0.1, 0.05)
  got = fivr.evaluate(sims, query_ids, db_ids)
  assert_metrics(got, ref_fivr(annotation, fivr.queries, fivr.database, fivr.easy_duplicates, similarities,
                               set(query_ids) | set(db_ids)))


def test_real_evve_and_svd_counts(real):
  evve = load_benchmark('evve', real)
  assert (len(evve.queries), len(evve.database), len(evve.events)) == (620, 2373, 13)
  svd = load_benchmark('svd', real)
  assert len(svd.queries) == 206 and len(svd.database) == 5951
  assert sum(map(len, svd.labels.values())) == 6355
  assert sum(sum(t.values()) for t in svd.labels.values()) == 1759
  m = svd.evaluate(np.random.default_rng(0).random((206, 5951)), svd.queries, svd.database)
  assert m['protocol'].startswith('labelled pairs only') and 0 < m['mAP'] < 1
