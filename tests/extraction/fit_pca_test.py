"""extraction.fit_pca: the fitted whitening, the file the converter reads, random weights made meaningful, the CLI.

The tiny ResNet (480-d iRMAC, 32-d PCA) keeps every test to a few seconds; the full-size check on the real clips
is the end-to-end search test's.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from backbones import registry, resnet
from extraction import fit_pca
from tests import video_fixtures

CFG = resnet.Config.tiny()


def _run(main, argv, capsys):
  try:
    rc = main(argv)
  except SystemExit as e:   # bad input ends through cli.clear_errors: one `error:` line, exit code 2
    rc = e.code
  return rc, capsys.readouterr()


@pytest.fixture(scope='module')
def backbone():
  return registry.Backbone('resnet50_irmac', CFG, resnet.init_params(CFG, 0))


def test_fit_whitens_and_the_converter_reads_the_file(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3000, 480)) @ rng.normal(size=(480, 480)) * 0.1 + 3.0   # correlated, off-centre
  pca = fit_pca.fit(x)
  assert np.all(np.diff(pca['d']) <= 0)   # descending
  np.testing.assert_allclose(pca['d'][:5], np.linalg.eigvalsh(np.cov(x.T, bias=True))[::-1][:5], rtol=1e-4)
  path = fit_pca.save(str(tmp_path / 'pca.npz'), pca)
  params = resnet.pca_params(resnet.load_pca(path), CFG)   # as convert_backbone --pca does
  z = (x - params['mean']) @ params['projection']
  np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(CFG.pca_dims), atol=2e-3)   # whitened
  assert sorted(os.listdir(tmp_path)) == ['pca.npz']   # nothing left under a temporary name


def test_floor_keeps_a_small_collection_usable():
  # 40 vectors of 480 dims: most of the spectrum is empty; the converter refuses non-positive eigenvalues and
  # would amplify rounding noise by 1/sqrt(1e-7) without the floor
  x = np.random.default_rng(1).normal(size=(40, 480))
  pca = fit_pca.fit(x)
  assert pca['d'].min() >= fit_pca.DEFAULT_FLOOR * pca['d'][0] * (1 - 1e-6)
  resnet.pca_params(pca, CFG)   # accepted
  with pytest.raises(ValueError, match='all equal'):
    fit_pca.fit(np.ones((10, 480)))


def _textures(rng, n, size=224):
  """n smooth random images (upsampled noise): distinct 'scenes' for a random network."""
  small = rng.integers(0, 256, size=(n, 7, 7, 3)).astype(np.float32)
  return np.repeat(np.repeat(small, size // 7, 1), size // 7, 2).astype(np.uint8)


def test_fitted_whitening_makes_random_weights_discriminative(backbone):
  rng = np.random.default_rng(2)
  videos = [_textures(rng, 6) for _ in range(4)]
  copy = np.clip(videos[0].astype(int) + 30 + rng.integers(-8, 9, videos[0].shape), 0, 255).astype(np.uint8)

  def score(net, a, b):   # Chamfer over regions, then over frames (ViSiL's frame and video similarity)
    fa, fb = (fit_pca.descriptor_fn(net, 8)(v) if net.config.pca_dims == 0 else
              np.asarray(net.forward(net.params, v)) for v in (a, b))
    return np.einsum('ird,jsd->ijrs', fa, fb).max(-1).mean(-1).max(1).mean()

  others = [score(backbone, videos[i], videos[j]) for i in range(4) for j in range(i)]
  assert min(others) > 0.9   # random PCA: every pair of unrelated videos looks alike
  fitted = fit_pca.with_pca(backbone, fit_pca.fit_frames(backbone, videos, batch_size=8))
  scores = [score(fitted, copy, v) for v in videos]
  assert int(np.argmax(scores)) == 0 and scores[0] > 3 * max(scores[1:]), scores   # measured 0.14 vs 0.03


@pytest.fixture(scope='module')
def clips(tmp_path_factory, backbone):
  tmp = tmp_path_factory.mktemp('fit_pca')
  folder = tmp / 'videos'
  folder.mkdir()
  for i, size in enumerate(((64, 48), (80, 48))):
    video_fixtures.make_video(str(folder / f'v{i}.mp4'), seconds=2, fps=4, size=size, audio_hz=None)
  model = registry.save(str(tmp / 'resnet'), 'resnet50_irmac', backbone.params, backbone.config)
  return tmp, str(folder), model


def test_cli_writes_the_pca_file_and_the_whitened_backbone(clips, capsys):
  tmp, folder, model = clips
  out, out_resnet = str(tmp / 'mine.npz'), str(tmp / 'resnet_mine')
  rc, io = _run(fit_pca.main, [f'--resnet={model}', f'--video_dir={folder}', f'--output={out}', '--fps=2',
                               f'--output_resnet={out_resnet}', '--pca_dims=16', '--batch_size=4'], capsys)
  assert rc == 0, io.err
  assert 'on 8 frames of 2 videos (72 region vectors)' in io.out
  got = registry.load(out_resnet, 'resnet50_irmac')
  want = fit_pca.with_pca(registry.load(model), resnet.load_pca(out), pca_dims=16)
  assert got.config == want.config and got.config.pca_dims == 16
  np.testing.assert_array_equal(got.params['pca']['projection'], want.params['pca']['projection'])


def test_cli_bad_input_is_one_error_and_writes_nothing(clips, capsys):
  tmp, folder, model = clips
  bad = tmp / 'bad'
  bad.mkdir()
  video_fixtures.make_corrupt(str(bad / 'broken.mp4'))
  out = str(tmp / 'never.npz')
  for argv, culprit in (([f'--video_dir={bad}', f'--output={out}'], 'broken.mp4'),
                        ([f'--video_dir={folder}', f'--output={tmp / "x.pth"}'], '.npz'),
                        ([f'--video_dir={folder}', f'--output={out}', f'--output_resnet={model}'], model),
                        ([f'--video_dir={tmp / "nowhere"}', f'--output={out}'], 'nowhere')):
    rc, io = _run(fit_pca.main, [f'--resnet={model}', *argv], capsys)
    assert rc == 2 and io.err.startswith('error: ') and culprit in io.err, (argv, io.err)
    assert len(io.err.strip().splitlines()) == 1, io.err
  assert not os.path.exists(out) and not os.path.exists(tmp / 'x.pth')
