"""The AVHash training input pipeline (the original's epochs of training tuples) with the Grain Dataset API.

One epoch = every training video once as an anchor, in the order of `TupleSampler.sample(epoch, shuffle=True)`
(a pure function of (seed, epoch)), cut into ``S = ceil(N / B)`` global batches of B tuples. The last batch of
an epoch is padded to B with zero tuples whose weight is 0, so the loss of that step is the mean over its real
tuples only: the original's ``drop_last=False`` with static shapes (one compilation).

  MapDataset.range(epochs · S · B_local)   local row j → (epoch, batch, global row) of this process
    → map(ReadTuple)                         the tuple's 2 + n_neg videos read from the feature source
    → batch(B_local) → to_iter_dataset → [mp_prefetch(workers)]

A process holds the contiguous rows ``[p · B_local, (p + 1) · B_local)`` of each global batch (B_local =
B / process_count), which are the rows its devices hold in the data-parallel step
(`jax.make_array_from_process_local_data`). One element (per process):

  image   float32 [B_local, 2 + n_neg, T, D]   anchor, positive, negatives (CLIP frame features)
  audio   float32 [B_local, 2 + n_neg, T, D]   the same videos' AST segment features
  weight  float32 [B_local]                    1 for a real tuple, 0 for the padding of an epoch's last batch
  anchor  int64   [B_local]                    the anchor's position in the training list (-1 for padding)

The feature source is anything with ``read(video_id) -> (image, audio)`` and picklable: `AVFeatures` (HDF5,
handles opened lazily in each worker) or `input_pipeline.avhash.shards.AVShardFeatures` (ArrayRecord). The stream
is a pure function of (ids, labels, cfg, seed, process_index, process_count): Grain's iterator
`get_state()/set_state()` resumes exactly at the next batch.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import grain
import numpy as np
from absl import flags

from input_pipeline.avhash import sampling

DEFAULTS = dict(batch_size=128, n_neg=sampling.N_NEG, workers=0, read_threads=4, prefetch_batches=4)


def read_config(cfg) -> Dict[str, Any]:
  get = (lambda k, v: cfg.get(k, v)) if isinstance(cfg, dict) else (lambda k, v: getattr(cfg, k, v))
  c = {k: int(get(k, v)) for k, v in DEFAULTS.items()}
  for key in ('batch_size', 'n_neg', 'read_threads', 'prefetch_batches'):
    if c[key] < 1:
      raise ValueError(f'config.{key} must be >= 1, got {c[key]}')
  if c['workers'] < 0:
    raise ValueError(f'config.workers must be >= 0, got {c["workers"]}')
  return c


def steps_per_epoch(num_videos: int, batch_size: int) -> int:
  return int(math.ceil(num_videos / batch_size))


class ReadTuple(grain.transforms.Map):
  """Local row index → one tuple's features (zeros and weight 0 for an epoch's padding rows)."""

  def __init__(self, features, ids: Sequence[str], labels, *, batch_size: int, n_neg: int, seed: int,
               process_index: int, process_count: int, shape):
    self.features = features
    self.ids = list(ids)
    self.sampler = sampling.TupleSampler(labels, n_neg=n_neg, seed=seed)
    self.batch, self.local = batch_size, batch_size // process_count
    self.offset = process_index * self.local
    self.steps = steps_per_epoch(len(self.ids), batch_size)
    self.shape = tuple(shape)
    self._epoch = None                     # (epoch, tuples [N, 2 + n_neg]) of the last epoch drawn, per process

  def __getstate__(self):
    return dict(self.__dict__, _epoch=None)

  def tuples(self, epoch: int) -> np.ndarray:
    if self._epoch is None or self._epoch[0] != epoch:
      self._epoch = (epoch, self.sampler.sample(epoch, shuffle=True))
    return self._epoch[1]

  def map(self, j):
    j = int(j)
    per_epoch = self.steps * self.local
    epoch, r = divmod(j, per_epoch)
    b, k = divmod(r, self.local)
    row = b * self.batch + self.offset + k            # row of the epoch's tuple order
    width = 2 + self.sampler.n_neg
    image = np.zeros((width,) + self.shape, np.float32)
    audio = np.zeros((width,) + self.shape, np.float32)
    tuples = self.tuples(epoch)
    if row >= len(tuples):
      return dict(image=image, audio=audio, weight=np.float32(0.), anchor=np.int64(-1))
    for slot, index in enumerate(tuples[row]):
      image[slot], audio[slot] = self.features.read(self.ids[index])
    return dict(image=image, audio=audio, weight=np.float32(1.), anchor=np.int64(tuples[row][0]))


def make_dataset(features, ids: Sequence[str], labels, cfg, *, seed: int, epochs: int, shape,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The training stream of one process over `epochs` epochs (see the module docstring)."""
  c = read_config(cfg)
  if len(ids) != len(labels):
    raise ValueError(f'{len(ids)} training ids but {len(labels)} labels')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, process_count={process_count})')
  if c['batch_size'] % process_count:
    raise ValueError(f'config.batch_size={c["batch_size"]} tuples must be divisible by the process count '
                     f'({process_count})')
  if epochs < 1:
    raise ValueError(f'epochs must be >= 1, got {epochs}')
  read = ReadTuple(features, ids, labels, batch_size=c['batch_size'], n_neg=c['n_neg'], seed=seed,
                   process_index=process_index, process_count=process_count, shape=shape)
  ds = grain.MapDataset.range(epochs * read.steps * read.local).map(read)
  ds = ds.batch(read.local, drop_remainder=True)
  out = ds.to_iter_dataset(grain.ReadOptions(num_threads=c['read_threads'],
                                             prefetch_buffer_size=c['prefetch_batches']))
  if c['workers'] > 0:
    if not flags.FLAGS.is_parsed():
      raise ValueError('config.workers > 0 needs parsed absl flags (Grain workers read them): run under '
                       'absl.app.run, or call absl.flags.FLAGS.mark_as_parsed() first')
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=c['workers']))
  return out


def make_iterator(features, ids, labels, cfg, **kw) -> grain.DatasetIterator:
  """A checkpointable iterator (`get_state()` / `set_state()`) over `make_dataset`."""
  return iter(make_dataset(features, ids, labels, cfg, **kw))
