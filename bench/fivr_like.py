"""A SYNTHETIC corpus of FIVR-5K's shape for the coarse-to-fine bench: 50 queries, 5,000 database videos, region
features [T, 9, 512] in the DnS format with FIVR's annotation files. Its numbers never transfer to real data.

Videos are sequences of shots; a frame's regions are its shot's region vectors plus per-frame noise, unit
norm. Every shot leans towards one of `topics` shared directions (per region), so unrelated videos of a topic
are mildly alike, as footage of one kind is. Per query, planted relatives of graded difficulty:

  ND  3  the whole query re-noised (noise 0.6 -> 1.0), a few frames cropped at either end
  DS  5  a part of the query (75% -> 25% of it; every second one at 2x slow motion) inside unrelated
         footage, the copy making 60% -> 15% of the database video
  CS  3  the same shots with 30% -> 60% of their region vectors replaced, shots reordered
  IS  3  new shots sharing 40% -> 20% of the query's region vectors
  hard distractors (unlabelled) 25: every region vector correlated with the query's (rho 0.35 -> 0.55), so a
         pooled descriptor finds them closer than the partial copies while no frame is a copy

and unrelated videos for the rest. Lengths are short (queries 10-24 frames, database 8-32) so that the
exhaustive engine finishes in minutes on 2 CPU cores.
"""
from __future__ import annotations

import numpy as np

from hapvr_jax import synthetic

PLANTED = {'ND': 3, 'DS': 5, 'CS': 3, 'IS': 3}


class _Maker:

  def __init__(self, rng, dims, topics, regions=9, topic_weight=0.5):
    self.rng, self.dims, self.regions, self.topic_weight = rng, dims, regions, topic_weight
    self.topics = rng.normal(size=(topics, regions, dims))

  def shots(self, n, topic=None):
    topic = self.rng.integers(len(self.topics)) if topic is None else topic
    return self.topic_weight * self.topics[topic] + self.rng.normal(size=(n, self.regions, self.dims))

  def lengths(self, total, n_shots):
    return self.rng.multinomial(total - n_shots, [1 / n_shots] * n_shots) + 1

  def video(self, min_len, max_len, topic=None):
    total = int(self.rng.integers(min_len, max_len + 1))
    n_shots = int(self.rng.integers(2, min(6, total) + 1))
    return self.shots(n_shots, topic), self.lengths(total, n_shots)

  def render(self, shots, lengths, noise=0.6):
    frames = np.concatenate([np.repeat(s[None], n, 0) for s, n in zip(shots, lengths)])
    return frames + noise * self.rng.normal(size=frames.shape)


def _grade(i, n, lo, hi):
  """The i-th of n values from lo to hi (the difficulty grading of planted copies)."""
  return lo + (hi - lo) * i / max(n - 1, 1)


def _planted(m, rng, label, i, shots, lengths):
  n = PLANTED[label]
  if label == 'ND':
    x = m.render(shots, lengths, noise=_grade(i, n, 0.6, 1.0))
    return x[int(rng.integers(0, 3)):len(x) - int(rng.integers(0, 3))]
  if label == 'DS':
    q = m.render(shots, lengths, noise=0.7)
    part = max(4, int(round(len(q) * _grade(i, n, 0.75, 0.25))))
    start = int(rng.integers(0, len(q) - part + 1))
    copy = q[start:start + part]
    copy = np.repeat(copy, 2, 0) if i % 2 else copy
    share = _grade(i, n, 0.6, 0.15)
    other = max(4, int(round(len(copy) * (1 - share) / share)))
    s2, l2 = m.video(other, other)
    x = m.render(s2, l2)
    at = int(rng.integers(0, len(x) + 1))
    return np.concatenate([x[:at], copy, x[at:]])
  if label == 'CS':
    alt = shots.copy()
    mask = rng.random(alt.shape[:2]) < _grade(i, n, 0.3, 0.6)
    alt[mask] = m.shots(len(shots))[mask]
    order = rng.permutation(len(shots))
    return m.render(alt[order], lengths[order], noise=0.8)
  alt = m.shots(len(shots))   # IS
  mask = rng.random(alt.shape[:2]) < _grade(i, n, 0.4, 0.2)
  alt[mask] = shots[mask]
  return m.render(alt, lengths, noise=0.8)


def make(directory: str, num_queries: int = 50, num_database: int = 5000, distractors: int = 25,
         dims: int = 512, topics: int = 100, seed: int = 0, dtype=np.float16) -> dict:
  """Writes features.hdf5, fivr_audio.pickle and fivr_easy_duplicates.txt into `directory`."""
  rng = np.random.default_rng(seed)
  m = _Maker(rng, dims, topics)
  need = num_queries * (sum(PLANTED.values()) + distractors)
  if num_database < need:
    raise ValueError(f'num_database={num_database} is smaller than the {need} planted videos')
  ids = synthetic.random_ids(rng, num_queries + num_database)
  queries, database = ids[:num_queries], ids[num_queries:]
  free = iter(rng.permutation(database))
  features, annotation, easy, hard = {}, {}, [], {}
  for q in queries:
    topic = int(rng.integers(topics))
    shots, lengths = m.video(10, 24, topic)
    features[q] = m.render(shots, lengths)
    annotation[q] = {label: [] for label in PLANTED}
    for label, n in PLANTED.items():
      for i in range(n):
        d = str(next(free))
        annotation[q][label].append(d)
        features[d] = _planted(m, rng, label, i, shots, lengths)
        if label == 'ND' and i == 0:
          easy.append(d)
    hard[q] = []
    for i in range(distractors):
      d = str(next(free))
      rho = _grade(i, distractors, 0.35, 0.55)
      alt = rho * shots / np.sqrt(1 + m.topic_weight ** 2) + np.sqrt(1 - rho ** 2) * m.shots(len(shots), topic)
      features[d] = m.render(alt, m.lengths(int(rng.integers(8, 33)), len(shots)) if len(shots) <= 8 else lengths)
      hard[q].append(d)
  for d in database:
    if d not in features:
      s, n = m.video(8, 32)
      features[d] = m.render(s, n)
  features = {k: synthetic.normalise(v).astype(dtype) for k, v in features.items()}
  path = synthetic.write_fivr_files(directory, features, queries, database, annotation, easy)
  return {'features': path, 'annotations': directory, 'queries': queries, 'database': database, 'hard': hard}
