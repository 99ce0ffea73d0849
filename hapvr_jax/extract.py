r"""HAP-VR features from video files: DnS-format HDF5 for evaluation, augmented views for training.

Evaluation features (as the DnS files): 1 frame/s, shorter side 256 (ffmpeg's fps and bicubic scale, through
PyAV), centre crop 224, ResNet-50 L3-iRMAC + ViSiL PCA -> one dataset [T, 9, 512] per video id:

  python -m hapvr_jax.extract --resnet=ckpt/resnet50_irmac --video_dir=fivr/videos --output=fivr_5k.h5

Training views: per video `--segments` 56-frame segments (random start, short videos tiled),
each stored as 1 weak + (`--views` - 1) strong pixel-augmented views (hapvr_jax.augment), with ResNet region
features and DINO ViT-S/16 CLS features, in the HDF5 view format of input_pipeline.hapvr.hdf5_views (a file per
host; the folder is a training store, and `--shards_output` also converts it to ArrayRecord shards):

  python -m hapvr_jax.extract --mode=train --views=4 --segments=2 --resnet=ckpt/resnet50_irmac \
      --dino=ckpt/dino_vits16 --videos=vcdb_list.txt --output=vcdb_views/views.h5 --bank_size=256

Resumable (rerun the same command: logged ids are skipped, a half-written video is redone), never half-written
at the final name, `--num_shards/--shard_index` (default: the jax process count/index) split one collection
over hosts (`x.h5` -> `x-00001-of-00004.h5`). Unreadable videos are logged to `<output>.failures.jsonl` and
skipped; the run ends with a summary (exit 0, or 1 when some videos failed and `--strict`). The settings that
determine the features (mode, fps, dtype, backbone weights, views, ...) are recorded in the output, and
resuming or extending it with other settings is refused. A full disk ends the run with one error line, the
finished videos kept.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib

import numpy as np
from absl import flags

from backbones import registry
from common_jax import cli, xla_cpu
from extraction import runner as extraction
from extraction import feature_writer
from extraction import video_io

SEGMENT_FRAMES = 56


def video_rng(seed: int, video_id: str) -> np.random.Generator:
  """Per-video randomness: the same views whatever the host split, order or resume point."""
  return np.random.default_rng([seed, zlib.crc32(video_id.encode())])


def segments_of(frames: np.ndarray, count: int, rng: np.random.Generator, length: int = SEGMENT_FRAMES):
  """`count` segments of `length` frames: a random start (randint(len - length), whose last offset is never
  drawn, as the original), or for a short video the frames tiled by concatenation."""
  n = len(frames)
  tiled = frames
  while len(tiled) < length:
    tiled = np.concatenate([tiled, frames])
  out = []
  for _ in range(count):
    start = int(rng.integers(max(len(tiled) - length, 1)))
    out.append((start, tiled[start:start + length]))
  return out, n


def make_bank(resnet_dino_fn, size: int, rng: np.random.Generator, augment, fonts, emojis, batch: int):
  """Features of black and uniform-noise frames through the strong-view pipeline: the frames TSD blanks or
  fills with noise, which the train step cannot render itself since it never sees pixels."""
  bank = {}
  for kind in ('black', 'noise'):
    frames = (np.zeros((size, 256, 256, 3), np.uint8) if kind == 'black'
              else rng.integers(0, 256, (size, 256, 256, 3), dtype=np.uint8))
    views = np.concatenate([augment.strong_view(f[None], rng, fonts=fonts, emojis=emojis)[0] for f in frames])
    runner = extraction.PackedRunner(resnet_dino_fn, batch)
    (_, (regions, teacher)), = runner.add('bank', views) + runner.flush()
    bank[f'{kind}_regions'], bank[f'{kind}_teacher'] = regions.astype(np.float16), teacher.astype(np.float16)
  return bank


def _list_files(folder: str, pattern: str):
  return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(pattern))


def settings(args, nets, dtype) -> dict:
  """What determines the stored features: a resumed or extended output must have been made with the same."""
  out = {'mode': args.mode, 'fps': float(args.fps), 'dtype': dtype.name, 'short_side': 256,
         'crop': 224 if args.mode == 'eval' else 'none', 'keep_extension': args.keep_extension,
         'resnet': extraction.backbone_identity(nets[0])}
  if args.mode == 'train':
    out.update(dino=extraction.backbone_identity(nets[1]), dino_normalize=args.dino_normalize, views=args.views,
               segments=args.segments, segment_frames=SEGMENT_FRAMES, seed=args.seed,
               fonts_dir=os.path.abspath(args.fonts_dir) if args.fonts_dir else '',
               emojis_dir=os.path.abspath(args.emojis_dir) if args.emojis_dir else '')
  return out


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_enum('mode', 'eval', ['eval', 'train'], 'eval: DnS-format features; train: augmented views',
                    flag_values=fv)
  flags.DEFINE_string('output', None, 'HDF5 file to write (per host: -0000k-of-0000n added)', flag_values=fv,
                      required=True)
  flags.DEFINE_string('resnet', None, 'converted resnet50_irmac (with PCA) directory', flag_values=fv,
                      required=True)
  flags.DEFINE_string('dino', '', 'converted dino_vits16 directory (train mode)', flag_values=fv)
  flags.DEFINE_enum('dino_normalize', 'none', ['none', 'imagenet'],
                    "DINO input: the original's raw [0,255] pixels (none) or ImageNet normalisation", flag_values=fv)
  flags.DEFINE_integer('views', 4, 'train: views per segment (1 weak + views-1 strong)', flag_values=fv,
                       lower_bound=1)
  flags.DEFINE_integer('segments', 2, 'train: 56-frame segments per video', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('bank_size', 0, 'train: black/noise bank entries per kind', flag_values=fv, lower_bound=0)
  flags.DEFINE_string('fonts_dir', '', "TTF fonts for text overlays (e.g. augly's fonts)", flag_values=fv)
  flags.DEFINE_string('emojis_dir', '', "RGBA PNG emojis for emoji overlays (e.g. augly's)", flag_values=fv)
  flags.DEFINE_string('shards_output', '', 'train: also write ArrayRecord shards here at the end', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'seed of the per-video augmentations and the bank', flag_values=fv)
  flags.DEFINE_float('fps', 1.0, 'frames decoded per second of video (> 0)', flag_values=fv)
  extraction.require_positive(fv, 'fps')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'float16'], 'eval features dtype', flag_values=fv)
  flags.DEFINE_integer('batch_size', 128, 'frames per accelerator batch', flag_values=fv, lower_bound=1)
  extraction.define_flags(fv)


def extract(args) -> int:
  xla_cpu.configure('resnet50_irmac', *(('dino_vits16',) if args.mode == 'train' else ()))   # before JAX starts
  from hapvr_jax import augment  # pylint: disable=g-import-not-at-top
  videos, num_shards, shard_index = extraction.this_host(args)
  output = extraction.shard_path(args.output, num_shards, shard_index)
  train = args.mode == 'train'
  if train and (not args.dino or args.views < 2 or args.segments < 1):
    raise ValueError('--mode=train needs --dino, --views >= 2 (1 weak + strong views) and --segments >= 1')
  if args.shards_output and (not train or num_shards > 1):
    raise ValueError('--shards_output needs --mode=train on one host; with several hosts run '
                     'python -m input_pipeline.hapvr.make_shards on the output folder once all have finished')
  nets = [registry.load(args.resnet, 'resnet50_irmac')]
  if train:
    dino = registry.load(args.dino, 'dino_vits16')
    dino.config = dataclasses.replace(dino.config, normalize=args.dino_normalize)
    nets.append(dino)
  fn, multiple = registry.batch_fn(nets)
  batch = -(-args.batch_size // multiple) * multiple
  runner = extraction.PackedRunner(fn if train else (lambda x: fn(x)[0]), batch)
  fonts = _list_files(args.fonts_dir, '.ttf') if args.fonts_dir else None
  emojis = _list_files(args.emojis_dir, '.png') if args.emojis_dir else None
  dtype = np.dtype(np.float16) if train else np.dtype(args.dtype)
  writer = feature_writer.ResumableH5({'features': output}, settings(args, nets, dtype))
  failures = extraction.FailureLog(output + '.failures.jsonl')
  meta = {}

  def decode(video):
    if not train:
      frames = video_io.read_frames_fps(video.path, fps=args.fps, short_side=256, crop=224)[0]
      return extraction.frames_or_error(video, frames)
    frames = extraction.frames_or_error(video, video_io.read_frames_fps(video.path, fps=args.fps,
                                                                        short_side=256, crop=None)[0])
    rng = video_rng(args.seed, video.video_id)
    segs, n = segments_of(frames, args.segments, rng)
    views, meta[video.video_id] = [], []
    for s, (start, seg) in enumerate(segs):
      for v in range(args.views):
        kind = 'weak' if v == 0 else 'strong'
        clip, m = (augment.weak_view(seg, rng) if v == 0 else
                   augment.strong_view(seg, rng, fonts=fonts, emojis=emojis))
        views.append(clip)
        meta[video.video_id].append((s, kind, v if v == 0 else v - 1, {
            **m, 'source_frames': n, 'segment_start': start, 'seed': args.seed, 'view_type': kind}))
    return np.concatenate(views)

  def write(video, out):
    if train:
      regions, teacher = out
      if not (np.isfinite(regions).all() and np.isfinite(teacher).all()):
        raise ValueError(f'{video.path}: non-finite features')
      def put(f):
        for i, (s, kind, v, m) in enumerate(meta.pop(video.video_id)):
          g = f.create_group(f'{video.video_id}/{s}/{kind}_{v}')
          rows = slice(i * SEGMENT_FRAMES, (i + 1) * SEGMENT_FRAMES)
          g.create_dataset('regions', data=regions[rows].astype(dtype))
          g.create_dataset('teacher', data=teacher[rows].astype(dtype))
          g.attrs['meta'] = json.dumps(m)
      nbytes = (regions.size + teacher.size) * dtype.itemsize
    else:
      if not np.isfinite(out).all():
        raise ValueError(f'{video.path}: non-finite features')
      put = lambda f: f.create_dataset(video.video_id, data=out.astype(dtype), compression='gzip',
                                       compression_opts=4)
      nbytes = out.size * dtype.itemsize
    writer.write(video.video_id, {'features': put}, nbytes)

  stats = extraction.run_resumable(videos, writer, failures, decode, runner.add, write, runner.flush, args.workers,
                                   f'{args.mode} features')
  if stats is None:
    return 0
  if train and args.bank_size and shard_index == 0:
    from input_pipeline.hapvr.shard_format import save_bank  # pylint: disable=g-import-not-at-top
    bank_rng = np.random.default_rng([args.seed, 0xBA4C])
    save_bank(os.path.join(os.path.dirname(os.path.abspath(output)), 'bank.npz'),
              make_bank(fn, args.bank_size, bank_rng, augment, fonts, emojis, batch))
  writer.commit()
  if train and args.shards_output:
    from input_pipeline.hapvr import hdf5_views  # pylint: disable=g-import-not-at-top
    hdf5_views.convert(os.path.dirname(os.path.abspath(output)), args.shards_output, progress=True)
  print(json.dumps({'output': output, **stats, 'failures': failures.summary(),
                    'padded_frames': runner.padded_rows, 'batches': runner.batches}))
  return 1 if args.strict and failures.failures else 0


def main(argv=None) -> int:
  return extraction.program_main(define_flags, extract, argv, __doc__)


if __name__ == '__main__':
  cli.run_main(main)
