r"""AVHash audio-visual features packed into ArrayRecord shards: `AVShardWriter`, `AVShardFeatures`, `convert_h5`.

The same per-video features as the two HDF5 files read by `input_pipeline.avhash.lists.AVFeatures` (image and audio,
float32 ``[frames, dim]`` each, ``[25, 768]`` for AVHash), one record per video, for large runs: random access
through one set of file handles per worker instead of two HDF5 files. `AVShardFeatures` has the interface of
`AVFeatures` (`read`, `check_ids`, `close`, picklable), so `open_features` lets a config point at either.

**Shard directory** (written by `AVShardWriter` / `convert_h5` / `python -m input_pipeline.avhash.make_shards`):

  OUT/<name>.array_record-00000-of-000NN   one record per video, written with group_size:1 (true random access)
  OUT/index.json                           {"format": "avhash-av-shards", "version": 1, "name", "frames", "dim",
                                           "dtype", "records", "shards": [{"file", "records"}], "ids": [...]}

"ids" lists the video ids in record order: a video's global record index is its position there (shard files
concatenated in order; "records" per shard says where each file starts). A record is

  b'AVHASHv1' | uint32 LE header length H | H bytes JSON header {"id", "frames", "dim", "dtype": "<f4"|"<f2"}
  (space-padded so the payload starts at a multiple of 8) | image [frames, dim] | audio [frames, dim]

both arrays little-endian in the header's dtype: float32 by default, float16 with ``dtype='float16'`` (half the
size; values must be finite in float16). Reading always returns float32. Every error is an `AVShardError` (a
ValueError, so the CLI reports it as one `error: ...` line) naming the directory, shard file and video at fault.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

from array_record.python import array_record_module
import numpy as np

from input_pipeline.avhash import lists as data_lists
from input_pipeline import record_dir

MAGIC = b'AVHASHv1'
FORMAT, VERSION, INDEX = 'avhash-av-shards', 1, 'index.json'
WRITE_OPTIONS = 'group_size:1,uncompressed'
READ_OPTIONS = 'readahead_buffer_size:0,max_parallelism:0'  # tuned for random access
DTYPES = {'float32': '<f4', 'float16': '<f2'}


class AVShardError(data_lists.AVFeatureError):
  """A shard directory, record or input video is missing or malformed; the message names file and video.

  A ValueError, and an `AVFeatureError` so that code catching the HDF5 reader's errors catches these too."""


def av_shard_filename(name: str, index: int, count: int) -> str:
  return f'{name}.array_record-{index:05d}-of-{count:05d}'


# ----------------------------------------------------------------------------------------------- records

def encode_av_record(video_id: str, image: np.ndarray, audio: np.ndarray, dtype: str = 'float32') -> bytes:
  """One video as a record; the arrays must already be validated (same 2-D shape, finite in `dtype`)."""
  code = DTYPES[dtype]
  frames, dim = image.shape
  header = {'id': video_id, 'frames': int(frames), 'dim': int(dim), 'dtype': code}
  return record_dir.pack_record(MAGIC, header, np.ascontiguousarray(image, code).tobytes(),
                                np.ascontiguousarray(audio, code).tobytes())


def _valid_header(header) -> bool:
  return (isinstance(header['id'], str) and header['dtype'] in DTYPES.values()
          and all(isinstance(header[k], int) and header[k] > 0 for k in ('frames', 'dim')))


def decode_av_record(data: bytes, where: str = 'record') -> Tuple[str, np.ndarray, np.ndarray]:
  """(video_id, image float32 [frames, dim], audio float32); validates magic, header and payload size."""
  header, offset = record_dir.unpack_record(data, MAGIC, 'an AVHash feature record', where, _valid_header,
                                            AVShardError)
  vid, frames, dim, code = header['id'], header['frames'], header['dim'], header['dtype']
  n, itemsize = frames * dim, np.dtype(code).itemsize
  if len(data) != offset + 2 * n * itemsize:
    raise AVShardError(f'{where}: record has {len(data) - offset} payload bytes; header shape '
                       f'[{frames}, {dim}] {code} x 2 needs {2 * n * itemsize} (corrupt record)')
  image = np.frombuffer(data, code, n, offset).reshape(frames, dim).astype(np.float32)
  audio = np.frombuffer(data, code, n, offset + n * itemsize).reshape(frames, dim).astype(np.float32)
  return vid, image, audio


# ----------------------------------------------------------------------------------------------- writer

class AVShardWriter(record_dir.VideoShardWriter):
  """Writes a shard directory; nothing appears at `directory` until `close()` succeeds.

    with AVShardWriter('shards/fcvid', records_per_shard=4096, dtype='float16') as w:
      w.add('vid', image, audio)       # float [frames, dim] each
    print(w.summary)

  Records go to a temporary folder beside `directory`, renamed onto it at the end; on an exception inside the
  `with` block it is removed instead. `frames`/`dim`, when given, fix the expected shape; otherwise the first
  video's shape is expected of all.
  """
  error = AVShardError

  def __init__(self, directory: str, name: str = 'avhash', records_per_shard: int = 4096,
               dtype: str = 'float32', frames: Optional[int] = None, dim: Optional[int] = None):
    if not re.fullmatch(r'[A-Za-z0-9_.-]+', name or ''):
      raise AVShardError(f'shard name {name!r}: use letters, digits, "_", "-" and "." only')
    if dtype not in DTYPES:
      raise AVShardError(f'dtype {dtype!r}: expected one of {sorted(DTYPES)}')
    self.name, self.dtype = name, dtype
    self._shape = None if frames is None or dim is None else (int(frames), int(dim))
    super().__init__(directory, records_per_shard, WRITE_OPTIONS)
    self._ids = []

  def _prepare(self, video_id: str, kind: str, x) -> np.ndarray:
    x = np.asarray(x)
    where = f'video {video_id!r} {kind}'
    if x.ndim != 2 or 0 in x.shape:
      raise AVShardError(f'{where}: shape {x.shape}; expected a non-empty 2-D [frames, dim] array')
    if not np.issubdtype(x.dtype, np.floating):
      raise AVShardError(f'{where}: dtype {x.dtype}; expected float features')
    if self._shape is not None and x.shape != self._shape:
      raise AVShardError(f'{where}: shape {x.shape} differs from the expected {self._shape}'
                         + (' (the first video\'s)' if self._ids else ''))
    with np.errstate(over='ignore'):
      out = x.astype(DTYPES[self.dtype])
    finite = np.isfinite(out)
    if not finite.all():
      bad = int(finite.size - np.count_nonzero(finite))
      why = 'NaN/Inf values' if not np.isfinite(x).all() else f'values that overflow {self.dtype}'
      raise AVShardError(f'{where}: {bad} {why}')
    return out

  def add(self, video_id: str, image, audio) -> int:
    """Validates and writes one video; returns its global record index."""
    self._check_new(video_id)
    image = self._prepare(video_id, 'image', image)
    if self._shape is None:
      self._shape = image.shape
    audio = self._prepare(video_id, 'audio', audio)
    index = self._out.write(encode_av_record(video_id, image, audio, self.dtype))
    self._seen.add(video_id)
    self._ids.append(video_id)
    return index

  def _filename(self, index: int, count: int) -> str:
    return av_shard_filename(self.name, index, count)

  def _write_index(self, folder, files):
    head = {'format': FORMAT, 'version': VERSION, 'name': self.name, 'frames': self._shape[0],
            'dim': self._shape[1], 'dtype': self.dtype, 'records': len(self._ids), 'shards': files}
    with open(os.path.join(folder, INDEX), 'w') as f:  # one id per line: readable and diffable
      f.write(json.dumps(head, indent=1)[:-2] + ',\n "ids": [\n')
      f.write(',\n'.join(json.dumps(v) for v in self._ids) + '\n ]\n}\n')

  def _summary(self, files) -> dict:
    return {'videos': len(self._ids), 'shards': len(files)}


# ----------------------------------------------------------------------------------------------- reader

class AVShardFeatures:
  """A shard directory with the interface of `AVFeatures`; picklable (shard files reopen lazily per process)."""

  def __init__(self, directory: str, frames: Optional[int] = None, dim: Optional[int] = None):
    self.directory = directory
    path = os.path.join(directory, INDEX)
    index = record_dir.read_index(directory, INDEX, FORMAT, VERSION, 'AVHash shard',
                                  'input_pipeline.avhash.make_shards', AVShardError)
    try:
      self.shape = (int(index['frames']), int(index['dim']))
      self.dtype = str(index['dtype'])
      self._files = [os.path.join(directory, str(s['file'])) for s in index['shards']]
      self._counts = [int(s['records']) for s in index['shards']]
      self._ids = [str(v) for v in index['ids']]
      records = int(index['records'])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise AVShardError(f'{path}: malformed index ({type(e).__name__}: {e})') from e
    if self.dtype not in DTYPES:
      raise AVShardError(f'{path}: dtype {self.dtype!r}; expected one of {sorted(DTYPES)}')
    if not self._ids or records != len(self._ids) or sum(self._counts) != records:
      raise AVShardError(f'{path}: record counts do not match (index "records" {records}, {len(self._ids)} ids, '
                         f'shards hold {sum(self._counts)})')
    self._row: Dict[str, int] = {v: i for i, v in enumerate(self._ids)}
    if len(self._row) != len(self._ids):
      raise AVShardError(f'{path}: duplicate video ids in the index')
    for fn in self._files:
      if not os.path.isfile(fn):
        raise AVShardError(f'{fn}: shard file listed in {path} is missing')
    expected = (frames if frames is not None else self.shape[0], dim if dim is not None else self.shape[1])
    if tuple(expected) != self.shape:
      raise AVShardError(f'{directory}: features are [frames, dim] = {list(self.shape)} ({INDEX}) but '
                         f'{list(expected)} was requested')
    self._starts = np.cumsum([0] + self._counts)
    self._readers, self._pid = {}, None

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_readers'], state['_pid'] = {}, None
    return state

  def __repr__(self):
    return f'AVShardFeatures({self.directory!r})'

  def __len__(self) -> int:
    return len(self._ids)

  @property
  def ids(self) -> List[str]:
    return list(self._ids)

  def close(self) -> None:
    for r in self._readers.values():
      with contextlib.suppress(Exception):
        r.close()
    self._readers = {}

  def _reader(self, shard: int):
    if self._pid != os.getpid():  # a forked worker must not share the parent's file handles
      self._readers, self._pid = {}, os.getpid()
    if shard not in self._readers:
      fn = self._files[shard]
      try:
        reader = array_record_module.ArrayRecordReader(fn, READ_OPTIONS)
        ok, found = reader.ok(), reader.num_records()
      except Exception as e:  # array_record reports broken files with various exception types
        raise AVShardError(f'{fn}: not a readable ArrayRecord file (corrupt or truncated; {type(e).__name__}: '
                           f'{e})') from e
      if not ok or found != self._counts[shard]:
        with contextlib.suppress(Exception):  # close() re-raises the reader's error
          reader.close()
        raise AVShardError(f'{fn}: ' + (f'holds {found} records; {INDEX} says {self._counts[shard]}' if ok else
                                        'not a readable ArrayRecord file (corrupt or truncated)'))
      self._readers[shard] = reader
    return self._readers[shard]

  def check_ids(self, ids: Sequence[str], list_path='list') -> None:
    """Every id must be in the shards; the error names the first missing id, the directory and the list."""
    missing = [v for v in ids if v not in self._row]
    if missing:
      raise AVShardError(f'{self.directory}: video {missing[0]!r} from {list_path} is not in the shards '
                         f'({len(missing)} of {len(ids)} ids missing)')

  def read(self, video_id: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(image, audio)`` float32 ``[frames, dim]`` each, validated."""
    key = self._row.get(video_id)
    if key is None:
      raise AVShardError(f'{self.directory}: video {video_id!r} is not in the shards')
    shard = int(np.searchsorted(self._starts, key, side='right')) - 1
    where = f'{self._files[shard]}: record {key - self._starts[shard]} (video {video_id!r})'
    try:
      data = self._reader(shard).read([int(key - self._starts[shard])])[0]
    except AVShardError as e:
      raise AVShardError(f'{e} (reading video {video_id!r})') from None
    except Exception as e:
      raise AVShardError(f'{where}: cannot be read (corrupt or truncated shard file; {type(e).__name__}: '
                         f'{e})') from e
    found, image, audio = decode_av_record(data, where)
    if found != video_id:
      raise AVShardError(f'{where}: holds video {found!r} but {INDEX} says {video_id!r} (index and shards '
                         f'do not match)')
    if image.shape != self.shape:
      raise AVShardError(f'{where}: shape {image.shape} differs from {INDEX}\'s {self.shape}')
    for kind, x in (('image', image), ('audio', audio)):
      if not np.isfinite(x).all():
        raise AVShardError(f'{where}: {kind} has {int(x.size - np.isfinite(x).sum())} NaN/Inf values')
    return image, audio


def open_features(image_h5: str, audio_h5: str, shards: str = '', frames: int = data_lists.FRAMES,
                  dim: int = data_lists.DIM):
  """`AVShardFeatures(shards)` when `shards` is set, else `AVFeatures(image_h5, audio_h5)`."""
  if shards:
    return AVShardFeatures(shards, frames, dim)
  return data_lists.AVFeatures(image_h5, audio_h5, frames, dim)


# ------------------------------------------------------------------------------------------ conversion

def _h5_ids(path: str) -> Tuple[List[str], Optional[Tuple[int, ...]]]:
  """The group names of a feature file and the shape of the first one's vectors."""
  import h5py  # pylint: disable=g-import-not-at-top
  try:
    with h5py.File(path, 'r') as f:
      ids = list(f.keys())
      first = f.get(f'{ids[0]}/vectors') if ids else None
      return ids, (tuple(first.shape) if isinstance(first, h5py.Dataset) else None)
  except OSError as e:
    raise AVShardError(f'{path}: not a readable HDF5 file ({e})') from e


def convert_h5(image_h5: str, audio_h5: str, output: str, ids: Optional[Sequence[str]] = None,
               lists: Sequence[str] = (), dataset: Optional[str] = None, records_per_shard: int = 4096,
               dtype: str = 'float32', progress: bool = True, name: str = 'avhash',
               frames: Optional[int] = None, dim: Optional[int] = None) -> dict:
  """Packs videos of the two HDF5 feature files into a shard directory; returns the writer's summary + seconds.

  Videos: `ids` and the ids of the split `lists` (read as `dataset`, fcvid or activitynet), in that order
  without repeats; with neither, every video of the files (which must then hold the same ids). frames/dim
  default to the shape of the first video in the image file.
  """
  start = time.time()
  for p in (image_h5, audio_h5):
    if not os.path.isfile(p):
      raise AVShardError(f'{p}: feature file not found')
  image_ids, shape = _h5_ids(image_h5)
  if ids is None and not lists:
    audio_ids = _h5_ids(audio_h5)[0]
    only_image, only_audio = set(image_ids) - set(audio_ids), set(audio_ids) - set(image_ids)
    if only_image or only_audio:
      parts = [f'{len(s)} in {p} only (e.g. {min(s)!r})' for s, p in ((only_image, image_h5),
                                                                      (only_audio, audio_h5)) if s]
      raise AVShardError(f'the two feature files hold different videos: {"; ".join(parts)} '
                         f'(give --list to choose the videos)')
    wanted, sources = list(image_ids), []
  else:
    if lists and dataset is None:
      raise AVShardError(f'split lists {list(lists)} need a dataset (fcvid or activitynet) to be read')
    sources = [('ids', list(ids or []))] + [(p, data_lists.read_list(p, dataset)[0]) for p in lists]
    wanted = list(dict.fromkeys(v for _, vs in sources for v in vs))
  if not wanted:
    raise AVShardError(f'{image_h5}: no videos to convert')
  if shape is None and (frames is None or dim is None):
    raise AVShardError(f'{image_h5}: the first video has no "vectors" dataset to take [frames, dim] from')
  frames = shape[0] if frames is None else frames
  dim = (shape[1] if len(shape) > 1 else 0) if dim is None else dim
  feats = data_lists.AVFeatures(image_h5, audio_h5, frames, dim)
  try:
    for where, vs in sources:
      if vs:
        feats.check_ids(vs, where)
    with AVShardWriter(output, name, records_per_shard, dtype, frames, dim) as writer:
      import tqdm  # pylint: disable=g-import-not-at-top
      for vid in tqdm.tqdm(wanted, desc='videos', unit='video', disable=not progress):
        writer.add(vid, *feats.read(vid))
  finally:
    feats.close()
  return dict(writer.summary, seconds=time.time() - start)
