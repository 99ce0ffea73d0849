r"""Convert extracted views (HDF5 extraction format) to ArrayRecord training shards.

  python -m input_pipeline.hapvr.make_shards --input=views/ --output=shards/vcdb [--records_per_shard=1024] \
      [--name=vcdb]

--input is one .h5/.hdf5 file or a folder of them (input_pipeline.hapvr.hdf5_views, HDF5Store: groups
/<video_id>/<segment>/<weak_i|strong_i>/{regions, teacher}); a `bank.npz` beside them is validated and
copied. --output must not exist or be empty: the shards are written to a temporary folder beside it and
renamed at the end, so a failed run leaves nothing. Every view is read, checked (shapes, NaN/Inf) and written
as float16 with its `meta` attribute; the summary line gives videos, segments, views, shards and bytes.
The output also holds the TFDS metadata (dataset_info.json, features.json) that lets tensorflow-datasets open
it with deserialize_method=RAW_BYTES (see input_pipeline.hapvr.shards). A bad input ends with one `error: ...` line
naming the file and video, and exit code 2. The work is done by `input_pipeline.hapvr.hdf5_views.convert`
(callable without flags).
"""
from __future__ import annotations

from absl import flags

from common_jax import cli
from input_pipeline.hapvr import hdf5_views


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('input', None, 'HDF5 view file, or a folder of *.h5 / *.hdf5 view files.', flag_values=fv,
                      required=True)
  flags.DEFINE_string('output', None, 'Output shard directory (must not exist, or be empty).', flag_values=fv,
                      required=True)
  flags.DEFINE_integer('records_per_shard', 1024, 'Views per ArrayRecord shard file.', flag_values=fv,
                        lower_bound=1)
  flags.DEFINE_string('name', 'vcdb', 'Dataset name in the shard file names (<name>-train.array_record-*).',
                      flag_values=fv)


def main(argv=None) -> int:
  args = cli.parse_flags(define_flags, argv, __doc__)
  with cli.clear_errors():
    summary = hdf5_views.convert(args.input, args.output, args.name, args.records_per_shard, progress=True)
  print(f'{summary["videos"]:,} videos, {summary["segments"]:,} segments, {summary["views"]:,} views -> '
        f'{summary["shards"]} shard file(s), {summary["bytes"] / 2**20:,.1f} MiB in {summary["directory"]}')
  return 0


if __name__ == '__main__':
  cli.run_main(main)
