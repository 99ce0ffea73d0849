"""The HDF5 extraction format of training views and its conversion to ArrayRecord shards.

**HDF5 extraction format** (`HDF5Store`, `write_hdf5_views`): one or more `*.h5` / `*.hdf5` files, each with
groups /<video_id>/<segment index 0..S-1>/<view>/ where <view> is weak_0, weak_1, ..., strong_0, ..., and each
view group holds datasets `regions` [T, R, D] and `teacher` [T, C] (float; read back as float16) and an optional
attribute `meta` (a JSON string). A video lives in exactly one file. An optional `bank.npz` sits in the same
folder. The index is built from shapes only; data is read (and checked for NaN/Inf) one view at a time.

`convert` (what `python -m input_pipeline.hapvr.make_shards` runs) and `convert_store` write any of these stores as
ArrayRecord shards (`input_pipeline.hapvr.shards`, which re-exports every public name of this module). Errors are
`ShardError`s (`input_pipeline.hapvr.shard_format`) naming the file, video, segment and view at fault.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

import h5py
import numpy as np
import tqdm

from common_jax import io_util
from input_pipeline.hapvr import shards
from input_pipeline.hapvr.shard_format import (BANK, ShardError, check_meta, check_output, check_shapes, check_view,
                                         load_bank, save_bank, view_where)
from input_pipeline.hapvr.store import STRONG, WEAK, IndexedStore, Segment, StoreInfo, ViewStore

_VIEW_NAME = re.compile(r'(weak|strong)_(\d+)')


def _hdf5_files(path: str):
  """(sorted HDF5 files, folder for bank.npz) of a file or a folder of `*.h5` / `*.hdf5` files."""
  if os.path.isfile(path):
    return [path], os.path.dirname(path)
  if not os.path.isdir(path):
    raise ShardError(f'{path}: not found')
  files = sorted(f for f in os.listdir(path) if f.endswith(('.h5', '.hdf5')) and not f.startswith('.'))
  if not files:
    raise ShardError(f'{path}: no *.h5 / *.hdf5 files in this folder')
  return [os.path.join(path, f) for f in files], path


def _open_h5(path: str) -> h5py.File:
  try:
    return h5py.File(path, 'r')
  except OSError as e:
    raise ShardError(f'{path}: not a readable HDF5 file ({e})') from e


class HDF5Store(IndexedStore):
  """Views in the HDF5 extraction format (module docstring). Picklable: h5py handles open lazily per process."""

  def __init__(self, path: str):
    self.path = path
    self._files, folder = _hdf5_files(path)
    self._views, self._ids, self._segments, self._expected, owner = [], [], [], None, {}
    for fi, fn in enumerate(self._files):
      with _open_h5(fn) as f:
        for vid in f:
          if not isinstance(f[vid], h5py.Group):
            raise ShardError(f'{fn}: /{vid} is a dataset; expected groups /<video_id>/<segment>/<view>/ '
                             f'(is this a DnS evaluation feature file?)')
          if vid in owner:
            raise ShardError(f'video {vid!r} is in both {owner[vid]} and {fn} (duplicate video id)')
          owner[vid] = fn
          self._ids.append(vid)
          self._segments.append(self._index_video(fi, fn, vid, f[vid]))
    if not self._ids:
      raise ShardError(f'{path}: no videos')
    (t, r, d), (_, c) = self._expected
    self.info = StoreInfo(frames=t, regions=r, dims=d, teacher_dims=c)
    bank = os.path.join(folder, BANK)
    self._bank = load_bank(bank, self.info) if os.path.isfile(bank) else None
    self._h5, self._pid = {}, None

  def _index_video(self, fi: int, fn: str, vid: str, group) -> List[Segment]:
    names = list(group)
    if not names or sorted(names) != sorted(map(str, range(len(names)))):
      raise ShardError(f'{fn}: video {vid!r} has members {names}; expected segment groups 0..S-1')
    segs = []
    for s in range(len(names)):
      sg, views = group[str(s)], {WEAK: {}, STRONG: {}}
      if not isinstance(sg, h5py.Group):
        raise ShardError(f'{fn}: video {vid!r} segment {s} is a dataset; expected a group of views')
      for name in sg:
        m = _VIEW_NAME.fullmatch(name)
        if not m or int(m[2]) in views[m[1]] or not isinstance(sg[name], h5py.Group):
          raise ShardError(f'{fn}: video {vid!r} segment {s}: unexpected member {name!r}; views are groups '
                           f'named weak_<i> / strong_<i>')
        views[m[1]][int(m[2])] = name
      keys = {}
      for kind in (WEAK, STRONG):
        if not views[kind]:
          raise ShardError(f'{fn}: video {vid!r} segment {s} has no {kind} view (members {list(sg)})')
        keys[kind] = []
        for i in sorted(views[kind]):
          name = views[kind][i]
          vg, where = sg[name], f'{fn}: video {vid!r} segment {s} view {name!r}'
          if not all(isinstance(vg.get(k), h5py.Dataset) for k in ('regions', 'teacher')):
            raise ShardError(f'{where}: needs datasets "regions" and "teacher" (has {list(vg)})')
          r, t = vg['regions'], vg['teacher']
          check_shapes(where, r.shape, r.dtype, t.shape, t.dtype, self._expected)
          self._expected = self._expected or (r.shape, t.shape)
          keys[kind].append(len(self._views))
          self._views.append((fi, f'{vid}/{s}/{name}'))
      segs.append(Segment(tuple(keys[WEAK]), tuple(keys[STRONG])))
    return segs

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_h5'], state['_pid'] = {}, None
    return state

  def __repr__(self):
    return f'HDF5Store({self.path!r})'

  def close(self) -> None:
    for f in self._h5.values():
      f.close()
    self._h5 = {}

  def _group(self, key):
    if not 0 <= key < len(self._views):
      raise ShardError(f'{self.path}: view key {key} is out of range [0, {len(self._views)})')
    if self._pid != os.getpid():
      self._h5, self._pid = {}, os.getpid()
    fi, name = self._views[key]
    if fi not in self._h5:
      self._h5[fi] = _open_h5(self._files[fi])
    vid, s, view = name.rsplit('/', 2)
    return self._h5[fi][name], f'{self._files[fi]}: video {vid!r} segment {s} view {view!r}'

  def load(self, key):
    group, where = self._group(key)
    try:
      regions, teacher = group['regions'][()], group['teacher'][()]
    except OSError as e:  # a corrupt chunk, a failed decompression
      raise ShardError(f'{where}: cannot be read ({e})') from e
    return check_view(where, regions, teacher, self._expected)

  def view_meta(self, key) -> dict:
    """The view's `meta` attribute (JSON) as a dict; {} when absent."""
    group, where = self._group(key)
    text = group.attrs.get('meta')
    if text is None:
      return {}
    try:
      meta = json.loads(text)
    except ValueError as e:
      raise ShardError(f'{where}: attribute "meta" is not valid JSON ({e})') from e
    if not isinstance(meta, dict):
      raise ShardError(f'{where}: attribute "meta" is not a JSON object')
    return meta


def write_hdf5_views(path: str, videos: Dict[str, list], bank: Optional[Dict[str, np.ndarray]] = None,
                     dtype=np.float16) -> None:
  """Writes {video_id: [{'weak': [view, ...], 'strong': [...]}]} in the HDF5 extraction format, atomically.

  A view is (regions, teacher) or (regions, teacher, meta dict). Arrays are stored as given (cast to `dtype`;
  shapes are checked by the reader, HDF5Store). `bank`, if given, goes to bank.npz beside the file.
  """
  with io_util.atomic_open(path, 'wb') as fo, h5py.File(fo, 'w') as f:
    for vid, segments in videos.items():
      if not isinstance(vid, str) or not vid or '/' in vid or vid in ('.', '..'):
        raise ShardError(f'{path}: video id {vid!r} cannot be an HDF5 group name')
      for s, seg in enumerate(segments):
        for kind in (WEAK, STRONG):
          for v, view in enumerate(seg.get(kind, ())):
            g = f.create_group(f'{vid}/{s}/{kind}_{v}')
            g.create_dataset('regions', data=np.asarray(view[0], dtype))
            g.create_dataset('teacher', data=np.asarray(view[1], dtype))
            if len(view) > 2 and view[2]:
              g.attrs['meta'] = json.dumps(check_meta(view_where(vid, s, kind, v), view[2]))
  if bank is not None:
    save_bank(os.path.join(os.path.dirname(os.path.abspath(path)), BANK), bank)


def convert_store(store: ViewStore, output: str, name: str = 'vcdb', records_per_shard: int = 1024,
                  progress: bool = False) -> dict:
  """Writes every view of `store` (any ViewStore; per-view meta from `view_meta` when it has one) as shards."""
  view_meta = getattr(store, 'view_meta', lambda key: {})
  with shards.ShardWriter(output, name=name, records_per_shard=records_per_shard, bank=store.bank()) as writer:
    for i in tqdm.trange(len(store), desc='videos', unit='video', disable=not progress):
      segments = [{kind: [(*store.load(k), view_meta(k)) for k in getattr(seg, kind)] for kind in (WEAK, STRONG)}
                  for seg in store.segments(i)]
      writer.add_video(store.video_ids[i], segments)
  return writer.summary


def convert(input_path: str, output: str, name: str = 'vcdb', records_per_shard: int = 1024,
            progress: bool = False) -> dict:
  """HDF5 views (a file or a folder) -> shard directory; what `python -m input_pipeline.hapvr.make_shards` runs."""
  check_output(output)  # fail before scanning a large input
  return convert_store(HDF5Store(input_path), output, name, records_per_shard, progress)
