"""AVHash split lists and audio-visual feature files.

Split lists are plain text, one video per line, comma separated, no header (blank lines are skipped):

* ``fcvid``:       ``video_id,label`` with **1-based** labels 1..239 (``--0K_j-zexM,76``).
* ``activitynet``: ``video_id,frame_count,label[,label,...]`` with **0-based** labels 0..199
  (``v_DFAodsf1dWk,6943,10,10,10``). ``frame_count`` is ignored (it must be present); the original uses **only the
  first label**; the extra labels (one per annotated segment) are checked to be valid labels and are returned
  only on request (``all_labels=True``, for a multi-label variant).

``read_list`` returns 0-based labels for both datasets (FCVID's are shifted by -1, as the original's one-hot
does). Every malformed line is an error naming file and line; so is a video id listed twice.
``check_train_classes`` rejects a class with a single training video (positive sampling needs another video
of the same class) and a list with fewer than ``n_neg + 1`` classes (negatives come from distinct classes).

Features: two HDF5 files (image, audio), one group per video id holding a ``vectors`` dataset float32
``[25, 768]``. ``AVFeatures`` opens the files lazily (the handles are dropped on pickling so worker processes
reopen their own), ``check_ids`` reports ids missing from either file up front, and ``read`` validates group,
shape, dtype and finiteness of each video as it is read, naming the file and id on failure.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import h5py
import numpy as np

NUM_CLASSES = {'fcvid': 239, 'activitynet': 200}
FRAMES, DIM = 25, 768


class ListError(ValueError):
  """A split list is missing or malformed; the message names the file (and line) and the problem."""


class AVFeatureError(ValueError):
  """A feature file is missing or a video in it is absent or malformed; the message names file and id."""


def _label(text: str, path, number: int, dataset: str) -> int:
  n = NUM_CLASSES[dataset]
  lo, hi = (1, n) if dataset == 'fcvid' else (0, n - 1)
  try:
    value = int(text)
  except ValueError:
    raise ListError(f'{path}:{number}: label {text!r} is not an integer') from None
  if not lo <= value <= hi:
    raise ListError(f'{path}:{number}: label {value} outside {lo}..{hi} ({dataset} labels are '
                    f'{"1" if dataset == "fcvid" else "0"}-based)')
  return value - lo


def read_list(path, dataset: str, all_labels: bool = False) -> Tuple[List[str], object]:
  """``(ids, labels)`` of a split list; labels int64 ``[N]`` 0-based (first label for ActivityNet).

  With ``all_labels`` (ActivityNet) ``labels`` is a list of sorted tuples of the distinct labels per video.
  """
  if dataset not in NUM_CLASSES:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {sorted(NUM_CLASSES)}')
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise ListError(f'{path}: ' + ('file not found' if isinstance(e, FileNotFoundError)
                                   else f'cannot be read ({e})')) from None
  try:
    text = raw.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    raise ListError(f'{path}: not UTF-8 text ({e})') from None
  ids, labels, seen = [], [], {}
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    fields = [x.strip() for x in line.split(',')]
    if dataset == 'fcvid' and len(fields) != 2:
      raise ListError(f'{path}:{number}: expected "video_id,label", got {line.strip()!r}')
    if dataset == 'activitynet' and len(fields) < 3:
      raise ListError(f'{path}:{number}: expected "video_id,frame_count,label[,label...]", '
                      f'got {line.strip()!r}')
    vid = fields[0]
    if not vid or any(c.isspace() for c in vid):
      raise ListError(f'{path}:{number}: invalid video id {vid!r}')
    if dataset == 'activitynet' and not fields[1]:
      raise ListError(f'{path}:{number}: empty frame_count field')
    if vid in seen:
      raise ListError(f'{path}:{number}: video {vid!r} listed twice (first at line {seen[vid]})')
    seen[vid] = number
    first = 1 if dataset == 'fcvid' else 2
    found = [_label(x, path, number, dataset) for x in fields[first:]]
    ids.append(vid)
    labels.append(tuple(sorted(set(found))) if all_labels else found[0])
  if not ids:
    raise ListError(f'{path}: the list is empty')
  return ids, (labels if all_labels else np.asarray(labels, np.int64))


def check_train_classes(labels: Sequence[int], path='train list', n_neg: int = 4) -> Dict[int, int]:
  """Class sizes of a training list; a class with a single video or too few classes is an error."""
  counts = Counter(int(c) for c in labels)
  single = sorted(c for c, n in counts.items() if n == 1)
  if single:
    raise ListError(f'{path}: {len(single)} class(es) have a single training video (e.g. label {single[0]}, '
                    '0-based); positive sampling needs >= 2 videos per class')
  if len(counts) < n_neg + 1:
    raise ListError(f'{path}: {len(counts)} classes; {n_neg} negatives from distinct other classes need '
                    f'>= {n_neg + 1}')
  return dict(counts)


class AVFeatures:
  """Lazy, validated reader of the image and audio HDF5 files; picklable (handles reopen after unpickling)."""

  def __init__(self, image_h5: str, audio_h5: str, frames: int = FRAMES, dim: int = DIM):
    for p in (image_h5, audio_h5):
      if not os.path.isfile(p):
        raise AVFeatureError(f'{p}: feature file not found')
    self.paths = {'image': image_h5, 'audio': audio_h5}
    self.shape = (frames, dim)
    self._h5 = {}

  def _file(self, kind: str) -> h5py.File:
    if kind not in self._h5:
      try:
        self._h5[kind] = h5py.File(self.paths[kind], 'r')
      except OSError as e:
        raise AVFeatureError(f'{self.paths[kind]}: not a readable HDF5 file ({e})') from e
    return self._h5[kind]

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_h5'] = {}
    return state

  def close(self) -> None:
    for f in self._h5.values():
      f.close()
    self._h5 = {}

  def check_ids(self, ids: Sequence[str], list_path='list') -> None:
    """Every id must be a group in both files; the error names the first missing id, the file and the list."""
    for kind in ('image', 'audio'):
      f = self._file(kind)
      missing = [v for v in ids if v not in f]
      if missing:
        raise AVFeatureError(f'{self.paths[kind]}: video {missing[0]!r} from {list_path} is not in the {kind} '
                             f'file ({len(missing)} of {len(ids)} ids missing)')

  def _read_one(self, kind: str, video_id: str) -> np.ndarray:
    path, f = self.paths[kind], self._file(kind)
    if video_id not in f:
      raise AVFeatureError(f'{path}: video {video_id!r} is not in the {kind} file')
    group = f[video_id]
    if not isinstance(group, h5py.Group) or 'vectors' not in group:
      raise AVFeatureError(f'{path}: {video_id!r} is not a group holding a "vectors" dataset')
    ds = group['vectors']
    if not isinstance(ds, h5py.Dataset):
      raise AVFeatureError(f'{path}: {video_id}/vectors is not a dataset')
    if tuple(ds.shape) != self.shape:
      raise AVFeatureError(f'{path}: video {video_id!r} has shape {tuple(ds.shape)}; expected {self.shape}')
    if not np.issubdtype(ds.dtype, np.floating):
      raise AVFeatureError(f'{path}: video {video_id!r} has dtype {ds.dtype}; expected float32')
    try:
      x = np.asarray(ds[()], np.float32)
    except OSError as e:
      raise AVFeatureError(f'{path}: video {video_id!r} cannot be read ({e})') from e
    if not np.all(np.isfinite(x)):
      raise AVFeatureError(f'{path}: video {video_id!r} has {int(x.size - np.isfinite(x).sum())} NaN/Inf values')
    return x

  def read(self, video_id: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(image, audio)`` float32 ``[25, 768]`` each, validated."""
    return self._read_one('image', video_id), self._read_one('audio', video_id)
