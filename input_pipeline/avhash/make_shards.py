r"""Pack AVHash image/audio HDF5 features into ArrayRecord shards (`input_pipeline.avhash.shards`).

  python -m input_pipeline.avhash.make_shards --image_h5=image.h5 --audio_h5=audio.h5 --output=shards/fcvid \
      [--list=train.txt --list=test.txt --dataset=fcvid|activitynet] [--records_per_shard=4096] \
      [--dtype=float32|float16] [--name=avhash]

Without --list every video of the two files is packed (they must hold the same ids); with --list (repeatable)
the union of the lists' videos, each checked to be in both files first. Every video is read and validated
(shape, NaN/Inf) as `input_pipeline.avhash.lists.AVFeatures` reads it. --output must not exist or be empty: the
shards are written to a temporary folder beside it and renamed at the end, so a failed run leaves nothing. A
bad input ends with one `error: ...` line naming the file and video, and exit code 2.
"""
from __future__ import annotations

from typing import List, Optional

from absl import flags

from common_jax import cli
from input_pipeline.avhash import shards as av_shards


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('image_h5', None, 'HDF5 file of image features (/<id>/vectors [T, D]).', flag_values=fv,
                      required=True)
  flags.DEFINE_string('audio_h5', None, 'HDF5 file of audio features (/<id>/vectors [T, D]).', flag_values=fv,
                      required=True)
  flags.DEFINE_string('output', None, 'Output shard directory (must not exist, or be empty).', flag_values=fv,
                      required=True)
  flags.DEFINE_multi_string('list', [], 'Split list whose videos to pack (repeatable; default: every video of '
                            'the files).', flag_values=fv)
  flags.DEFINE_enum('dataset', None, sorted(av_shards.data_lists.NUM_CLASSES), 'Format of the --list files.',
                    flag_values=fv)
  flags.DEFINE_integer('records_per_shard', 4096, 'Videos per ArrayRecord shard file.', flag_values=fv,
                        lower_bound=1)
  flags.DEFINE_enum('dtype', 'float32', sorted(av_shards.DTYPES), 'Stored precision (reading always returns '
                    'float32).', flag_values=fv)
  flags.DEFINE_string('name', 'avhash', 'Shard file name prefix (<name>.array_record-*).', flag_values=fv)
  flags.DEFINE_bool('no_progress', False, 'No progress bar.', flag_values=fv)


def main(argv: Optional[List[str]] = None) -> int:
  args = cli.parse_flags(define_flags, argv, __doc__)
  if args.list and not args.dataset:
    return cli.fail('--list needs --dataset (fcvid or activitynet)')
  with cli.clear_errors():
    s = av_shards.convert_h5(args.image_h5, args.audio_h5, args.output, lists=args.list, dataset=args.dataset,
                             records_per_shard=args.records_per_shard, dtype=args.dtype,
                             progress=not args.no_progress, name=args.name)
  print(f'{s["videos"]:,} videos -> {s["shards"]} shard file(s), {s["bytes"] / 2**20:,.1f} MiB '
        f'({s["bytes"]:,} bytes, {args.dtype}) in {s["directory"]}; {s["seconds"]:.1f} s')
  return 0


if __name__ == '__main__':
  cli.run_main(main)
