r"""PCA whitening fitted on the iRMAC region vectors of your own frames, for the ResNet-50 L3-iRMAC backbone.

ViSiL's `pca_resnet50_vcdb_1M.pth` was learned on VCDB frames. Without it, or for footage of another kind, fit
the same whitening (mean, eigenvalues d, eigenvectors V) on your collection and give it to the converter:

  python -m extraction.fit_pca --resnet=ckpt/resnet50_plain --video_dir=my_videos --output=pca_mine.npz \
      --output_resnet=ckpt/resnet50_irmac_mine
  python -m backbones.convert_backbone --arch=resnet50_irmac --torch_checkpoint=resnet50-0676ba61.pth \
      --pca=pca_mine.npz --output=ckpt/resnet50_irmac

`--resnet` is a converted resnet50_irmac directory, with or without a PCA (the fit uses the L2-normalised iRMAC
before any PCA). Frames are decoded as the extractor decodes them (`--fps` frames per second, shorter side
256, centre crop 224); every region of every frame is one sample (9 per frame), accumulated in float64
(mean and second moments: memory does not grow with the collection). `--output` is an .npz with float32 mean
[D], d [D] (descending) and V [D, D], the layout the converter's --pca reads; `--output_resnet` also writes the
backbone of --resnet with the fitted whitening (`--pca_dims` components) for hapvr_jax.extract / .index.

A collection of fewer than D / 9 frames (D = 3840 for ResNet-50) leaves part of the spectrum empty, and whitening
would blow up directions that hold only rounding noise: eigenvalues below `--eigenvalue_floor` x the largest are
raised to that floor (a shrinkage that leaves a well-sampled spectrum alone). With random ResNet weights (tests,
demos) the fitted whitening is what makes scores meaningful: random iRMAC vectors all point almost the same way,
and subtracting their mean and whitening spreads them out.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from backbones import registry, resnet
from common_jax import cli, io_util
from common_jax.convert_util import ConversionError, check_new_output

DEFAULT_FLOOR = 1e-4


def plain(backbone: registry.Backbone) -> registry.Backbone:
  """The same ResNet without its PCA: outputs the L2-normalised iRMAC [N, 9, irmac_dims]."""
  if backbone.arch != 'resnet50_irmac':
    raise ConversionError(f'PCA whitening applies to resnet50_irmac, not {backbone.arch}')
  params = {k: v for k, v in backbone.params.items() if k != 'pca'}
  return dataclasses.replace(backbone, config=dataclasses.replace(backbone.config, pca_dims=0), params=params)


class Moments:
  """Running float64 sum and sum of outer products of region vectors: a fit of any collection size."""

  def __init__(self, dims: int):
    self.n, self.sum, self.outer = 0, np.zeros(dims), np.zeros((dims, dims))

  def add(self, x: np.ndarray) -> None:
    x = np.asarray(x, np.float64).reshape(-1, self.sum.shape[0])
    self.n += len(x)
    self.sum += x.sum(0)
    self.outer += x.T @ x

  def fit(self, eigenvalue_floor: float = DEFAULT_FLOOR) -> dict:
    return fit_moments(self.n, self.sum, self.outer, eigenvalue_floor)


def fit_moments(n: int, total: np.ndarray, outer: np.ndarray, eigenvalue_floor: float = DEFAULT_FLOOR) -> dict:
  """{'mean', 'd', 'V'} (float32, d descending) of the covariance of n vectors with this sum and outer sum."""
  if n < 2:
    raise ValueError(f'a PCA needs at least 2 region vectors, got {n}')
  mean = total / n
  cov = outer / n - np.outer(mean, mean)
  d, v = np.linalg.eigh((cov + cov.T) / 2)
  d, v = d[::-1], v[:, ::-1]
  if not d[0] > 0:
    raise ValueError(f'the {n} region vectors are all equal: nothing to whiten')
  d = np.maximum(d, eigenvalue_floor * d[0])
  return {'mean': mean.astype(np.float32), 'd': d.astype(np.float32), 'V': v.astype(np.float32)}


def fit(descriptors: np.ndarray, eigenvalue_floor: float = DEFAULT_FLOOR) -> dict:
  """The whitening of region vectors [..., D] (e.g. iRMAC [N, 9, D])."""
  x = np.asarray(descriptors)
  m = Moments(x.shape[-1])
  m.add(x)
  return m.fit(eigenvalue_floor)


def descriptor_fn(backbone: registry.Backbone, batch_size: int = 64):
  """fn(frames uint8 [N, 224, 224, 3]) -> float32 iRMAC [N, 9, irmac_dims] (the backbone's PCA dropped)."""
  net = plain(backbone)
  params = jax.device_put(net.params)
  forward = jax.jit(net.forward)

  def run(frames):
    out = []
    for i in range(0, len(frames), batch_size):
      chunk = np.asarray(frames[i:i + batch_size])
      pad = batch_size - len(chunk) if len(frames) > batch_size else 0   # one compiled shape per run
      x = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
      out.append(np.asarray(forward(params, jnp.asarray(x)))[:len(chunk)])
    return np.concatenate(out)
  return run


def fit_frames(backbone: registry.Backbone, frame_batches: Iterable[np.ndarray], batch_size: int = 64,
               eigenvalue_floor: float = DEFAULT_FLOOR) -> dict:
  """The whitening of the iRMAC region vectors of frames (an iterable of uint8 [N, 224, 224, 3] arrays)."""
  fn = descriptor_fn(backbone, batch_size)
  m = Moments(plain(backbone).config.irmac_dims)
  for frames in frame_batches:
    m.add(fn(frames))
  return m.fit(eigenvalue_floor)


def with_pca(backbone: registry.Backbone, pca: Mapping[str, np.ndarray],
             pca_dims: Optional[int] = None) -> registry.Backbone:
  """The backbone with this whitening (`pca_dims` components, default min(512, D)) in place of its own."""
  net = plain(backbone)
  dims = min(resnet.Config.pca_dims, net.config.irmac_dims) if pca_dims is None else pca_dims
  cfg = dataclasses.replace(net.config, pca_dims=dims)
  params = {**net.params, 'pca': resnet.pca_params(pca, cfg, getattr(pca, 'where', 'fitted PCA'))}
  return dataclasses.replace(net, config=cfg, params=params)


def save(path: str, pca: Mapping[str, np.ndarray]) -> str:
  """Writes mean / d / V as an .npz (the converter's --pca reads it), atomically."""
  if not path.endswith('.npz'):
    raise ValueError(f'{path}: the PCA file must end in .npz')
  with io_util.atomic_open(path, 'wb') as f:
    np.savez(f, **{k: np.asarray(pca[k], np.float32) for k in ('mean', 'd', 'V')})
  return path


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('resnet', None, 'converted resnet50_irmac directory (its PCA, if any, is ignored)',
                      flag_values=fv, required=True)
  flags.DEFINE_string('videos', '', 'list file: "path" or "id<TAB>path" per line', flag_values=fv)
  flags.DEFINE_string('video_dir', '', 'or: every video file in this folder', flag_values=fv)
  flags.DEFINE_string('output', None, 'the PCA file to write (.npz: mean, d, V)', flag_values=fv, required=True)
  flags.DEFINE_string('output_resnet', '', 'also write --resnet with the fitted whitening here (a new folder)',
                      flag_values=fv)
  flags.DEFINE_integer('pca_dims', None, 'components kept in --output_resnet (default 512)', flag_values=fv,
                       lower_bound=1)
  flags.DEFINE_float('fps', 1.0, 'frames decoded per second of video (more for a small collection)',
                     flag_values=fv, lower_bound=1e-6)
  flags.DEFINE_integer('max_frames', 0, 'at most this many frames per video, evenly spaced (0: all)',
                       flag_values=fv, lower_bound=0)
  flags.DEFINE_float('eigenvalue_floor', DEFAULT_FLOOR, 'eigenvalues below this x the largest are raised to it',
                     flag_values=fv, lower_bound=0.0, upper_bound=1.0)
  flags.DEFINE_integer('batch_size', 64, 'frames per forward pass', flag_values=fv, lower_bound=1)


def video_frames(videos, fps: float, max_frames: int = 0):
  """Yields each video's frames as the extractor decodes them (shorter side 256, centre crop 224)."""
  from extraction import video_io   # the frame decoding of hapvr_jax.extract, so the fit sees the same frames
  for video in videos:
    frames = video_io.read_frames_fps(video.path, fps=fps, short_side=256, crop=224)[0]
    if max_frames and len(frames) > max_frames:
      frames = frames[np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    yield frames


def main(argv=None) -> int:
  args = cli.parse_flags(define_flags, argv, __doc__)
  with cli.clear_errors():
    from extraction import runner
    videos = runner.read_video_list(args.videos, args.video_dir)
    if args.output_resnet:
      check_new_output(args.output_resnet)
    if not args.output.endswith('.npz'):
      raise ValueError(f'--output={args.output}: the PCA file must end in .npz')
    backbone = registry.load(args.resnet, 'resnet50_irmac')
    frames = []

    def counted():
      for f in video_frames(videos, args.fps, args.max_frames):
        frames.append(len(f))
        yield f
    pca = fit_frames(backbone, counted(), args.batch_size, args.eigenvalue_floor)
    fitted = with_pca(backbone, pca, args.pca_dims) if args.output_resnet else None
    save(args.output, pca)
    if fitted is not None:
      registry.save(os.path.abspath(args.output_resnet), fitted.arch, fitted.params, fitted.config)
  n = sum(frames)
  note = ' (fewer region vectors than dimensions: the floor fills the rest)' if 9 * n < len(pca['d']) else ''
  print(f'fitted a {len(pca["d"])}-d PCA on {n} frames of {len(videos)} videos ({9 * n} region vectors){note}; '
        f'wrote {args.output}' + (f' and {args.output_resnet}' if args.output_resnet else ''))
  return 0


if __name__ == '__main__':
  cli.run_main(main)
