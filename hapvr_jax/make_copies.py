r"""Build a copy-detection corpus from real video: reference videos, query videos into which edited segments of
the references are inserted, and the ground truth in the Video Similarity Challenge format.

  python -m hapvr_jax.make_copies --videos=../shared/data/videos --output=copies --seed=0

`--videos` is a folder (its video files), a glob pattern, one video file, or a list file (one path per line,
relative to the list's folder). Each input is decoded at `--fps` and split into `--tiles` x `--tiles`
disjoint regions brought to `--size` pixels high (16:9): the footage from which `--refs` references of
`--ref_min`..`--ref_max` seconds are concatenated, no frame used twice (hapvr_jax.copy_corpus). Each of the
`--queries` queries holds one (sometimes two) segment(s) of `--min_segment`..`--max_segment` reference
seconds at a random offset amid other footage (what the references left over, or synthetic footage), with
1..`--max_edits` edits drawn from `--edits`: speed 0.5x-2x, crop, hflip, brightness_contrast, pip (the copy
shrunk into other footage), text, rescale (another frame size), low_bitrate; `--no_copy` more queries hold
no copy. Everything follows from `--seed`: a rerun writes the same bytes.

Writes into `--output`, replacing what an earlier run wrote there (built under a temporary name first):
  refs/R000001.mp4 ...     the references (H.264)
  queries/Q000001.mp4 ...  the queries
  refs.txt, queries.txt    one video path per line, relative to the folder (lists for index and search)
  ground_truth.csv         query_id,ref_id,query_start,query_end,ref_start,ref_end in seconds (hapvr_jax.vsc)
  edits.jsonl              per query: its segments, edits and their parameters, and its filler footage
An input shorter than --min_segment is skipped with a logged warning; an unreadable one is one error line,
exit 2, with nothing written. The default run on the three shared clips (4 references, 50 s; 16 queries,
161 s; 15 copied segments) takes about 5 s of CPU.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import flags, logging

from common_jax import cli, io_util
from extraction import copy_edits as ce
from extraction.runner import VIDEO_EXTENSIONS, read_video_list
from hapvr_jax import copy_corpus as cc
from hapvr_jax import vsc


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('videos', None, 'input videos: a folder, a glob pattern, a video file or a list file',
                      flag_values=fv, required=True)
  flags.DEFINE_string('output', None, 'folder of the corpus', flag_values=fv, required=True)
  flags.DEFINE_integer('seed', 0, 'seed of every random choice', flag_values=fv)
  flags.DEFINE_integer('refs', 4, 'reference videos', flag_values=fv, lower_bound=1)
  flags.DEFINE_float('ref_min', 10.0, 'shortest reference, seconds', flag_values=fv, lower_bound=0.1)
  flags.DEFINE_float('ref_max', 20.0, 'longest reference, seconds', flag_values=fv, lower_bound=0.1)
  flags.DEFINE_integer('queries', 12, 'queries that hold a copy', flag_values=fv, lower_bound=0)
  flags.DEFINE_integer('no_copy', 4, 'queries that hold none', flag_values=fv, lower_bound=0)
  flags.DEFINE_float('min_segment', 2.0, 'shortest copied segment, reference seconds', flag_values=fv,
                     lower_bound=0.1)
  flags.DEFINE_float('max_segment', 6.0, 'longest copied segment, reference seconds', flag_values=fv,
                     lower_bound=0.1)
  flags.DEFINE_float('max_gap', 4.0, 'most seconds of other footage before, between and after the copies',
                     flag_values=fv, lower_bound=0.0)
  flags.DEFINE_float('two_segments', 0.25, 'probability of a second copied segment in a query', flag_values=fv,
                     lower_bound=0.0, upper_bound=1.0)
  flags.DEFINE_list('edits', list(cc.EDITS), 'edits drawn from (empty: exact copies)', flag_values=fv)
  flags.DEFINE_integer('max_edits', 3, 'most edits per query', flag_values=fv, lower_bound=0)
  flags.DEFINE_integer('fps', 10, 'frame rate of the output videos', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('size', 160, 'frame height of the references (even; width = 16:9)', flag_values=fv,
                       lower_bound=8)
  flags.DEFINE_integer('tiles', 2, 'each input splits into tiles x tiles disjoint regions', flag_values=fv,
                       lower_bound=1)
  flags.DEFINE_integer('crf', 18, 'x264 quality of the videos (lower: better)', flag_values=fv, lower_bound=0,
                       upper_bound=51)


def settings_from(args) -> cc.Settings:
  for lo, hi in (('ref_min', 'ref_max'), ('min_segment', 'max_segment'), ('max_segment', 'ref_min')):
    if getattr(args, lo) > getattr(args, hi):
      raise cli.UsageError(f'--{lo}={getattr(args, lo):g} is more than --{hi}={getattr(args, hi):g}')
  unknown = [e for e in args.edits if e not in cc.EDITS]
  if unknown:
    raise cli.UsageError(f'--edits: unknown edit {unknown[0]!r} (known: {",".join(cc.EDITS)})')
  if args.size % 2:
    raise cli.UsageError(f'--size={args.size} must be even (H.264 4:2:0)')
  return cc.Settings(fps=args.fps, size=ce.frame_size(args.size), refs=args.refs,
                     ref_seconds=(args.ref_min, args.ref_max), queries=args.queries, no_copy=args.no_copy,
                     segment_seconds=(args.min_segment, args.max_segment), max_gap=args.max_gap,
                     two_segments=args.two_segments, edits=tuple(args.edits), max_edits=args.max_edits)


def input_videos(spec: str) -> list[str]:
  """The video paths that --videos names, in a fixed order."""
  if os.path.isdir(spec):
    paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(VIDEO_EXTENSIONS))
  elif glob.has_magic(spec):
    paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
  elif spec.lower().endswith(VIDEO_EXTENSIONS) or not os.path.isfile(spec):
    if not os.path.isfile(spec):
      raise cli.UsageError(f'--videos={spec}: no such file or folder')
    paths = [spec]
  else:
    paths = [v.path for v in read_video_list(list_path=spec)]
  if not paths:
    raise cli.UsageError(f'--videos={spec}: names no video file ({", ".join(VIDEO_EXTENSIONS)})')
  return paths


def load_strands(paths: list[str], settings: cc.Settings, tiles: int):
  """(strands, their names): the disjoint tiles of each input long enough for a segment."""
  strands, names = [], []
  min_seconds = settings.segment_seconds[0]
  for path in paths:
    frames = ce.decode(path, settings.fps, short_side=tiles * settings.size[1])
    if len(frames) < max(1, round(min_seconds * settings.fps)):
      logging.warning('skipped %s: %.2f s at %d fps is shorter than --min_segment=%g s', path,
                      len(frames) / settings.fps, settings.fps, min_seconds)
      continue
    for k, tile in enumerate(ce.tiles(frames, settings.size, tiles)):
      strands.append(tile)
      names.append(f'{os.path.basename(path)}:tile{k}' if tiles > 1 else os.path.basename(path))
  if not strands:
    raise cli.UsageError(f'no input video is at least --min_segment={min_seconds:g} s long')
  return strands, names


def filler_frames(part: cc.Filler, strands, filler, settings: cc.Settings, seed: int) -> np.ndarray:
  piece = filler[part.source]
  steps = part.offset + np.arange(part.frames)
  if piece.strand == cc.SYNTHETIC:
    return ce.synthetic_frames(steps.tolist(), settings.size, [seed, 2])
  return strands[piece.strand][piece.start + steps % piece.length]


def apply_edits(frames: np.ndarray, edits: dict, host) -> np.ndarray:
  """The spatial and colour edits of one copied stretch; ``host()`` gives the picture-in-picture footage."""
  if 'crop' in edits:
    frames = ce.crop(frames, edits['crop']['box'])
  if 'hflip' in edits:
    frames = ce.hflip(frames)
  if 'brightness_contrast' in edits:
    frames = ce.brightness_contrast(frames, edits['brightness_contrast']['brightness'],
                                    edits['brightness_contrast']['contrast'])
  if 'pip' in edits:
    frames = ce.picture_in_picture(frames, host(), edits['pip']['box'])
  if 'text' in edits:
    t = edits['text']
    frames = ce.overlay_text(frames, t['text'], t['xy'], t['font_size'], t['colour'])
  return frames


def render_query(q: cc.Query, ref_frames, strands, filler, settings: cc.Settings, seed: int) -> np.ndarray:
  out, t = [], 0
  for part in q.parts:
    if isinstance(part, cc.Filler):
      frames = filler_frames(part, strands, filler, settings, seed)
      n = part.frames
    else:
      s = q.segments[part]
      n = s.query_frames
      frames = ref_frames[s.ref][s.ref_start + ce.speed_indices(s.ref_frames, n)]
    if not isinstance(part, cc.Filler) or part.edited:
      pip = q.edits.get('pip', {})
      host = cc.Filler(pip.get('host', 0), pip.get('offset', 0) + t, n)
      frames = apply_edits(frames, q.edits, lambda: filler_frames(host, strands, filler, settings, seed))
    out.append(frames)
    t += n
  return ce.resize(np.concatenate(out), q.size)


def describe(q: cc.Query, refs, filler, names, fps: int) -> dict:
  def source(k, offset):   # where the footage starts
    p = filler[k]
    return 'synthetic' if p.strand == cc.SYNTHETIC else f'{names[p.strand]}@{(p.start + offset % p.length) / fps:g}s'
  return {
      'query_id': q.query_id, 'copy': bool(q.segments), 'seconds': q.length / fps, 'size': list(q.size),
      'segments': [{'ref_id': refs[s.ref].ref_id, 'query_start': s.query_start / fps,
                    'query_end': (s.query_start + s.query_frames) / fps, 'ref_start': s.ref_start / fps,
                    'ref_end': (s.ref_start + s.ref_frames) / fps, 'speed': s.ref_frames / s.query_frames}
                   for s in q.segments],
      'edits': {k: ({**v, 'host': source(v['host'], v['offset'])} if k == 'pip' else v) for k, v in q.edits.items()},
      'filler': [source(p.source, p.offset) for p in q.parts if isinstance(p, cc.Filler)],
  }


def write_corpus(tmp: str, strands, names, settings: cc.Settings, seed: int, crf: int) -> tuple:
  refs, filler = cc.plan_references([len(s) for s in strands], settings, seed)
  queries = cc.plan_queries(refs, filler, settings, seed)
  ref_frames = [np.concatenate([strands[p.strand][p.start:p.start + p.length] for p in r.pieces]) for r in refs]
  for r, frames in zip(refs, ref_frames):
    ce.encode(os.path.join(tmp, 'refs', f'{r.ref_id}.mp4'), frames, settings.fps, crf=crf)
  with io_util.atomic_open(os.path.join(tmp, 'edits.jsonl')) as f:
    for q in queries:
      frames = render_query(q, ref_frames, strands, filler, settings, seed)
      ce.encode(os.path.join(tmp, 'queries', f'{q.query_id}.mp4'), frames, settings.fps, crf=crf,
                bitrate=q.edits.get('low_bitrate', {}).get('bitrate'))
      f.write(json.dumps(describe(q, refs, filler, names, settings.fps)) + '\n')
  for name, items in (('refs.txt', [f'refs/{r.ref_id}.mp4' for r in refs]),
                      ('queries.txt', [f'queries/{q.query_id}.mp4' for q in queries])):
    with io_util.atomic_open(os.path.join(tmp, name)) as f:
      f.write(''.join(line + '\n' for line in items))
  gt = cc.ground_truth(queries, refs, settings.fps)
  vsc.write_matches(os.path.join(tmp, 'ground_truth.csv'), gt)
  return refs, queries, gt


OUTPUTS = ('refs', 'queries', 'edits.jsonl', 'refs.txt', 'queries.txt', 'ground_truth.csv')


def publish(tmp: str, output: str) -> None:
  """Moves the finished corpus from ``tmp`` into ``output``, replacing an earlier run's files (the ground
  truth last)."""
  for name in OUTPUTS:
    target = os.path.join(output, name)
    if os.path.isdir(target) and not os.path.islink(target):
      os.replace(target, os.path.join(tmp, f'old-{name}'))   # removed with tmp
    os.replace(os.path.join(tmp, name), target)


def run(args) -> dict:
  t0 = time.time()
  cli.check_workdir(args.output)
  settings = settings_from(args)
  paths = input_videos(args.videos)
  strands, names = load_strands(paths, settings, args.tiles)   # bad input fails before any write
  os.makedirs(args.output, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.make_copies-', dir=args.output)
  try:
    refs, queries, gt = write_corpus(tmp, strands, names, settings, args.seed, args.crf)
    publish(tmp, args.output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  seconds = [r.length / args.fps for r in refs], [q.length / args.fps for q in queries]
  print(f'{len(refs)} references ({sum(seconds[0]):.1f} s), {len(queries)} queries ({sum(seconds[1]):.1f} s, '
        f'{sum(bool(q.segments) for q in queries)} with a copy), {len(gt)} copied segments from '
        f'{len(strands)} strands of {len(paths)} videos; wrote {args.output} in {time.time() - t0:.1f} s')
  return {'refs': refs, 'queries': queries, 'ground_truth': gt}


main = cli.program(define_flags, run, __doc__)


if __name__ == '__main__':
  cli.run_main(main)
