"""Metrics of the Video Similarity Challenge 2022 and of VCSL, on hapvr_jax.vsc's Match and Pair records.

Matching-track micro-AP (segment level): predictions from all pairs are sorted by score, highest first, and
taken in groups of equal score. After each group, on each time axis (query, reference), the union of a pair's
predicted intervals is intersected with the union of its ground-truth intervals, counting only the
ground-truth segments whose rectangle (query span x reference span) overlaps a predicted rectangle; summed
over pairs this gives precision = overlap / predicted length and recall = overlap / ground-truth length per
axis. P and R are the geometric means of the two axes, and the AP is sum P * (R - previous R) over the groups.
Overlapping or repeated predictions count their time once (a union), so a duplicate adds nothing. A
prediction for a pair without ground truth (including a query or reference the ground truth never names)
adds predicted length and no overlap: a false positive.

Descriptor-track micro-AP (pair level): candidate pairs sorted by score; AP = (1/#true pairs) * sum over each
group of equal score of (true pairs in the group) * precision after the group, which for distinct scores is
the usual sum of precision at each true pair.

VCSL segment precision/recall, per video pair: on each axis, precision is the time each predicted box shares
with the ground-truth boxes it overlaps (as rectangles), summed over predicted boxes and divided by their
summed length; recall the same with the roles swapped; P and R are the products of the two axes. A pair with
predictions and no ground truth has P 0 and R 1, one with ground truth and no prediction P 1 and R 0. Pairs
(those in the ground truth or the predictions) are averaged per query, then over queries; F = 2PR / (P + R).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict

import numpy as np


class MetricError(ValueError):
  pass


def union(intervals) -> list[tuple[float, float]]:
  """Sorted, disjoint intervals covering the same time as `intervals`."""
  out = []
  for s, e in sorted(intervals):
    if out and s <= out[-1][1]:
      out[-1] = (out[-1][0], max(out[-1][1], e))
    else:
      out.append((s, e))
  return out


def length(intervals) -> float:
  return sum(e - s for s, e in union(intervals))


def overlap(a, b) -> float:
  """The length of time in both interval sets."""
  a, b = union(a), union(b)
  total, i, j = 0.0, 0, 0
  while i < len(a) and j < len(b):
    total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
    if a[i][1] < b[j][1]:
      i += 1
    else:
      j += 1
  return total


def _boxes_overlap(a, b) -> bool:
  return (min(a.query_end, b.query_end) > max(a.query_start, b.query_start) and
          min(a.ref_end, b.ref_end) > max(a.ref_start, b.ref_start))


def pair_overlaps(gts, preds) -> tuple[list[float], list[float], list[float]]:
  """Per axis: (overlap, predicted length, ground-truth length) of one video pair."""
  hit = [g for g in gts if any(_boxes_overlap(g, p) for p in preds)]
  inter, pred_len, gt_len = [], [], []
  for axis in (0, 1):
    p = [m.interval(axis) for m in preds]
    inter.append(overlap(p, [g.interval(axis) for g in hit]))
    pred_len.append(length(p))
    gt_len.append(length([g.interval(axis) for g in gts]))
  return inter, pred_len, gt_len


@dataclasses.dataclass
class AP:
  ap: float
  precisions: np.ndarray   # the PR curve: one point where recall grew
  recalls: np.ndarray
  scores: np.ndarray


def _by_pair(matches):
  out = defaultdict(list)
  for m in matches:
    out[m.pair].append(m)
  return out


def matching_ap(gts, predictions) -> AP:
  """VSC matching-track segment-level micro-AP."""
  gt_pairs = _by_pair(gts)
  gt_total = [sum(length([g.interval(a) for g in v]) for v in gt_pairs.values()) for a in (0, 1)]
  if min(gt_total) <= 0:
    raise MetricError('the ground truth has no segment of positive length: the matching AP is undefined')
  preds = defaultdict(list)
  state = {}   # pair -> (overlap per axis, predicted length per axis)
  inter, total = [0.0, 0.0], [0.0, 0.0]
  ap, recall, curve = 0.0, 0.0, []
  for score, group in itertools.groupby(sorted(predictions, key=lambda m: -m.score), key=lambda m: m.score):
    touched = set()
    for m in group:
      preds[m.pair].append(m)
      touched.add(m.pair)
    for pair in touched:   # only the pairs this group changed are recomputed
      i, p, _ = pair_overlaps(gt_pairs.get(pair, []), preds[pair])
      old_i, old_p = state.get(pair, ([0.0, 0.0], [0.0, 0.0]))
      for a in (0, 1):
        inter[a] += i[a] - old_i[a]
        total[a] += p[a] - old_p[a]
      state[pair] = (i, p)
    new_recall = math.sqrt(inter[0] / gt_total[0] * inter[1] / gt_total[1])
    precision = math.sqrt(inter[0] / total[0] * inter[1] / total[1]) if min(total) > 0 else 0.0
    if new_recall > recall:
      ap += precision * (new_recall - recall)
      recall = new_recall
      curve.append((precision, recall, score))
  return _ap(ap, curve)


def _ap(ap, curve) -> AP:
  p, r, s = (np.array(c, np.float64) for c in zip(*curve)) if curve else (np.zeros(0),) * 3
  return AP(float(ap), p, r, s)


def descriptor_ap(gt_pairs, predictions) -> AP:
  """VSC descriptor-track pair-level micro-AP; `gt_pairs`: the (query_id, ref_id) of every true pair."""
  positives = set(gt_pairs)
  if not positives:
    raise MetricError('the ground truth has no pair: the descriptor AP is undefined')
  seen, correct, ap, curve = 0, 0, 0.0, []
  for score, group in itertools.groupby(sorted(predictions, key=lambda p: -p.score), key=lambda p: p.score):
    hits = [p.pair in positives for p in group]
    seen, correct = seen + len(hits), correct + sum(hits)
    if any(hits):
      ap += sum(hits) * correct / seen / len(positives)
      curve.append((correct / seen, correct / len(positives), score))
  return _ap(ap, curve)


def _clip(a, b, axis):
  """The part of `a`'s interval on `axis` inside `b`'s."""
  (s0, e0), (s1, e1) = a.interval(axis), b.interval(axis)
  return max(s0, s1), min(e0, e1)


def _covered(boxes, others, axis) -> tuple[float, float]:
  """(sum over `boxes` of the time each shares with the `others` it overlaps, sum of their lengths)."""
  shared = sum(length([_clip(b, o, axis) for o in others if _boxes_overlap(b, o)]) for b in boxes)
  return shared, sum(b.interval(axis)[1] - b.interval(axis)[0] for b in boxes)


def _ratio(boxes, others) -> float:
  """The product over both axes of the covered fraction of `boxes`' own (summed) length."""
  out = 1.0
  for axis in (0, 1):
    shared, total = _covered(boxes, others, axis)
    out *= shared / total if total > 0 else 0.0
  return out


def vcsl_pair_pr(gts, preds) -> tuple[float, float]:
  """VCSL's (precision, recall) of one video pair; a pair with no prediction has precision 1 and recall 0,
  one with no ground truth precision 0 and recall 1."""
  if not gts or not preds:
    return (1.0 if not preds else 0.0), (1.0 if not gts else 0.0)
  return _ratio(preds, gts), _ratio(gts, preds)


def vcsl_prf(gts, predictions) -> dict:
  """VCSL's segment-level precision, recall and F-score over the pairs in the ground truth or predictions,
  averaged over each query's pairs and then over queries."""
  gt_pairs, pred_pairs = _by_pair(gts), _by_pair(predictions)
  per_query = defaultdict(list)
  for pair in set(gt_pairs) | set(pred_pairs):
    per_query[pair[0]].append(vcsl_pair_pr(gt_pairs.get(pair, []), pred_pairs.get(pair, [])))
  if not per_query:
    return {'precision': 0.0, 'recall': 0.0, 'f_score': 0.0}
  precision, recall = np.mean([np.mean(v, axis=0) for v in per_query.values()], axis=0).tolist()
  f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return {'precision': precision, 'recall': recall, 'f_score': f}
