"""The region attention of every video of a search index, kept beside the index per checkpoint.

Before the frame-to-frame similarity, the network weighs each region vector x of a video by
a = sigmoid(tanh(x W + b) w): a [D, D] product per region vector, which on a short-video index is most of
a search's compute, and the same on every search. `refresh` computes these weights once per (index version,
attention parameters) and keeps them in ATTENTION_FILE, a derived file of the index (one float32 per region
vector, 1/D of the features): a search then hands the engine its targets already weighted, x * a in float32
as SimilarityNetwork.index_video computes it, and the engine does not index them again
(EngineConfig.indexed_targets). A file built at another index version or for other attention parameters,
or one that cannot be read, is rebuilt; an index that cannot be written to (read-only) gets the weights
computed for this search only.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from common_jax import io_util
from common_jax.index_dir import IndexDir

ATTENTION_FILE = 'attention.npz'
FRAMES_PER_CALL = 1024   # region vectors of this many frames per jitted call (the last call: a power of 2)


class Weights:
  """Region attention weights [T, R] (float32) of each video, read by id."""

  def __init__(self, ids, weights: np.ndarray, offsets: np.ndarray):
    self.rows = {v: (int(offsets[k]), int(offsets[k + 1])) for k, v in enumerate(ids)}
    self.weights = weights

  def __getitem__(self, video_id: str) -> np.ndarray:
    start, stop = self.rows[video_id]
    return self.weights[start:stop]

  def apply(self, video_id: str, x: np.ndarray) -> np.ndarray:
    """x [T, R, D] of `video_id` weighed as the network's index_video weighs it (in float32)."""
    out = np.array(x, np.float32)   # a copy, then in place: half the memory traffic of x * a
    out *= self[video_id][..., None]
    return out


def attention_digest(params) -> str:
  from hapvr_jax.engine_state import params_digest
  return params_digest(params['attention'])


def compute(ix: IndexDir, model_config, params, ids) -> tuple:
  """(weights [frames of all `ids`, R] float32, offsets [len(ids) + 1]) through the network's own
  attention module, a bounded number of frames per call."""
  import jax
  from hapvr_jax.model import SimilarityNetwork
  net = SimilarityNetwork(model_config)
  fn = jax.jit(lambda p, x: net.apply({'params': p}, x, method=lambda m, x: m.attention(x)[1][..., 0]))
  regions, dims = ix.config['regions'], ix.config['dims']
  offsets = np.zeros(len(ids) + 1, np.int64)
  pending, parts = [], []

  def flush():
    x = np.concatenate(pending) if pending else np.zeros((0, regions, dims), np.float32)
    n = len(x)
    rows = min(FRAMES_PER_CALL, 1 << max(3, (n - 1).bit_length()))   # few shapes to compile
    padded = np.zeros((rows, regions, dims), np.float32)
    padded[:n] = x
    parts.append(np.asarray(fn(params, padded))[:n])
    pending.clear()

  for k, vid in enumerate(ids):
    x = np.asarray(ix.read(vid, 'features'), np.float32)
    offsets[k + 1] = offsets[k] + len(x)
    while len(x):
      room = FRAMES_PER_CALL - sum(map(len, pending))
      pending.append(x[:room])
      x = x[room:]
      if room <= len(pending[-1]):
        flush()
  if pending:
    flush()
  weights = np.concatenate(parts) if parts else np.zeros((0, regions), np.float32)
  return weights, offsets


def _key(ix: IndexDir, digest: str) -> str:
  return json.dumps({'version': ix.version, 'videos': len(ix), 'attention': digest}, sort_keys=True)


def _load(path: str, key: str, n_ids: int) -> tuple | None:
  """(weights, offsets) of a file built for `key`; None when it is missing, stale or unreadable."""
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f['key']) != key:
        return None
      weights, offsets = f['weights'], f['offsets']
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None
  if len(offsets) != n_ids + 1 or offsets[-1] != len(weights):
    return None
  return weights, offsets


def refresh(ix: IndexDir, model_config, params) -> Weights | None:
  """The attention weights of every live video of `ix` for `params`, from ATTENTION_FILE when it was built
  at this index version for these attention parameters, else computed (and saved where the index is
  writable). None for networks without attention, whose indexing is cheap."""
  if not model_config.attention:
    return None
  ids = ix.ids()
  key = _key(ix, attention_digest(params))
  path = ix.derived_path(ATTENTION_FILE)
  loaded = _load(path, key, len(ids))
  if loaded is None:
    loaded = compute(ix, model_config, params, ids)
    try:
      with io_util.atomic_open(path, 'wb') as f:
        np.savez(f, key=np.array(key), weights=loaded[0], offsets=loaded[1])
    except OSError:
      pass   # a read-only index: this search uses the weights computed in memory
  return Weights(ids, *loaded)


def is_cached(ix: IndexDir, params) -> bool:
  """Whether ATTENTION_FILE holds the weights of this index version for `params`."""
  return os.path.exists(ix.derived_path(ATTENTION_FILE)) and _load(
      ix.derived_path(ATTENTION_FILE), _key(ix, attention_digest(params)), len(ix)) is not None
