r"""Build, extend and edit a HAP-VR search index (for `python -m hapvr_jax.search`).

From video files, through the evaluation extractor (1 frame/s, ResNet-50 L3-iRMAC + PCA, [T, 9, 512]):

  python -m hapvr_jax.index --index=my_index --video_dir=videos --resnet=ckpt/resnet50_irmac

From an existing DnS-format feature file (one [T, 9, 512] dataset per id; no re-extraction):

  python -m hapvr_jax.index --index=fivr_index --features=fivr_5k.hdf5

Rerunning either command adds the videos the index lacks: it extends an index and resumes a killed build
(videos are committed in batches of --batch; a kill loses at most the batch in progress, never the index).
`--remove=ID,ID` hides videos; `--merge=PART,PART` joins indexes built by several hosts with the extractor's
host split (`--num_shards=4 --shard_index=k` builds INDEX-0000k-of-00004). The index holds each video's
region features (float16 by default), its metadata (path, duration, frames, fps), a coarse descriptor
(hapvr_jax.coarse) in a FAISS index (exact; `--coarse_index=ivfpq` for millions of videos) and a manifest of
the settings; another backbone or feature size is refused with one error line, the index untouched.
"""
from __future__ import annotations

import json
import os

import numpy as np
import tqdm
from absl import flags

from common_jax import cli, faults, xla_cpu
from common_jax.float_index import FloatIndex
from common_jax.index_dir import IndexDir, IndexDirError
from extraction import runner as extraction
from hapvr_jax import coarse

KIND = 'hapvr'
COARSE_FILE, COARSE_INFO = 'coarse.faiss', 'coarse.json'
FEATURE_FILE_BACKBONE = 'DnS feature file'


def index_config(backbone: str, dims: int, regions: int, fps: float, feature_dtype: str = 'float16',
                 coarse_index: str = 'flat') -> dict:
  """The manifest config: what the stored features mean; an index built otherwise is refused."""
  return {'backbone': backbone, 'dims': int(dims), 'regions': int(regions), 'fps': float(fps),
          'feature_dtype': feature_dtype, 'coarse': coarse.METHOD, 'coarse_index': coarse_index}


def open_or_create(path: str, config: dict) -> IndexDir:
  """The index at `path` (its coarse index kind kept when `config` leaves it out) or a new one."""
  if os.path.exists(os.path.join(path, 'manifest.json')):
    existing = IndexDir.open(path, KIND)
    config = {**config, 'coarse_index': config.get('coarse_index') or existing.config.get('coarse_index')}
  return IndexDir.create(path, KIND, {**config, 'coarse_index': config.get('coarse_index') or 'flat'})


def video_entry(ix: IndexDir, video_id: str, features: np.ndarray, meta: dict):
  """(id, arrays, meta) of one video for IndexDir.add: features cast to the index's dtype, its descriptor."""
  x = np.asarray(features)
  x = x[:, None] if x.ndim == 2 else x
  cfg = ix.config
  if x.ndim != 3 or x.shape[1:] != (cfg['regions'], cfg['dims']):
    raise IndexDirError(f'video {video_id!r}: features of shape {x.shape}; the index {ix.path} holds '
                        f'[T, {cfg["regions"]}, {cfg["dims"]}]')
  if not np.all(np.isfinite(x)):
    raise IndexDirError(f'video {video_id!r}: non-finite features')
  stored = x.astype(cfg['feature_dtype'])
  return video_id, {'features': stored, 'coarse': coarse.describe(stored)}, {'frames': int(len(x)), **meta}


# ------------------------------------------------------------------------------------------ coarse index
def refresh_coarse(ix: IndexDir, force: bool = False) -> FloatIndex | None:
  """The FAISS index of the live videos' descriptors (rows: ix.ids()), rebuilt when missing or stale.
  A corrupt file is an error naming it (delete it, or pass force, to rebuild)."""
  path, info_path = ix.derived_path(COARSE_FILE), ix.derived_path(COARSE_INFO)
  if len(ix) == 0:
    raise IndexDirError(f'{ix.path}: the index is empty; add videos with python -m hapvr_jax.index')
  info = None
  if not force and os.path.exists(info_path) and os.path.exists(path):
    with open(info_path) as f:
      try:
        info = json.load(f)
      except ValueError:
        info = None
  if info is not None and info.get('version') == ix.version and info.get('videos') == len(ix):
    return FloatIndex.load(path)
  from common_jax import io_util
  descriptors = ix.stack('coarse', ix.ids())
  index = FloatIndex.build(descriptors, ix.config.get('coarse_index', 'flat'))
  index.save(path)   # then the info: a kill between the two leaves the info stale, so the file is rebuilt
  faults.point('hapvr_index.coarse_saved')
  io_util.write_json(info_path, {'version': ix.version, 'videos': len(ix), 'kind': index.kind})
  return index


# ------------------------------------------------------------------------------------------------ sources
def add_feature_file(ix: IndexDir, path: str, ids=None, batch: int = 64, progress: bool = True) -> int:
  """Adds the videos of a DnS-format feature file that the index lacks; returns how many were added."""
  from hapvr_jax.features import FeatureFile
  ff = FeatureFile(path, dims=ix.config['dims'])
  ids = sorted(ff.ids()) if ids is None else list(ids)
  todo = [v for v in ids if v not in ix]
  fps, added, pending = ix.config['fps'], 0, []
  for vid in tqdm.tqdm(todo, desc='indexing features', unit='video', disable=not progress):
    x = ff.read(vid)
    meta = {'path': f'{os.path.abspath(path)}:{vid}', 'duration': len(x) / fps, 'fps': fps}
    pending.append(video_entry(ix, vid, x, meta))
    if len(pending) >= batch:
      added += ix.add(pending)
      pending = []
  added += ix.add(pending)
  ff.close()
  return added


def load_backbone(resnet: str):
  from backbones import registry
  return registry.load(resnet, 'resnet50_irmac')


def features_fn(net, batch_size: int = 64):
  """(frames [T, 224, 224, 3] uint8 -> features [T, R, D]) through the extractor's packed batches."""
  from backbones import registry
  fn, multiple = registry.batch_fn([net])
  return extraction.PackedRunner(lambda x: fn(x)[0], -(-batch_size // multiple) * multiple)


def decode_video(path: str, fps: float):
  """(frames, metadata) as the evaluation extractor decodes a video; VideoError names an unreadable file."""
  from extraction import video_io
  frames, _ = video_io.read_frames_fps(path, fps=fps, short_side=256, crop=224)
  info = video_io.probe(path)
  meta = {'path': os.path.abspath(path), 'duration': round(float(info.duration), 3), 'fps': fps,
          'source_fps': round(float(info.fps), 3)}
  return frames, meta


def add_videos(ix: IndexDir, videos, runner, batch: int = 64, workers: int = 4, failures=None) -> dict:
  """Extracts and adds the videos (extraction.Video) the index lacks, committing every `batch` videos."""
  fps, meta, pending = ix.config['fps'], {}, []

  def decode(video):
    frames, meta[video.video_id] = decode_video(video.path, fps)
    return extraction.frames_or_error(video, frames)

  def write(video, out):
    pending.append(video_entry(ix, video.video_id, out, meta.pop(video.video_id)))
    if len(pending) >= batch:
      ix.add(pending)
      pending.clear()

  stats = extraction.run(videos, decode, lambda v, x: runner.add(v, x), write, runner.flush,
                         done=set(ix.ids()), failures=failures, workers=workers, desc='indexing videos')
  ix.add(pending)
  return stats


# ------------------------------------------------------------------------------------------------ program
def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('index', None, 'index folder (created if missing)', flag_values=fv, required=True)
  flags.DEFINE_string('features', '', 'a DnS-format feature file to index instead of video files',
                      flag_values=fv)
  flags.DEFINE_string('resnet', '', 'converted resnet50_irmac (with PCA) directory, for video files',
                      flag_values=fv)
  flags.DEFINE_list('remove', [], 'video ids to remove', flag_values=fv)
  flags.DEFINE_list('merge', [], 'index folders (other hosts\' parts) to merge into --index', flag_values=fv)
  flags.DEFINE_integer('batch', 64, 'videos per commit (a kill loses at most one batch of work)',
                       flag_values=fv, lower_bound=1)
  flags.DEFINE_float('fps', 1.0, 'frames decoded per second of video (> 0)', flag_values=fv)
  extraction.require_positive(fv, 'fps')
  flags.DEFINE_enum('feature_dtype', 'float16', ['float16', 'float32'], 'stored region features',
                    flag_values=fv)
  flags.DEFINE_enum('coarse_index', None, ['flat', 'ivfpq'], 'FAISS index of the coarse descriptors: exact '
                    '(flat, default) or IVF-PQ (millions of videos)', flag_values=fv)
  flags.DEFINE_integer('batch_size', 64, 'frames per accelerator batch', flag_values=fv, lower_bound=1)
  flags.DEFINE_bool('progress', True, 'show progress bars', flag_values=fv)
  extraction.define_flags(fv)


def run(args) -> dict:
  ix_path = args.index
  if not (args.merge or args.remove or args.features):
    xla_cpu.configure('resnet50_irmac')   # video files: the backbone's CPU options, before JAX starts
  if args.merge:
    parts = [IndexDir.open(p, KIND) for p in args.merge]
    ix = IndexDir.create(ix_path, KIND, parts[0].config)
    added = sum(ix.merge(p) for p in parts)
  elif args.remove:
    ix = IndexDir.open(ix_path, KIND)
    added = -ix.remove(args.remove)
  elif args.features:
    from hapvr_jax.features import FeatureFile
    ff = FeatureFile(args.features)
    first = sorted(ff.ids())
    if not first:
      raise IndexDirError(f'{args.features}: holds no feature datasets')
    regions, dims = ff.regions(first[0]), ff.read(first[0]).shape[-1]
    shards, shard = args.num_shards or 1, args.shard_index or 0
    ids = first[shard::shards] if 0 <= shard < shards else cli.fail('--shard_index out of range')
    ix = open_or_create(extraction.shard_path(ix_path, shards, shard), index_config(
        FEATURE_FILE_BACKBONE, dims, regions, args.fps, args.feature_dtype, args.coarse_index))
    added = add_feature_file(ix, args.features, ids, args.batch, args.progress)
  else:
    if not args.resnet:
      raise cli.UsageError('give --features=FILE, or video files (--video_dir or --videos) and --resnet=DIR')
    videos, shards, shard = extraction.this_host(args)
    net = load_backbone(args.resnet)
    ix = open_or_create(extraction.shard_path(ix_path, shards, shard), index_config(
        extraction.backbone_identity(net), net.config.out_dims, 9, args.fps, args.feature_dtype,
        args.coarse_index))
    failures = extraction.FailureLog(os.path.join(ix.path, 'failures.jsonl'))
    stats = add_videos(ix, videos, features_fn(net, args.batch_size), args.batch, args.workers, failures)
    failures.write()
    added = stats['extracted']
  if len(ix):
    refresh_coarse(ix)
  return {'index': ix.path, 'videos': len(ix), 'changed': added}


def main(argv=None) -> int:
  args = cli.parse_flags(define_flags, argv, __doc__)
  if sum(map(bool, (args.features, args.remove, args.merge))) > 1:
    return cli.fail('give one of --features, --remove, --merge (or video files)')
  with cli.clear_errors():
    print(json.dumps(run(args)))
  return 0


if __name__ == '__main__':
  cli.run_main(main)
