"""Reading DnS-format feature files: one HDF5 dataset per video id at the file root, float [T, 9, 512]
(or [T, D], read as [T, 1, D]) at one frame per second.

Videos are read one at a time (FIVR-200K's file is ~400 GB): `lengths()` reads only the dataset shapes,
`read()` one video. Every read is validated, and a bad video stops the run with an error naming the file and
the id, where the original silently skipped it: a wanted id stored as a group or a broken link, and a video
whose region count differs from the others' (a [T, 7, 512] or [T, 512] video in a [T, 9, 512] file), are
errors too. Short videos are tiled as the original's loader does: the whole array is concatenated with itself
while it is shorter than `min_len` (so 3 frames become 12 with min_len 8, not 8).
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Optional

import h5py
import numpy as np
from absl import logging


class FeatureError(ValueError):
  pass


def tile_min_len(x: np.ndarray, min_len: int) -> np.ndarray:
  while x.shape[0] < min_len:
    x = np.concatenate([x, x], axis=0)
  return x


def tiled_length(n: int, min_len: int) -> int:
  while n < min_len:
    n *= 2
  return n


class FeatureFile:
  """Lazy, validated access to a DnS-format HDF5 feature file.

  The h5py handle is opened on first use and reopened after pickling, so the object can be handed to worker
  processes or threads that each read their own videos.
  """

  def __init__(self, path: str, dims: Optional[int] = None, min_len: int = 1):
    if not os.path.isfile(path):
      raise FeatureError(f'{path}: feature file not found')
    self.path = path
    self.dims = dims
    self.min_len = min_len
    self._h5 = None
    self._layout = None   # (regions, video id, shape) of the first video seen: every other must match

  def _file(self) -> h5py.File:
    if self._h5 is None:
      try:
        self._h5 = h5py.File(self.path, 'r')
      except OSError as e:
        raise FeatureError(f'{self.path}: not a readable HDF5 file ({e})') from e
    return self._h5

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_h5'] = None
    return state

  def close(self) -> None:
    if self._h5 is not None:
      self._h5.close()
      self._h5 = None

  def ids(self, wanted: Iterable[str] = ()) -> set:
    """The video ids in the file (datasets at the root). Other objects are ignored, except that an id of
    `wanted` stored as a group or a broken link is an error (silently dropping it would change the results)."""
    f = self._file()
    items = dict(f.items())   # a broken external link reads as None
    for vid in sorted(set(wanted) & set(items)):
      if not isinstance(items[vid], h5py.Dataset):
        what = 'a broken link' if items[vid] is None else f'a {type(items[vid]).__name__.lower()}'
        raise FeatureError(f'{self.path}: {vid!r} is {what}, not a feature dataset [T, R, D]')
    return {k for k, v in items.items() if isinstance(v, h5py.Dataset)}

  def _dataset(self, video_id: str) -> h5py.Dataset:
    f = self._file()
    if video_id not in f:
      raise FeatureError(f'{self.path}: video {video_id!r} is not in the file')
    ds = f[video_id]
    if not isinstance(ds, h5py.Dataset):
      raise FeatureError(f'{self.path}: {video_id!r} is a group, not a feature dataset')
    if ds.ndim not in (2, 3):
      raise FeatureError(f'{self.path}: video {video_id!r} has shape {ds.shape}; expected [T, R, D] or [T, D]')
    if not np.issubdtype(ds.dtype, np.floating):
      raise FeatureError(f'{self.path}: video {video_id!r} has dtype {ds.dtype}; expected float16/32/64 features')
    if self.dims is not None and ds.shape[-1] != self.dims:
      raise FeatureError(f'{self.path}: video {video_id!r} has feature dimension {ds.shape[-1]} '
                         f'(shape {ds.shape}); the model expects {self.dims}')
    if ds.shape[0] == 0 or (ds.ndim == 3 and ds.shape[1] == 0):
      raise FeatureError(f'{self.path}: video {video_id!r} is empty (shape {ds.shape})')
    self._check_regions(video_id, ds.shape)
    return ds

  def _check_regions(self, video_id: str, shape) -> None:
    """Every video must have the first one's region count ([T, D] counts as one region)."""
    regions = 1 if len(shape) == 2 else int(shape[1])
    if self._layout is None:
      self._layout = (regions, video_id, tuple(shape))
    elif regions != self._layout[0]:
      first_regions, first, first_shape = self._layout
      raise FeatureError(f'{self.path}: video {video_id!r} has shape {tuple(shape)} ({regions} region(s) per '
                         f'frame), but video {first!r} has shape {first_shape} ({first_regions}); all videos of a '
                         'feature file need the same region count')

  def raw_length(self, video_id: str) -> int:
    return int(self._dataset(video_id).shape[0])

  def lengths(self, video_ids: Iterable[str]) -> np.ndarray:
    """Frame counts after min_len tiling, from the dataset shapes only (no feature data is read)."""
    return np.array([tiled_length(self.raw_length(v), self.min_len) for v in video_ids], np.int64)

  def regions(self, video_id: str) -> int:
    ds = self._dataset(video_id)
    return 1 if ds.ndim == 2 else int(ds.shape[1])

  def read(self, video_id: str) -> np.ndarray:
    """float32 [T, R, D], validated (finite values) and tiled to at least min_len frames."""
    ds = self._dataset(video_id)
    try:
      x = ds[()]
    except OSError as e:  # a corrupt chunk, a failed decompression
      raise FeatureError(f'{self.path}: video {video_id!r} cannot be read ({e})') from e
    if not np.all(np.isfinite(x)):
      bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
      raise FeatureError(f'{self.path}: video {video_id!r} has {bad} NaN/Inf values')
    x = tile_min_len(np.asarray(x, np.float32), self.min_len)
    return x[:, None, :] if x.ndim == 2 else x

  def content_digest(self, video_ids: Iterable[str]) -> str:
    """sha1 over each video's id, shape, dtype and its first, middle and last frame: identifies the content
    a run reads (an in-place rewrite of the same size changes it) while reading 3 frames a video, not 400 GB."""
    h = hashlib.sha1()
    for vid in video_ids:
      ds = self._dataset(vid)
      n = ds.shape[0]
      h.update(f'{vid}:{ds.shape}:{ds.dtype}'.encode('utf-8'))
      for i in sorted({0, n // 2, n - 1}):
        try:
          h.update(ds[i].tobytes())
        except OSError as e:
          raise FeatureError(f'{self.path}: video {vid!r} cannot be read ({e})') from e
    return h.hexdigest()[:16]


def open_split(bench, features: str, model_config):
  """(feature file, queries, database): the benchmark's videos present in the feature file, in benchmark
  order; an error if no query or no database video is there."""
  ff = FeatureFile(features, dims=model_config.dims, min_len=model_config.min_len)
  present = ff.ids(wanted=set(bench.queries) | set(bench.database))
  queries = [q for q in bench.queries if q in present]
  database = [d for d in bench.database if d in present]
  logging.info('%s: %d/%d queries and %d/%d database videos found in %s', bench.name, len(queries),
               len(bench.queries), len(database), len(bench.database), features)
  if not queries or not database:
    raise FeatureError(f'{features}: holds {len(queries)} of the {len(bench.queries)} '
                       f'{bench.name} queries and {len(database)} database videos; nothing to score')
  return ff, queries, database
