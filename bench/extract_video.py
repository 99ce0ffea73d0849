r"""Full-size extraction of one real video through the product's CLIs, checked against PyTorch end to end.

  python bench/extract_video.py --video=../shared/data/videos/video1.mp4 --workdir=/tmp/extract_bench

Builds the four full-size PyTorch references with random weights (bench/backbones.py), saves them as .pth files,
converts them with `python -m backbones.convert_backbone`, runs `python -m hapvr_jax.extract` (evaluation
features) and `python -m avhash_jax.extract` on the video, and then:

  * reads the outputs the way the evaluators do (hapvr_jax.features.FeatureFile with 512 dims, AVHash's
    AVFeatures with [25, 768]) and encodes them with a random full-size AVHash model;
  * recomputes every feature with the PyTorch module on the frames/audio decoded by extraction.video_io and
    prints the relative error (float32 target 1e-4);
  * prints the wall time of each extraction (compilation included: one video) and the decode-only time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import numpy as np  # noqa: E402

from bench.backbones import bench_reference  # noqa: E402


def rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--video', required=True)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--seed', type=int, default=0)
  a = parser.parse_args(argv)
  import torch
  from backbones import ast, clip, convert_backbone, fbank, resnet, registry
  from extraction import video_io
  os.makedirs(a.workdir, exist_ok=True)
  refs, dirs = {}, {}
  for arch, mod in (('resnet50_irmac', resnet), ('clip_vitl14', clip), ('ast', ast)):
    out = os.path.join(a.workdir, arch)
    fn, sd, extra = bench_reference(arch, mod.Config.full(), a.seed)
    refs[arch] = fn
    if not os.path.isdir(out):
      pth = os.path.join(a.workdir, arch + '.pth')
      torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()}, pth)
      args = [f'--arch={arch}', f'--torch_checkpoint={pth}', f'--output={out}']
      if arch == 'resnet50_irmac':
        pca = os.path.join(a.workdir, 'pca.npz')
        np.savez(pca, **{k: np.asarray(v) for k, v in extra['pca'].items()})
        args.append(f'--pca={pca}')
      convert_backbone.main(args)
      os.remove(pth)
    dirs[arch] = out
  listing = os.path.join(a.workdir, 'list.txt')
  with open(listing, 'w') as f:
    f.write(f'video\t{os.path.abspath(a.video)}\n')
  res = {}

  from hapvr_jax import extract as hx, features
  h5 = os.path.join(a.workdir, 'hapvr.h5')
  for p in (h5, h5 + '.partial', h5 + '.done'):
    if os.path.exists(p):
      os.remove(p)
  t0 = time.perf_counter()
  hx.main([f'--resnet={dirs["resnet50_irmac"]}', f'--videos={listing}', f'--output={h5}', '--batch_size=16'])
  res['hapvr_extract_s'] = time.perf_counter() - t0
  x = features.FeatureFile(h5, dims=512).read('video')
  t0 = time.perf_counter()
  frames, _ = video_io.read_frames_fps(a.video, fps=1.0, short_side=256, crop=224)
  res['hapvr_decode_s'] = time.perf_counter() - t0
  cfg = registry.load(dirs['resnet50_irmac']).config
  res['hapvr_shape'] = list(x.shape)
  res['hapvr_rel_err'] = rel(x, refs['resnet50_irmac'](np.asarray(resnet.preprocess(frames, cfg))))

  from avhash_jax import evaluate, extract as ax, model
  from input_pipeline.avhash.lists import AVFeatures
  img, aud = os.path.join(a.workdir, 'clip.h5'), os.path.join(a.workdir, 'ast.h5')
  for p in (img, aud, img + '.partial', aud + '.partial', img + '.done'):
    if os.path.exists(p):
      os.remove(p)
  t0 = time.perf_counter()
  ax.main([f'--clip={dirs["clip_vitl14"]}', f'--ast={dirs["ast"]}', f'--videos={listing}', f'--image_output={img}',
           f'--audio_output={aud}', '--batch_size=25', '--audio_batch_size=5'])
  res['avhash_extract_s'] = time.perf_counter() - t0
  feats = AVFeatures(img, aud)
  image, audio = feats.read('video')
  t0 = time.perf_counter()
  times = video_io.uniform_times(video_io.probe(a.video).duration, 25)
  frames = video_io.clip_frames(video_io.read_frames_at(a.video, times))
  pieces = video_io.audio_windows(video_io.read_audio(a.video), times)
  fb = np.stack([fbank.ast_input_numpy(p) for p in pieces]).astype(np.float32)
  res['avhash_decode_fbank_s'] = time.perf_counter() - t0
  res['clip_rel_err'] = rel(image, refs['clip_vitl14'](np.asarray(clip.preprocess(frames, clip.Config.full()))))
  res['ast_rel_err'] = rel(audio, np.concatenate([refs['ast'](fb[i:i + 5]) for i in range(0, 25, 5)]))
  mc = model.ModelConfig()
  codes = evaluate.extract_codes(mc, model.init_params(mc, 0), feats, ['video'], batch_size=8)
  res['avhash_code_bits'] = int(np.asarray(codes).shape[1])
  print(json.dumps(res, indent=1))
  return res


if __name__ == '__main__':
  main()
