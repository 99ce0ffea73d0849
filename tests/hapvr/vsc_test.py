"""The VSC CSV formats and the matching/descriptor micro-AP and VCSL segment metrics on hand-computed cases."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hapvr_jax import eval_matching, vsc
from hapvr_jax import vsc_metrics as M

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def m(q, r, qs, qe, rs, re, score=1.0):
  return vsc.Match(q, r, qs, qe, rs, re, score)


GT = [m('Q1', 'R1', 0, 10, 20, 30), m('Q2', 'R2', 5, 15, 0, 10)]


def test_perfect_predictions_score_one():
  assert M.matching_ap(GT, GT).ap == pytest.approx(1.0)
  assert M.descriptor_ap({g.pair for g in GT}, vsc.pairs_from_matches(GT)).ap == pytest.approx(1.0)
  assert M.vcsl_prf(GT, GT) == pytest.approx({'precision': 1, 'recall': 1, 'f_score': 1})


def test_no_predictions_score_zero():
  assert M.matching_ap(GT, []).ap == 0.0
  assert M.descriptor_ap({g.pair for g in GT}, []).ap == 0.0
  assert M.vcsl_prf(GT, []) == {'precision': 1.0, 'recall': 0.0, 'f_score': 0.0}   # VCSL: nothing claimed
  with pytest.raises(M.MetricError):
    M.matching_ap([], GT)


def test_partial_overlap():
  # Q1 half found on both axes, exactly aligned: the prediction's own time is all right (P 1), R = 1/2 of
  # the 20 s of ground truth per axis (5 of 10 in pair 1, 0 in pair 2): 5/20 per axis
  preds = [m('Q1', 'R1', 5, 10, 25, 30, 0.9)]
  assert M.matching_ap(GT, preds).ap == pytest.approx(0.25)
  # a prediction twice as long on the query axis, half outside: P_q = 5/10, P_r = 5/5 -> P = sqrt(1/2)
  preds = [m('Q1', 'R1', 5, 15, 25, 30, 0.9)]
  assert M.matching_ap(GT, preds).ap == pytest.approx(np.sqrt(0.5) * 0.25)
  # only the truth a prediction overlaps as a rectangle counts: the second prediction shares the query time of
  # segment B but not its reference time, so it adds no recall on either axis
  two = [m('Q', 'R', 0, 10, 0, 10), m('Q', 'R', 20, 30, 20, 30)]
  preds2 = [m('Q', 'R', 0, 10, 0, 10, 0.9), m('Q', 'R', 20, 30, 40, 50, 0.8)]
  assert M.matching_ap(two, preds2).ap == pytest.approx(0.5)
  # VCSL, products of the axes: pair Q1 P 5/10 * 5/5, R 5/10 * 5/10; pair Q2 missed: P 1, R 0
  prf = M.vcsl_prf(GT, preds)
  assert prf['precision'] == pytest.approx((0.5 + 1) / 2)
  assert prf['recall'] == pytest.approx(0.25 / 2)
  assert prf['f_score'] == pytest.approx(2 * 0.75 * 0.125 / (0.75 + 0.125))


def test_duplicates_count_once():
  preds = [m('Q1', 'R1', 0, 10, 20, 30, 0.9), m('Q1', 'R1', 0, 10, 20, 30, 0.8),
           m('Q1', 'R1', 2, 8, 22, 28, 0.7)]
  ap = M.matching_ap(GT, preds)
  assert ap.ap == pytest.approx(0.5)   # the whole of pair 1 (half the ground truth), precision 1
  assert len(ap.recalls) == 1
  assert M.vcsl_prf(GT, preds) == pytest.approx({'precision': 1.0, 'recall': 0.5, 'f_score': 2 / 3})


def test_false_positive_with_a_high_score():
  # a wrong pair first (10 s per axis), then both true segments: P = 20/30 at the only recall step (0 -> 1)
  preds = [m('Q9', 'R1', 0, 10, 0, 10, 0.99), *(dataclasses.replace(g, score=0.5) for g in GT)]
  assert M.matching_ap(GT, preds).ap == pytest.approx(2 / 3)
  # descriptor track: ranks FP, TP, TP (one tie group of two): AP = (2 * 2/3) / 2
  pairs = vsc.pairs_from_matches(preds)
  assert M.descriptor_ap({g.pair for g in GT}, pairs).ap == pytest.approx(2 / 3)
  # a tie is one step whatever the input order: {true Q1, false Q9} at P 1/2, R 1/2, then Q2 at P 2/3, R 1
  tied = [dataclasses.replace(GT[0], score=0.5), m('Q9', 'R1', 0, 10, 0, 10, 0.5),
          dataclasses.replace(GT[1], score=0.4)]
  for order in (tied, tied[::-1]):
    assert M.matching_ap(GT, order).ap == pytest.approx(0.5 * 0.5 + 2 / 3 * 0.5)
  # the same false positive ranked last costs nothing
  preds[0] = dataclasses.replace(preds[0], score=0.1)
  assert M.matching_ap(GT, preds).ap == pytest.approx(1.0)
  # a box in the right pair, disjoint from the truth: it adds predicted length and no overlap
  wrong_place = [m('Q1', 'R1', 40, 50, 40, 50, 0.99), m('Q1', 'R1', 0, 10, 20, 30, 0.5)]
  assert M.matching_ap(GT, wrong_place).ap == pytest.approx(0.5 * 0.5)
  # VCSL: the false pair Q9-R1 has P 0, R 1; pair Q1's box in the wrong place halves its precision
  assert M.vcsl_pair_pr([GT[0]], wrong_place) == pytest.approx((0.5 * 0.5, 1.0))
  prf = M.vcsl_prf(GT, preds)
  assert prf['precision'] == pytest.approx((1 + 1 + 0) / 3) and prf['recall'] == pytest.approx(1.0)


def test_descriptor_ap_matches_brute_force():
  rng = np.random.default_rng(0)
  truth = {(f'Q{i}', f'R{j}') for i in range(6) for j in range(6) if rng.random() < 0.3}
  preds = [vsc.Pair(f'Q{i}', f'R{j}', float(rng.random())) for i in range(6) for j in range(6)
           if rng.random() < 0.7]
  ranked = sorted(preds, key=lambda p: -p.score)
  brute = sum(sum(q.pair in truth for q in ranked[:k + 1]) / (k + 1)
              for k, p in enumerate(ranked) if p.pair in truth) / len(truth)
  assert M.descriptor_ap(truth, preds).ap == pytest.approx(brute)


def test_csv_round_trip_and_errors(tmp_path):
  path = str(tmp_path / 'm.csv')
  vsc.write_matches(path, GT)
  assert vsc.read_matches(path) == GT
  vsc.write_pairs(str(tmp_path / 'p.csv'), vsc.pairs_from_matches(GT))
  assert vsc.read_pairs(str(tmp_path / 'p.csv')) == vsc.pairs_from_matches(GT)
  gt = tmp_path / 'gt.csv'
  gt.write_text('query_id,ref_id,query_start,query_end,ref_start,ref_end\nQ1,R1,0,10,20,30\n')
  assert vsc.read_matches(str(gt), ground_truth=True) == [GT[0]]
  bad = {'Q1,R1,0,10,20\n': 'fields', 'Q1,R1,0,x,20,30,1\n': 'not a number',
         'Q1,R1,5,1,20,30,1\n': 'before', 'Q1,R1,-1,1,20,30,1\n': 'negative', ',R1,0,1,2,3,1\n': 'empty'}
  header = ','.join(vsc.MATCH_COLUMNS) + '\n'
  for line, why in bad.items():
    (tmp_path / 'bad.csv').write_text(header + 'Q0,R0,0,1,0,1,0.5\n' + line)
    with pytest.raises(vsc.VscFormatError, match=rf'bad.csv:3: .*{why}'):
      vsc.read_matches(str(tmp_path / 'bad.csv'))
  (tmp_path / 'bad.csv').write_text('query_id,ref_id,query_start,query_end,ref_start,score\n')
  with pytest.raises(vsc.VscFormatError, match='bad.csv:1: missing column ref_end'):
    vsc.read_matches(str(tmp_path / 'bad.csv'))
  (tmp_path / 'bad.csv').write_text('query_id,ref_id,score\nQ1,R1,1\nQ1,R1,2\n')
  with pytest.raises(vsc.VscFormatError, match='bad.csv:3: pair Q1,R1 already listed on line 2'):
    vsc.read_pairs(str(tmp_path / 'bad.csv'))


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'hapvr_jax.eval_matching', *args], cwd=ROOT, env=os.environ,
                        capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(tmp_path):
  vsc.write_matches(str(tmp_path / 'gt.csv'), GT)
  vsc.write_matches(str(tmp_path / 'pred.csv'), [m('Q1', 'R1', 5, 10, 25, 30, 0.9), m('Q7', 'R1', 0, 1, 0, 1)])
  # the descriptor track from its own file: the true pair ranked below a false one -> AP 1/2
  vsc.write_pairs(str(tmp_path / 'pairs.csv'), [vsc.Pair('Q2', 'R2', 0.5), vsc.Pair('Q1', 'R2', 0.8)])
  out = tmp_path / 'eval'
  r = _cli(f'--predictions={tmp_path / "pred.csv"}', f'--ground_truth={tmp_path / "gt.csv"}', f'--output={out}',
           f'--descriptor_predictions={tmp_path / "pairs.csv"}')
  assert r.returncode == 0, r.stderr
  metrics = json.loads((out / 'metrics.json').read_text())
  # the unknown query first (1 s per axis, no overlap), then 5 of the 20 s of truth: P 5/6 at R 1/4
  assert metrics['matching_micro_ap'] == pytest.approx(5 / 6 * 0.25)
  assert metrics['descriptor_micro_ap'] == pytest.approx(0.5 * 0.5)   # 1 of 2 true pairs, at precision 1/2
  assert metrics['unknown_id_predictions'] == 1 and metrics['false_pair_predictions'] == 1
  assert (out / 'pr_curve.png').read_bytes()[:4] == b'\x89PNG'
  assert 'matching_micro_ap' in r.stdout
  assert sorted(os.listdir(out)) == ['metrics.json', 'pr_curve.png']   # no temporary left behind
  (tmp_path / 'pred.csv').write_text(','.join(vsc.MATCH_COLUMNS) + '\nQ1,R1,0,10,20,30\n')
  r = _cli(f'--predictions={tmp_path / "pred.csv"}', f'--ground_truth={tmp_path / "gt.csv"}')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [f'error: {tmp_path / "pred.csv"}:2: 6 fields, the header has 7']
  (tmp_path / 'gt.csv').write_text(','.join(vsc.MATCH_COLUMNS[:-1]) + '\nQ1,R1,0,10,-2,30\n')
  r = _cli(f'--predictions={tmp_path / "pairs.csv"}', f'--ground_truth={tmp_path / "gt.csv"}')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [f'error: {tmp_path / "gt.csv"}:2: negative time ref_start=-2']


def test_evaluate_counts():
  metrics, _ = eval_matching.evaluate(GT, GT)
  assert metrics['matching_micro_ap'] == pytest.approx(1.0) and metrics['false_pair_predictions'] == 0
