r"""The on-disk format of ArrayRecord training shards: records, index, bank, TFDS metadata.

`input_pipeline.hapvr.shards` writes and reads it (`ShardWriter`, `ArrayRecordStore`) and re-exports every public
name of this module; `input_pipeline.hapvr.hdf5_views` shares its checks. Nothing here imports h5py or grain.

**Shard directory** (written by `ShardWriter` / `python -m input_pipeline.hapvr.make_shards`, read by
`ArrayRecordStore`), in the TFDS array_record file layout:

  OUT/<name>-train.array_record-00000-of-000NN   one record per stored view (video, segment, view)
  OUT/shards.json                                the index
  OUT/bank.npz                                   optional TSD black/noise frame bank
  OUT/dataset_info.json, OUT/features.json       TFDS metadata (below); this code never reads them

Records are written with group_size:1 (one record per chunk: true random access, what Grain expects) and,
by default, uncompressed: zstd shrinks float16 features little and slows reading a lot. A record is

  b'HAPVRv1\0' | uint32 LE header length H | H bytes JSON header (space-padded so the payload starts at a
  multiple of 8) | regions [T, R, D] float16 LE | teacher [T, C] float16 LE

with header {"video_id", "segment", "kind": "weak"|"strong", "view", "regions": [T, R, D], "teacher": [T, C],
"dtype": "<f2", "meta": {...}} (meta: free-form, e.g. augmentation parameters and extraction seed).
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
  header, regions, teacher = shard_format.decode_record(source[key])   # key: global record index, as in shards.json

or, by name, with OUT placed at D/<name>/1.0.0 (e.g. make_shards --output=D/vcdb/1.0.0; the name must then
match [a-zA-Z]\w*): `tfds.data_source('vcdb', data_dir=D, split='train[10:20]', deserialize_method=RAW)`.
Either source is random access (len, [i]) and can feed `grain.MapDataset.source(source).map(...)`.
RAW_BYTES is required. TFDS's default method parses every record as a serialized tf.train.Example and
decodes it with the features of features.json; DESERIALIZE_NO_DECODE parses the Example with TensorFlow. These
records are not Example protos (they are the float16 layout above, decoded with one frombuffer per array, no
protobuf), so neither applies: with the empty FeaturesDict the default fails with "No features set, cannot
decode example!" (with Tensor features declared it would fail on "Wire format was corrupt"), and
DESERIALIZE_NO_DECODE needs TensorFlow. RAW_BYTES hands back each record's bytes untouched.

**Bank** (`bank.npz`, features of black and noise frames for TSD): float16 arrays `input_pipeline.hapvr.store.BANK_KEYS`.

Every error is a `ShardError` (a ValueError, so the CLIs report it as one `error: ...` line) naming the file and
the video, segment, view or record at fault.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from common_jax import io_util
from input_pipeline import record_dir
from input_pipeline.hapvr.store import BANK_KEYS, STRONG, WEAK, StoreInfo

MAGIC = b'HAPVRv1\0'
FORMAT, VERSION = 'hapvr-view-shards', 1
INDEX, BANK = 'shards.json', 'bank.npz'
TFDS_INFO, TFDS_FEATURES = 'dataset_info.json', 'features.json'
TFDS_VERSION = f'{VERSION}.0.0'  # the dataset version TFDS sees (D/<name>/1.0.0/)
DEFAULT_OPTIONS = 'group_size:1,uncompressed'


class ShardError(ValueError):
  pass


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



def check_output(directory: str) -> None:
  record_dir.check_output(directory, ShardError)


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



def check_video(video_id: str, segments, expected=None):
  """Validates every view of one video as `ShardWriter.add_video` takes them (a list of {"weak": [view, ...],
  "strong": [...]}, a view being (regions, teacher) or (regions, teacher, meta)); `expected`: the (regions,
  teacher) shapes every view must have, None for the first video. Returns (per segment {kind: [(regions float16,
  teacher float16, meta dict)]}, expected)."""
  if not isinstance(segments, (list, tuple)) or not segments:
    raise ShardError(f'video {video_id!r}: no segments')
  prepared = []
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
  return prepared, expected


# ----------------------------------------------------------------------------------------------- records

def encode_record(video_id: str, segment: int, kind: str, view: int, regions: np.ndarray,
                  teacher: np.ndarray, meta: Optional[dict] = None) -> bytes:
  """One view as a record (arrays must already be validated; they are written as float16)."""
  header = {'video_id': video_id, 'segment': int(segment), 'kind': kind, 'view': int(view),
            'regions': list(regions.shape), 'teacher': list(teacher.shape), 'dtype': '<f2', 'meta': meta or {}}
  return record_dir.pack_record(MAGIC, header, np.ascontiguousarray(regions, '<f2').tobytes(),
                                np.ascontiguousarray(teacher, '<f2').tobytes())


def _valid_header(header) -> bool:
  rs, ts = tuple(header['regions']), tuple(header['teacher'])
  return (isinstance(header['video_id'], str) and header['kind'] in (WEAK, STRONG) and header['dtype'] == '<f2'
          and isinstance(header['segment'], int) and isinstance(header['view'], int)
          and isinstance(header['meta'], dict) and len(rs) == 3 and len(ts) == 2
          and all(isinstance(n, int) and n > 0 for n in rs + ts))


def decode_record(data: bytes, where: str = 'record'):
  """(header dict, regions float16 [T, R, D], teacher float16 [T, C]); validates magic, header and sizes."""
  header, offset = record_dir.unpack_record(data, MAGIC, 'a HAP-VR view record', where, _valid_header, ShardError)
  rs, ts = tuple(header['regions']), tuple(header['teacher'])
  nr, nt = int(np.prod(rs)), int(np.prod(ts))
  if len(data) != offset + 2 * (nr + nt):
    raise ShardError(f'{where}: record has {len(data) - offset} payload bytes; header shapes {rs} + {ts} '
                     f'need {2 * (nr + nt)} (corrupt record)')
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




# ------------------------------------------------------------------------------------------ index, TFDS

def tfds_metadata(name: str, counts: List[int], nbytes: int):
  """(dataset_info.json, features.json) contents that let TFDS open the shards (module docstring).

  Hand-written protobuf JSON (DatasetInfo, FeaturesDict) as TFDS 4.9 writes it: int64 fields are strings and
  only known field names appear (TFDS parses it strictly). `counts`: records per shard file, in order.
  """
  info = {
      'name': name, 'version': TFDS_VERSION, 'fileFormat': 'array_record', 'moduleName': 'input_pipeline.hapvr.shards',
      'description': 'HAP-VR training views (one record per stored view). Records are not tf.train.Example: '
                     'read them with deserialize_method=RAW_BYTES and decode them with '
                     'input_pipeline.hapvr.shards.decode_record.',
      'splits': [{'name': 'train', 'filepathTemplate': '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
                  'shardLengths': [str(int(n)) for n in counts], 'numBytes': str(int(nbytes))}]}
  features = {'featuresDict': {}, 'pythonClassName': 'tensorflow_datasets.core.features.features_dict.FeaturesDict'}
  return info, features



def write_metadata(directory: str, head: dict, videos: List[dict], counts: List[int]) -> None:
  """Writes shards.json (`head` + "videos") and the TFDS metadata into `directory`, beside the shard files."""
  nbytes = sum(os.path.getsize(os.path.join(directory, f['file'])) for f in head['shards'])
  for fn, content in zip((TFDS_INFO, TFDS_FEATURES), tfds_metadata(head['name'], counts, nbytes)):
    with open(os.path.join(directory, fn), 'w') as f:
      f.write(json.dumps(content, indent=2, sort_keys=True) + '\n')
  with open(os.path.join(directory, INDEX), 'w') as f:  # one video per line: readable and diffable
    f.write(json.dumps(head, indent=1)[:-2] + ',\n "videos": [\n')
    f.write(',\n'.join(json.dumps(v, separators=(',', ':')) for v in videos) + '\n ]\n}\n')


def read_index(directory: str) -> dict:
  """The shards.json of a shard directory, checked for format and version (not yet for content)."""
  return record_dir.read_index(directory, INDEX, FORMAT, VERSION, 'HAP-VR shard', 'input_pipeline.hapvr.make_shards',
                               ShardError)
