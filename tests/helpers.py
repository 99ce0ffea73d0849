"""Setups shared by the test files of several packages: random unit features, a small FIVR-format benchmark,
and a SIGTERM sent to the test process once a training run has logged its first step."""
from __future__ import annotations

import os
import pickle
import signal
import threading
import time

import h5py
import numpy as np


def unit_features(rng: np.random.Generator, shape) -> np.ndarray:
  """Gaussian float32 features of `shape`, L2-normalised along the last axis."""
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_fivr(folder, queries, database, dims: int, frames_step: int, seed: int = 1):
  """A FIVR-5K-format benchmark in `folder` (a pathlib.Path): annotations where queries qa and qb have v0-v3 as
  ND/DS/CS relatives and v9 is an easy duplicate, and features f.hdf5 holding video i of queries + database as
  [6 + frames_step * i, 4, dims] unit vectors. Returns (annotations folder, features path)."""
  rng = np.random.default_rng(seed)
  ann = folder / 'ann'
  ann.mkdir()
  split = {'queries': queries, 'database': set(database)}
  with open(ann / 'fivr_audio.pickle', 'wb') as f:
    pickle.dump({'5k': split, '200k': split,
                 'annotation': {'qa': {'ND': ['v0'], 'DS': ['v1']}, 'qb': {'ND': ['v2'], 'CS': ['v3']}}}, f)
  (ann / 'fivr_easy_duplicates.txt').write_text('v9\n')
  features = str(folder / 'f.hdf5')
  with h5py.File(features, 'w') as f:
    for i, v in enumerate(queries + database):
      f[v] = unit_features(rng, (6 + frames_step * i, 4, dims))
  return ann, features


def sigterm_after_first_step(workdir: str) -> threading.Thread:
  """Starts a thread that sends this process SIGTERM as soon as workdir/train.jsonl has a line (a training
  run logged its first step): the run then saves a checkpoint and stops. Join the thread after the run."""
  log = os.path.join(workdir, 'train.jsonl')

  def kill_after_first_step():
    while not (os.path.exists(log) and os.path.getsize(log) > 0):
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
  killer = threading.Thread(target=kill_after_first_step, daemon=True)
  killer.start()
  return killer
