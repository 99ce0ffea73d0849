"""The AVHash audio-visual hashing network (class `MMVH` of iFamilyi/AVHash) in Flax Linen.

Forward (the argument order is the original's, *image first*):

  p_A, H_A = AE(X_A);  p_I, H_I = IE(X_I)           three 1-layer BERT encoders over [cls ; tokens]
  Â = H_A[:, 1:] + X_A;  Î = H_I[:, 1:] + X_I        residual with the raw input features
  C_A = AqI(Â, Î);  C_I = IqA(Î, Â)                   cross-attention, no bias on q/k/v, no residual/LN
  F_A, F_I = gated mixes of (Â, C_A), (Î, C_I)        gates: softmax(tanh(W [x ; y] + b)), 2-way per token
  F = gated mix of (F_I, F_A);  p_V = VE(F)
  h = tanh(hash(p_V))                                 continuous code in (-1, 1)^bits; codes = sign(h)

`__call__(image, audio)` returns (p_A, p_I, h): the two pooled encoder outputs and the hash output, which
is everything the contrastive loss uses.

The CLS vector (`cls.pt`: bert-base-uncased's [CLS] word embedding) is a *frozen* constant in the original,
outside the state_dict. Here it is the parameter `cls_token [hidden]` so that a converted checkpoint is
self-contained, and the model reads it through `stop_gradient`: its gradient is exactly zero, so Adam
(weight decay 0) never moves it.

Parameter tree (mirrors the original state_dict; `avhash_jax.convert.TABLE` is the key-by-key mapping):

  cls_token [H]                                                   <- cls.pt (not in the state_dict)
  {AE,IE,VE}/encoder/embeddings/{position_embeddings [P, H], token_type_embeddings [2, H], LayerNorm/{scale,bias}}
  {AE,IE,VE}/encoder/encoder/layer_0/attention/self/{query,key,value}/{kernel,bias}
  {AE,IE,VE}/encoder/encoder/layer_0/attention/output/{dense,LayerNorm}
  {AE,IE,VE}/encoder/encoder/layer_0/{intermediate/dense, output/dense, output/LayerNorm}
  {AE,IE,VE}/encoder/pooler/dense
  {AqI,IqA}/{linear_q,linear_k,linear_v}/kernel, {AqI,IqA}/linear_output/{kernel,bias}
  {A_W,I_W,AI_W}/{kernel [2H, 2], bias [2]};  hash/linear1/{kernel [H, bits], bias [bits]}

The unused word-embedding tables and `Audio_project` of the original are not part of this model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import flax.linen as nn

from common_jax import config_util

BITS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class ModelConfig(config_util.JsonConfig):
  """Architecture; the encoder fields are those of the original's BertConfig/config.json."""
  hidden_size: int = 768
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  num_hidden_layers: int = 1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  bits: int = 64                 # hash code length L
  tokens: int = 25               # frames / audio segments per video (the CLS token comes on top)

  def __post_init__(self):
    if self.bits not in BITS:
      raise ValueError(f'bits={self.bits} is not one of {BITS}')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not a multiple of '
                       f'num_attention_heads={self.num_attention_heads}')
    if self.tokens + 1 > self.max_position_embeddings:
      raise ValueError(f'tokens={self.tokens} + CLS exceed max_position_embeddings={self.max_position_embeddings}')
    if self.num_hidden_layers < 1:
      raise ValueError(f'num_hidden_layers={self.num_hidden_layers} must be >= 1')


def torch_linear_init(fan_in: int):
  """PyTorch's default nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases alike."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class _Ctx(nn.Module):
  """Base with the shared dense/LayerNorm factories (BERT init: normal 0.02, zero bias)."""
  config: ModelConfig
  precision: Any = lax.Precision.HIGHEST

  def dense(self, n, name, bias=True):
    return nn.Dense(n, use_bias=bias, precision=self.precision, name=name,
                    kernel_init=nn.initializers.normal(0.02), bias_init=nn.initializers.zeros)

  def layer_norm(self, name):
    return nn.LayerNorm(epsilon=self.config.layer_norm_eps, use_fast_variance=False, name=name)


class BertSelfAttention(_Ctx):
  """Multi-head self-attention of one BERT layer, no mask: the `attention.self` part (q, k, v)."""

  @nn.compact
  def __call__(self, x, deterministic: bool):
    c = self.config
    heads, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    split = lambda t: t.reshape(*t.shape[:-1], heads, d)
    q, k, v = (split(self.dense(c.hidden_size, n)(x)) for n in ('query', 'key', 'value'))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=self.precision) / math.sqrt(d)
    probs = nn.Dropout(c.attention_probs_dropout_prob)(jax.nn.softmax(scores, axis=-1), deterministic)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v, precision=self.precision)
    return out.reshape(*x.shape[:-1], c.hidden_size)


class BertAddNorm(_Ctx):
  """`LN(residual + Dropout(dense(x)))`: BERT's `attention.output` and `output` blocks."""
  features: int = 0

  @nn.compact
  def __call__(self, x, residual, deterministic: bool):
    y = nn.Dropout(self.config.hidden_dropout_prob)(self.dense(self.features, 'dense')(x), deterministic)
    return self.layer_norm('LayerNorm')(residual + y)


class Attention(_Ctx):
  """BERT's `attention`: `self` (multi-head attention) + `output` (dense, dropout, residual, LayerNorm)."""

  @nn.compact
  def __call__(self, x, deterministic: bool):
    c = self.config
    ctx = BertSelfAttention(c, self.precision, name='self')(x, deterministic)
    return BertAddNorm(c, self.precision, features=c.hidden_size, name='output')(ctx, x, deterministic)


class Intermediate(_Ctx):
  """BERT's `intermediate`: dense to intermediate_size, exact (erf) GELU."""

  @nn.compact
  def __call__(self, x):
    return nn.gelu(self.dense(self.config.intermediate_size, 'dense')(x), approximate=False)


class BertLayer(_Ctx):
  """One post-LN Transformer layer: self-attention block, then the feed-forward block."""

  @nn.compact
  def __call__(self, x, deterministic: bool):
    c = self.config
    h1 = Attention(c, self.precision, name='attention')(x, deterministic)
    inter = Intermediate(c, self.precision, name='intermediate')(h1)
    return BertAddNorm(c, self.precision, features=c.hidden_size, name='output')(inter, h1, deterministic)


class Embeddings(_Ctx):
  """`embeddings`: LN(inputs_embeds + position[0:T] + token_type[0]), then dropout."""

  @nn.compact
  def __call__(self, z, deterministic: bool):
    c = self.config
    init = nn.initializers.normal(0.02)
    pos = self.param('position_embeddings', init, (c.max_position_embeddings, c.hidden_size))
    typ = self.param('token_type_embeddings', init, (c.type_vocab_size, c.hidden_size))
    x = z + pos[:z.shape[-2]] + typ[0]
    return nn.Dropout(c.hidden_dropout_prob)(self.layer_norm('LayerNorm')(x), deterministic)


class LayerStack(_Ctx):
  """BERT's `encoder`: num_hidden_layers post-LN layers, named layer_0, layer_1, ..."""

  @nn.compact
  def __call__(self, x, deterministic: bool):
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.precision, name=f'layer_{i}')(x, deterministic)
    return x


class Pooler(_Ctx):
  """BERT's `pooler`: tanh(dense(h[:, 0]))."""

  @nn.compact
  def __call__(self, h):
    return jnp.tanh(self.dense(self.config.hidden_size, 'dense')(h[..., 0, :]))


class BertModel(_Ctx):
  """A BertModel fed with `inputs_embeds` (no word embeddings, no mask, token type 0 everywhere).

  Returns (last_hidden_state [B, T, H], pooler output [B, H])."""

  @nn.compact
  def __call__(self, z, deterministic: bool):
    c = self.config
    x = Embeddings(c, self.precision, name='embeddings')(z, deterministic)
    x = LayerStack(c, self.precision, name='encoder')(x, deterministic)
    return x, Pooler(c, self.precision, name='pooler')(x)


class EncoderModel(_Ctx):
  """`AE`/`IE`/`VE`: prepends the fixed CLS vector to the tokens [B, T, H] and runs the BERT encoder."""

  @nn.compact
  def __call__(self, x, cls_token, deterministic: bool):
    cls = jnp.broadcast_to(cls_token.astype(x.dtype), (*x.shape[:-2], 1, x.shape[-1]))
    return BertModel(self.config, self.precision, name='encoder')(
        jnp.concatenate([cls, x], axis=-2), deterministic)


class CrossAttention(_Ctx):
  """`AqI`/`IqA`: queries from x, keys/values from y (no bias), softmax(q k^T / sqrt(d)), output dense
  with bias. No mask, dropout, residual or LayerNorm, as in the original."""

  @nn.compact
  def __call__(self, x, y):
    c = self.config
    heads, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    dense = lambda name, bias: nn.Dense(
        c.hidden_size, use_bias=bias, precision=self.precision, name=name,
        kernel_init=torch_linear_init(c.hidden_size), bias_init=torch_linear_init(c.hidden_size))
    split = lambda t: t.reshape(*t.shape[:-1], heads, d)
    q, k, v = split(dense('linear_q', False)(x)), split(dense('linear_k', False)(y)), split(dense('linear_v', False)(y))
    probs = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=self.precision) / math.sqrt(d), axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v, precision=self.precision)
    return dense('linear_output', True)(out.reshape(*x.shape[:-1], c.hidden_size))


class HashLayer(_Ctx):
  """`hash`: tanh(linear1(p)) in (-1, 1)^bits."""

  @nn.compact
  def __call__(self, p):
    c = self.config
    init = torch_linear_init(c.hidden_size)
    return jnp.tanh(nn.Dense(c.bits, precision=self.precision, kernel_init=init, bias_init=init,
                             name='linear1')(p))


class AVHash(_Ctx):
  """The full network (the original `MMVH`)."""

  def setup(self):
    c, prec = self.config, self.precision
    self.cls_token = self.param('cls_token', nn.initializers.normal(0.02), (c.hidden_size,))
    self.AE = EncoderModel(c, prec)
    self.IE = EncoderModel(c, prec)
    self.VE = EncoderModel(c, prec)
    self.AqI = CrossAttention(c, prec)
    self.IqA = CrossAttention(c, prec)
    gate = lambda: nn.Dense(2, precision=prec, kernel_init=torch_linear_init(2 * c.hidden_size),
                            bias_init=torch_linear_init(2 * c.hidden_size))
    self.A_W, self.I_W, self.AI_W = gate(), gate(), gate()
    self.hash = HashLayer(c, prec)

  @staticmethod
  def _gated(gate, x, y):
    """softmax(tanh(W [x ; y] + b)) per token -> g0 * x + g1 * y."""
    g = jax.nn.softmax(jnp.tanh(gate(jnp.concatenate([x, y], axis=-1))), axis=-1)
    return g[..., 0:1] * x + g[..., 1:2] * y

  def __call__(self, image, audio, deterministic: bool = True):
    """image, audio [B, T, H] (CLIP frames, AST segments) -> (p_A [B, H], p_I [B, H], h [B, bits])."""
    cls = lax.stop_gradient(self.cls_token)
    h_a, p_a = self.AE(audio, cls, deterministic)
    h_i, p_i = self.IE(image, cls, deterministic)
    a = h_a[..., 1:, :] + audio
    i = h_i[..., 1:, :] + image
    c_a = self.AqI(a, i)
    c_i = self.IqA(i, a)
    f_a = self._gated(self.A_W, a, c_a)
    f_i = self._gated(self.I_W, i, c_i)
    fused = self._gated(self.AI_W, f_i, f_a)     # image first, as the original
    _, p_v = self.VE(fused, cls, deterministic)
    return p_a, p_i, self.hash(p_v)


def init_params(config: ModelConfig, seed: int = 0):
  """Fresh parameters: BERT init (normal 0.02, zero biases, LN 1/0) in the encoders, PyTorch's default
  Linear init elsewhere, cls_token normal 0.02 (replace it by the real [CLS] vector before training)."""
  x = jnp.zeros((1, config.tokens, config.hidden_size), jnp.float32)
  return jax.jit(AVHash(config).init)(jax.random.PRNGKey(seed), x, x)['params']


def hash_codes(h):
  """Binary codes sign(h) as int8 in {-1, 0, +1} (0 only for an exactly zero output, as torch.sign)."""
  return jnp.sign(h).astype(jnp.int8)
