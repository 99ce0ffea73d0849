r"""On-disk training views (spec §10.2): ArrayRecord training shards, the HDF5 extraction format, the bank.

**Shard directory** (written by `ShardWriter` / `python -m input_pipeline.make_shards`, read by
`ArrayRecordStore`), in the TFDS array_record file layout:

  OUT/<name>-train.array_record-00000-of-000NN   one record per stored view (video, segment, view)
  OUT/shards.json                                the index
  OUT/bank.npz                                   optional TSD black/noise frame bank

Records are written with group_size:1 (one record per chunk: true random access, what Grain expects) and,
by default, uncompressed: fp16 features gain ~8% from zstd but read ~5x slower. A record is

  b'HAPVRv1\0' | uint32 LE header length H | H bytes JSON header (space-padded so the payload starts at a
  multiple of 8) | regions [T, R, D] float16 LE | teacher [T, C] float16 LE

with header {"video_id", "segment", "kind": "weak"|"strong", "view", "regions": [T, R, D], "teacher": [T, C],
"dtype": "<f2", "meta": {...}} (meta: free-form, e.g. augmentation parameters and extraction seed, §10.1).
shards.json holds {"format": "hapvr-view-shards", "version": 1, "info": StoreInfo, "dtype", "name", "records",
"shards": [{"file", "records"}], "videos": [{"id", "segments": [{"weak": [keys], "strong": [keys]}]}],
"bank": "bank.npz" | null}; keys are global record indices (shard files concatenated in order).

**HDF5 extraction format** (`HDF5Store`, `write_hdf5_views`): one or more `*.h5` / `*.hdf5` files, each with
groups /<video_id>/<segment index 0..S-1>/<view>/ where <view> is weak_0, weak_1, ..., strong_0, ..., and each
view group holds datasets `regions` [T, R, D] and `teacher` [T, C] (float; read back as float16) and an optional
attribute `meta` (a JSON string). A video lives in exactly one file. An optional `bank.npz` sits in the same
folder. The index is built from shapes only; data is read (and checked for NaN/Inf) one view at a time.

**Bank** (`bank.npz`, spec §10.3): float16 arrays `input_pipeline.store.BANK_KEYS`.

Every error is a `ShardError` (a ValueError, so the CLIs report it as one `error: ...` line) naming the file and
the video, segment, view or record at fault.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Dict, List, Optional

from array_record.python import array_record_module
import h5py
import numpy as np
import tqdm

from common_jax import io_util
from input_pipeline.store import BANK_KEYS, STRONG, WEAK, Segment, StoreInfo, ViewStore

MAGIC = b'HAPVRv1\0'
FORMAT, VERSION = 'hapvr-view-shards', 1
INDEX, BANK = 'shards.json', 'bank.npz'
DEFAULT_OPTIONS = 'group_size:1,uncompressed'
_HEAD = struct.Struct('<8sI')
_VIEW_NAME = re.compile(r'(weak|strong)_(\d+)')


class ShardError(ValueError):
  pass


def shard_filename(name: str, index: int, count: int) -> str:
  return f'{name}-train.array_record-{index:05d}-of-{count:05d}'


def _where(video_id, segment, kind, view) -> str:
  return f'video {video_id!r} segment {segment} {kind} view {view}'


def _check_shapes(where: str, rshape, rdtype, tshape, tdtype, expected=None) -> None:
  """Rank, float dtype, non-empty, frame counts agree, and (if given) shapes equal `expected` = (rs, ts)."""
  for name, shape, dtype, rank in (('regions', rshape, rdtype, 3), ('teacher', tshape, tdtype, 2)):
    if len(shape) != rank:
      raise ShardError(f'{where}: {name} has shape {tuple(shape)}; expected rank {rank} '
                       f'({"[T, R, D]" if rank == 3 else "[T, C]"})')
    if not np.issubdtype(dtype, np.floating):
      raise ShardError(f'{where}: {name} has dtype {dtype}; expected float features')
    if 0 in shape:
      raise ShardError(f'{where}: {name} is empty (shape {tuple(shape)})')
  if rshape[0] != tshape[0]:
    raise ShardError(f'{where}: regions has {rshape[0]} frames but teacher has {tshape[0]} '
                     f'(shapes {tuple(rshape)}, {tuple(tshape)})')
  if expected is not None and (tuple(rshape), tuple(tshape)) != tuple(map(tuple, expected)):
    raise ShardError(f'{where}: shapes regions {tuple(rshape)}, teacher {tuple(tshape)} differ from the first '
                     f'view\'s regions {tuple(expected[0])}, teacher {tuple(expected[1])}')


def check_view(where: str, regions, teacher, expected=None):
  """Validate one view (shapes as `_check_shapes`, finite in float16); returns (regions, teacher) float16."""
  regions, teacher = np.asarray(regions), np.asarray(teacher)
  _check_shapes(where, regions.shape, regions.dtype, teacher.shape, teacher.dtype, expected)
  out = []
  for name, x in (('regions', regions), ('teacher', teacher)):
    with np.errstate(over='ignore'):
      x16 = x.astype(np.float16)
    finite = np.isfinite(x16)
    if not finite.all():
      bad = int(finite.size - np.count_nonzero(finite))
      why = 'NaN/Inf values' if not np.isfinite(x).all() else 'values that overflow float16 (|x| > 65504)'
      raise ShardError(f'{where}: {name} has {bad} {why}')
    out.append(x16)
  return tuple(out)


# ----------------------------------------------------------------------------------------------- records

def encode_record(video_id: str, segment: int, kind: str, view: int, regions: np.ndarray,
                  teacher: np.ndarray, meta: Optional[dict] = None) -> bytes:
  """One view as a record (arrays must already be validated; they are written as float16)."""
  header = {'video_id': video_id, 'segment': int(segment), 'kind': kind, 'view': int(view),
            'regions': list(regions.shape), 'teacher': list(teacher.shape), 'dtype': '<f2', 'meta': meta or {}}
  text = json.dumps(header, separators=(',', ':'), allow_nan=False).encode()
  text += b' ' * (-(_HEAD.size + len(text)) % 8)
  return b''.join((_HEAD.pack(MAGIC, len(text)), text, np.ascontiguousarray(regions, '<f2').tobytes(),
                   np.ascontiguousarray(teacher, '<f2').tobytes()))


def decode_record(data: bytes, where: str = 'record'):
  """(header dict, regions float16 [T, R, D], teacher float16 [T, C]); validates magic, header and sizes."""
  if len(data) < _HEAD.size or data[:8] != MAGIC:
    raise ShardError(f'{where}: not a HAP-VR view record (bad magic {bytes(data[:8])!r}; corrupt or foreign file)')
  (_, size), start = _HEAD.unpack_from(data), _HEAD.size
  if start + size > len(data):
    raise ShardError(f'{where}: header length {size} exceeds the record size {len(data)} (corrupt record)')
  try:
    header = json.loads(bytes(data[start:start + size]))
    rs, ts = tuple(header['regions']), tuple(header['teacher'])
    ok = (isinstance(header['video_id'], str) and header['kind'] in (WEAK, STRONG) and header['dtype'] == '<f2'
          and isinstance(header['segment'], int) and isinstance(header['view'], int)
          and isinstance(header['meta'], dict) and len(rs) == 3 and len(ts) == 2
          and all(isinstance(n, int) and n > 0 for n in rs + ts))
  except (ValueError, KeyError, TypeError) as e:
    raise ShardError(f'{where}: unreadable record header ({e!r}; corrupt record)') from e
  if not ok:
    raise ShardError(f'{where}: invalid record header {header} (corrupt record)')
  nr, nt = int(np.prod(rs)), int(np.prod(ts))
  if len(data) != start + size + 2 * (nr + nt):
    raise ShardError(f'{where}: record has {len(data) - start - size} payload bytes; header shapes {rs} + {ts} '
                     f'need {2 * (nr + nt)} (corrupt record)')
  offset = start + size
  regions = np.frombuffer(data, '<f2', nr, offset).reshape(rs).astype(np.float16)
  teacher = np.frombuffer(data, '<f2', nt, offset + 2 * nr).reshape(ts).astype(np.float16)
  return header, regions, teacher


# ------------------------------------------------------------------------------------------------- bank

def check_bank(bank: Dict[str, np.ndarray], where: str = 'bank', info: Optional[StoreInfo] = None):
  """Validated float16 copy of a black/noise frame bank (keys BANK_KEYS, matching R, D and C)."""
  if set(bank) != set(BANK_KEYS):
    raise ShardError(f'{where}: keys {sorted(bank)}; expected {list(BANK_KEYS)}')
  out = {}
  for k in BANK_KEYS:
    x = np.asarray(bank[k])
    rank = 3 if k.endswith('regions') else 2
    if x.ndim != rank or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
      raise ShardError(f'{where}: {k} has shape {x.shape} dtype {x.dtype}; expected non-empty float '
                       f'{"[K, R, D]" if rank == 3 else "[K, C]"}')
    with np.errstate(over='ignore'):
      out[k] = x.astype(np.float16)
    if not np.isfinite(out[k]).all():
      raise ShardError(f'{where}: {k} has NaN/Inf values (in float16)')
  for kind in ('black', 'noise'):
    r, t = out[f'{kind}_regions'], out[f'{kind}_teacher']
    if r.shape[0] != t.shape[0]:
      raise ShardError(f'{where}: {kind}_regions has {r.shape[0]} entries but {kind}_teacher has {t.shape[0]}')
  shapes = {k: out[k].shape[1:] for k in BANK_KEYS}
  if shapes['black_regions'] != shapes['noise_regions'] or shapes['black_teacher'] != shapes['noise_teacher']:
    raise ShardError(f'{where}: black and noise entries differ in shape ({shapes})')
  if info is not None and (shapes['black_regions'] + shapes['black_teacher']
                           != (info.regions, info.dims, info.teacher_dims)):
    raise ShardError(f'{where}: entries have regions {shapes["black_regions"]}, teacher {shapes["black_teacher"]}; '
                     f'the views have R={info.regions}, D={info.dims}, C={info.teacher_dims}')
  return out


def load_bank(path: str, info: Optional[StoreInfo] = None) -> Dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise ShardError(f'{path}: bank file not found')
  try:
    with np.load(path, allow_pickle=False) as z:
      bank = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise ShardError(f'{path}: not a readable .npz bank ({e})') from e
  return check_bank(bank, path, info)


def save_bank(path: str, bank: Dict[str, np.ndarray]) -> None:
  bank = check_bank(bank, path)
  with io_util.atomic_open(path, 'wb') as f:
    np.savez(f, **bank)


# ----------------------------------------------------------------------------------------------- writer

def check_output(directory: str) -> None:
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise ShardError(f'{directory}: output exists and is not an empty directory; refusing to overwrite it '
                     f'(remove it or choose another --output)')


def _view_meta(where: str, meta) -> dict:
  if meta is None:
    return {}
  if not isinstance(meta, dict):
    raise ShardError(f'{where}: meta must be a dict, got {type(meta).__name__}')
  try:
    json.dumps(meta, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ShardError(f'{where}: meta is not JSON-serialisable ({e})') from e
  return meta


class ShardWriter:
  """Writes a shard directory; nothing appears at `directory` until `close()` succeeds.

    with ShardWriter('shards/vcdb', name='vcdb', records_per_shard=1024, bank=bank) as w:
      w.add_video('vid', [{'weak': [(regions, teacher)], 'strong': [(regions, teacher, {'seed': 3}), ...]}])
    print(w.summary)

  A view is (regions [T, R, D], teacher [T, C]) or (regions, teacher, meta dict). Each video is validated
  whole before any of its records is written. Records go to a temporary folder beside `directory`, which is
  renamed at the end; on an exception inside the `with` block it is removed instead.
  """

  def __init__(self, directory: str, name: str = 'vcdb', records_per_shard: int = 1024,
               bank: Optional[Dict[str, np.ndarray]] = None, options: str = DEFAULT_OPTIONS):
    if not re.fullmatch(r'[A-Za-z0-9_.]+', name or ''):
      raise ShardError(f'shard name {name!r}: use letters, digits, "_" and "." only')
    if records_per_shard < 1:
      raise ShardError(f'records_per_shard={records_per_shard}: must be >= 1')
    self.directory = os.path.abspath(directory)
    self.name, self.records_per_shard, self.options = name, int(records_per_shard), options
    check_output(self.directory)
    self._bank = None if bank is None else check_bank(bank, 'bank')
    parent = os.path.dirname(self.directory)
    os.makedirs(parent, exist_ok=True)
    self._tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(self.directory)}.', suffix='.tmp', dir=parent)
    self._writer, self._counts, self._videos, self._seen = None, [], [], set()
    self._expected, self._records, self._segments = None, 0, 0
    self.summary = None

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.abort()

  def _write(self, record: bytes) -> None:
    if self._writer is None:
      path = os.path.join(self._tmp, f'shard-{len(self._counts):05d}.tmp')
      self._writer = array_record_module.ArrayRecordWriter(path, self.options)
      self._counts.append(0)
    self._writer.write(record)
    self._counts[-1] += 1
    self._records += 1
    if self._counts[-1] == self.records_per_shard:
      self._writer.close()
      self._writer = None

  def add_video(self, video_id: str, segments: List[dict]) -> List[Segment]:
    """Validates and writes all views of one video; returns its Segments (global record indices)."""
    if self._tmp is None:
      raise ShardError('ShardWriter: already closed')
    if not isinstance(video_id, str) or not video_id:
      raise ShardError(f'video id {video_id!r}: must be a non-empty string')
    if video_id in self._seen:
      raise ShardError(f'video {video_id!r} was added twice (duplicate video id)')
    if not isinstance(segments, (list, tuple)) or not segments:
      raise ShardError(f'video {video_id!r}: no segments')
    expected, prepared = self._expected, []
    for s, seg in enumerate(segments):
      if not isinstance(seg, dict) or set(seg) - {WEAK, STRONG}:
        raise ShardError(f'video {video_id!r} segment {s}: expected a dict with keys "weak" and "strong", '
                         f'got {sorted(seg) if isinstance(seg, dict) else type(seg).__name__}')
      if not seg.get(WEAK) or not seg.get(STRONG):
        raise ShardError(f'video {video_id!r} segment {s}: needs at least one weak and one strong view (has '
                         f'{len(seg.get(WEAK) or ())} weak, {len(seg.get(STRONG) or ())} strong)')
      views = {}
      for kind in (WEAK, STRONG):
        views[kind] = []
        for v, view in enumerate(seg[kind]):
          where = _where(video_id, s, kind, v)
          if not isinstance(view, (tuple, list)) or len(view) not in (2, 3):
            raise ShardError(f'{where}: expected (regions, teacher) or (regions, teacher, meta)')
          regions, teacher = check_view(where, view[0], view[1], expected)
          expected = expected or (regions.shape, teacher.shape)
          views[kind].append((regions, teacher, _view_meta(where, view[2] if len(view) == 3 else None)))
      prepared.append(views)
    out = []
    for s, views in enumerate(prepared):
      keys = {}
      for kind in (WEAK, STRONG):
        keys[kind] = tuple(range(self._records, self._records + len(views[kind])))
        for v, (regions, teacher, meta) in enumerate(views[kind]):
          self._write(encode_record(video_id, s, kind, v, regions, teacher, meta))
      out.append(Segment(keys[WEAK], keys[STRONG]))
    self._expected = expected
    self._seen.add(video_id)
    self._segments += len(out)
    self._videos.append({'id': video_id, 'segments': [{WEAK: list(g.weak), STRONG: list(g.strong)} for g in out]})
    return out

  def abort(self) -> None:
    """Discards everything written so far."""
    if self._writer is not None:
      with contextlib.suppress(Exception):
        self._writer.close()
      self._writer = None
    if self._tmp is not None:
      shutil.rmtree(self._tmp, ignore_errors=True)
      self._tmp = None

  def close(self) -> dict:
    """Names the shard files, writes shards.json (and bank.npz), renames the folder into place."""
    if self._tmp is None:
      return self.summary
    try:
      if self._writer is not None:
        self._writer.close()
        self._writer = None
      if not self._videos:
        raise ShardError(f'{self.directory}: no videos were added; nothing written')
      files = []
      for i, count in enumerate(self._counts):
        files.append({'file': shard_filename(self.name, i, len(self._counts)), 'records': count})
        os.rename(os.path.join(self._tmp, f'shard-{i:05d}.tmp'), os.path.join(self._tmp, files[-1]['file']))
      (t, r, d), (_, c) = self._expected
      info = StoreInfo(frames=t, regions=r, dims=d, teacher_dims=c)
      if self._bank is not None:
        bank = check_bank(self._bank, 'bank', info)
        with open(os.path.join(self._tmp, BANK), 'wb') as f:
          np.savez(f, **bank)
      head = {'format': FORMAT, 'version': VERSION, 'info': dataclasses.asdict(info), 'dtype': 'float16',
              'name': self.name, 'records': self._records, 'shards': files, 'options': self.options,
              'bank': BANK if self._bank is not None else None}
      with open(os.path.join(self._tmp, INDEX), 'w') as f:  # one video per line: readable and diffable
        f.write(json.dumps(head, indent=1)[:-2] + ',\n "videos": [\n')
        f.write(',\n'.join(json.dumps(v, separators=(',', ':')) for v in self._videos) + '\n ]\n}\n')
      check_output(self.directory)
      os.chmod(self._tmp, 0o755)  # mkdtemp made it private
      if os.path.isdir(self.directory):
        os.rmdir(self.directory)
      os.rename(self._tmp, self.directory)
      self._tmp = None
    except BaseException:
      self.abort()
      raise
    nbytes = sum(os.path.getsize(os.path.join(self.directory, f)) for f in os.listdir(self.directory))
    self.summary = {'directory': self.directory, 'videos': len(self._videos), 'segments': self._segments,
                    'views': self._records, 'shards': len(files), 'bytes': nbytes}
    return self.summary


# ------------------------------------------------------------------------------------------- ArrayRecord

@dataclasses.dataclass(frozen=True)
class _FileInstruction:
  """A shard with its record count, so the data source need not open every file to count its records."""
  filename: str
  skip: int
  take: int
  examples_in_shard: int


class ArrayRecordStore(ViewStore):
  """A shard directory as a ViewStore; keys are global record indices. Picklable; files open lazily."""

  def __init__(self, directory: str):
    self.directory = directory
    path = os.path.join(directory, INDEX)
    if not os.path.isdir(directory):
      raise ShardError(f'{directory}: shard directory not found')
    if not os.path.isfile(path):
      raise ShardError(f'{directory}: no {INDEX} index here (not a shard directory? write one with '
                       f'python -m input_pipeline.make_shards)')
    try:
      with open(path) as f:
        index = json.load(f)
    except (OSError, ValueError) as e:
      raise ShardError(f'{path}: unreadable index ({e})') from e
    if not isinstance(index, dict) or index.get('format') != FORMAT:
      raise ShardError(f'{path}: not a HAP-VR shard index (format '
                       f'{index.get("format") if isinstance(index, dict) else None!r}, expected {FORMAT!r})')
    if index.get('version') != VERSION:
      raise ShardError(f'{path}: index version {index.get("version")!r}; this code reads version {VERSION} '
                       f'(rewrite the shards with python -m input_pipeline.make_shards)')
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

  @property
  def video_ids(self):
    return self._ids

  def segments(self, index):
    return self._segments[index]

  def bank(self):
    return self._bank

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
      expected = _where(self._ids[vi], s, (WEAK, STRONG)[ki], v)
      raise ShardError(f'{where}: holds {_where(*found)} but {INDEX} says {expected} (index and shards do not match)')
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


# -------------------------------------------------------------------------------------------------- HDF5

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


class HDF5Store(ViewStore):
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
          _check_shapes(where, r.shape, r.dtype, t.shape, t.dtype, self._expected)
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

  @property
  def video_ids(self):
    return self._ids

  def segments(self, index):
    return self._segments[index]

  def bank(self):
    return self._bank

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
              g.attrs['meta'] = json.dumps(_view_meta(_where(vid, s, kind, v), view[2]))
  if bank is not None:
    save_bank(os.path.join(os.path.dirname(os.path.abspath(path)), BANK), bank)


# ------------------------------------------------------------------------------------------- conversion

def convert_store(store: ViewStore, output: str, name: str = 'vcdb', records_per_shard: int = 1024,
                  progress: bool = False) -> dict:
  """Writes every view of `store` (any ViewStore; per-view meta from `view_meta` when it has one) as shards."""
  view_meta = getattr(store, 'view_meta', lambda key: {})
  with ShardWriter(output, name=name, records_per_shard=records_per_shard, bank=store.bank()) as writer:
    for i in tqdm.trange(len(store), desc='videos', unit='video', disable=not progress):
      segments = [{kind: [(*store.load(k), view_meta(k)) for k in getattr(seg, kind)] for kind in (WEAK, STRONG)}
                  for seg in store.segments(i)]
      writer.add_video(store.video_ids[i], segments)
  return writer.summary


def convert(input_path: str, output: str, name: str = 'vcdb', records_per_shard: int = 1024,
            progress: bool = False) -> dict:
  """HDF5 views (a file or a folder) -> shard directory; what `python -m input_pipeline.make_shards` runs."""
  check_output(output)  # fail before scanning a large input
  return convert_store(HDF5Store(input_path), output, name, records_per_shard, progress)


def open_store(path: str) -> ViewStore:
  """A shard directory (with shards.json) -> ArrayRecordStore; an HDF5 file or folder of them -> HDF5Store."""
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX)):
    return ArrayRecordStore(path)
  if os.path.isfile(path) and path.endswith(('.h5', '.hdf5')):
    return HDF5Store(path)
  if os.path.isdir(path):
    names = os.listdir(path)
    if any(n.endswith(('.h5', '.hdf5')) and not n.startswith('.') for n in names):
      return HDF5Store(path)
    if any('.array_record' in n for n in names):
      raise ShardError(f'{path}: has ArrayRecord shard files but no {INDEX} index')
    raise ShardError(f'{path}: neither a shard directory ({INDEX}) nor a folder of *.h5 / *.hdf5 view files')
  if not os.path.exists(path):
    raise ShardError(f'{path}: not found')
  raise ShardError(f'{path}: not a shard directory or an .h5 / .hdf5 view file')
