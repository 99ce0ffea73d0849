r"""ArrayRecord training shards (spec §10.2): the record format, `ShardWriter`, `ArrayRecordStore`, the bank.

The HDF5 extraction format (`HDF5Store`, `write_hdf5_views`) and the HDF5 -> shards conversion (`convert`,
`convert_store`) live in `input_pipeline.hdf5_views`; they are re-exported here (imported on first use, so
reading shards does not import h5py).

**Shard directory** (written by `ShardWriter` / `python -m input_pipeline.make_shards`, read by
`ArrayRecordStore`), in the TFDS array_record file layout:

  OUT/<name>-train.array_record-00000-of-000NN   one record per stored view (video, segment, view)
  OUT/shards.json                                the index
  OUT/bank.npz                                   optional TSD black/noise frame bank
  OUT/dataset_info.json, OUT/features.json       TFDS metadata (below); this code never reads them

Records are written with group_size:1 (one record per chunk: true random access, what Grain expects) and,
by default, uncompressed: fp16 features gain ~8% from zstd but read ~5x slower. A record is

  b'HAPVRv1\0' | uint32 LE header length H | H bytes JSON header (space-padded so the payload starts at a
  multiple of 8) | regions [T, R, D] float16 LE | teacher [T, C] float16 LE

with header {"video_id", "segment", "kind": "weak"|"strong", "view", "regions": [T, R, D], "teacher": [T, C],
"dtype": "<f2", "meta": {...}} (meta: free-form, e.g. augmentation parameters and extraction seed, §10.1).
shards.json holds {"format": "hapvr-view-shards", "version": 1, "info": StoreInfo, "dtype", "name", "records",
"shards": [{"file", "records"}], "videos": [{"id", "segments": [{"weak": [keys], "strong": [keys]}]}],
"bank": "bank.npz" | null}; keys are global record indices (shard files concatenated in order).

**Reading the shards with TFDS** (optional: tensorflow-datasets is not a dependency; checked with 4.9.10, no
TensorFlow needed). dataset_info.json describes OUT as a prepared TFDS dataset: fileFormat "array_record",
the shard name, version "1.0.0", one split "train" with the shard file template and shardLengths; features.json
declares an empty FeaturesDict. Open the records as raw bytes and decode them with `decode_record`:

  import tensorflow_datasets as tfds
  RAW = tfds.decode.DeserializeMethod.RAW_BYTES
  source = tfds.builder_from_directory(OUT).as_data_source('train', deserialize_method=RAW)
  header, regions, teacher = shards.decode_record(source[key])   # key: global record index, as in shards.json

or, by name, with OUT placed at D/<name>/1.0.0 (e.g. make_shards --output=D/vcdb/1.0.0; the name must then
match [a-zA-Z]\w*): `tfds.data_source('vcdb', data_dir=D, split='train[10:20]', deserialize_method=RAW)`.
Either source is random access (len, [i]) and can feed `grain.MapDataset.source(source).map(...)`.
RAW_BYTES is required. TFDS's default method parses every record as a serialized tf.train.Example and
decodes it with the features of features.json; DESERIALIZE_NO_DECODE parses the Example with TensorFlow. These
records are not Example protos (they are the float16 layout above, decoded with one frombuffer per array, no
protobuf), so neither applies: with the empty FeaturesDict the default fails with "No features set, cannot
decode example!" (with Tensor features declared it would fail on "Wire format was corrupt"), and
DESERIALIZE_NO_DECODE needs TensorFlow. RAW_BYTES hands back each record's bytes untouched.

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
import numpy as np

from common_jax import io_util
from input_pipeline.store import BANK_KEYS, STRONG, WEAK, Segment, StoreInfo, ViewStore

MAGIC = b'HAPVRv1\0'
FORMAT, VERSION = 'hapvr-view-shards', 1
INDEX, BANK = 'shards.json', 'bank.npz'
TFDS_INFO, TFDS_FEATURES = 'dataset_info.json', 'features.json'
TFDS_VERSION = f'{VERSION}.0.0'  # the dataset version TFDS sees (D/<name>/1.0.0/)
DEFAULT_OPTIONS = 'group_size:1,uncompressed'
_HEAD = struct.Struct('<8sI')


class ShardError(ValueError):
  pass


_HDF5_NAMES = ('HDF5Store', 'write_hdf5_views', 'convert', 'convert_store')


def __getattr__(name):
  """Re-exports `input_pipeline.hdf5_views` (which imports this module) on first use."""
  if name in _HDF5_NAMES:
    from input_pipeline import hdf5_views  # pylint: disable=g-import-not-at-top
    return getattr(hdf5_views, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def shard_filename(name: str, index: int, count: int) -> str:
  return f'{name}-train.array_record-{index:05d}-of-{count:05d}'


def view_where(video_id, segment, kind, view) -> str:
  return f'video {video_id!r} segment {segment} {kind} view {view}'


def check_shapes(where: str, rshape, rdtype, tshape, tdtype, expected=None) -> None:
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
  """Validate one view (shapes as `check_shapes`, finite in float16); returns (regions, teacher) float16."""
  regions, teacher = np.asarray(regions), np.asarray(teacher)
  check_shapes(where, regions.shape, regions.dtype, teacher.shape, teacher.dtype, expected)
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


def check_meta(where: str, meta) -> dict:
  if meta is None:
    return {}
  if not isinstance(meta, dict):
    raise ShardError(f'{where}: meta must be a dict, got {type(meta).__name__}')
  try:
    json.dumps(meta, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ShardError(f'{where}: meta is not JSON-serialisable ({e})') from e
  return meta


def tfds_metadata(name: str, counts: List[int], nbytes: int):
  """(dataset_info.json, features.json) contents that let TFDS open the shards (module docstring).

  Hand-written protobuf JSON (DatasetInfo, FeaturesDict) as TFDS 4.9 writes it: int64 fields are strings and
  only known field names appear (TFDS parses it strictly). `counts`: records per shard file, in order.
  """
  info = {
      'name': name, 'version': TFDS_VERSION, 'fileFormat': 'array_record', 'moduleName': __name__,
      'description': 'HAP-VR training views (one record per stored view). Records are not tf.train.Example: '
                     'read them with deserialize_method=RAW_BYTES and decode them with '
                     'input_pipeline.shards.decode_record.',
      'splits': [{'name': 'train', 'filepathTemplate': '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
                  'shardLengths': [str(int(n)) for n in counts], 'numBytes': str(int(nbytes))}]}
  features = {'featuresDict': {}, 'pythonClassName': 'tensorflow_datasets.core.features.features_dict.FeaturesDict'}
  return info, features


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
          where = view_where(video_id, s, kind, v)
          if not isinstance(view, (tuple, list)) or len(view) not in (2, 3):
            raise ShardError(f'{where}: expected (regions, teacher) or (regions, teacher, meta)')
          regions, teacher = check_view(where, view[0], view[1], expected)
          expected = expected or (regions.shape, teacher.shape)
          views[kind].append((regions, teacher, check_meta(where, view[2] if len(view) == 3 else None)))
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
    """Names the shard files, writes shards.json (bank.npz, TFDS metadata), renames the folder into place."""
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
      nbytes = sum(os.path.getsize(os.path.join(self._tmp, f['file'])) for f in files)
      for fn, content in zip((TFDS_INFO, TFDS_FEATURES), tfds_metadata(self.name, self._counts, nbytes)):
        with open(os.path.join(self._tmp, fn), 'w') as f:
          f.write(json.dumps(content, indent=2, sort_keys=True) + '\n')
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
  from input_pipeline import hdf5_views  # pylint: disable=g-import-not-at-top  (it imports this module)
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
