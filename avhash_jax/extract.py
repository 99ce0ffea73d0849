r"""AVHash features from video files: 25 CLIP frame embeddings and 25 AST audio-segment embeddings per video.

  python -m avhash_jax.extract --clip=ckpt/clip_vitl14 --ast=ckpt/ast --video_dir=fcvid/videos \
      --image_output=fcvid_clip.h5 --audio_output=fcvid_ast.h5

Frames: 25 timestamps t_k = (k + 0.5)·T/25 (the centres of 25 equal slices; the original does not publish
its frame sampling), each the last frame at or before t_k;
shorter side resized to 224 (bicubic) and centre-cropped, CLIP normalisation; stored: the unnormalised
768-d `image_embeds`. Audio: the track resampled to 16 kHz mono; 25 windows of
`--audio_window` seconds centred on the same timestamps, clipped to the track (or `--audio_segments=chunks`:
25 equal consecutive chunks); each window -> Kaldi fbank (128 bins), padded/truncated to 1024 frames,
normalised; AST pooled output (mean of CLS and distillation tokens). A video without an audio track gets zero
vectors (`--no_audio=zeros`, the default, counted in the summary) or is recorded as a failure (`fail`).

The two files have one group per video id holding a dataset `vectors`, float32 [25, 768]: the original's
layout, which `avhash_jax.evaluate`, training and `input_pipeline.avhash.make_shards` read. Resumable, never
half-written at the final names, `--num_shards/--shard_index` for several hosts, failures in
`<image_output>.failures.jsonl`, the settings recorded and a resume with other ones refused, a full disk one
error line (see hapvr_jax.extract).
"""
from __future__ import annotations

import json

import numpy as np
from absl import flags

from backbones import fbank, registry
from common_jax import cli, xla_cpu
from extraction import runner as extraction
from extraction import feature_writer
from extraction import video_io

SEGMENTS = 25


def audio_inputs(wave: np.ndarray, times: np.ndarray, mode: str, window: float, max_length: int) -> np.ndarray:
  """[25, max_length, 128] normalised AST inputs of one track."""
  if mode == 'chunks':
    pieces = video_io.equal_chunks(wave, len(times))
  else:
    pieces = video_io.audio_windows(wave, times, rate=fbank.SAMPLE_RATE, window=window)
  # NumPy on the decoding threads, beside the accelerator's work; a window under 25 ms is all padding.
  return np.stack([fbank.ast_input_numpy(p, max_length=max_length) for p in pieces]).astype(np.float32)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('clip', None, 'converted clip_vitl14 directory', flag_values=fv, required=True)
  flags.DEFINE_string('ast', None, 'converted ast directory', flag_values=fv, required=True)
  flags.DEFINE_string('image_output', None, 'HDF5 file of CLIP features', flag_values=fv, required=True)
  flags.DEFINE_string('audio_output', None, 'HDF5 file of AST features', flag_values=fv, required=True)
  flags.DEFINE_enum('audio_segments', 'windows', ['windows', 'chunks'],
                    'windows centred on the frame times, or equal consecutive chunks', flag_values=fv)
  flags.DEFINE_float('audio_window', 5.0, 'seconds per centred audio window (> 0)', flag_values=fv)
  extraction.require_positive(fv, 'audio_window')
  flags.DEFINE_enum('no_audio', 'zeros', ['zeros', 'fail'], 'a video without audio: zero vectors, or a failure',
                    flag_values=fv)
  flags.DEFINE_integer('batch_size', 100, 'frames per CLIP batch', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('audio_batch_size', 50, 'segments per AST batch', flag_values=fv, lower_bound=1)
  extraction.define_flags(fv)


def extract(args) -> int:
  xla_cpu.configure('clip_vitl14', 'ast')   # before JAX starts: XLA reads its options once
  videos, num_shards, shard_index = extraction.this_host(args)
  paths = {'image': extraction.shard_path(args.image_output, num_shards, shard_index),
           'audio': extraction.shard_path(args.audio_output, num_shards, shard_index)}
  if paths['image'] == paths['audio']:
    raise ValueError('--image_output and --audio_output must be different files')
  clip, ast = registry.load(args.clip, 'clip_vitl14'), registry.load(args.ast, 'ast')
  max_length = ast.config.max_length
  runners = {}
  for name, net, size in (('image', clip, args.batch_size), ('audio', ast, args.audio_batch_size)):
    fn, multiple = registry.batch_fn([net])
    runners[name] = extraction.PackedRunner(lambda x, fn=fn: fn(x)[0], -(-size // multiple) * multiple)
  writer = feature_writer.ResumableH5(paths, {
      'clip': extraction.backbone_identity(clip), 'ast': extraction.backbone_identity(ast), 'frames': SEGMENTS,
      'audio_segments': args.audio_segments, 'audio_window': float(args.audio_window),
      'no_audio': args.no_audio, 'keep_extension': args.keep_extension})
  failures = extraction.FailureLog(paths['image'] + '.failures.jsonl')
  silent, partial, dropped = [], {}, set()

  def decode(video):
    info = video_io.probe(video.path)
    times = video_io.uniform_times(info.duration, SEGMENTS)
    frames = extraction.frames_or_error(video, video_io.clip_frames(video_io.read_frames_at(video.path, times)))
    try:
      wave = video_io.read_audio(video.path, rate=fbank.SAMPLE_RATE)
    except video_io.VideoError as e:
      if e.reason != 'no_audio' or args.no_audio == 'fail':
        raise
      return frames, None
    return frames, audio_inputs(wave, times, args.audio_segments, args.audio_window, max_length)

  def collect(name, completed):
    out = []
    for video, emb in completed:
      if video in dropped:   # its other half was in a failed batch
        continue
      partial.setdefault(video, {})[name] = emb
      if len(partial[video]) == 2:
        out.append((video, partial.pop(video)))
    return out

  def gather(steps):
    """Runs (name, call) steps; a failed batch in either runner fails its videos in both (their other half
    is dropped when it arrives) and the completed ones are still returned, through one BatchError."""
    done, failed, cause = [], [], None
    for name, call in steps:
      try:
        done += collect(name, call())
      except extraction.BatchError as e:
        done += collect(name, e.completed)
        failed += e.keys
        cause = cause or e.cause
    if failed:
      dropped.update(failed)
      for video in failed:
        partial.pop(video, None)
      raise extraction.BatchError(failed, cause, [d for d in done if d[0] not in dropped])
    return done

  def compute(video, item):
    frames, audio = item
    if audio is None:
      silent.append(video.video_id)
      zeros = np.zeros((SEGMENTS, ast.config.hidden_size), np.float32)
      return gather([('image', lambda: runners['image'].add(video, frames)), ('audio', lambda: [(video, zeros)])])
    return gather([('image', lambda: runners['image'].add(video, frames)),
                   ('audio', lambda: runners['audio'].add(video, audio))])

  def flush():
    return gather([('image', runners['image'].flush), ('audio', runners['audio'].flush)])

  def write(video, out):
    for name, x in out.items():
      if x.shape != (SEGMENTS, x.shape[-1]) or not np.isfinite(x).all():
        raise ValueError(f'{video.path}: {name} features of shape {x.shape} with non-finite values')
    writer.write(video.video_id, {
        name: (lambda f, x=x.astype(np.float32): f.create_group(video.video_id).create_dataset('vectors', data=x))
        for name, x in out.items()}, {name: x.size * 4 for name, x in out.items()})

  stats = extraction.run_resumable(videos, writer, failures, decode, compute, write, flush, args.workers,
                                   'avhash features')
  if stats is None:
    return 0
  writer.commit()
  print(json.dumps({**paths, **stats, 'no_audio_zero_vectors': len(silent), 'failures': failures.summary()}))
  return 1 if args.strict and failures.failures else 0


def main(argv=None) -> int:
  return extraction.program_main(define_flags, extract, argv, __doc__)


if __name__ == '__main__':
  cli.run_main(main)
