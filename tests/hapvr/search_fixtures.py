"""Small inputs shared by the index, search and API tests: a DnS-format feature file, a similarity-network
checkpoint of the same feature size, and helpers that run a program and read an index back."""
import dataclasses
import hashlib
import os

import h5py
import numpy as np
import pytest

DIMS = 32


def write_features(path, n=10, dims=DIMS, seed=0, prefix='v'):
  """Random unit features [T, 9, dims] whose values float16 holds exactly, so a float16 index and the
  file score the same; video k+1 is a noisy copy of video k for even k (near duplicates to find)."""
  rng = np.random.default_rng(seed)
  feats = {}
  for k in range(n):
    x = rng.normal(size=(int(rng.integers(4, 20)), 9, dims))
    if k % 2 == 1:
      x = feats[f'{prefix}{k - 1:02d}'] + 0.3 * rng.normal(size=feats[f'{prefix}{k - 1:02d}'].shape)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    feats[f'{prefix}{k:02d}'] = x.astype(np.float16).astype(np.float32)
  with h5py.File(path, 'w') as f:
    for vid, x in feats.items():
      f[vid] = x
  return str(path)


def make_checkpoint(path, dims=DIMS, seed=0, averaging_comparator=False):
  """A random network; `averaging_comparator`: its comparator CNN made of averaging filters (no training
  either, but its output grows with the frame-to-frame similarity, where a random CNN's sign is arbitrary)."""
  import jax
  from common_jax import checkpoint
  from hapvr_jax import model as model_lib
  cfg = model_lib.ModelConfig(dims=dims)
  params = jax.tree_util.tree_map(np.asarray, model_lib.init_params(cfg, seed=seed))
  if averaging_comparator:
    from hapvr_jax.copy_demo import averaging_comparator as averaging
    params = averaging(params)
  checkpoint.save_params(str(path), params, cfg.to_dict())
  return str(path)


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('search_corpus')
  return {'features': write_features(tmp / 'features.h5'),
          'features_64': write_features(tmp / 'features_64.h5', n=2, dims=64, prefix='w'), 'tmp': tmp}


@pytest.fixture(scope='session')
def checkpoint32(tmp_path_factory):
  return make_checkpoint(tmp_path_factory.mktemp('ckpt32') / 'ckpt')


def snapshot(path):
  """What an index holds, independent of how it was built: per live id its metadata and stored arrays, and
  the FAISS file's bytes (rows in id order)."""
  from common_jax.index_dir import IndexDir
  ix = IndexDir.open(str(path))
  out = {vid: (ix.meta(vid), ix.read(vid, 'features').tobytes(), ix.read(vid, 'coarse').tobytes())
         for vid in ix.ids()}
  with open(os.path.join(path, 'coarse.faiss'), 'rb') as f:
    out['<faiss>'] = hashlib.sha1(f.read()).hexdigest()
  ix.close()
  return out


def tree_digest(path):
  """sha1 of every file under `path` (names and bytes): 'the index untouched'."""
  h = hashlib.sha1()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      if name == '.lock':
        continue
      p = os.path.join(root, name)
      h.update(os.path.relpath(p, path).encode())
      with open(p, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def run_error(main, argv, capsys):
  """(exit code, stderr) of a program expected to end with one `error:` line."""
  with pytest.raises(SystemExit) as e:
    main(argv)
  err = capsys.readouterr().err.strip()
  return e.value.code, err


CLIPS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), os.pardir,
                     'shared', 'data', 'videos')


def real_clips():
  """The real clips beside the checkout (../shared/data/videos), or a skip."""
  folder = os.path.normpath(CLIPS)
  if not os.path.isdir(folder) or not any(f.endswith('.mp4') for f in os.listdir(folder)):
    pytest.skip('../shared/data/videos is not present')
  return folder


def edited_copy(source, path, scale=0.5, bitrate=150_000, fps=10):
  """`source` re-encoded at a low bitrate (H.264), rescaled by `scale`, at `fps`: a near-duplicate copy."""
  import fractions

  import av
  from extraction import video_io
  frames, _ = video_io.read_frames_fps(source, fps=fps, short_side=None, crop=None)
  h, w = (int(round(d * scale / 2) * 2) for d in frames.shape[1:3])
  with av.open(str(path), 'w', format='mp4') as out:
    vs = out.add_stream('libx264', rate=fps)
    vs.width, vs.height, vs.pix_fmt, vs.bit_rate = w, h, 'yuv420p', bitrate
    vs.time_base = fractions.Fraction(1, fps)
    for i, img in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(img, format='rgb24').reformat(width=w, height=h)
      frame.pts = i
      out.mux(vs.encode(frame))
    out.mux(vs.encode(None))
  return str(path)


def make_resnet(path, pca_dims=0, seed=0):
  """A tiny random resnet50_irmac checkpoint at the real input size (224)."""
  from backbones import registry, resnet as resnet_lib
  cfg = dataclasses.replace(resnet_lib.Config.tiny(), pca_dims=pca_dims)
  registry.save(str(path), 'resnet50_irmac', resnet_lib.init_params(cfg, seed), cfg)
  return str(path), cfg


def fitted_resnet(path, videos, pca_dims=32, seed=0):
  """A tiny random resnet50_irmac whose PCA whitening is fitted (extraction.fit_pca) on the iRMAC regions of
  `videos`' frames: with a random PCA the random backbone's features collapse to one direction."""
  from backbones import registry, resnet as resnet_lib
  from extraction import fit_pca
  from extraction.runner import Video
  cfg = dataclasses.replace(resnet_lib.Config.tiny(), pca_dims=pca_dims)
  net = registry.Backbone('resnet50_irmac', cfg, resnet_lib.init_params(cfg, seed))
  pca = fit_pca.fit_frames(net, fit_pca.video_frames([Video(str(k), v) for k, v in enumerate(videos)], 1.0))
  net = fit_pca.with_pca(net, pca, pca_dims)
  registry.save(str(path), 'resnet50_irmac', net.params, net.config)
  return str(path), net.config


@pytest.fixture(scope='session')
def clips_index(tmp_path_factory):
  """The real clips indexed through python -m hapvr_jax.index with a tiny random backbone whose PCA is fitted
  on their frames and a random network with an averaging comparator, plus an edited copy of each clip
  (H.264 at 150 kbit/s, half size, 10 fps)."""
  from hapvr_jax import index
  folder = real_clips()
  tmp = tmp_path_factory.mktemp('clips')
  videos = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.mp4'))
  resnet, cfg = fitted_resnet(tmp / 'resnet50_irmac', videos)
  ckpt = make_checkpoint(tmp / 'hapvr', dims=cfg.out_dims, averaging_comparator=True)
  path = str(tmp / 'index')
  assert index.main([f'--index={path}', f'--video_dir={folder}', f'--resnet={resnet}', '--noprogress']) == 0
  copies = {os.path.splitext(os.path.basename(v))[0]: edited_copy(v, tmp / ('copy_' + os.path.basename(v)))
            for v in videos}
  return {'index': path, 'resnet': resnet, 'checkpoint': ckpt, 'copies': copies, 'folder': folder,
          'tmp': tmp}
