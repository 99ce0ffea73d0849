"""A SYNTHETIC FIVR-format corpus of region features, for demos and tests (never a benchmark result).

Each source video is a sequence of "shots"; a frame's 9 region features are its shot's region vectors plus
per-frame noise, L2-normalised per region, as the DnS features are. Each query gets planted relatives in the
database, mimicking FIVR's labels:

  ND  near-duplicate: the whole query, re-noised, with a small temporal crop
  DS  duplicate scene: a temporal crop of half the query at 2x slow motion, inserted into unrelated footage
  CS  complementary scene: another recording of the same shots (region vectors partly replaced, re-noised)
  IS  incident scene: the same incident filmed differently (only a few region vectors shared)

plus unrelated distractors. The files are written in the original formats: `fivr_audio.pickle` (with the
same ids under both '5k' and '200k'), `fivr_easy_duplicates.txt` and a DnS-format HDF5 feature file.
"""
from __future__ import annotations

import os
import string

import h5py
import numpy as np

from common_jax import io_util

_ALPHABET = np.array(list(string.ascii_letters + string.digits + '-_'))


def random_ids(rng, n, prefix=''):
  """n distinct YouTube-like 11-character ids (sorted), with an optional prefix."""
  out = set()
  while len(out) < n:
    out.add(prefix + ''.join(rng.choice(_ALPHABET, 11)))
  return sorted(out)


def normalise(x):
  """L2-normalised along the last axis, float32 (as the DnS region features)."""
  return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def write_fivr_files(directory, features, queries, database, annotation, easy) -> str:
  """The original FIVR formats: `fivr_audio.pickle` (the same split under '5k' and '200k'),
  `fivr_easy_duplicates.txt` and a DnS-format `features.hdf5` ({id: [T, R, D]}), each written atomically.
  Returns the feature file's path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, 'features.hdf5')
  tmp = path + '.tmp'
  with h5py.File(tmp, 'w') as f:
    for vid in sorted(features):
      f.create_dataset(vid, data=features[vid])
  os.replace(tmp, path)
  split = {'queries': list(queries), 'database': set(database)}
  io_util.write_pickle(os.path.join(directory, 'fivr_audio.pickle'),
                       _plain({'5k': split, '200k': split, 'annotation': annotation}))
  with io_util.atomic_open(os.path.join(directory, 'fivr_easy_duplicates.txt')) as f:
    f.write(''.join(f'{d}\n' for d in sorted(easy)))
  return path


def _plain(obj):
  """Python builtins only (NumPy strings and numbers as str/int/float): annotation pickles are read back
  with an unpickler that refuses every other type."""
  if isinstance(obj, dict):
    return {_plain(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple, set)):
    return type(obj)(_plain(v) for v in obj)
  return obj.item() if isinstance(obj, np.generic) else obj


class _Maker:

  def __init__(self, rng, dims, regions=9):
    self.rng, self.dims, self.regions = rng, dims, regions

  def shots(self, n):
    return self.rng.normal(size=(n, self.regions, self.dims))

  def render(self, shots, lengths, noise=0.6):
    frames = np.concatenate([np.repeat(s[None], n, 0) for s, n in zip(shots, lengths)])
    return frames + noise * self.rng.normal(size=frames.shape)

  def video(self, min_len=20, max_len=80):
    n_shots = int(self.rng.integers(3, 7))
    lengths = self.rng.multinomial(int(self.rng.integers(min_len, max_len)) - n_shots, [1 / n_shots] * n_shots) + 1
    shots = self.shots(n_shots)
    return shots, lengths


def make_fivr_corpus(directory: str, num_queries: int = 10, num_database: int = 200, dims: int = 512,
                     seed: int = 0) -> dict:
  """Writes the corpus to `directory`; returns {'features': path, 'annotations': directory, 'ids': ...}."""
  rng = np.random.default_rng(seed)
  m = _Maker(rng, dims)
  per_query = {'ND': 2, 'DS': 2, 'CS': 2, 'IS': 2}
  n_related = num_queries * sum(per_query.values())
  if num_database < n_related:
    raise ValueError(f'num_database={num_database} is smaller than the {n_related} planted relatives')
  ids = random_ids(rng, num_queries + num_database)
  queries, database = ids[:num_queries], ids[num_queries:]
  order = rng.permutation(len(database))
  features, annotation, easy = {}, {}, []
  k = 0
  for q in queries:
    shots, lengths = m.video()
    features[q] = m.render(shots, lengths)
    annotation[q] = {}
    for label, count in per_query.items():
      annotation[q][label] = []
      for _ in range(count):
        d = database[order[k]]
        k += 1
        annotation[q][label].append(d)
        if label == 'ND':
          x = m.render(shots, lengths, noise=0.7)
          a = int(rng.integers(0, 3))
          x = x[a:len(x) - int(rng.integers(0, 3))]
          if rng.random() < 0.5:
            easy.append(d)
        elif label == 'DS':
          half = max(4, int(lengths.sum()) // 2)
          start = int(rng.integers(0, int(lengths.sum()) - half + 1))
          part = np.repeat(m.render(shots, lengths, 0.7)[start:start + half], 2, 0)
          s2, l2 = m.video(10, 30)
          x = np.concatenate([m.render(s2, l2), part])
        elif label == 'CS':
          alt = shots.copy()
          mask = rng.random(alt.shape[:2]) < 0.5
          alt[mask] = m.shots(len(shots))[mask]
          x = m.render(alt, rng.permutation(lengths), noise=0.8)
        else:  # IS
          alt = m.shots(len(shots))
          mask = rng.random(alt.shape[:2]) < 0.25
          alt[mask] = shots[mask]
          x = m.render(alt, lengths, noise=0.8)
        features[d] = x
  for d in database:
    if d not in features:
      shots, lengths = m.video()
      features[d] = m.render(shots, lengths)
  path = write_fivr_files(directory, {vid: normalise(x) for vid, x in features.items()}, queries, database,
                          annotation, easy)
  return {'features': path, 'annotations': directory, 'queries': queries, 'database': database}
