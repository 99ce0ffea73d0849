"""Retrieval metrics of AVHash's test script: mAP@K in two normalisations, P@K, R@K and the PR curve.

Definitions, for one query whose ranked list has relevant items at 1-based ranks
``pos_1 < ... < pos_{R_K}`` among the first K, with ``S_K = sum_j j / pos_j`` (sum of precision at each hit):

* ``mAP@K``        AVHash-style, what the original's ``mean_average_precision`` computes: ``AP = S_K / R_K``
                   (divided by the relevant items *retrieved*), and 0 for a query without a hit in the top K (it
                   still counts in the mean). ``mAP@all`` is the same over the whole ranked database; it is the
                   metric the original uses for best-val model selection.
* ``mAP@K_ssvh``   SSVH-literature style (ConMH/S5VH/AutoSSVH ``mAP`` tool, the original's unused
                   ``mean_average_precision_2``): ``AP = S_K / K``. Not defined for ``all``.
* ``P@K`` = ``R_K / K``; ``R@K`` = ``R_K / N_rel`` with ``N_rel`` the relevant items in the whole database
  (0 for a query with no relevant item, where the original would divide by zero).
* PR curve: mean ``P@k`` and ``R@k`` at ``k`` = 1, 21, 41, 61, 81, 101, 131, 161, 191, 201, 251, 301, 351, then
  401, 601, ... (step 200), every point ``<= N_db``.

Relevance: "share at least one label". Labels are either 1-D class ids (the original's path: single label, for
ActivityNet only the first label of a line) — relevant = same class — or 2-D multi-hot ``[N, C]`` arrays, where
relevant = ``y_q . y_x > 0`` (an optional ActivityNet multi-label variant, not what the repository does).

Self-matches: nothing is removed, as in the original. With AVHash's protocol (test/val queries vs the training
set) the query is not in the database when the split lists are disjoint; under the SSVH all-vs-all protocol the
query is its own first hit (distance 0) and counts, as it does there.

Ties follow ``ranking`` (stable: equal distances in database order). ``evaluate`` ranks and scores one query
chunk at a time, so full-depth metrics over 45,600 x 45,600 need only ``chunk x N_db`` memory.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from avhash_jax import ranking

KS = (5, 10, 20, 40, 60, 80, 100, 200)
_PR_HEAD = (1, 21, 41, 61, 81, 101, 131, 161, 191, 201, 251, 301, 351)


class MetricError(ValueError):
  """Inputs to a metric do not fit together; the message says which ones and how."""


def pr_ks(n_db: int) -> np.ndarray:
  """The cut-offs of the PR curve: the fixed head, then 401, 601, ... — all <= n_db."""
  ks = [k for k in _PR_HEAD if k <= n_db] + list(range(401, n_db + 1, 200))
  return np.asarray(ks, np.int64)


def multi_hot(label_sets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
  """bool ``[N, C]`` from per-video label collections (0-based)."""
  out = np.zeros((len(label_sets), num_classes), bool)
  for i, labels in enumerate(label_sets):
    for c in labels:
      if not 0 <= c < num_classes:
        raise MetricError(f'video {i}: label {c} outside 0..{num_classes - 1}')
      out[i, c] = True
  return out


def _check_labels(q_labels, db_labels):
  q, d = np.asarray(q_labels), np.asarray(db_labels)
  if q.ndim != d.ndim or q.ndim not in (1, 2) or (q.ndim == 2 and q.shape[1] != d.shape[1]):
    raise MetricError(f'query labels {q.shape} and database labels {d.shape} must both be class ids [N] or '
                      'multi-hot [N, C] with the same C')
  return q, d


def relevance(q_labels, db_labels) -> np.ndarray:
  """bool ``[N_q, N_db]``: the pair shares at least one label."""
  q, d = _check_labels(q_labels, db_labels)
  if q.ndim == 1:
    return q[:, None] == d[None, :]
  return (q.astype(np.float32) @ d.astype(np.float32).T) > 0


def n_relevant(q_labels, db_labels, chunk: int = 1024) -> np.ndarray:
  """int64 ``[N_q]``: relevant items per query in the whole database."""
  q, d = _check_labels(q_labels, db_labels)
  if q.ndim == 1:
    classes, counts = np.unique(d, return_counts=True)
    pos = np.clip(np.searchsorted(classes, q), 0, max(len(classes) - 1, 0))
    return np.where((len(classes) > 0) & (classes[pos] == q), counts[pos], 0).astype(np.int64)
  return np.concatenate([relevance(q[s:s + chunk], d).sum(1) for s in range(0, len(q), chunk)] or
                        [np.zeros(0, np.int64)]).astype(np.int64)


def _ranked_relevance(rankings, q, d) -> np.ndarray:
  if q.ndim == 1:
    return d[rankings] == q[:, None]
  return np.take_along_axis(relevance(q, d), rankings, axis=1)  # [chunk, N_db] bool, not [chunk, depth, C]


def _sums(rankings, q, d, ks, n_rel, with_all: bool, pr: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
  """Per-metric sums over the queries of one chunk (means are taken by the caller)."""
  n_db = len(d)
  rel = _ranked_relevance(rankings, q, d)
  depth = rel.shape[1]
  hits = np.cumsum(rel, axis=1, dtype=np.int64)
  s = np.cumsum(np.where(rel, hits / np.arange(1, depth + 1), 0.0), axis=1)
  out = {}

  def at(k):
    if k > depth and depth < n_db:
      raise MetricError(f'rankings hold {depth} of {n_db} items; K={k} needs more')
    return min(k, depth) - 1

  for k in ks:
    i = at(k)
    r = hits[:, i]
    out[f'mAP@{k}'] = np.where(r > 0, s[:, i] / np.maximum(r, 1), 0.0).sum()
    out[f'mAP@{k}_ssvh'] = (s[:, i] / k).sum()
    out[f'P@{k}'] = (r / k).sum()
    out[f'R@{k}'] = np.where(n_rel > 0, r / np.maximum(n_rel, 1), 0.0).sum()
  if with_all:
    i = at(n_db)
    r = hits[:, i]
    out['mAP@all'] = np.where(r > 0, s[:, i] / np.maximum(r, 1), 0.0).sum()
  if pr is not None:
    r = hits[:, [at(k) for k in pr]]
    out['pr_precision'] = (r / pr).sum(0)
    out['pr_recall'] = np.where(n_rel[:, None] > 0, r / np.maximum(n_rel, 1)[:, None], 0.0).sum(0)
  return out


def _finish(total: Dict[str, np.ndarray], n_q: int, pr) -> Dict:
  res = {k: float(v) / n_q for k, v in total.items() if not k.startswith('pr_')}
  if pr is not None:
    res['pr'] = {'k': pr, 'precision': total['pr_precision'] / n_q, 'recall': total['pr_recall'] / n_q}
  return res


def retrieval_metrics(rankings, q_labels, db_labels, ks: Sequence[int] = KS, with_all: Optional[bool] = None,
                      with_pr: bool = False) -> Dict:
  """Metrics from given rankings (database indices ``[N_q, depth]``, best first).

  ``with_all`` (default: whether the rankings cover the whole database) adds ``mAP@all``; ``with_pr`` adds
  ``'pr': {'k', 'precision', 'recall'}`` (needs full-depth rankings for the cut-offs above ``depth``).
  """
  q, d = _check_labels(q_labels, db_labels)
  rankings = np.asarray(rankings)
  if rankings.ndim != 2 or rankings.shape[0] != len(q):
    raise MetricError(f'rankings {rankings.shape} must be [N_q={len(q)}, depth]')
  if len(q) == 0:
    raise MetricError('no queries')
  if with_all is None:
    with_all = rankings.shape[1] == len(d)
  pr = pr_ks(len(d)) if with_pr else None
  total = _sums(rankings, q, d, ks, n_relevant(q, d), with_all, pr)
  return _finish(total, len(q), pr)


def evaluate(q_codes, q_labels, db_codes, db_labels, ks: Sequence[int] = KS, with_all: bool = True,
             with_pr: bool = True, chunk: int = 128) -> Dict:
  """Ranks the database for every query (stable Hamming ranking) and returns all metrics.

  Queries are processed ``chunk`` at a time; when ``mAP@all`` or the PR curve is wanted each chunk is ranked to
  full depth (``chunk x N_db`` memory), otherwise only to ``max(ks)`` without a full distance matrix.
  """
  q, d = _check_labels(q_labels, db_labels)
  if len(q) != len(q_codes) or len(d) != len(db_codes):
    raise MetricError(f'{len(q_codes)} query codes vs {len(q)} labels, {len(db_codes)} database codes vs '
                      f'{len(d)} labels')
  if len(q) == 0:
    raise MetricError('no queries')
  qp, dp = ranking.pack(q_codes), ranking.pack(db_codes)
  top_k = None if (with_all or with_pr) else max(ks)
  pr = pr_ks(len(d)) if with_pr else None
  n_rel = n_relevant(q, d)
  total: Dict[str, np.ndarray] = {}
  for s in range(0, len(q), chunk):
    order = ranking.rank_packed(qp[s:s + chunk], dp, top_k=top_k, chunk=chunk)
    part = _sums(order, q[s:s + chunk], d, ks, n_rel[s:s + chunk], with_all, pr)
    for k, v in part.items():
      total[k] = total.get(k, 0.0) + v
  return _finish(total, len(q), pr)


def plot_pr(curves: Dict[str, Dict], path: str, title: str = 'Precision-recall') -> None:
  """Writes a PNG of one or more PR curves (``{name: result['pr']}``); atomic (tmp file, then rename)."""
  from common_jax import plots
  fig = plots.figure((5, 4))
  ax = fig.add_subplot()
  for name, c in curves.items():
    ax.plot(c['recall'], c['precision'], marker='.', label=name)
  ax.set_xlabel('recall')
  ax.set_ylabel('precision')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if curves:
    ax.legend()
  plots.save_png(fig, path, dpi=120, bbox_inches='tight')
