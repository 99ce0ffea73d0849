"""Retrieval benchmarks: annotation loaders and metrics for FIVR-5K, FIVR-200K, EVVE and SVD.

The evaluation protocol of the HAP-VR code base (``datasets/fivr.py``, ``evve.py``, ``svd.py``)
computed on a dense score matrix ``sims[query, database]`` instead of a dict of dicts. Each dataset
keeps its own AP convention:

* FIVR mAP and every µAP: non-interpolated AP, ``sum_k prec@k * rel_k / |GT|``;
* EVVE mAP: trapezoidal AP from 0-based ranks (INRIA's ``score_ap_from_ranks_1``);
* SVD mAP: step-wise AP, tied scores merged into one threshold (scikit-learn's ``average_precision_score``).

Tie order: a stable sort by descending score, ties in ``db_ids`` order (reproducible, where the original's
FIVR sort is not); pooled (µAP) rankings
break ties by (query, database) order, queries in sorted order. Videos that were not loaded leave the
candidates and the ground truth as the original's ``all_db`` logic does. Numpy only at import. The annotation
pickles come from third-party repositories: they are read with common_jax.safe_pickle, which refuses anything
but plain data before any of it runs.
"""
from pathlib import Path

import numpy as np

from common_jax import safe_pickle

NAMES = ('fivr_5k', 'fivr_200k', 'evve', 'svd')
_LEVEL = {'ND': 0, 'DS': 0, 'CS': 1, 'IS': 2}  # FIVR task t (DS, CS, IS) uses the labels of level <= t
_TASKS = (('DSVR', 'DSVD'), ('CSVR', 'CSVD'), ('ISVR', 'ISVD'))


class AnnotationError(ValueError):
  """An annotation file is missing or malformed; the message names the file (and line) and the problem."""


def _fail(path, what):
  raise AnnotationError(f'{path}: {what}')


def _read(path):
  try:
    return Path(path).read_bytes()
  except OSError as e:
    _fail(path, 'file not found' if isinstance(e, FileNotFoundError) else f'cannot be read ({e})')


def _load_pickle(path, keys):
  raw = _read(path)
  try:
    data = safe_pickle.loads(raw, str(path), 'an annotation pickle')
  except safe_pickle.UnsafePickleError as e:
    raise AnnotationError(str(e)) from None
  except Exception as e:  # any unpickling failure means a corrupt or foreign file
    _fail(path, f'cannot be unpickled ({type(e).__name__}: {e})')
  if not isinstance(data, dict) or not set(keys) <= data.keys():
    got = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
    _fail(path, f'expected a dict with keys {sorted(keys)}, got {got}')
  return data


def _ids(value, path, what):
  """``value`` as a list, checked to be a list/tuple/set of string ids."""
  if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
    _fail(path, f'{what} must be a list or set of string ids, got {type(value).__name__}')
  return list(value)


def _lines(path, n_fields, expected):
  """Yields (line number, fields) of the non-blank lines of a text file, each with ``n_fields`` fields."""
  raw = _read(path)
  try:
    text = raw.decode()
  except UnicodeDecodeError as e:
    _fail(path, f'not UTF-8 text ({e})')
  for number, line in enumerate(text.splitlines(), 1):
    if line.strip():
      if len(line.split()) != n_fields:
        _fail(path, f'line {number}: expected {expected}, got {line.strip()!r}')
      yield number, line.split()


# ----------------------------------------------------------------------------------------------- ranking & AP
def _rank(sims, rows):
  """Ranks the candidates of every row and locates the tracked ones, without a pooled sort of all pairs.

  ``rows``: ``(r, cand, tracked)`` per query; the candidates of row ``r`` of ``sims`` are the columns ``cand``
  (in tie-break order) and ``tracked`` indexes into ``cand``. A row ranks by descending score, ties by
  position; the pooled ranking of all rows breaks ties by (row, position). Returns per row the 0-based
  positions of its tracked candidates and the number of its candidates scoring >= each (ties included), and
  the pooled 0-based ranks of all tracked candidates.
  """
  tracked = [np.asarray(t, np.int64) for _, _, t in rows]
  bounds = np.cumsum([0] + [t.size for t in tracked])
  keys = np.concatenate([-sims[r, c[t]] for (r, c, _), t in zip(rows, tracked)] + [np.zeros(0, sims.dtype)])
  values, value_of = np.unique(keys, return_inverse=True)  # distinct tracked keys (-score), ascending
  # Pooled counts per distinct tracked key, searching the smaller array into the larger: every value into
  # each row (``higher``: keys < value), or each row's keys into the values (``higher``: per slot, summed
  # at the end).
  by_value = values.size <= max((len(c) for _, c, _ in rows), default=0)
  higher = np.zeros(values.size + (not by_value), np.int64)
  equal_seen = np.zeros(values.size, np.int64)  # candidates of the rows done so far with key == values[u]
  pooled, own, ge = np.zeros(keys.size, np.int64), [], []
  for j, (r, cand, _) in enumerate(rows):
    lo, hi = bounds[j], bounds[j + 1]
    k, kt = -sims[r, cand], keys[lo:hi]
    ks = np.sort(k)
    above, at_least = np.searchsorted(ks, kt, 'left'), np.searchsorted(ks, kt, 'right')
    position = above
    if np.any(at_least - above > 1):  # a tracked candidate shares its score: order the ties by column
      position = np.empty(k.size, np.int64)
      position[np.argsort(k, kind='stable')] = np.arange(k.size)
      position = position[tracked[j]]
    pooled[lo:hi] = equal_seen[value_of[lo:hi]] + position - above  # ties: earlier rows, earlier columns
    if by_value:
      below = np.searchsorted(ks, values, 'left')
      higher += below
      equal_seen += np.searchsorted(ks, values, 'right') - below
    else:
      slot = np.searchsorted(values, ks, 'left')
      np.add.at(higher, slot, 1)
      equal = slot < values.size
      equal[equal] = values[slot[equal]] == ks[equal]
      np.add.at(equal_seen, slot[equal], 1)
    own.append(position)
    ge.append(at_least)
  if not by_value:  # keys <= values[u], minus those equal to it
    higher = np.cumsum(higher)[:-1] - equal_seen
  pooled += higher[value_of]  # candidates of every row scoring strictly higher
  return own, ge, pooled


def _ap_from_ranks(ranks, gt_len):
  """Non-interpolated AP (FIVR's ``calculate_metric``) of relevant items at 0-based ``ranks``; nan: no GT."""
  if gt_len == 0:
    return float('nan')
  ranks = np.sort(np.asarray(ranks))
  return float(np.sum(np.arange(1, ranks.size + 1) / (ranks + 1.0)) / gt_len)


def _trapezoid_ap(ranks, n_pos):
  """EVVE AP: trapezoids of width 1/n_pos between precisions ntp/rank (1 at rank 0) and (ntp+1)/(rank+1)."""
  if n_pos == 0 or len(ranks) == 0:
    return 0.0
  ranks, ntp = np.sort(np.asarray(ranks)).astype(np.float64), np.arange(len(ranks))
  left = np.where(ranks == 0, 1.0, ntp / np.maximum(ranks, 1.0))
  return float(np.sum(left + (ntp + 1) / (ranks + 1)) / (2.0 * n_pos))


def _stepwise_ap(at_least):
  """scikit-learn AP, sum_n (R_n - R_{n-1}) P_n over distinct scores.

  A positive reached together with ``at_least`` candidates adds precision tp/at_least, tp = positives scoring
  >= it. Without positives: 0.0, which scikit-learn 1.9 returns (with a warning)."""
  if len(at_least) == 0:
    return 0.0
  at_least = np.asarray(at_least)
  return float(np.mean(np.searchsorted(np.sort(at_least), at_least, 'right') / at_least))


def _pooled_curve(ranks, gt_len):
  """Precision and recall of a ranking at each relevant item (the corners of its precision-recall curve)."""
  hits = np.arange(1, len(ranks) + 1)
  return hits / (np.sort(np.asarray(ranks)) + 1.0), hits / max(gt_len, 1)


def average_precision(y_true, y_score, kind='stable', gt_len=None):
  """AP of one ranking, on the code path of ``evaluate``.

  kind: 'stable' (FIVR and every µAP; gt_len defaults to the positives in y_true), 'trapezoid' (EVVE) or
  'stepwise' (SVD, scikit-learn; gt_len ignored)."""
  score, positive = np.asarray(y_score, np.float64), np.flatnonzero(np.asarray(y_true, bool))
  (ranks,), (at_least,), _ = _rank(score[None], [(0, np.arange(score.size), positive)])
  n_pos = positive.size if gt_len is None else gt_len
  metrics = {'stable': lambda: _ap_from_ranks(ranks, n_pos), 'trapezoid': lambda: _trapezoid_ap(ranks, n_pos),
             'stepwise': lambda: _stepwise_ap(at_least)}
  if kind not in metrics:
    raise ValueError(f'unknown AP kind {kind!r}; valid: {", ".join(metrics)}')
  return metrics[kind]()


def pr_curve(y_true, y_score, gt_len=None):
  """(precision, recall) after each candidate ranked by descending score (stable sort); recall over gt_len
  (default: the positives in y_true)."""
  y = np.asarray(y_true, bool)[np.argsort(-np.asarray(y_score, np.float64), kind='stable')]
  tp = np.cumsum(y)
  return tp / np.arange(1.0, y.size + 1), tp / max(int(y.sum()) if gt_len is None else gt_len, 1)


def plot_pr_curves(curves, path, title=None):
  """Writes a PNG (atomically) with one line per ``label: (precision, recall)``."""
  from common_jax import plots
  fig = plots.figure((5, 5))
  ax = fig.add_subplot()
  for label, (precision, recall) in curves.items():  # at most 20k points per line
    keep = np.unique(np.linspace(0, len(recall) - 1, min(len(recall), 20000)).astype(np.int64))
    ax.plot(np.asarray(recall)[keep], np.asarray(precision)[keep], label=label)
  ax.set(xlabel='recall', ylabel='precision', xlim=(0, 1), ylim=(0, 1.02), title=title or '')
  ax.grid(alpha=0.3)
  if curves:
    ax.legend(loc='lower left')
  plots.save_png(fig, path, dpi=120)


# ------------------------------------------------------------------------------------------------- benchmarks
class Benchmark:
  """A loaded benchmark; ``evaluate`` checks its inputs, subclasses compute the metrics in ``_evaluate``."""
  name: str
  queries: list
  database: list

  def evaluate(self, sims, query_ids, db_ids):
    """Metrics of ``sims[i, j]`` = similarity of ``query_ids[i]`` to ``db_ids[j]`` (the loaded videos)."""
    sims, queries, db_ids = self._check(sims, query_ids, db_ids)
    metrics = self._evaluate(sims, queries, db_ids)
    metrics.update(num_queries=len(queries), num_missing_queries=len(self.queries) - len(queries),
                   num_database=len(db_ids))
    return metrics

  def pr_curves(self, sims, query_ids, db_ids):
    """{label: (precision, recall)} of the pooled µAP rankings at each relevant pair, for plot_pr_curves."""
    curves = {}
    self._evaluate(*self._check(sims, query_ids, db_ids), curves=curves)
    return curves

  def _check(self, sims, query_ids, db_ids):
    """Validated (float sims, [(query id, row)] in sorted query order, db ids)."""
    query_ids, db_ids, sims = list(map(str, query_ids)), list(map(str, db_ids)), np.asarray(sims)
    if sims.shape != (len(query_ids), len(db_ids)):
      raise ValueError(f'{self.name}: sims has shape {sims.shape}, expected {(len(query_ids), len(db_ids))}')
    sims = sims if np.issubdtype(sims.dtype, np.floating) else sims.astype(np.float64)
    if np.isnan(sims).any():
      raise ValueError(f'{self.name}: sims contains NaN')
    for kind, ids, known in (('query', query_ids, self.queries), ('database', db_ids, self.database)):
      if len(set(ids)) != len(ids):
        raise ValueError(f'{self.name}: duplicate {kind} ids')
      unknown = sorted(set(ids).difference(known))
      if unknown:
        raise ValueError(f'{self.name}: {len(unknown)} {kind} ids not in the benchmark, e.g. {unknown[:3]}')
    row = {q: i for i, q in enumerate(query_ids)}
    return sims, [(q, row[q]) for q in self.queries if q in row], db_ids


class FIVR(Benchmark):
  """FIVR-5K/200K (fivr_audio.pickle): mAP (DSVR/CSVR/ISVR) and µAP (DSVD/CSVD/ISVD); '_h' drops the easy
  duplicates (fivr_easy_duplicates.txt) from the database.

  Per query, GT = task labels ∩ all_db - {q} and the candidates are all_db - {q}, all_db = database ∩ loaded
  ids (loaded queries included: a GT video loaded only as a query counts in |GT| but cannot be retrieved, as
  in the original). Queries with an empty GT are left out of the mAP; their pairs stay in the µAP pool."""

  def __init__(self, version, annotation_path, easy_path):
    data = _load_pickle(annotation_path, (version, 'annotation'))
    split, annotation = data[version], data['annotation']
    if not (isinstance(split, dict) and {'queries', 'database'} <= split.keys()
            and isinstance(annotation, dict)):
      _fail(annotation_path, f"'{version}' must be a dict with 'queries' and 'database', 'annotation' a dict")
    self.name = f'FIVR-{version.upper()}'
    self.queries = sorted(_ids(split['queries'], annotation_path, f"'{version}' queries"))
    self.database = sorted(set(_ids(split['database'], annotation_path, f"'{version}' database")))
    self.gt = {}  # query -> {video: lowest task level of its labels}
    for q in self.queries:
      if not isinstance(annotation.get(q), dict):
        _fail(annotation_path, f"query {q!r} has no {{label: [video ids]}} entry in 'annotation'")
      self.gt[q] = {}
      for label in ('IS', 'CS', 'DS', 'ND'):
        for vid in _ids(annotation[q].get(label, []), annotation_path, f'annotation[{q!r}][{label!r}]'):
          self.gt[q][vid] = _LEVEL[label]
    self.easy_duplicates = frozenset(f[0] for _, f in _lines(easy_path, 1, 'one video id'))

  def _evaluate(self, sims, queries, db_ids, curves=None):
    loaded = set(self.database).intersection(set(db_ids).union(q for q, _ in queries))
    col = dict(zip(db_ids, range(len(db_ids))))
    easy = np.isin(np.asarray(db_ids, dtype=str), sorted(self.easy_duplicates))
    out = {}
    for suffix, keep, db in (('', np.ones_like(easy), loaded), ('_h', ~easy, loaded - self.easy_duplicates)):
      cols, at = np.flatnonzero(keep), np.cumsum(keep) - 1  # at[c]: index of kept column c within cols
      rows, counts, levels = [], [], []
      for q, r in queries:
        n, tracked, level = np.zeros(3, np.int64), [], []
        for vid, lv in self.gt[q].items():
          if vid != q and vid in db:
            n[lv] += 1
            if vid in col:
              tracked.append(at[col[vid]])
              level.append(lv)
        cand, tracked = cols, np.asarray(tracked, np.int64)
        if q in col and keep[col[q]]:  # the query is never its own candidate
          cand = np.delete(cols, at[col[q]])
          tracked -= tracked > at[col[q]]
        rows.append((r, cand, tracked))
        counts.append(np.cumsum(n))
        levels.append(np.asarray(level, np.int64))
      own, _, pooled = _rank(sims, rows)
      pooled_level = np.concatenate(levels + [np.zeros(0, np.int64)])
      for t, (retrieval, detection) in enumerate(_TASKS):
        aps = [_ap_from_ranks(w[lv <= t], c[t]) for w, lv, c in zip(own, levels, counts) if c[t] > 0]
        out[retrieval + suffix] = float(np.mean(aps)) if aps else float('nan')
        n_gt = int(sum(c[t] for c in counts))
        out[detection + suffix] = _ap_from_ranks(pooled[pooled_level <= t], n_gt)
        if curves is not None and not suffix:
          curves[f'{self.name} {detection}'] = _pooled_curve(pooled[pooled_level <= t], n_gt)
    return out


class EVVE(Benchmark):
  """EVVE (evve.pickle): mean trapezoidal AP over all evaluated queries (EVVE_mAP, and per event), µAP.

  Candidates: all loaded database videos (the query is not excluded); positives: event positives ∩ loaded
  ids (all_db = loaded queries and database videos)."""

  def __init__(self, path):
    data = _load_pickle(path, ('annotation', 'queries', 'database'))
    self.name, events = 'EVVE', data['annotation']
    self.queries = sorted(_ids(data['queries'], path, "'queries'"))
    self.database = sorted(set(_ids(data['database'], path, "'database'")))
    if not isinstance(events, dict) or any(not isinstance(v, (tuple, list)) or len(v) != 3
                                           for v in events.values()):
      _fail(path, "'annotation' must be a dict {event: (queries, positives, null)}")
    self.events, self.query_to_event = {}, {}
    for event, (event_queries, positives, _) in events.items():
      self.events[event] = frozenset(_ids(positives, path, f'positives of event {event!r}'))
      for q in _ids(event_queries, path, f'queries of event {event!r}'):
        if self.query_to_event.setdefault(q, event) != event:
          _fail(path, f'query {q!r} belongs to events {self.query_to_event[q]!r} and {event!r}')
    orphans = sorted(set(self.queries) - self.query_to_event.keys())
    if orphans:
      _fail(path, f'{len(orphans)} queries belong to no event, e.g. {orphans[:3]}')

  def _evaluate(self, sims, queries, db_ids, curves=None):
    loaded = set(db_ids).union(q for q, _ in queries)
    col, cand = dict(zip(db_ids, range(len(db_ids)))), np.arange(len(db_ids))
    rows, n_pos = [], []
    for q, r in queries:
      positives = self.events[self.query_to_event[q]] & loaded
      rows.append((r, cand, [col[p] for p in positives if p in col]))
      n_pos.append(len(positives))
    own, _, pooled = _rank(sims, rows)
    aps = [_trapezoid_ap(w, n) for w, n in zip(own, n_pos)]
    if curves is not None:
      curves['EVVE uAP'] = _pooled_curve(pooled, sum(n_pos))
    out = {'EVVE_mAP': float(np.mean(aps)) if aps else float('nan'),
           'EVVE_uAP': _ap_from_ranks(pooled, sum(n_pos))}
    event_of = [self.query_to_event[q] for q, _ in queries]
    for event in sorted(set(event_of)):
      out[f'EVVE_mAP/{event}'] = float(np.mean([a for e, a in zip(event_of, aps) if e == event]))
    return out


class SVD(Benchmark):
  """SVD (test_groundtruth, optional unlabeled-data-id): mean scikit-learn AP over queries and pooled µAP.

  A query's candidates are its own loaded labelled targets plus every loaded distractor (label 0; a distractor
  labelled for the query itself counts once, with its label). A query without a loaded candidate scores 0,
  like one without positives."""

  def __init__(self, groundtruth_path, distractor_path=None):
    self.name, self.labels = 'SVD', {}
    for number, (q, c, label) in _lines(groundtruth_path, 3, "'query target label'"):
      if label not in ('0', '1'):
        _fail(groundtruth_path, f'line {number}: label must be 0 or 1, got {label!r}')
      if self.labels.setdefault(q, {}).setdefault(c, int(label)) != int(label):
        _fail(groundtruth_path, f'line {number}: pair {q} {c} was labelled differently before')
    if not self.labels:
      _fail(groundtruth_path, 'no labelled pairs')
    self.distractors = None
    if distractor_path is not None:
      self.distractors = sorted({f[0] for _, f in _lines(distractor_path, 1, 'one video id')})
    self.queries = sorted(self.labels)
    self.database = sorted(set().union(*self.labels.values(), self.distractors or ()))

  def _evaluate(self, sims, queries, db_ids, curves=None):
    col = dict(zip(db_ids, range(len(db_ids))))
    distractor = np.isin(np.asarray(db_ids, dtype=str), np.asarray(self.distractors or [], dtype=str))
    rows = []
    for q, r in queries:
      own = np.asarray([(col[c], y) for c, y in self.labels[q].items() if c in col], np.int64).reshape(-1, 2)
      mask = distractor.copy()
      mask[own[:, 0]] = True
      rows.append((r, np.flatnonzero(mask), np.cumsum(mask)[own[own[:, 1] == 1, 0]] - 1))
    _, at_least, pooled = _rank(sims, rows)
    aps = [_stepwise_ap(g) for g in at_least]
    if curves is not None:
      curves['SVD uAP'] = _pooled_curve(pooled, pooled.size)
    protocol = ('labelled pairs only (no unlabeled-data-id)' if self.distractors is None else
                f'labelled pairs + {int(distractor.sum())} of {len(self.distractors)} distractors')
    return {'mAP': float(np.mean(aps)) if aps else float('nan'), 'uAP': _ap_from_ranks(pooled, pooled.size),
            'protocol': protocol}


def load_benchmark(name, annotations_dir):
  """Loads 'fivr_5k', 'fivr_200k', 'evve' or 'svd' from the original annotation files in annotations_dir."""
  key, root = str(name).lower().replace('-', '_'), Path(annotations_dir)
  if key in ('fivr_5k', 'fivr_200k'):
    return FIVR(key[5:], root / 'fivr_audio.pickle', root / 'fivr_easy_duplicates.txt')
  if key == 'evve':
    return EVVE(root / 'evve.pickle')
  if key == 'svd':
    distractors = root / 'unlabeled-data-id'
    return SVD(root / 'test_groundtruth', distractors if distractors.exists() else None)
  raise ValueError(f'unknown benchmark {name!r}; valid names: {", ".join(NAMES)}')
