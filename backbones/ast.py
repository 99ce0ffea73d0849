"""AST, the Audio Spectrogram Transformer (Gong et al.; AudioSet checkpoint), in Flax Linen.

Input: the normalised log-mel fbank of `backbones.fbank.ast_input`, [B, max_length (time), num_mel_bins].
Like transformers' ASTModel it is transposed to (mel, time) and cut into 16x16 patches by a conv with
frequency/time strides 10: at full size 12 x 101 = 1212 patches, ordered frequency-major (index f * 101 + t),
after [CLS, distillation] -> 1214 tokens, plus learned position embeddings. Then pre-LN ViT blocks (eps 1e-12,
exact GELU), a final LayerNorm, and the output (the model's own pooled vector: AVHash does not say which AST
output it stored) is transformers' `pooler_output`
(h[:, 0] + h[:, 1]) / 2: [B, hidden] (768).

Parameter tree (mirrors the hub / transformers-4 names; TABLE below is the key-by-key mapping):

  embeddings/{cls_token [1,1,H], distillation_token [1,1,H], position_embeddings [1,P,H]}
  embeddings/patch_embeddings/projection/{kernel [p,p,1,H], bias}
  encoder/layer_N/attention/attention/{query,key,value}/{kernel,bias}, encoder/layer_N/attention/output/dense
  encoder/layer_N/{intermediate/dense, output/dense, layernorm_before, layernorm_after};  layernorm/{scale,bias}

`convert` accepts (recognised from the key names; prefix `audio_spectrogram_transformer.` optional, the
`classifier.*` head of ASTForAudioClassification dropped):
  hub (transformers 4, MIT/ast-finetuned-audioset-10-10-0.4593): encoder.layer.N.attention.attention.query,
      ...attention.output.dense, intermediate.dense, output.dense, layernorm_before/after
  transformers 5 (ASTModel().state_dict() in 5.x): layers.N.attention.{q,k,v,o}_proj, layers.N.mlp.{fc1,fc2},
      layers.N.layernorm_before/after
Sizes come from the shapes: hidden (cls_token), layers, MLP width, patch size (the conv kernel), and the
position count, which must equal 2 + F * T with F = (num_mel_bins - p) // frequency_stride + 1 and
T = (max_length - p) // time_stride + 1. num_mel_bins (128) and the strides (10) are not in the weights
(keyword overrides); max_length is the 1024 of the checkpoint when consistent, else given, else the smallest
length giving T time patches. Heads default to hidden / 64 (`num_heads` overrides).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from common_jax import config_util
from common_jax.convert_util import ConversionError, check_keys, layout, put, to_numpy


@dataclasses.dataclass(frozen=True)
class Config(config_util.JsonConfig):
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  layer_norm_eps: float = 1e-12
  patch_size: int = 16
  frequency_stride: int = 10
  time_stride: int = 10
  num_mel_bins: int = 128
  max_length: int = 1024
  qkv_bias: bool = True

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not a multiple of '
                       f'num_attention_heads={self.num_attention_heads}')
    if min(self.num_mel_bins, self.max_length) < self.patch_size:
      raise ValueError(f'num_mel_bins={self.num_mel_bins} and max_length={self.max_length} must be >= '
                       f'patch_size={self.patch_size}')

  @classmethod
  def full(cls) -> 'Config':
    return cls()

  @classmethod
  def tiny(cls) -> 'Config':
    """hidden 32, 2 layers, 2 heads, 66 frames x 128 mels -> 12 x 6 patches (74 positions)."""
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_length=66)

  @property
  def patch_grid(self) -> tuple[int, int]:
    """(frequency, time) patch counts."""
    return ((self.num_mel_bins - self.patch_size) // self.frequency_stride + 1,
            (self.max_length - self.patch_size) // self.time_stride + 1)

  @property
  def num_positions(self) -> int:
    f, t = self.patch_grid
    return f * t + 2


class _Ctx(nn.Module):
  """Shared fields and factories (init as transformers: normal 0.02 weights, zero biases, LayerNorm 1/0)."""
  config: Config
  dtype: Any = jnp.float32
  precision: Any = None

  def dense(self, n, name, bias=True):
    return nn.Dense(n, use_bias=bias, dtype=self.dtype, precision=self.precision, name=name,
                    kernel_init=nn.initializers.normal(0.02))

  def norm(self, name):
    return nn.LayerNorm(self.config.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name=name)

  def sub(self, cls, name, **kw):
    return cls(self.config, self.dtype, self.precision, name=name, **kw)


class Dense(_Ctx):
  """A block holding one Linear called `dense` (the hub's `attention.output`, `intermediate`, `output`)."""
  features: int = 0

  @nn.compact
  def __call__(self, x):
    return self.dense(self.features, 'dense')(x)


class SelfAttention(_Ctx):
  """`attention.attention`: q/k/v projections and softmax(q k^T / sqrt(d)) v over all tokens (no mask)."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    heads = c.num_attention_heads
    d = c.hidden_size // heads
    q, k, v = (self.dense(c.hidden_size, n, c.qkv_bias)(x).reshape(*x.shape[:-1], heads, d)
               for n in ('query', 'key', 'value'))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=self.precision) / math.sqrt(d)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v, precision=self.precision).reshape(*x.shape[:-1], -1)


class Attention(_Ctx):
  @nn.compact
  def __call__(self, x):
    ctx = self.sub(SelfAttention, 'attention')(x)
    return self.sub(Dense, 'output', features=self.config.hidden_size)(ctx)


class Layer(_Ctx):
  """One pre-LN ViT block: x + attention(LN(x)); x + MLP(LN(x)) with exact GELU."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = x + self.sub(Attention, 'attention')(self.norm('layernorm_before')(x))
    h = self.sub(Dense, 'intermediate', features=c.intermediate_size)(self.norm('layernorm_after')(x))
    return x + self.sub(Dense, 'output', features=c.hidden_size)(nn.gelu(h, approximate=False))


class PatchEmbeddings(_Ctx):
  """[B, time, mel] -> [B, F*T, H]: transposed to (mel, time), 16x16 conv with strides (10, 10), patches in
  row-major (frequency, time) order as transformers' `projection(...).flatten(2)`."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    spec = jnp.swapaxes(x, -1, -2)[..., None]                                   # [B, mel, time, 1]
    y = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.frequency_stride, c.time_stride),
                padding='VALID', dtype=self.dtype, precision=self.precision,
                kernel_init=nn.initializers.normal(0.02), name='projection')(spec)
    return y.reshape(x.shape[0], -1, c.hidden_size)


class Embeddings(_Ctx):
  """[CLS, distillation, patches] + position embeddings."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    init = nn.initializers.normal(0.02)
    b, h = x.shape[0], c.hidden_size
    tokens = [jnp.broadcast_to(self.param(n, init, (1, 1, h)).astype(self.dtype), (b, 1, h))
              for n in ('cls_token', 'distillation_token')]
    pos = self.param('position_embeddings', init, (1, c.num_positions, h))
    patches = self.sub(PatchEmbeddings, 'patch_embeddings')(x)
    return jnp.concatenate([*tokens, patches], axis=1) + pos.astype(self.dtype)


class Encoder(_Ctx):
  @nn.compact
  def __call__(self, h):
    for i in range(self.config.num_hidden_layers):
      h = self.sub(Layer, f'layer_{i}')(h)
    return h


class Model(_Ctx):
  """[B, max_length, num_mel_bins] normalised fbank -> [B, hidden] float32 pooled (mean of CLS and distillation
  tokens after the final LayerNorm). dtype: compute dtype (parameters stay float32); precision None lets
  jax.default_matmul_precision decide (the parity tests use 'highest')."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    if x.shape[-2:] != (c.max_length, c.num_mel_bins):
      raise ValueError(f'AST input must be [batch, {c.max_length}, {c.num_mel_bins}], got {x.shape}')
    h = self.sub(Embeddings, 'embeddings')(x.astype(self.dtype))
    h = self.norm('layernorm')(self.sub(Encoder, 'encoder')(h))
    return ((h[:, 0] + h[:, 1]) / 2).astype(jnp.float32)


def preprocess(x, config: Config) -> jnp.ndarray:
  """Identity + float32 cast: the fbank and its normalisation are `backbones.fbank.ast_input`."""
  return jnp.asarray(x, jnp.float32)


def init_params(config: Config, seed: int = 0):
  x = jnp.zeros((1, config.max_length, config.num_mel_bins), jnp.float32)
  return jax.jit(Model(config).init)(jax.random.PRNGKey(seed), x)['params']


def flops_per_segment(config: Config) -> int:
  """Multiply-add FLOPs (x2) of one forward pass on one segment: patch conv + per layer q/k/v/o, scores,
  attention-weighted sum and the MLP (LayerNorm, softmax and GELU not counted)."""
  c = config
  n, h, p = c.num_positions, c.hidden_size, c.patch_size
  per_layer = 4 * n * h * h + 2 * n * n * h + 2 * n * h * c.intermediate_size
  return 2 * ((n - 2) * h * p * p + c.num_hidden_layers * per_layer)


# ---------------------------------------------------------------------------------------------- conversion
# hub key (without prefix) -> (Flax path, transform); '{n}' = layer index. 'T': Linear [out,in] -> kernel.
_LINEAR = (('weight', 'kernel', 'T'), ('bias', 'bias', None))
_NORM = (('weight', 'scale', None), ('bias', 'bias', None))
TABLE = (
    *((f'embeddings.{n}', ('embeddings', n), None) for n in ('cls_token', 'distillation_token', 'position_embeddings')),
    *((f'embeddings.patch_embeddings.projection.{w}', ('embeddings', 'patch_embeddings', 'projection', f), t)
      for w, f, t in (('weight', 'kernel', 'conv'), ('bias', 'bias', None))),
    *((f'encoder.layer.{{n}}.{m}.{w}', ('encoder', 'layer_{n}', *m.split('.'), f), t)
      for m in ('attention.attention.query', 'attention.attention.key', 'attention.attention.value',
                'attention.output.dense', 'intermediate.dense', 'output.dense') for w, f, t in _LINEAR),
    *((f'encoder.layer.{{n}}.{m}.{w}', ('encoder', 'layer_{n}', m, f), t)
      for m in ('layernorm_before', 'layernorm_after') for w, f, t in _NORM),
    *((f'layernorm.{w}', ('layernorm', f), t) for w, f, t in _NORM),
)
# transformers-5 names -> hub names (the inverse of transformers' ViTModel weight renaming).
V5_TO_HUB = (
    (r'^layers\.(\d+)\.attention\.q_proj\.', r'encoder.layer.\1.attention.attention.query.'),
    (r'^layers\.(\d+)\.attention\.k_proj\.', r'encoder.layer.\1.attention.attention.key.'),
    (r'^layers\.(\d+)\.attention\.v_proj\.', r'encoder.layer.\1.attention.attention.value.'),
    (r'^layers\.(\d+)\.attention\.o_proj\.', r'encoder.layer.\1.attention.output.dense.'),
    (r'^layers\.(\d+)\.mlp\.fc1\.', r'encoder.layer.\1.intermediate.dense.'),
    (r'^layers\.(\d+)\.mlp\.fc2\.', r'encoder.layer.\1.output.dense.'),
    (r'^layers\.(\d+)\.(layernorm_before|layernorm_after)\.', r'encoder.layer.\1.\2.'),
)
PREFIX = 'audio_spectrogram_transformer.'


def table(config: Config):
  """(hub key, Flax path tuple, transform) rows with the layer index filled in."""
  rows = []
  for key, path, t in TABLE:
    for n in (range(config.num_hidden_layers) if '{n}' in key else (None,)):
      rows.append((key.format(n=n), tuple(q.format(n=n) for q in path), t))
  return rows


def expected_shapes(config: Config) -> dict:
  c = config
  h, i, p = c.hidden_size, c.intermediate_size, c.patch_size
  shapes = {'embeddings.cls_token': (1, 1, h), 'embeddings.distillation_token': (1, 1, h),
            'embeddings.position_embeddings': (1, c.num_positions, h),
            'embeddings.patch_embeddings.projection.weight': (h, 1, p, p),
            'embeddings.patch_embeddings.projection.bias': (h,), 'layernorm.weight': (h,), 'layernorm.bias': (h,)}
  for n in range(c.num_hidden_layers):
    pre = f'encoder.layer.{n}.'
    for m in ('query', 'key', 'value'):
      shapes[f'{pre}attention.attention.{m}.weight'] = (h, h)
      if c.qkv_bias:
        shapes[f'{pre}attention.attention.{m}.bias'] = (h,)
    shapes.update({f'{pre}attention.output.dense.weight': (h, h), f'{pre}attention.output.dense.bias': (h,),
                   f'{pre}intermediate.dense.weight': (i, h), f'{pre}intermediate.dense.bias': (i,),
                   f'{pre}output.dense.weight': (h, i), f'{pre}output.dense.bias': (h,)})
    for m in ('layernorm_before', 'layernorm_after'):
      shapes.update({f'{pre}{m}.weight': (h,), f'{pre}{m}.bias': (h,)})
  return shapes


def to_hub_keys(state_dict: Mapping[str, Any], where: str) -> dict:
  """Prefix stripped, classifier dropped, transformers-5 names renamed to the hub's."""
  out = {}
  for key, value in to_numpy(state_dict).items():
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if key.startswith('classifier.'):
      continue
    for pattern, repl in V5_TO_HUB:
      key = re.sub(pattern, repl, key)
    if key in out:
      raise ConversionError(f'{where}: {key} appears twice (the checkpoint mixes hub and transformers-5 names, '
                            'or prefixed and unprefixed keys)')
    out[key] = value
  return out


def infer_config(sd: Mapping[str, np.ndarray], where: str = 'checkpoint', num_heads: Optional[int] = None,
                 num_mel_bins: int = 128, max_length: Optional[int] = None, frequency_stride: int = 10,
                 time_stride: int = 10) -> Config:
  """The architecture read off the (hub-named) shapes; defaults where keys are absent (check_keys reports them)."""
  d = Config()
  get = lambda k, axis, default: int(np.shape(sd[k])[axis]) if k in sd and np.ndim(sd[k]) > axis else default
  hidden = get('embeddings.cls_token', 2, d.hidden_size)
  layers = {int(m.group(1)) for k in sd for m in [re.match(r'encoder\.layer\.(\d+)\.', k)] if m}
  patch = get('embeddings.patch_embeddings.projection.weight', 3, d.patch_size)
  if not num_heads and hidden % 64:
    raise ConversionError(f'{where}: hidden size {hidden} is not a multiple of 64; give num_heads')
  fixed = dict(hidden_size=hidden, num_hidden_layers=max(layers) + 1 if layers else 1,
               num_attention_heads=num_heads or hidden // 64, patch_size=patch,
               intermediate_size=get('encoder.layer.0.intermediate.dense.weight', 0, d.intermediate_size),
               frequency_stride=frequency_stride, time_stride=time_stride, num_mel_bins=num_mel_bins,
               qkv_bias='encoder.layer.0.attention.attention.query.bias' in sd or not layers)
  try:
    freq = (num_mel_bins - patch) // frequency_stride + 1
    positions = get('embeddings.position_embeddings', 1, None)
    if max_length is None and positions is not None:
      time, rest = divmod(positions - 2, freq)
      if rest or time < 1:
        raise ConversionError(f'{where}: {positions} position embeddings is not 2 + {freq} frequency patches x '
                              f'T time patches (num_mel_bins={num_mel_bins}, patch {patch}, frequency_stride='
                              f'{frequency_stride}); pass num_mel_bins / frequency_stride')
      max_length = (d.max_length if (d.max_length - patch) // time_stride + 1 == time
                    else (time - 1) * time_stride + patch)
    return Config(max_length=max_length or d.max_length, **fixed)
  except ValueError as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f'{where}: unsupported architecture: {e}') from e


def convert(state_dict: Mapping[str, Any], where: str = 'checkpoint', **extra):
  """(Flax params of float32 NumPy arrays, Config) from an AST state_dict; extra: num_heads, num_mel_bins,
  max_length, frequency_stride, time_stride (see the module docstring)."""
  sd = to_hub_keys(state_dict, where)
  config = infer_config(sd, where, **extra)
  f, t = config.patch_grid
  check_keys(sd, expected_shapes(config), where,
             f'AST (hidden={config.hidden_size}, layers={config.num_hidden_layers}, mlp={config.intermediate_size}, '
             f'{f}x{t} patches of {config.patch_size} for {config.max_length} frames x {config.num_mel_bins} mels)')
  params = {}
  for key, path, transform in table(config):
    if key in sd:                     # q/k/v biases are absent when qkv_bias is False
      put(params, path, layout(sd[key], transform))
  return params, config
