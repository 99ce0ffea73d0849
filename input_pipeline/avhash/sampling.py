"""Training-tuple sampling of AVHash: per anchor, every epoch, a positive and n_neg negatives.

An epoch is one pass over all training videos as anchors. For the anchor at position i of its class c (n_c
videos, in list order):

* positive: the video at position ``(i + U{1..n_c−1}) mod n_c`` of class c — uniformly one of the *other*
  videos of the class (so a class with a single training video is an error, as in the original);
* negatives: ``n_neg = 4`` (the original's ``pn − 1``) **distinct** classes drawn uniformly without
  replacement from all classes other than c, in random order, and one uniformly random video of each.

The original draws with python/numpy global state inside ``Dataset.__getitem__``; here one epoch's draws are a
pure function of ``(seed, epoch)``: ``np.random.Generator(PCG64(SeedSequence([seed, epoch])))``. The result is an
int64 index array ``[N, 2 + n_neg]`` into the training list, columns ``(anchor, positive, neg_1 … neg_n)``;
rows follow the list order (anchor column = ``arange(N)``) unless ``shuffle=True`` permutes them with the same
generator (the original's DataLoader shuffles; a data pipeline may equally shuffle batches itself).

Errors (`SamplingError`, a ValueError) name the culprit: a class with a single video (its label), fewer than
``n_neg + 1`` classes, malformed labels, a negative seed or epoch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

N_NEG = 4
SEED = 3346


class SamplingError(ValueError):
  """The labels cannot be sampled as the original does (the message names the class or argument)."""


def _generator(seed: int, epoch: int) -> np.random.Generator:
  for name, v in (('seed', seed), ('epoch', epoch)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise SamplingError(f'{name} must be a non-negative integer; got {v!r}')
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))


class TupleSampler:
  """Precomputes the class structure of ``labels`` once; `sample(epoch)` draws one epoch's tuples."""

  def __init__(self, labels: Sequence[int], n_neg: int = N_NEG, seed: int = SEED, name: str = 'training labels'):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
      raise SamplingError(f'{name}: labels must be a non-empty 1-D sequence; got shape {labels.shape}')
    if not np.issubdtype(labels.dtype, np.integer):
      raise SamplingError(f'{name}: labels must be integers; got dtype {labels.dtype}')
    if isinstance(n_neg, bool) or not isinstance(n_neg, (int, np.integer)) or n_neg < 1:
      raise SamplingError(f'n_neg must be a positive integer; got {n_neg!r}')
    _generator(seed, 0)                                   # validates seed
    classes, cls_of, counts = np.unique(labels, return_inverse=True, return_counts=True)
    single = classes[counts == 1]
    if single.size:
      raise SamplingError(f'{name}: class {int(single[0])} has a single video ({single.size} such class(es)); '
                          'the positive must be another video of the same class, so every class needs >= 2')
    if classes.size < n_neg + 1:
      raise SamplingError(f'{name}: {classes.size} classes; {n_neg} negatives from distinct other classes need '
                          f'>= {n_neg + 1}')
    self.name, self.n_neg, self.seed = name, int(n_neg), int(seed)
    self.classes = classes                                # sorted original labels
    self.class_index = cls_of.astype(np.int64)            # [N] 0..C-1
    self.counts = counts.astype(np.int64)                 # [C]
    order = np.argsort(self.class_index, kind='stable')   # members of each class, in list order
    self.members = order.astype(np.int64)                 # [N] CSR values
    self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)   # [C]
    self.position = np.empty_like(self.members)           # position of each video within its class
    self.position[order] = np.arange(labels.size) - self.starts[self.class_index[order]]

  @property
  def num_videos(self) -> int:
    return int(self.class_index.size)

  def sample(self, epoch: int, shuffle: bool = False) -> np.ndarray:
    """int64 ``[N, 2 + n_neg]``: ``(anchor, positive, negatives…)`` indices into the list, for ``epoch``."""
    rng = _generator(self.seed, epoch)
    n, c_num, m = self.num_videos, self.classes.size, self.n_neg
    anchor = np.arange(n, dtype=np.int64)
    c = self.class_index
    n_c = self.counts[c]
    # Positive: (i + U{1..n_c-1}) mod n_c within the anchor's class.
    shift = rng.integers(1, n_c)                          # U{1..n_c-1}, n_c >= 2
    positive = self.members[self.starts[c] + (self.position + shift) % n_c]
    # Negatives: a uniformly random ordered sample of m distinct classes other than c (smallest random keys,
    # the anchor's class excluded by an infinite key), then one uniform video of each.
    keys = rng.random((n, c_num))
    keys[anchor, c] = np.inf
    pick = np.argpartition(keys, m - 1, axis=1)[:, :m]     # m <= C - 1 < C
    pick = np.take_along_axis(pick, np.argsort(np.take_along_axis(keys, pick, 1), axis=1), 1)
    offset = rng.integers(0, self.counts[pick])
    negatives = self.members[self.starts[pick] + offset]
    out = np.concatenate([anchor[:, None], positive[:, None], negatives], axis=1)
    if shuffle:
      out = out[rng.permutation(n)]
    return out


def sample_tuples(labels: Sequence[int], seed: int, epoch: int, n_neg: int = N_NEG,
                  shuffle: bool = False) -> np.ndarray:
  """One-shot form of ``TupleSampler(labels, n_neg, seed).sample(epoch, shuffle)``."""
  return TupleSampler(labels, n_neg=n_neg, seed=seed).sample(epoch, shuffle=shuffle)
