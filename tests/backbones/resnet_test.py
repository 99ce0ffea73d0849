"""backbones.resnet (ResNet-50 L3-iRMAC + PCA) against PyTorch, NumPy and its converter's error paths.

The reference (tests.references.resnet_torch) is transformers' ResNetModel set up as a torchvision ResNet with random
weights and random BatchNorm statistics, re-keyed to torchvision names; it runs in float64. The Flax model
(float32, HIGHEST matmul precision) must match its four stage outputs and its [N, 9, D] descriptor at
rtol = atol = 1e-5. The iRMAC pooling is also checked against an explicit NumPy loop over the 3x3 windows, and
the PCA against an independent selection of the largest eigenvalues from a shuffled spectrum.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backbones import resnet
from tests.references import resnet_torch
from common_jax.convert_util import ConversionError

CFG = resnet.Config.tiny()   # layers (1, 1, 1, 1), width 8, 480-d iRMAC, 32-d PCA


@pytest.fixture(scope='module')
def reference():
  ref, sd = resnet_torch.build(CFG, seed=0, dtype=torch.float64)
  return ref, sd


@pytest.fixture(scope='module')
def frames():
  return np.random.default_rng(1).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)


def apply_fn(cfg, dtype=jnp.float32):
  model = resnet.Model(cfg, dtype=dtype)
  return jax.jit(lambda p, x: model.apply({'params': p}, resnet.preprocess(x, cfg), return_stages=True))


def run_both(ref, params, cfg, frames):
  with jax.default_matmul_precision('highest'):
    out, stages = apply_fn(cfg)(params, frames)
  x = (frames.astype(np.float32) / 255 - np.float32(resnet.IMAGENET_MEAN)) / np.float32(resnet.IMAGENET_STD)
  with torch.no_grad():
    want, want_stages = ref(x, return_stages=True)
  return (np.asarray(out), [np.asarray(s) for s in stages],
          want.numpy(), [s.permute(0, 2, 3, 1).numpy() for s in want_stages])


# ==========================================================================================================
# Against PyTorch
# ==========================================================================================================
@pytest.fixture(scope='module')
def with_pca(reference, frames):
  """(params, cfg, Flax outputs, torch outputs) of the converted tiny model with PCA."""
  ref, sd = reference
  params, cfg = resnet.convert(sd, pca=ref.pca, pca_dims=CFG.pca_dims)
  return params, cfg, run_both(ref, params, cfg, frames)


def test_matches_torch_with_pca(with_pca):
  _, cfg, (out, stages, want, want_stages) = with_pca
  assert cfg == CFG
  for i, (got, w) in enumerate(zip(stages, want_stages)):
    assert got.shape == w.shape == (2, 56 // 2 ** i, 56 // 2 ** i, cfg.stage_channels[i])
    print(f'[max abs err] layer{i + 1}: {np.abs(got - w).max():.3g} (max |x| {np.abs(w).max():.3g})')
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
  assert out.shape == (2, 9, 32) and out.dtype == np.float32
  print(f'[max abs err] iRMAC + PCA: {np.abs(out - want).max():.3g}')
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)


def test_matches_torch_without_pca(reference, frames):
  ref, sd = reference
  params, cfg = resnet.convert(sd)
  assert cfg.pca_dims == 0 and 'pca' not in params and cfg.out_dims == 480
  out, _, _, want_stages = run_both(ref, params, cfg, frames)
  want = resnet_torch.irmac_torch([torch.from_numpy(s).permute(0, 3, 1, 2) for s in want_stages]).numpy()
  assert out.shape == (2, 9, 480)
  print(f'[max abs err] iRMAC: {np.abs(out - want).max():.3g}')
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_close(with_pca, frames):
  params, cfg, (f32, *_) = with_pca
  bf16 = np.asarray(apply_fn(cfg, jnp.bfloat16)(params, frames)[0])
  assert bf16.dtype == np.float32
  cos = np.sum(f32 * bf16, axis=-1)
  print(f'[bf16] max 1 - region cosine to float32: {1 - cos.min():.3g}')
  assert 1e-7 < 1 - cos.min() < 0.02   # really computed in bf16, and close


def test_converted_tree_is_the_model_tree(reference, with_pca):
  _, sd = reference
  params, cfg, _ = with_pca
  want = jax.tree.map(lambda a: (a.shape, a.dtype), resnet.init_params(cfg))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == want
  np.testing.assert_array_equal(params['layer2']['0']['conv2']['kernel'],
                                sd['layer2.0.conv2.weight'].permute(2, 3, 1, 0).numpy())
  np.testing.assert_array_equal(params['layer4']['0']['downsample']['1']['var'],
                                sd['layer4.0.downsample.1.running_var'].numpy())


# ==========================================================================================================
# iRMAC and PCA against NumPy
# ==========================================================================================================
def irmac_numpy(stages):
  """Explicit windows: region (i, j) of a stage with kernel s covers rows/cols [i*ceil(s/2), +s)."""
  n = stages[0].shape[0]
  out = np.zeros((n, 3, 3, 0))
  for x, s in zip(stages, (28, 14, 6, 3)):
    step = -(-s // 2)
    grid = np.zeros((n, 3, 3, x.shape[-1]))
    for i in range(3):
      for j in range(3):
        grid[:, i, j] = x[:, i * step:i * step + s, j * step:j * step + s].max(axis=(1, 2))
    grid /= np.linalg.norm(grid, axis=-1, keepdims=True)
    out = np.concatenate([out, grid], axis=-1)
  out = out.reshape(n, 9, -1)   # row-major (h, w)
  return out / np.linalg.norm(out, axis=-1, keepdims=True)


def test_irmac_against_numpy():
  rng = np.random.default_rng(2)
  stages = [rng.normal(size=(3, side, side, c)) for side, c in zip((56, 28, 14, 7), (3, 5, 7, 11))]
  got = np.asarray(resnet.irmac([jnp.asarray(s, jnp.float32) for s in stages]))
  want = irmac_numpy(stages)
  print(f'[max abs err] iRMAC vs NumPy float64: {np.abs(got - want).max():.3g}')
  assert got.shape == (3, 9, 26)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='layer1 output 42x42 pooled with kernel 28 stride 14 gives a 2x2 grid'):
    resnet.irmac([jnp.zeros((1, 42, 42, 2))] + [jnp.asarray(s[:1], jnp.float32) for s in stages[1:]])


@pytest.mark.parametrize('order', ['shuffled', 'ascending'])
def test_pca_keeps_largest_eigenvalues(order):
  dims = CFG.irmac_dims
  pca = resnet_torch.random_pca(dims, seed=3)
  if order == 'ascending':   # np.linalg.eigh's order: the wanted components are the LAST ones
    idx = np.argsort(pca['d'])
    pca = {'mean': pca['mean'], 'd': pca['d'][idx], 'V': pca['V'][:, idx]}
  d = pca['d'].astype(np.float64)
  assert not np.all(np.diff(d) <= 0)
  top = sorted(range(dims), key=lambda i: -d[i])[:CFG.pca_dims]
  want = pca['V'][:, top].astype(np.float64) / np.sqrt(d[top] + 1e-7)
  got = resnet.pca_params(pca, CFG)
  np.testing.assert_allclose(got['projection'], want, rtol=1e-6)
  np.testing.assert_array_equal(got['mean'], pca['mean'])
  rng = np.random.default_rng(4)   # a random non-negative iRMAC batch
  x = irmac_numpy([rng.random((1, s, s, c)) for s, c in zip((56, 28, 14, 7), CFG.stage_channels)])
  y = resnet.PCA(CFG.pca_dims).apply({'params': got}, jnp.asarray(x, jnp.float32))
  z = (x - pca['mean']) @ want
  np.testing.assert_allclose(np.asarray(y), z / np.linalg.norm(z, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)


# ==========================================================================================================
# Config, preprocessing, FLOPs
# ==========================================================================================================
def test_config():
  full = resnet.Config.full()
  assert (full.layers, full.width, full.pca_dims, full.irmac_dims) == ((3, 4, 6, 3), 64, 512, 3840)
  assert full.stage_channels == (256, 512, 1024, 2048)
  cfg = resnet.Config.from_dict(json.loads(CFG.to_json()))
  assert cfg == CFG and hash(cfg) == hash(CFG)
  with pytest.raises(ValueError, match='unknown model config keys'):
    resnet.Config.from_dict({**CFG.to_dict(), 'depth': 50})
  with pytest.raises(ValueError, match='region grids'):
    resnet.Config(image_size=256)
  with pytest.raises(ValueError, match='pca_dims'):
    resnet.Config(width=8, pca_dims=481)
  assert resnet.stage_sizes(224) == (56, 28, 14, 7)


def test_preprocess_and_input_checks():
  x = np.arange(224 * 224 * 3, dtype=np.int64).reshape(1, 224, 224, 3) % 256
  got = np.asarray(resnet.preprocess(x.astype(np.uint8), CFG))
  want = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='224, 224, 3'):
    resnet.preprocess(np.zeros((1, 256, 256, 3), np.uint8), CFG)
  with pytest.raises(ValueError, match='224, 224, 3'):
    resnet.Model(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 224, 224)))


def test_flops_per_frame():
  # torchvision's ResNet-50 has 4.09 GMAC at 224 (conv + fc); conv only ~4.087 GMAC; PCA 9 x 3840 x 512 MAC.
  full = resnet.flops_per_frame(resnet.Config.full())
  assert 8.17e9 < full - 2 * 9 * 3840 * 512 < 8.18e9
  assert resnet.flops_per_frame(CFG) < full / 20


# ==========================================================================================================
# Converter inputs
# ==========================================================================================================
def random_state_dict(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return {key: rng.normal(size=shape).astype(np.float32) for key, _, _, shape in resnet.table(cfg)}


def test_config_inferred_from_shapes():
  cfg = resnet.Config(layers=(2, 1, 3, 1), width=4, pca_dims=0)
  sd = random_state_dict(cfg)
  sd['layer3.1.bn1.num_batches_tracked'] = np.array(7)
  params, got = resnet.convert(sd, where='x.pth')
  assert got == cfg
  assert sorted(params['layer3']) == ['0', '1', '2'] and 'downsample' not in params['layer3']['1']
  pca = resnet_torch.random_pca(cfg.irmac_dims)
  assert resnet.convert(sd, pca=pca, pca_dims=16)[1].pca_dims == 16
  assert resnet.convert(sd, pca=pca)[1].pca_dims == cfg.irmac_dims == 240   # default 512, capped at D


def test_bad_state_dict_lists_every_problem(reference):
  _, sd = reference
  sd = dict(sd)
  del sd['layer3.0.bn2.running_var']
  sd['head.weight'] = torch.zeros(3)
  sd['layer1.0.conv2.weight'] = torch.zeros(8, 8, 1, 1)
  with pytest.raises(ConversionError) as e:
    resnet.convert(sd, where='bad.pth')
  msg = str(e.value)
  assert msg.startswith('bad.pth does not match a torchvision ResNet (layers=[1, 1, 1, 1], width=8)')
  assert 'missing key layer3.0.bn2.running_var (expected shape [32])' in msg
  assert 'unexpected key head.weight (shape [3])' in msg
  assert 'layer1.0.conv2.weight: shape [8, 8, 1, 1], expected [8, 8, 3, 3]' in msg
  with pytest.raises(ConversionError, match='pca_dims=481'):
    resnet.convert(reference[1], where='r.pth', pca=resnet_torch.random_pca(480), pca_dims=481)


def test_pca_files(tmp_path, reference):
  pca = resnet_torch.random_pca(CFG.irmac_dims, seed=5)
  torch.save({k: torch.from_numpy(v) for k, v in pca.items()}, tmp_path / 'pca.pth')
  np.savez(tmp_path / 'pca.npz', **pca)
  for name in ('pca.pth', 'pca.npz'):
    loaded = resnet.load_pca(str(tmp_path / name))
    assert loaded.where.endswith(name) and loaded['V'].dtype == np.float64
    np.testing.assert_array_equal(loaded['d'], pca['d'])
  with pytest.raises(ConversionError, match='file not found'):
    resnet.load_pca(str(tmp_path / 'nope.pth'))
  torch.save({'mean': torch.zeros(4), 'd': torch.ones(5)}, tmp_path / 'bad.pth')
  with pytest.raises(ConversionError) as e:
    resnet.load_pca(str(tmp_path / 'bad.pth'))
  assert 'missing key V' in str(e.value) and 'd: shape [5], expected [4]' in str(e.value)
  torch.save([1, 2], tmp_path / 'list.pth')
  with pytest.raises(ConversionError, match='holds a list'):
    resnet.load_pca(str(tmp_path / 'list.pth'))
  small = resnet_torch.random_pca(100)
  np.savez(tmp_path / 'small.npz', **small)
  with pytest.raises(ConversionError) as e:   # a PCA learned on other vectors than this model's 480-d iRMAC
    resnet.convert(reference[1], pca=str(tmp_path / 'small.npz'), pca_dims=32)
  assert 'small.npz does not match a PCA file of 480-d vectors' in str(e.value)
  assert 'V: shape [100, 100], expected [480, 480]' in str(e.value)
  nan = dict(pca, d=np.full(480, np.nan, np.float32))
  with pytest.raises(ConversionError, match='non-finite values in d'):
    resnet.pca_params(nan, CFG)
  neg = dict(pca, d=-np.abs(pca['d']))
  with pytest.raises(ConversionError, match='non-positive'):
    resnet.pca_params(neg, CFG)
