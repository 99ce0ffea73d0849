"""Pre-LN Vision Transformer pieces shared by DINO ViT-S/16 (`backbones.dino`) and CLIP ViT-L/14 (`backbones.clip`).

Both towers are the same computation with different names: tokens = [CLS ; patches] + positions, then blocks of

  x = x + attn(norm_a(x));  x = x + mlp(norm_b(x))        attn: fused qkv Linear, softmax(q k^T / sqrt(d)) v, out Linear
                                                          mlp: Linear -> activation (exact GELU / quick GELU) -> Linear

The Flax modules here take the parameter names as attributes, so each model's tree mirrors its own checkpoint
(DINO: norm1/attn/qkv/proj/norm2/mlp/fc1/fc2; OpenAI CLIP: ln_1/attn/in_proj/out_proj/ln_2/mlp/c_fc/c_proj). Params
are float32; `dtype` is the compute dtype (bf16 for benches); softmax and LayerNorm statistics run in float32.

Conversion helpers: `gather` reads a state_dict in some layout into the *canonical* (original checkpoint) key names
through rows (canonical key, source keys, how), checking every key first in the source layout's own names, so an
error names exactly what the user's file has or lacks; `depth_of` counts the blocks present.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from common_jax import config_util
from common_jax.convert_util import ConversionError, check_keys, state_dict_of


def quick_gelu(x):
  """OpenAI CLIP's activation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {'gelu': lambda x: nn.gelu(x, approximate=False), 'quick_gelu': quick_gelu}


def dense(features: int, name: str, dtype, precision, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, precision=precision, name=name,
                  kernel_init=nn.initializers.truncated_normal(0.02), bias_init=nn.initializers.zeros)


def layer_norm(eps: float, name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, name=name)


def attention(q, k, v, dtype, precision, heads_major: bool):
  """softmax(q k^T / sqrt(d)) v per head: q, k, v [B, T, H, Dh] -> [B, T, H * Dh]. `heads_major` moves the heads
  before the tokens once, so both matmuls are plain batched ones (no per-head strided operands)."""
  b, t, h, dh = q.shape
  if heads_major:
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = jnp.einsum('bhqd,bhkd->bhqk', q, k, precision=precision) * dh ** -0.5
  else:
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=precision) * dh ** -0.5
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
  if heads_major:
    return jnp.einsum('bhqk,bhkd->bhqd', probs, v, precision=precision).transpose(0, 2, 1, 3).reshape(b, t, h * dh)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v, precision=precision).reshape(b, t, h * dh)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (output channels ordered [q | k | v], heads inside)."""
  num_heads: int
  qkv_name: str = 'qkv'
  out_name: str = 'proj'
  dtype: Any = jnp.float32
  precision: Any = None
  heads_major: bool = True

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = self.num_heads
    qkv = dense(3 * d, self.qkv_name, self.dtype, self.precision)(x).reshape(b, t, 3, h, d // h)
    out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.dtype, self.precision, self.heads_major)
    return dense(d, self.out_name, self.dtype, self.precision)(out)


class Mlp(nn.Module):
  hidden: int
  act: str = 'gelu'
  fc_names: tuple = ('fc1', 'fc2')
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    y = ACTIVATIONS[self.act](dense(self.hidden, self.fc_names[0], self.dtype, self.precision)(x))
    return dense(x.shape[-1], self.fc_names[1], self.dtype, self.precision)(y)


class Block(nn.Module):
  """One pre-LN block. names = (norm_a, attn, qkv, out, norm_b, mlp, fc1, fc2): the checkpoint's module names."""
  num_heads: int
  mlp_dim: int
  eps: float
  act: str
  names: tuple = ('norm1', 'attn', 'qkv', 'proj', 'norm2', 'mlp', 'fc1', 'fc2')
  dtype: Any = jnp.float32
  precision: Any = None
  heads_major: bool = True

  @nn.compact
  def __call__(self, x):
    na, attn, qkv, out, nb, mlp, fc1, fc2 = self.names
    x = x + SelfAttention(self.num_heads, qkv, out, self.dtype, self.precision, self.heads_major, name=attn)(
        layer_norm(self.eps, na, self.dtype)(x))
    return x + Mlp(self.mlp_dim, self.act, (fc1, fc2), self.dtype, self.precision, name=mlp)(
        layer_norm(self.eps, nb, self.dtype)(x))


class ImageConfig(config_util.JsonConfig):
  """Mixin of the image ViT configs (frozen dataclasses with image_size and patch_size)."""

  @classmethod
  def full(cls):
    """The checkpoint's size: the defaults."""
    return cls()

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size


class ConfigModule(nn.Module):
  """A module built from a backbone config, with its compute dtype and matmul precision. `fast_layout`: the
  patch projection as a matmul and head-major attention (`PatchProjection`, `attention`); False keeps the
  former convolution / token-major formulation, for the benchmarks' before/after (same numbers to rounding)."""
  config: Any
  dtype: Any = jnp.float32
  precision: Any = None
  fast_layout: bool = True


class PatchProjection(nn.Module):
  """torch Conv2d(3, W, P, stride P) over non-overlapping patches, with nn.Conv's parameters (kernel [P, P, 3, W],
  bias): as a reshape + matmul when `as_dot` (XLA:CPU's convolution with 3 input channels is slow), else as
  nn.Conv. [B, H, W, 3] -> [B, (H / P) * (W / P), W] tokens, row-major over the grid as torch's flatten(2)."""
  features: int
  patch: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  precision: Any = None
  as_dot: bool = True

  @nn.compact
  def __call__(self, x):
    p, (b, hh, ww, c) = self.patch, x.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (p, p, c, self.features), jnp.float32)
    if self.as_dot:
      x = x.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
      y = jnp.matmul(x.astype(self.dtype), kernel.reshape(p * p * c, -1).astype(self.dtype), precision=self.precision)
    else:
      y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (p, p), 'VALID',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
      y = y.reshape(b, -1, self.features)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y


def with_class_token(patches, cls, pos, dtype):
  """[CLS ; patches] + position embeddings: tokens [B, 1 + N, W] in `dtype`."""
  b, _, w = patches.shape
  return jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, w)), patches], axis=1) + pos.astype(dtype)


def check_dims(width_name: str, width: int, num_heads: int, image_size: int, patch_size: int) -> None:
  """The shape rules of an image ViT config, checked when it is built (`width_name`: the field's name)."""
  if width % num_heads:
    raise ValueError(f'{width_name}={width} is not a multiple of num_heads={num_heads}')
  if image_size % patch_size:
    raise ValueError(f'image_size={image_size} is not a multiple of patch_size={patch_size}')


def check_grid(height: int, width: int, patch: int, image_size: int, what: str) -> None:
  """Position embeddings are stored for image_size x image_size; other sizes are refused (no interpolation)."""
  if height != image_size or width != image_size:
    raise ValueError(f'{what}: input is {height}x{width} but the position embeddings are for {image_size}x{image_size} '
                     f'(patch {patch}); resize the frames to {image_size}x{image_size} (interpolating position '
                     'embeddings is not supported)')


def encoder_flops(tokens: int, width: int, mlp_dim: int, depth: int) -> int:
  """Multiply-adds x 2 of `depth` blocks over `tokens` tokens (LayerNorm, softmax and activations not counted)."""
  per_block = 2 * tokens * width * (3 * width + width + 2 * mlp_dim) + 2 * 2 * tokens * tokens * width
  return depth * per_block


# ------------------------------------------------------------------------------------------------- conversion


def flat_state_dict(state_dict: Any, where: str) -> dict:
  """A bare state_dict (torch tensors or arrays) or a wrapped one (e.g. DINO's {'teacher': ...}) -> NumPy dict."""
  return state_dict_of(state_dict, where)


def strip_prefix(sd: Mapping[str, np.ndarray], prefix: str) -> dict:
  """Removes `prefix` from the keys that carry it (the others stay, to be reported or ignored)."""
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def depth_of(keys, pattern: str) -> int:
  """1 + the largest block index matched by `pattern` (a regex with one group for the index), 0 if none."""
  idx = [int(m.group(1)) for m in map(re.compile(pattern).match, keys) if m]
  return max(idx) + 1 if idx else 0


def gather(sd: Mapping[str, np.ndarray], rows: Sequence[tuple], canonical_shapes: Mapping[str, tuple], where: str,
           what: str, ignore=None) -> dict:
  """Canonical key -> array, from `rows` = (canonical key, source keys, how) with how None (one key, as is), 'cat'
  (several keys concatenated on axis 0, e.g. q/k/v -> qkv) or 'T' (one key, transposed). The check runs on the source
  names; shapes of the sources follow from the canonical ones."""
  expected = {}
  for key, sources, how in rows:
    shape = canonical_shapes[key]
    for s in sources:
      if how == 'cat':
        expected[s] = (None if shape[0] is None else shape[0] // len(sources), *shape[1:])
      elif how == 'T':
        expected[s] = tuple(reversed(shape))
      else:
        expected[s] = shape
  check_keys(sd, expected, where, what, allow_extra=ignore)
  out = {}
  for key, sources, how in rows:
    if how == 'cat':
      out[key] = np.concatenate([np.asarray(sd[s], np.float32) for s in sources], axis=0)
    elif how == 'T':
      out[key] = np.asarray(sd[sources[0]], np.float32).T
    else:
      out[key] = np.asarray(sd[sources[0]], np.float32)
  return out


def need(sd: Mapping[str, np.ndarray], keys: Sequence[str], where: str, what: str) -> None:
  """The keys the size is read from must exist before anything else can be checked."""
  missing = [k for k in keys if k not in sd]
  if missing:
    raise ConversionError(f'{where} does not match {what}: missing key(s) {", ".join(missing)} '
                          f'(cannot read the model size); first keys present: {sorted(sd)[:8]}')


def sizes_of(sd: Mapping[str, np.ndarray], patch_key: str, pos_key: str, fc_key: str, depth_pattern: str,
             where: str, what: str):
  """(width, patch, grid, mlp, depth) of an image ViT, read off its state_dict: the patch projection
  [W, 3, P, P], the position table (1 + grid^2 rows), the first MLP layer (4 W when absent) and the blocks
  that `depth_pattern` counts."""
  need(sd, [pos_key, patch_key], where, what)
  w = sd[patch_key]
  if np.ndim(w) != 4 or w.shape[2] != w.shape[3]:
    raise ConversionError(f'{where}: patch projection has shape {list(np.shape(w))}, expected [W, 3, P, P]')
  width, patch = int(w.shape[0]), int(w.shape[2])
  grid = grid_of(int(np.shape(sd[pos_key])[-2]), where)
  mlp = int(np.shape(sd[fc_key])[0]) if fc_key in sd else 4 * width
  depth = depth_of(sd, depth_pattern)
  if depth == 0:
    raise ConversionError(f'{where} does not match {what}: no transformer blocks found')
  return width, patch, grid, mlp, depth


def grid_of(num_positions: int, where: str) -> int:
  """Side of the square patch grid stored in a position table of 1 + side^2 rows."""
  side = math.isqrt(max(num_positions - 1, 0))
  if side * side != num_positions - 1 or side == 0:
    raise ConversionError(f'{where}: position embeddings have {num_positions} rows, not 1 + a square number of patches')
  return side


def default_heads(width: int, num_heads: Optional[int]) -> int:
  """Head count (not stored in the weights): the override, else width / 64 (ViT-S/16: 6, ViT-L/14: 16); a width
  that is not a multiple of 64 needs the override (a guessed head count would give a silently different model)."""
  if num_heads is None and width % 64:
    raise ConversionError(f'width {width} is not a multiple of 64: give the head count (--num_heads)')
  heads = num_heads if num_heads is not None else width // 64
  if heads < 1 or width % heads:
    raise ConversionError(f'num_heads={heads} does not divide the width {width}')
  return heads


def tree_from(canonical: Mapping[str, np.ndarray], table: Sequence[tuple]) -> dict:
  """Nested Flax params from canonical arrays via TABLE rows (canonical key, Flax path, transform)."""
  from common_jax.convert_util import layout, put
  params: dict = {}
  for key, path, transform in table:
    put(params, path, layout(canonical[key], transform))
  return params


# Conversion-table rows shared by the ViT converters: (torch leaf, Flax leaf, transform).
LN_ROWS = (('weight', 'scale', None), ('bias', 'bias', None))
LINEAR_ROWS = (('weight', 'kernel', 'T'), ('bias', 'bias', None))


def fill_table(rows, depth: int):
  """A TABLE of (key, Flax path, transform) with '{n}' rows repeated for blocks 0..depth-1."""
  return [(k.format(n=n), tuple(p.format(n=n) for p in path), t)
          for k, path, t in rows for n in (range(depth) if '{n}' in k else (None,))]


def init_image_params(model: nn.Module, image_size: int, seed: int = 0):
  """Random parameters of an image model (one zero frame of image_size x image_size traces the shapes)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(model.init)(jax.random.PRNGKey(seed), x)['params']
