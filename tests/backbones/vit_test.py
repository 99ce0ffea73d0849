"""DINO ViT-S/16 (`backbones.dino`) and CLIP ViT-L/14 (`backbones.clip`) against transformers PyTorch modules.

Tiny configs (width 32, 2 blocks, 2 heads) with random weights everywhere (LayerNorm affine and embeddings included):
convert(state_dict in every supported layout) -> Flax output vs the torch output at rtol = atol = 1e-5 (float32, matmul
precision 'highest'); the layouts of one module give identical params; DINO training checkpoints (teacher +
`backbone.` + head), `vit.`-prefixed and pooler-carrying ViTModels, full CLIPModel / OpenAI state_dicts with a text
tower are accepted; missing, unexpected and mis-shaped keys come back in one ConversionError; the size is read off the
shapes (heads: default width / 64, `num_heads` override).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch

from backbones import clip, dino
from tests.references import clip_torch
from tests.references import dino_torch
from common_jax.convert_util import ConversionError

TOL = dict(rtol=1e-5, atol=1e-5)
SEED = 3


@functools.lru_cache(maxsize=None)
def apply_fn(mod, cfg, dtype=np.float32):
  return jax.jit(mod.Model(cfg, dtype=dtype).apply)


def run(mod, params, cfg, x, dtype=np.float32):
  with jax.default_matmul_precision('highest'):
    return np.asarray(apply_fn(mod, cfg, dtype)({'params': params}, x))


def frames(cfg, n=3, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (n, cfg.image_size, cfg.image_size, 3)).astype(np.uint8)


def param_shapes(mod, cfg):
  """The shapes Model.init would create (traced only: compiling the random init costs seconds of CPU)."""
  x = np.zeros((1, cfg.image_size, cfg.image_size, 3), np.float32)
  return jax.tree.map(lambda a: a.shape, jax.eval_shape(mod.Model(cfg).init, jax.random.PRNGKey(0), x)['params'])


def assert_same_tree(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))


def assert_matches_reference(mod, fn, params, cfg, dim):
  """The Flax model on three preprocessed frames: [3, dim] float32, equal to the torch reference `fn`."""
  x = np.asarray(mod.preprocess(frames(cfg), cfg))
  out, ref = run(mod, params, cfg, x), fn(x)
  assert out.shape == (3, dim) and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, **TOL)


def assert_layouts_agree(mod, refs):
  """Every layout converts to the same params, in the tree Model.init creates."""
  trees = [mod.convert(sd, num_heads=2)[0] for _, sd in refs.values()]
  for tree in trees[1:]:
    assert_same_tree(tree, trees[0])
  assert param_shapes(mod, mod.Config.tiny()) == jax.tree.map(np.shape, trees[0])


def assert_bad_keys_one_error(mod, sd, where, missing, bad, bad_shape, good_shape, extra):
  """`missing` deleted, `bad` given `bad_shape`, `extra` added: one ConversionError names all three and `where`."""
  sd = dict(sd)
  del sd[missing]
  sd[bad] = np.zeros(bad_shape, np.float32)
  sd[extra] = np.zeros(2, np.float32)
  with pytest.raises(ConversionError) as e:
    mod.convert(sd, where=where, num_heads=2)
  msg = str(e.value)
  assert where in msg and f'missing key {missing}' in msg and f'unexpected key {extra}' in msg
  assert f'{bad}: shape {list(bad_shape)}, expected {good_shape}' in msg


@pytest.fixture(scope='module')
def dino_refs():
  return {layout: dino_torch.build(dino.Config.tiny(), SEED, layout) for layout in dino_torch.LAYOUTS}


@pytest.fixture(scope='module')
def clip_refs():
  return {layout: clip_torch.build(clip.Config.tiny(), SEED, layout) for layout in clip_torch.LAYOUTS}


# ------------------------------------------------------------------------------------------------------- DINO


@pytest.mark.parametrize('layout', dino_torch.LAYOUTS)
@pytest.mark.parametrize('normalize', dino.NORMALIZE)
def test_dino_matches_torch(dino_refs, layout, normalize):
  fn, sd = dino_refs[layout]
  params, cfg = dino.convert(sd, num_heads=2, normalize=normalize)
  assert cfg == dataclasses.replace(dino.Config.tiny(), normalize=normalize)
  assert_matches_reference(dino, fn, params, cfg, cfg.hidden_size)


def test_dino_layouts_give_identical_params(dino_refs):
  assert_layouts_agree(dino, dino_refs)


def test_dino_wrappers_and_prefixes(dino_refs):
  official, hf = dino_refs['official'][1], dino_refs['hf4'][1]
  base, cfg = dino.convert(official, num_heads=2)
  rng = np.random.RandomState(0)
  teacher = {'backbone.' + k: torch.from_numpy(v) for k, v in official.items()}
  teacher.update({'head.mlp.0.weight': torch.zeros(8, 32), 'head.last_layer.weight_g': torch.ones(16, 1)})
  ckpt = {'student': {'module.' + k: v for k, v in teacher.items()}, 'teacher': teacher, 'epoch': 100}
  params, cfg2 = dino.convert(ckpt, num_heads=2)
  assert cfg2 == cfg
  assert_same_tree(params, base)
  vit = {'vit.' + k: v for k, v in hf.items()}
  vit.update({'pooler.dense.weight': rng.randn(32, 32), 'pooler.dense.bias': rng.randn(32)})
  assert_same_tree(dino.convert(vit, num_heads=2)[0], base)


@pytest.mark.parametrize('layout', dino_torch.LAYOUTS)
def test_dino_bad_keys_one_error(dino_refs, layout):
  qkv = {'official': 'blocks.1.attn.qkv.weight', 'hf': 'layers.1.attention.k_proj.weight',
         'hf4': 'encoder.layer.1.attention.attention.key.weight'}[layout]
  fc2 = {'official': 'blocks.0.mlp.fc2.bias', 'hf': 'layers.0.mlp.fc2.bias', 'hf4': 'encoder.layer.0.output.dense.bias'}
  assert_bad_keys_one_error(dino, dino_refs[layout][1], 'ckpt.pth', qkv, fc2[layout], (31,), '[32]', 'extra.weight')


def test_dino_config_inference():
  cfg = dino.Config(image_size=24, patch_size=8, hidden_size=128, depth=3, num_heads=2, mlp_dim=96)
  _, sd = dino_torch.build(cfg, 0, 'official')
  got = dino.convert(sd)[1]                             # heads default: 128 / 64 = 2
  assert got == cfg
  assert dino.convert(sd, num_heads=4)[1].num_heads == 4
  with pytest.raises(ConversionError, match='num_heads=3'):
    dino.convert(sd, num_heads=3)
  # Depth is the number of blocks present (a truncated file converts to fewer blocks).
  short = {k: v for k, v in sd.items() if not k.startswith('blocks.2.')}
  assert dino.convert(short)[1].depth == 2
  # Full size from shapes only (zero-copy broadcast arrays): the teacher of dino_deitsmall16_pretrain.pth.
  full = {k: np.broadcast_to(np.float32(0), s) for k, s in dino.canonical_shapes(dino.Config.full()).items()}
  assert dino.convert(full)[1] == dino.Config.full()
  with pytest.raises(ConversionError, match='no_such|neither'):
    dino.convert({'no_such.weight': np.zeros(3)})


def test_dino_preprocess_and_config():
  cfg = dino.Config.tiny()
  x = frames(cfg, 2)
  np.testing.assert_array_equal(dino.preprocess(x, cfg), x.astype(np.float32))      # original: raw [0, 255]
  want = (x / 255.0 - np.array(dino.IMAGENET_MEAN)) / np.array(dino.IMAGENET_STD)
  np.testing.assert_allclose(dino.preprocess(x, cfg, 'imagenet'), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dino.preprocess(x, dataclasses.replace(cfg, normalize='imagenet')), want, rtol=1e-6,
                             atol=1e-6)
  assert dino.Config.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match='unknown'):
    dino.Config.from_dict({**cfg.to_dict(), 'bogus': 1})
  with pytest.raises(ValueError, match='normalize'):
    dino.Config(normalize='imagnet')
  with pytest.raises(ValueError, match='position embeddings'):
    dino.Model(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 40, 40, 3), np.float32))
  assert dino.flops_per_image(dino.Config.full()) == pytest.approx(9.2e9, rel=0.01)
  # init_params (benches): float32 params of the converter's tree, finite output.
  params = dino.init_params(cfg, seed=1)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
  assert np.isfinite(run(dino, params, cfg, np.asarray(dino.preprocess(x, cfg)))).all()


# ------------------------------------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize('layout', clip_torch.LAYOUTS)
def test_clip_matches_torch(clip_refs, layout):
  fn, sd = clip_refs[layout]
  params, cfg = clip.convert(sd, num_heads=2)
  assert cfg == clip.Config.tiny()
  assert_matches_reference(clip, fn, params, cfg, cfg.projection_dim)


def test_clip_layouts_give_identical_params(clip_refs):
  assert_layouts_agree(clip, clip_refs)


def test_clip_full_models_accepted(clip_refs):
  from transformers import CLIPConfig, CLIPModel
  fn, hf = clip_refs['hf']
  base, cfg = clip.convert(hf, num_heads=2)
  c = clip.Config.tiny()
  full = CLIPModel(CLIPConfig(
      vision_config=dict(hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.layers,
                         num_attention_heads=c.num_heads, image_size=c.image_size, patch_size=c.patch_size,
                         hidden_act='quick_gelu'),
      text_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
      projection_dim=c.projection_dim))
  incompatible = full.load_state_dict(fn.module.state_dict(), strict=False)
  assert not incompatible.unexpected_keys
  assert all(k.startswith(('text_', 'logit_scale')) for k in incompatible.missing_keys)
  sd = dict(full.state_dict())
  sd['vision_model.embeddings.position_ids'] = torch.arange(1 + c.grid ** 2)[None]
  params, cfg2 = clip.convert(sd, num_heads=2)
  assert cfg2 == cfg
  assert_same_tree(params, base)
  # OpenAI: the full model's state_dict (text tower + the JIT archive's scalar entries) beside `visual.*`.
  openai = dict(clip_refs['openai'][1])
  rng = np.random.RandomState(0)
  openai.update({'transformer.resblocks.0.attn.in_proj_weight': rng.randn(72, 24), 'token_embedding.weight':
                 rng.randn(64, 24), 'positional_embedding': rng.randn(77, 24), 'ln_final.weight': rng.randn(24),
                 'text_projection': rng.randn(24, 16), 'logit_scale': np.float32(4.6),
                 'input_resolution': np.int64(28), 'context_length': np.int64(77), 'vocab_size': np.int64(64)})
  assert_same_tree(clip.convert(openai, num_heads=2)[0], base)
  # A bare `model.visual` state_dict (no prefix).
  bare = {k[len('visual.'):]: v for k, v in clip_refs['openai'][1].items()}
  assert_same_tree(clip.convert(bare, num_heads=2)[0], base)


@pytest.mark.parametrize('layout', clip_torch.LAYOUTS)
def test_clip_bad_keys_one_error(clip_refs, layout):
  if layout == 'openai':
    missing, bad, good_shape = 'visual.transformer.resblocks.1.attn.in_proj_bias', 'visual.ln_post.weight', '[32]'
  else:
    missing, bad, good_shape = 'vision_model.encoder.layers.1.self_attn.v_proj.bias', 'visual_projection.weight', \
        '[16, 32]'
  assert_bad_keys_one_error(clip, clip_refs[layout][1], 'ViT-L-14.pt', missing, bad,
                            (16, 31) if layout == 'hf' else (5,), good_shape, 'visual.extra')


def test_clip_config_inference_preprocess_and_bf16(clip_refs):
  cfg = clip.Config(image_size=24, patch_size=8, width=128, layers=3, num_heads=2, mlp_dim=96, projection_dim=8)
  _, sd = clip_torch.build(cfg, 0, 'hf')
  assert clip.convert(sd)[1] == cfg                       # heads default: 128 / 64 = 2
  assert clip.convert(sd, num_heads=8)[1].num_heads == 8
  with pytest.raises(ConversionError, match='num_heads=3'):
    clip.convert(sd, num_heads=3)
  c = clip.Config.tiny()
  x = frames(c, 2)
  want = (x / 255.0 - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD)
  np.testing.assert_allclose(clip.preprocess(x, c), want, rtol=1e-6, atol=1e-6)
  assert clip.Config.from_dict(c.to_dict()) == c
  with pytest.raises(ValueError, match='unknown'):
    clip.Config.from_dict({**c.to_dict(), 'hidden_size': 3})
  assert clip.flops_per_image(clip.Config.full()) == pytest.approx(162e9, rel=0.01)
  # bf16 compute (benches): same tree, close to float32.
  fn, osd = clip_refs['openai']
  params, _ = clip.convert(osd, num_heads=2)
  xin = np.asarray(clip.preprocess(x, c))
  out = run(clip, params, c, xin, dtype=jax.numpy.bfloat16)
  ref = fn(xin)
  assert out.dtype == np.float32
  assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_configs_refuse_shapes_that_do_not_divide():
  with pytest.raises(ValueError, match='width=30 is not a multiple of num_heads=4'):
    clip.Config(width=30, num_heads=4)
  with pytest.raises(ValueError, match='hidden_size=30 is not a multiple of num_heads=4'):
    dino.Config(hidden_size=30, num_heads=4)
  with pytest.raises(ValueError, match='image_size=30 is not a multiple of patch_size=16'):
    dino.Config(image_size=30)
