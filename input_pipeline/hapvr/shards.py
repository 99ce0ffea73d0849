"""ArrayRecord training shards: `ShardWriter`, `ArrayRecordStore`, `open_store`.

The shard directory layout, record format, shards.json index and bank, and how to read the shards with TFDS,
are documented in `input_pipeline.hapvr.shard_format` (the codec, checks and bank helpers); its public names are
re-exported here. So are, imported on first use so that reading shards does not import h5py, the HDF5 format
(`HDF5Store`, `write_hdf5_views`) and the HDF5 -> shards conversion (`convert`, `convert_store`) of
`input_pipeline.hapvr.hdf5_views`. Every error is a `ShardError` (a ValueError, so the CLIs report it as one
`error: ...` line) naming the file and the video, segment, view or record at fault.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Optional

from array_record.python import array_record_module
import numpy as np

from input_pipeline.hapvr.shard_format import (  # noqa: F401  (re-exported: shards is the public name)
    BANK, DEFAULT_OPTIONS, FORMAT, INDEX, MAGIC, TFDS_FEATURES, TFDS_INFO, TFDS_VERSION, VERSION, ShardError,
    check_bank, check_meta, check_output, check_shapes, check_video, check_view, decode_record, encode_record,
    load_bank, read_index, save_bank, shard_filename, tfds_metadata, view_where, write_metadata)
from input_pipeline import record_dir
from input_pipeline.hapvr.store import STRONG, WEAK, IndexedStore, Segment, StoreInfo, ViewStore

_HDF5_NAMES = ('HDF5Store', 'write_hdf5_views', 'convert', 'convert_store')


def __getattr__(name):
  """Re-exports `input_pipeline.hapvr.hdf5_views` (which imports this module) on first use."""
  if name in _HDF5_NAMES:
    from input_pipeline.hapvr import hdf5_views  # pylint: disable=g-import-not-at-top
    return getattr(hdf5_views, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


class ShardWriter(record_dir.VideoShardWriter):
  """Writes a shard directory; nothing appears at `directory` until `close()` succeeds.

    with ShardWriter('shards/vcdb', name='vcdb', records_per_shard=1024, bank=bank) as w:
      w.add_video('vid', [{'weak': [(regions, teacher)], 'strong': [(regions, teacher, {'seed': 3}), ...]}])
    print(w.summary)

  A view is (regions [T, R, D], teacher [T, C]) or (regions, teacher, meta dict). Each video is validated
  whole before any of its records is written. Records go to a temporary folder beside `directory`, which is
  renamed at the end; on an exception inside the `with` block it is removed instead.
  """
  error = ShardError

  def __init__(self, directory: str, name: str = 'vcdb', records_per_shard: int = 1024,
               bank: Optional[Dict[str, np.ndarray]] = None, options: str = DEFAULT_OPTIONS):
    if not re.fullmatch(r'[A-Za-z0-9_.]+', name or ''):
      raise ShardError(f'shard name {name!r}: use letters, digits, "_" and "." only')
    self.name, self.options = name, options
    self._bank = None if bank is None else check_bank(bank, 'bank')
    super().__init__(directory, records_per_shard, options)
    self._videos, self._expected, self._segments = [], None, 0

  def add_video(self, video_id: str, segments: List[dict]) -> List[Segment]:
    """Validates and writes all views of one video; returns its Segments (global record indices)."""
    self._check_new(video_id)
    prepared, expected = check_video(video_id, segments, self._expected)
    out = []
    for s, views in enumerate(prepared):
      keys = {}
      for kind in (WEAK, STRONG):
        keys[kind] = tuple(self._out.write(encode_record(video_id, s, kind, v, regions, teacher, meta))
                           for v, (regions, teacher, meta) in enumerate(views[kind]))
      out.append(Segment(keys[WEAK], keys[STRONG]))
    self._expected = expected
    self._seen.add(video_id)
    self._segments += len(out)
    self._videos.append({'id': video_id, 'segments': [{WEAK: list(g.weak), STRONG: list(g.strong)} for g in out]})
    return out

  def _filename(self, index: int, count: int) -> str:
    return shard_filename(self.name, index, count)

  def _write_index(self, folder, files):
    """shards.json, bank.npz and the TFDS metadata."""
    (t, r, d), (_, c) = self._expected
    info = StoreInfo(frames=t, regions=r, dims=d, teacher_dims=c)
    if self._bank is not None:
      bank = check_bank(self._bank, 'bank', info)
      with open(os.path.join(folder, BANK), 'wb') as f:
        np.savez(f, **bank)
    head = {'format': FORMAT, 'version': VERSION, 'info': dataclasses.asdict(info), 'dtype': 'float16',
            'name': self.name, 'records': self._out.records, 'shards': files, 'options': self.options,
            'bank': BANK if self._bank is not None else None}
    write_metadata(folder, head, self._videos, self._out.counts)

  def _summary(self, files) -> dict:
    return {'videos': len(self._videos), 'segments': self._segments, 'views': self._out.records,
            'shards': len(files)}


# ------------------------------------------------------------------------------------------- ArrayRecord

@dataclasses.dataclass(frozen=True)
class _FileInstruction:
  """A shard with its record count, so the data source need not open every file to count its records."""
  filename: str
  skip: int
  take: int
  examples_in_shard: int


class ArrayRecordStore(IndexedStore):
  """A shard directory as a ViewStore; keys are global record indices. Picklable; files open lazily."""

  def __init__(self, directory: str):
    self.directory = directory
    path = os.path.join(directory, INDEX)
    index = read_index(directory)
    try:
      self._parse(index, path)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      if isinstance(e, ShardError):
        raise
      raise ShardError(f'{path}: malformed index ({type(e).__name__}: {e})') from e
    self._bank = None if index.get('bank') is None else load_bank(os.path.join(directory, index['bank']),
                                                                  self.info)
    self._src, self._pid = None, None

  def _parse(self, index: dict, path: str) -> None:
    self.info = StoreInfo(**{f.name: int(index['info'][f.name]) for f in dataclasses.fields(StoreInfo)})
    self._files = [os.path.join(self.directory, s['file']) for s in index['shards']]
    self._counts = [int(s['records']) for s in index['shards']]
    for fn in self._files:
      if not os.path.isfile(fn):
        raise ShardError(f'{fn}: shard file listed in {path} is missing')
    self._starts = np.cumsum([0] + self._counts)
    n = int(index['records'])
    if n != self._starts[-1] or n == 0:
      raise ShardError(f'{path}: "records" is {n} but the shards hold {self._starts[-1]}')
    self._owner = np.full(n, -1, np.int32)
    self._place = np.zeros((n, 3), np.int32)  # (segment, kind 0 weak / 1 strong, view)
    self._ids, self._segments = [], []
    for vi, video in enumerate(index['videos']):
      vid, segs = str(video['id']), []
      for s, seg in enumerate(video['segments']):
        keys = [tuple(int(k) for k in seg[kind]) for kind in (WEAK, STRONG)]
        for ki, kind in enumerate((WEAK, STRONG)):
          if not keys[ki]:
            raise ShardError(f'{path}: video {vid!r} segment {s} has no {kind} view')
          for v, k in enumerate(keys[ki]):
            if not 0 <= k < n or self._owner[k] != -1:
              raise ShardError(f'{path}: video {vid!r} segment {s}: record {k} is out of range or used twice')
            self._owner[k], self._place[k] = vi, (s, ki, v)
        segs.append(Segment(*keys))
      if not segs:
        raise ShardError(f'{path}: video {vid!r} has no segments')
      self._ids.append(vid)
      self._segments.append(segs)
    if len(set(self._ids)) != len(self._ids):
      raise ShardError(f'{path}: duplicate video ids in the index')

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_src'] = state['_pid'] = None
    return state

  def __repr__(self):
    return f'ArrayRecordStore({self.directory!r})'

  def close(self) -> None:
    if self._src is not None:
      self._src.__exit__(None, None, None)
      self._src = None

  @property
  def shard_files(self) -> List[str]:
    return list(self._files)

  @property
  def num_records(self) -> int:
    return int(self._starts[-1])

  def _source(self):
    if self._src is None or self._pid != os.getpid():
      import grain  # pylint: disable=g-import-not-at-top
      self._src = grain.sources.ArrayRecordDataSource(
          [_FileInstruction(f, 0, n, n) for f, n in zip(self._files, self._counts)])
      self._pid = os.getpid()
    return self._src

  def _read(self, key):
    key = int(key)
    if not 0 <= key < self.num_records:
      raise ShardError(f'{self.directory}: record key {key} is out of range [0, {self.num_records})')
    shard = int(np.searchsorted(self._starts, key, side='right')) - 1
    where = f'{self._files[shard]}: record {key - self._starts[shard]} (key {key})'
    try:
      data = self._source()[key]
    except Exception as e:  # array_record reports corrupt or truncated files with various exception types
      raise ShardError(f'{where}: cannot be read ({type(e).__name__}: {e})') from e
    return decode_record(data, where) + (where,)

  def view_header(self, key) -> dict:
    """The record's header: video_id, segment, kind, view, shapes and its meta dict."""
    return self._read(key)[0]

  def load(self, key):
    header, regions, teacher, where = self._read(key)
    vi, (s, ki, v) = self._owner[key], self._place[key]
    found = (header['video_id'], header['segment'], header['kind'], header['view'])
    if vi >= 0 and found != (self._ids[vi], s, (WEAK, STRONG)[ki], v):
      expected = view_where(self._ids[vi], s, (WEAK, STRONG)[ki], v)
      raise ShardError(f'{where}: holds {view_where(*found)} but {INDEX} says {expected} '
                       f'(index and shards do not match)')
    if (regions.shape + teacher.shape[1:]) != (self.info.frames, self.info.regions, self.info.dims,
                                               self.info.teacher_dims):
      raise ShardError(f'{where}: shapes {regions.shape}, {teacher.shape} do not match the index info {self.info}')
    return regions, teacher

  def verify(self, read: bool = False) -> None:
    """Checks every shard's record count against the index; with read=True also decodes every record."""
    for fn, n in zip(self._files, self._counts):
      try:
        reader = array_record_module.ArrayRecordReader(fn)
        found = reader.num_records()
        reader.close()
      except Exception as e:
        raise ShardError(f'{fn}: not a readable ArrayRecord file ({type(e).__name__}: {e})') from e
      if found != n:
        raise ShardError(f'{fn}: holds {found} records; {INDEX} says {n}')
    if read:
      for key in range(self.num_records):
        self.load(key)


def open_store(path: str) -> ViewStore:
  """A shard directory (with shards.json) -> ArrayRecordStore; an HDF5 file or folder of them -> HDF5Store."""
  from input_pipeline.hapvr import hdf5_views  # pylint: disable=g-import-not-at-top  (it imports this module)
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX)):
    return ArrayRecordStore(path)
  if os.path.isfile(path) and path.endswith(('.h5', '.hdf5')):
    return hdf5_views.HDF5Store(path)
  if os.path.isdir(path):
    names = os.listdir(path)
    if any(n.endswith(('.h5', '.hdf5')) and not n.startswith('.') for n in names):
      return hdf5_views.HDF5Store(path)
    if any('.array_record' in n for n in names):
      raise ShardError(f'{path}: has ArrayRecord shard files but no {INDEX} index')
    raise ShardError(f'{path}: neither a shard directory ({INDEX}) nor a folder of *.h5 / *.hdf5 view files')
  if not os.path.exists(path):
    raise ShardError(f'{path}: not found')
  raise ShardError(f'{path}: not a shard directory or an .h5 / .hdf5 view file')
