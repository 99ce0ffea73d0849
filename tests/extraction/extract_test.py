"""End to end: PyTorch weights -> convert_backbone CLI -> extraction CLIs on generated (and real) videos ->
files the evaluators/encoders accept, equal to the PyTorch modules run on the same decoded frames."""
import dataclasses
from tests.conftest import ROOT
import json
import os

import h5py
import numpy as np
import pytest
import torch

from backbones import ast as ast_lib, clip as clip_lib, convert_backbone, dino as dino_lib, fbank
from backbones import resnet as resnet_lib
from tests.references import ast_torch
from tests.references import clip_torch
from tests.references import dino_torch
from tests.references import resnet_torch
from extraction import runner as extraction
from extraction import video_io
from tests import video_fixtures

TOL = 1e-4   # float32 end to end (fbank on the host, the backbone under jit), relative to the output scale
REAL_VIDEO = os.path.join(os.path.dirname(ROOT),
                          'shared', 'data', 'videos', 'video1.mp4')


def _convert(tmp, arch, state_dict, *extra):
  pth = str(tmp / f'{arch}.pth')
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, pth)
  out = str(tmp / arch)
  assert convert_backbone.main([f'--arch={arch}', f'--torch_checkpoint={pth}', f'--output={out}', *extra]) == 0
  return out


@pytest.fixture(scope='module')
def backbones(tmp_path_factory):
  """Tiny backbones at the real input sizes (224 frames, fbank of 128 bins), converted through the CLI."""
  tmp = tmp_path_factory.mktemp('backbones')
  cfg = {'clip': dataclasses.replace(clip_lib.Config.tiny(), image_size=224, patch_size=56, projection_dim=32),
         'ast': ast_lib.Config.tiny(),
         'dino': dataclasses.replace(dino_lib.Config.tiny(), image_size=224, patch_size=56, depth=1),
         'resnet': resnet_lib.Config.tiny()}
  refs, dirs = {}, {}
  fn, sd = clip_torch.build(cfg['clip'], seed=1, layout='openai')
  refs['clip'], dirs['clip'] = fn, _convert(tmp, 'clip_vitl14', sd, '--num_heads=2')
  fn, sd = ast_torch.build(cfg['ast'], seed=2, layout='hub')
  refs['ast'], dirs['ast'] = fn, _convert(tmp, 'ast', sd, '--num_heads=2')
  fn, sd = dino_torch.build(cfg['dino'], seed=3, layout='official')
  refs['dino'], dirs['dino'] = fn, _convert(tmp, 'dino_vits16', sd, '--num_heads=2')
  module, sd = resnet_torch.build(cfg['resnet'], seed=5)
  pca_path = str(tmp / 'pca.npz')
  np.savez(pca_path, **{k: np.asarray(v) for k, v in module.pca.items()})

  def resnet_ref(x):
    with torch.no_grad():
      return module(torch.from_numpy(np.array(x, np.float32))).double().numpy()
  refs['resnet'], dirs['resnet'] = resnet_ref, _convert(tmp, 'resnet50_irmac', sd, f'--pca={pca_path}',
                                                        f'--pca_dims={cfg["resnet"].pca_dims}')
  return cfg, refs, dirs


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('videos')
  paths = {'tone': str(tmp / 'tone.mp4'), 'silent': str(tmp / 'silent.mp4'), 'broken': str(tmp / 'broken.mp4')}
  video_fixtures.make_video(paths['tone'], seconds=6.0, fps=10, size=(320, 240), audio_hz=440.0)
  video_fixtures.make_video(paths['silent'], seconds=3.0, fps=10, size=(240, 320), audio_hz=None)
  video_fixtures.make_corrupt(paths['broken'])
  if os.path.isfile(REAL_VIDEO):
    paths['real'] = REAL_VIDEO
  listing = tmp / 'list.txt'
  listing.write_text(''.join(f'{k}\t{p}\n' for k, p in paths.items()))
  return paths, str(listing)


def _rel(got, want):
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def test_avhash_extract_matches_torch_and_feeds_the_encoder(backbones, videos, tmp_path, monkeypatch):
  from avhash_jax import evaluate, extract, model
  from input_pipeline.avhash.lists import AVFeatures
  cfg, refs, dirs = backbones
  paths, listing = videos
  image, audio = str(tmp_path / 'img.h5'), str(tmp_path / 'aud.h5')
  args = [f'--clip={dirs["clip"]}', f'--ast={dirs["ast"]}', f'--videos={listing}', f'--image_output={image}',
          f'--audio_output={audio}', '--batch_size=16', '--audio_batch_size=8', '--workers=2']
  assert extract.main(args) == 0
  ok = sorted(k for k in paths if k != 'broken')
  with h5py.File(image) as fi, h5py.File(audio) as fa:
    assert sorted(fi) == ok and sorted(fa) == ok
  failures = [json.loads(x) for x in open(image + '.failures.jsonl')]
  assert [(f['id'], f['reason']) for f in failures] == [('broken', 'unreadable')]

  # Parity with the PyTorch modules on the same decoded inputs.
  feats = AVFeatures(image, audio, frames=25, dim=32)
  for vid in ok:
    img, aud = feats.read(vid)
    times = video_io.uniform_times(video_io.probe(paths[vid]).duration, 25)
    frames = video_io.clip_frames(video_io.read_frames_at(paths[vid], times))
    want = refs['clip'](np.asarray(clip_lib.preprocess(frames, cfg['clip'])))
    assert _rel(img, want) < TOL, vid
    if vid == 'silent':
      assert not aud.any()   # no audio track: zero vectors
      continue
    wave = video_io.read_audio(paths[vid])
    pieces = video_io.audio_windows(wave, times)
    x = np.stack([fbank.ast_input_numpy(p, max_length=cfg['ast'].max_length) for p in pieces])
    assert _rel(aud, refs['ast'](x)) < TOL, vid

  # The AVHash encoder takes the files as they are.
  mc = model.ModelConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, bits=16)
  codes = evaluate.extract_codes(mc, model.init_params(mc, 0), feats, ok, batch_size=8)
  assert np.asarray(codes).shape[0] == len(ok)

  # Rerunning skips everything; a missing checkpoint is one clear error.
  assert extract.main(args) == 0
  with pytest.raises(SystemExit) as e:
    extract.main([*args[1:], f'--clip={tmp_path / "nowhere"}'])
  assert e.value.code == 2

  # The CLIP batch function fails once, on the batch that holds the last 9 frames of 'tone' and the first 7 of
  # 'silent' (batches of 16, 25 frames a video): both are logged (tone's finished audio half is dropped), every
  # other video is written whole, and a rerun extracts the two.
  real = extraction.PackedRunner
  calls = []

  class FaultyRunner(real):
    def __init__(self, fn, batch_size):
      def maybe_fail(x):
        if x.ndim == 4:   # image batches [B, 224, 224, 3]
          calls.append(1)
          if len(calls) == 2:
            raise RuntimeError('device fault')
        return fn(x)
      super().__init__(maybe_fail, batch_size)

  monkeypatch.setattr(extraction, 'PackedRunner', FaultyRunner)
  image2, audio2 = str(tmp_path / 'img2.h5'), str(tmp_path / 'aud2.h5')
  args2 = [a for a in args if not a.startswith(('--image_output', '--audio_output'))] + [
      f'--image_output={image2}', f'--audio_output={audio2}']
  assert extract.main(args2) == 0
  failed = [json.loads(x) for x in open(image2 + '.failures.jsonl')]
  lost = sorted(f['id'] for f in failed if f['id'] != 'broken')
  assert lost == ['silent', 'tone'] and all('device fault' in f['error'] for f in failed if f['id'] in lost)
  with h5py.File(image2) as fi, h5py.File(audio2) as fa:
    assert sorted(fi) == sorted(fa) == sorted(set(ok) - set(lost))
  monkeypatch.setattr(extraction, 'PackedRunner', real)
  assert extract.main(args2) == 0
  with h5py.File(image2) as fi, h5py.File(audio2) as fa, h5py.File(image) as f1:
    assert sorted(fi) == sorted(fa) == ok
    for vid in lost:
      np.testing.assert_allclose(fi[vid]['vectors'][()], f1[vid]['vectors'][()], rtol=1e-5, atol=1e-6)


def test_hapvr_eval_extract_matches_torch_and_the_evaluator_reads_it(backbones, videos, tmp_path):
  from hapvr_jax import extract, features
  cfg, refs, dirs = backbones
  paths, listing = videos
  out = str(tmp_path / 'feats.h5')
  args = [f'--resnet={dirs["resnet"]}', f'--videos={listing}', f'--output={out}', '--batch_size=8',
          '--workers=2']
  assert extract.main(args) == 0
  dims = cfg['resnet'].pca_dims
  ff = features.FeatureFile(out, dims=dims, min_len=1)
  ok = sorted(k for k in paths if k != 'broken')
  assert sorted(ff.ids()) == ok
  for vid in ok:
    x = ff.read(vid)
    frames, times = video_io.read_frames_fps(paths[vid], fps=1.0, short_side=256, crop=224)
    assert x.shape == (len(frames), 9, dims)
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, atol=1e-5)   # unit regions, as DnS
    want = refs['resnet'](np.asarray(resnet_lib.preprocess(frames, cfg['resnet'])))
    assert _rel(x, want) < TOL, vid
  assert ff.raw_length('tone') == 6 and ff.raw_length('silent') == 3
  failures = [json.loads(x) for x in open(out + '.failures.jsonl')]
  assert [f['id'] for f in failures] == ['broken']


def test_hapvr_train_views_make_a_training_store(backbones, videos, tmp_path):
  from hapvr_jax import extract
  from input_pipeline.hapvr import hdf5_views
  from input_pipeline.hapvr import shards
  _, _, dirs = backbones
  paths, _ = videos
  listing = tmp_path / 'list.txt'
  listing.write_text(f'tone\t{paths["tone"]}\nsilent\t{paths["silent"]}\n')
  out_dir = tmp_path / 'views'
  out_dir.mkdir()
  args = ['--mode=train', f'--resnet={dirs["resnet"]}', f'--dino={dirs["dino"]}', f'--videos={listing}',
          f'--output={out_dir / "views.h5"}', '--views=3', '--segments=1', '--bank_size=2', '--batch_size=64',
          f'--shards_output={tmp_path / "shards"}', '--seed=7']
  assert extract.main(args) == 0
  store = hdf5_views.HDF5Store(str(out_dir))
  assert sorted(store.video_ids) == ['silent', 'tone']
  (seg,) = store.segments(store.video_ids.index('tone'))
  assert len(seg.weak) == 1 and len(seg.strong) == 2
  regions, teacher = store.load(seg.strong[0])
  assert regions.shape == (56, 9, 32) and teacher.shape == (56, 32) and regions.dtype == np.float16
  meta = store.view_meta(seg.strong[0])
  assert meta['view_type'] == 'strong' and meta['source_frames'] == 6 and 'randaugment' in meta
  assert set(store.bank()) == {'black_regions', 'black_teacher', 'noise_regions', 'noise_teacher'}
  assert shards.open_store(str(tmp_path / 'shards')).num_records == 6
