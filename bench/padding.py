r"""Padding waste of the evaluation engine's target length buckets, on real or modelled video lengths.

  python bench/padding.py                                   # modelled: FIVR-200K-sized, lognormal lengths
  python bench/padding.py --features=fivr_200k.hdf5         # the real lengths (reads shapes only)
  python bench/padding.py --ratios=1.25,1.15,1.1

Targets are cut into the original's 2048-frame chunks, tiled to min_len, and padded to the next bucket length
(`hapvr_jax.engine.bucket_lengths`, geometric by `engine.bucket_ratio`). The f2f work of a chunk is
proportional to its padded length, so the waste is 1 - sum(lengths) / sum(padded lengths); the partly filled
last block of each bucket adds at most (buckets x block size) padded targets, negligible at FIVR-200K scale.
The goal is under 15% (docs/performance.md). More buckets cost one compilation each.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import numpy as np  # noqa: E402

from hapvr_jax import engine  # noqa: E402
from hapvr_jax.features import FeatureFile, tiled_length  # noqa: E402


def modelled_lengths(videos=225_960, median=71.0, sigma=0.8, min_len=8, seed=0):
  """FIVR-200K-like video lengths in frames (1 fps, lognormal), tiled to min_len as the engine reads them.
  The defaults give a mean near 98 frames, about 22M frames in all: an estimate from the
  released feature files' sizes."""
  rng = np.random.default_rng(seed)
  raw = np.maximum(1, np.round(rng.lognormal(np.log(median), sigma, videos))).astype(int)
  return np.array([tiled_length(int(n), min_len) for n in raw])


def waste(lengths, ratio, chunk=2048, min_bucket=8):
  items = np.array([e - s for n in lengths for s, e in engine.split_chunks(int(n), chunk)])
  buckets = engine.bucket_lengths(int(items.max()), ratio, min_bucket)
  padded = np.array([engine.bucket_of(int(x), buckets) for x in items])
  return 1 - items.sum() / padded.sum(), len(buckets)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--features', default='', help='DnS-format HDF5: use its real lengths')
  p.add_argument('--videos', type=int, default=225_960, help='modelled: number of videos (FIVR-200K)')
  p.add_argument('--median', type=float, default=71.0, help='modelled: median length in frames (1 fps)')
  p.add_argument('--sigma', type=float, default=0.8, help='modelled: lognormal sigma')
  p.add_argument('--min_len', type=int, default=8)
  p.add_argument('--ratios', default='1.25,1.15,1.1')
  a = p.parse_args(argv)
  if a.features:
    ff = FeatureFile(a.features, min_len=a.min_len)
    lengths = ff.lengths(sorted(ff.ids()))
    source = f'{a.features}: {len(lengths)} videos'
  else:
    lengths = modelled_lengths(a.videos, a.median, a.sigma, a.min_len)
    source = f'modelled: {a.videos} videos, lognormal median {a.median:g} frames, sigma {a.sigma:g}'
  print(f'{source}; mean length {lengths.mean():.1f} frames')
  for r in (float(x) for x in a.ratios.split(',')):
    w, n = waste(lengths, r, min_bucket=8)
    print(f'bucket_ratio {r:<5g} {n:3d} buckets  padding waste {100 * w:5.1f}% of the f2f work')


if __name__ == '__main__':
  main()
