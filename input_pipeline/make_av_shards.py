r"""Pack AVHash image/audio HDF5 features into ArrayRecord shards (`input_pipeline.av_shards`).

  python -m input_pipeline.make_av_shards --image_h5=image.h5 --audio_h5=audio.h5 --output=shards/fcvid \
      [--list=train.txt --list=test.txt --dataset=fcvid|activitynet] [--records_per_shard=4096] \
      [--dtype=float32|float16] [--name=avhash]

Without --list every video of the two files is packed (they must hold the same ids); with --list (repeatable)
the union of the lists' videos, each checked to be in both files first. Every video is read and validated
(shape, NaN/Inf) as `avhash_jax.data_lists.AVFeatures` reads it. --output must not exist or be empty: the
shards are written to a temporary folder beside it and renamed at the end, so a failed run leaves nothing. A
bad input ends with one `error: ...` line naming the file and video, and exit code 2. Plain argparse (no absl
flags), so `main(argv)` can be called in a process that defines other flags.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from common_jax import cli
from input_pipeline import av_shards, extraction


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one `error: ...` line and exit code 2, as every entry point
    cli.fail(message)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  p = _Parser(prog='python -m input_pipeline.make_av_shards',
              description='Pack AVHash image/audio HDF5 features into ArrayRecord shards.')
  p.add_argument('--image_h5', required=True, help='HDF5 file of image features (/<id>/vectors [T, D]).')
  p.add_argument('--audio_h5', required=True, help='HDF5 file of audio features (/<id>/vectors [T, D]).')
  p.add_argument('--output', required=True, help='Output shard directory (must not exist, or be empty).')
  p.add_argument('--list', action='append', default=[], dest='lists',
                 help='Split list whose videos to pack (repeatable; default: every video of the files).')
  p.add_argument('--dataset', choices=sorted(av_shards.data_lists.NUM_CLASSES), default=None,
                 help='Format of the --list files.')
  p.add_argument('--records_per_shard', type=extraction.positive_int, default=4096,
                 help='Videos per ArrayRecord shard file.')
  p.add_argument('--dtype', choices=sorted(av_shards.DTYPES), default='float32',
                 help='Stored precision (reading always returns float32).')
  p.add_argument('--name', default='avhash', help='Shard file name prefix (<name>.array_record-*).')
  p.add_argument('--no_progress', action='store_true', help='No progress bar.')
  args = p.parse_args(argv)
  if args.lists and not args.dataset:
    p.error('--list needs --dataset (fcvid or activitynet)')
  return args


def main(argv: Optional[List[str]] = None) -> int:
  args = parse_args(argv)
  with cli.clear_errors():
    s = av_shards.convert_h5(args.image_h5, args.audio_h5, args.output, lists=args.lists, dataset=args.dataset,
                             records_per_shard=args.records_per_shard, dtype=args.dtype,
                             progress=not args.no_progress, name=args.name)
  print(f'{s["videos"]:,} videos -> {s["shards"]} shard file(s), {s["bytes"] / 2**20:,.1f} MiB '
        f'({s["bytes"]:,} bytes, {args.dtype}) in {s["directory"]}; {s["seconds"]:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
