"""Coarse video descriptors for the shortlist stage of a search: one unit vector per video, compared by inner
product (cosine), cheap enough to score every video of a large collection before the similarity network
re-ranks a shortlist.

`describe(features)` maps a video's region features [T, R, D] (or [T, D]) to a float32 unit vector of
`dim(D)` values. The default is pooled regions: each frame's regions are averaged and L2-normalised, the
frames are averaged and the result L2-normalised again. It needs no training and keeps the whitened feature
space in which near-duplicate frames lie close.

Why this one (bench/coarse_to_fine.py, synthetic FIVR-5K-shaped corpus, features-only fine stage; synthetic
figures do not transfer to real data): pooled regions keep 99.7% of the exhaustive DSVR with 5% of the
database re-ranked (99.9% at 10%), at 24x (12x) less time per query, from one vector per video (2 KB; IVF-PQ
for millions) and a 3 ms exact search over 5,000 videos. Per-frame descriptors with kNN voting
(`frame_descriptors`) shortlist partial copies better (100% of the DSVR at 1%) but store T vectors per video
and their exact search costs ~300 ms per query here, so they win only below ~2%. A coarse student trained on
the network's scores (DnS) was not measured: it needs a trained network and real training videos.
"""
from __future__ import annotations

import numpy as np

METHOD = 'pooled_regions'


def dim(feature_dims: int) -> int:
  """Length of the descriptor of a video whose regions have `feature_dims` values."""
  return feature_dims


def _unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _frames(features) -> np.ndarray:
  x = np.asarray(features, np.float32)
  if x.ndim == 2:
    x = x[:, None]
  if x.ndim != 3 or x.shape[0] == 0:
    raise ValueError(f'features of shape {x.shape}: expected [T, R, D] or [T, D] with T > 0')
  return _unit(x.mean(axis=1))


def frame_descriptors(features: np.ndarray) -> np.ndarray:
  """Per-frame descriptors [T, dim(D)] (float32, unit norm): the frame-level alternative, searched by kNN with
  each query frame voting for the videos of its nearest frames (T vectors per video instead of one)."""
  return _frames(features).astype(np.float32)


def describe(features: np.ndarray) -> np.ndarray:
  """The descriptor [dim(D)] (float32, unit norm) of one video's features [T, R, D] or [T, D]."""
  return _unit(_frames(features).mean(axis=0)).astype(np.float32)
