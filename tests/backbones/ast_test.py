"""AST backbone: Flax vs transformers' ASTModel (both key layouts), the converter's checks, and the log-mel fbank
(NumPy and JAX) vs transformers' ASTFeatureExtractor."""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from backbones import ast, fbank
from tests.references import ast_torch
from common_jax.convert_util import ConversionError

SR = 16000
PAD = (0 - fbank.MEAN) / (2 * fbank.STD)     # a padded (all-zero) fbank cell after normalisation


@pytest.fixture(scope='module')
def tiny():
  cfg = ast.Config.tiny()
  x = (0.5 * np.random.default_rng(0).standard_normal((3, cfg.max_length, cfg.num_mel_bins))).astype(np.float32)
  return cfg, x


@functools.lru_cache(maxsize=None)
def _jitted(cfg, dtype):
  return jax.jit(lambda params, x: ast.Model(cfg, dtype=dtype).apply({'params': params}, ast.preprocess(x, cfg)))


def flax_apply(params, cfg, x, dtype=jnp.float32):
  with jax.default_matmul_precision('highest'):
    return np.asarray(_jitted(cfg, dtype)(params, x))


@pytest.mark.parametrize('layout', ['hub', 'v5'])
def test_matches_transformers(tiny, layout):
  cfg, x = tiny
  fn, sd = ast_torch.build(cfg, seed=3, layout=layout)
  params, inferred = ast.convert(sd, num_heads=cfg.num_attention_heads)
  assert inferred == cfg
  want = fn(x)
  assert want.shape == (3, cfg.hidden_size) and np.abs(want).max() > 0.5
  np.testing.assert_allclose(flax_apply(params, cfg, x), want, rtol=1e-5, atol=1e-5)
  # The classification checkpoint: prefixed keys and a head that is dropped.
  wrapped = {f'audio_spectrogram_transformer.{k}': v for k, v in sd.items()}
  wrapped.update({'classifier.layernorm.weight': np.ones(cfg.hidden_size), 'classifier.dense.weight':
                  np.zeros((527, cfg.hidden_size)), 'classifier.dense.bias': np.zeros(527)})
  params2, _ = ast.convert(wrapped, num_heads=cfg.num_attention_heads)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, params2))


def test_params_tree_matches_init(tiny):
  cfg, _ = tiny
  _, sd = ast_torch.build(cfg, layout='v5')
  params, _ = ast.convert(sd, num_heads=2)
  shapes = lambda t: jax.tree.map(np.shape, t)
  x = jnp.zeros((1, cfg.max_length, cfg.num_mel_bins))
  assert shapes(params) == shapes(jax.eval_shape(ast.Model(cfg).init, jax.random.PRNGKey(0), x)['params'])
  assert params['embeddings']['position_embeddings'].shape == (1, 12 * 6 + 2, cfg.hidden_size)
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))


def test_bfloat16_close(tiny):
  cfg, x = tiny
  _, sd = ast_torch.build(cfg, seed=1, layout='v5')
  params, _ = ast.convert(sd, num_heads=2)
  full, half = flax_apply(params, cfg, x), flax_apply(params, cfg, x, jnp.bfloat16)
  assert half.dtype == np.float32
  assert np.abs(full - half).max() < 0.05 * np.abs(full).max()


def test_converter_reports_all_problems_at_once(tiny):
  cfg, _ = tiny
  _, sd = ast_torch.build(cfg, layout='hub')
  del sd['encoder.layer.1.output.dense.bias']
  sd['encoder.layer.0.mystery.weight'] = np.zeros(3)
  sd['layernorm.weight'] = np.ones(cfg.hidden_size + 1)
  with pytest.raises(ConversionError) as e:
    ast.convert(sd, where='ast.pth', num_heads=2)
  msg = str(e.value)
  assert msg.startswith('ast.pth does not match AST')
  for part in ('missing key encoder.layer.1.output.dense.bias', 'unexpected key encoder.layer.0.mystery.weight',
               'layernorm.weight: shape [33], expected [32]'):
    assert part in msg


def test_converter_rejects_mixed_layouts_and_bad_sizes(tiny):
  cfg, _ = tiny
  _, hub = ast_torch.build(cfg, layout='hub')
  _, v5 = ast_torch.build(cfg, layout='v5')
  with pytest.raises(ConversionError, match='appears twice'):
    ast.convert({**hub, 'layers.0.mlp.fc1.weight': v5['layers.0.mlp.fc1.weight']}, num_heads=2)
  with pytest.raises(ConversionError, match='not a multiple of 64; give num_heads'):
    ast.convert(hub)
  with pytest.raises(ConversionError, match='position embeddings'):
    ast.convert(hub, num_heads=2, num_mel_bins=64)        # 72 patches are not 6 frequency rows x T


def test_config_inference():
  full = ast.Config.full()
  assert full.patch_grid == (12, 101) and full.num_positions == 1214
  # Full-size shapes without the memory: zero-stride arrays.
  shapes = {k: np.broadcast_to(np.float32(0), s) for k, s in ast.expected_shapes(full).items()}
  assert ast.infer_config(shapes) == full
  assert ast.infer_config(shapes, num_heads=16).num_attention_heads == 16
  tiny = ast.Config.tiny()
  shapes = {k: np.broadcast_to(np.float32(0), s) for k, s in ast.expected_shapes(tiny).items()}
  assert ast.infer_config(shapes, num_heads=2) == tiny
  # 64 frames give the same 6 time patches as 66: the smallest such length is inferred unless given.
  assert ast.infer_config(shapes, num_heads=2, max_length=64).max_length == 64
  no_bias = {k: v for k, v in shapes.items() if not re.search(r'attention\.attention\.\w+\.bias', k)}
  assert not ast.infer_config(no_bias, num_heads=2).qkv_bias
  assert ast.Config.from_dict(tiny.to_dict()) == tiny
  with pytest.raises(ValueError, match='unknown model config keys'):
    ast.Config.from_dict({**tiny.to_dict(), 'hidden': 3})
  assert 2.5e11 < ast.flops_per_segment(full) < 2.7e11


# ---------------------------------------------------------------------------------------------------- fbank


def _waves():
  rng = np.random.default_rng(0)
  t = np.arange(3 * SR) / SR
  return {
      'tone': 0.5 * np.sin(2 * np.pi * 440 * t),
      'chirp': 0.3 * np.sin(2 * np.pi * (100 + 1500 * t) * t),
      'noise': 0.1 * rng.standard_normal(2 * SR),
      'short': 0.3 * rng.standard_normal(5000),
      'exact_1024_frames': 0.2 * rng.standard_normal(400 + 1023 * 160),
      'longer_than_10s': 0.2 * rng.standard_normal(12 * SR),
      'dc_offset': 0.5 + 0.1 * rng.standard_normal(8000),
      'under_one_window': 0.2 * rng.standard_normal(300),
  }


@pytest.fixture(scope='module')
def extractor_outputs():
  transformers = pytest.importorskip('transformers')
  fe = transformers.ASTFeatureExtractor()
  waves = {k: v.astype(np.float32) for k, v in _waves().items()}
  return waves, {k: fe(w, sampling_rate=SR, return_tensors='np')['input_values'][0] for k, w in waves.items()}


def test_fbank_numpy_matches_extractor(extractor_outputs):
  waves, want = extractor_outputs
  for name, wave in waves.items():
    got = fbank.ast_input_numpy(wave)
    assert got.shape == want[name].shape == (1024, 128), name
    np.testing.assert_allclose(got, want[name], rtol=0, atol=1e-5, err_msg=name)
  assert fbank.fbank_numpy(waves['exact_1024_frames']).shape == (1024, 128)
  assert fbank.fbank_numpy(waves['under_one_window']).shape == (0, 128)
  np.testing.assert_allclose(want['short'][29:], PAD, atol=1e-6)       # 5000 samples -> 29 frames, then padding
  assert np.abs(want['short'][:29] - PAD).min() > 0


def assert_close_to_extractor(got, want, name):
  """float32 limits: cells within 15 nats (65 dB) of their frame's loudest mel bin agree to 5e-5; cells far below
  it (down to the 1.2e-7 floor) carry float32 rounding of the louder bins (torchaudio's float32 FFT too)."""
  loud = (want.max(axis=1, keepdims=True) - want) * 2 * fbank.STD < 15
  np.testing.assert_allclose(got[loud], want[loud], rtol=0, atol=5e-5, err_msg=name)
  np.testing.assert_allclose(got, want, rtol=0, atol=3e-3, err_msg=name)


def test_fbank_jax_matches_extractor(extractor_outputs):
  waves, want = extractor_outputs
  run = jax.jit(fbank.ast_input)
  for name, wave in waves.items():
    assert_close_to_extractor(np.asarray(run(wave[None]))[0], want[name], name)
  raw = np.asarray(fbank.fbank_jax(waves['noise'][None]))[0]
  np.testing.assert_allclose(raw, fbank.fbank_numpy(waves['noise']), rtol=0, atol=2e-4)


def test_ast_input_batch_with_lengths(extractor_outputs):
  waves, want = extractor_outputs
  names = ['short', 'noise', 'under_one_window', 'tone']
  lengths = np.array([len(waves[n]) for n in names])
  batch = np.zeros((len(names), lengths.max()), np.float32)
  for i, n in enumerate(names):
    batch[i, :lengths[i]] = waves[n]
  got = np.asarray(jax.jit(fbank.ast_input)(batch, lengths=lengths))
  for i, n in enumerate(names):
    assert_close_to_extractor(got[i], want[n], n)


def test_very_short_clip_is_all_padding():
  # transformers' NumPy path raises below 240 samples (negative frame count); torchaudio and we give 0 frames.
  transformers = pytest.importorskip('transformers')
  wave = np.full(100, 0.1, np.float32)
  with pytest.raises(ValueError):
    transformers.ASTFeatureExtractor()(wave, sampling_rate=SR, return_tensors='np')
  np.testing.assert_allclose(fbank.ast_input_numpy(wave), PAD, atol=1e-6)
  np.testing.assert_allclose(np.asarray(fbank.ast_input(wave[None])), PAD, atol=1e-6)
  with pytest.raises(ValueError, match='16000 Hz'):
    fbank.fbank_numpy(wave, sample_rate=8000)
