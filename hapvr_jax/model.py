"""The HAP-VR / S2VS / ViSiL similarity network in Flax Linen.

Parameter tree (mirrors the original state_dict, see `hapvr_jax.convert`):

  attention/transform/{kernel [D, D], bias [D]}       <- attention.transform.{weight.T, bias}
  attention/context_vector/kernel [D, 1]              <- attention.context_vector.weight.T
  binarization/W [D, bits]                            <- binarization.W   (only with binarization=True)
  comparator_module/conv{1,2,3}/{kernel HWIO, bias}   <- comparator_module.conv{1,2,3}.{weight OIHW, bias}
  comparator_module/fconv/{kernel [1,1,128,1], bias}  <- comparator_module.fconv.{weight, bias}

Every stage is separately callable through `model.apply(params, ..., method=...)`: `index_video` (once per
video, so a database can be indexed once), `frame_to_frame`, `compare` (the CNN) and `video_to_video`;
`calculate_video_similarity` chains them for evaluation and `__call__` is the training forward.
Validity is given as prefix lengths (`q_len`, `t_len`); padded inputs give exactly the unpadded result.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import flax.linen as nn

from common_jax import config_util
from hapvr_jax import similarity as sim_lib


@dataclasses.dataclass(frozen=True)
class ModelConfig(config_util.JsonConfig):
  """Architecture of the similarity network; the fields of the original's argparse namespace."""
  dims: int = 512
  attention: bool = True
  binarization: bool = False
  binary_bits: int = 512
  f2f_sim_module: str = 'TopKChamfer'
  v2v_sim_module: str = 'TopKChamfer'
  f_topk_rate: float = 0.1
  v_topk_rate: float = 0.03
  symmetric: bool = False
  min_len: int = 8            # evaluation: shorter videos are tiled by self-concatenation (S2VS used 4)
  source: str = 'hapvr'       # which code base the weights came from ('hapvr', 's2vs' or 'jax')

  def __post_init__(self):
    sim_lib.check_kind(self.f2f_sim_module)
    sim_lib.check_kind(self.v2v_sim_module)
    if self.attention and self.binarization:
      raise ValueError('attention=True and binarization=True cannot be combined (as in the original)')


def _valid_mask(n_rows, n_cols, row_len, col_len):
  """[P, n_rows, n_cols, 1] validity of a prefix-padded map."""
  rows = jnp.arange(n_rows) < row_len[:, None]
  cols = jnp.arange(n_cols) < col_len[:, None]
  return (rows[:, :, None] & cols[:, None, :])[..., None]


def max_pool_2x2(x):
  """2x2/2 VALID max pooling of x [P, H, W, C] as a reshape + max: the same values as nn.max_pool, with a
  gradient that is a cheap mask instead of XLA's select-and-scatter (several times slower on CPU, where it
  would be the largest part of the comparator's backward pass). Ties split the gradient, but after a ReLU the
  only common ties are zeros, whose gradient is zero either way."""
  p, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  return x[:, :2 * h2, :2 * w2].reshape(p, h2, 2, w2, 2, c).max(axis=(2, 4))


class VideoComparator(nn.Module):
  """The small CNN over a frame-to-frame similarity map, with masks carried through pooling."""
  dtype: Any = jnp.float32
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, sim, row_len, col_len):
    """sim [P, H, W]; row_len/col_len [P] valid sizes. Returns (C [P, H//4, W//4], row_len', col_len')."""
    conv = lambda name, features, k: nn.Conv(
        features, (k, k), padding=1 if k == 3 else 0, dtype=self.dtype, precision=self.precision,
        kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros, name=name)
    x = sim[..., None].astype(self.dtype)
    mask = _valid_mask(x.shape[1], x.shape[2], row_len, col_len)
    x = jnp.where(mask, x, 0)
    # Exactness with padding needs zeros wherever a *valid* output reads outside the valid area: a pooled
    # cell < floor(valid/2) reads only valid cells, so masking after each pool (and at the end) suffices; no
    # mask is needed on the full-resolution conv outputs (which would cost several extra memory passes).
    for name, features, pool in (('conv1', 32, True), ('conv2', 64, True), ('conv3', 128, False)):
      x = nn.relu(conv(name, features, 3)(x))
      if pool:
        x = max_pool_2x2(x)
        row_len, col_len = row_len // 2, col_len // 2   # pooled validity: index < floor(valid / 2)
        mask = _valid_mask(x.shape[1], x.shape[2], row_len, col_len)
        x = x * mask.astype(x.dtype)
    x = conv('fconv', 1, 1)(x)   # 1x1: invalid conv3 outputs only reach invalid cells, masked here
    x = jnp.where(mask, x, 0)
    return x[..., 0].astype(jnp.float32), row_len, col_len


class Attention(nn.Module):
  """Region attention: a = sigmoid(tanh(x W + b) w); x' = a * x (no renormalisation)."""
  dims: int
  dtype: Any = jnp.float32
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    dense = lambda name, n, bias: nn.Dense(
        n, use_bias=bias, dtype=self.dtype, precision=self.precision, name=name,
        kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros)
    h = jnp.tanh(dense('transform', self.dims, True)(x))
    weights = nn.sigmoid(dense('context_vector', 1, False)(h))
    return (x * weights).astype(x.dtype), weights


class Binarization(nn.Module):
  """ITQ binarisation: sign(normalise(x) W) at evaluation, erf(./sqrt(2 sigma)) in training."""
  dims: int
  bits: int
  sigma: float = 1e-6

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = self.param('W', nn.initializers.normal(1.0), (self.dims, self.bits))
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    x = jnp.matmul(x, w, precision=lax.Precision.HIGHEST)
    return jax.scipy.special.erf(x / jnp.sqrt(2 * self.sigma)) if train else jnp.sign(x)


class SimilarityNetwork(nn.Module):
  config: ModelConfig
  dtype: Any = jnp.float32
  precision: Any = lax.Precision.HIGHEST

  def setup(self):
    c = self.config
    if c.attention:
      self.attention = Attention(c.dims, dtype=self.dtype, precision=self.precision)
    if c.binarization:
      self.binarization = Binarization(c.dims, c.binary_bits)
    self.comparator_module = VideoComparator(dtype=self.dtype, precision=self.precision)

  def index_video(self, x, length=None, train: bool = False):
    """x [..., T, R, D] -> indexed features; frames at index >= length are zeroed."""
    if self.config.attention:
      x, _ = self.attention(x)
    if self.config.binarization:
      x = self.binarization(x, train=train)
    if length is not None:
      valid = jnp.arange(x.shape[-3]) < jnp.asarray(length)[..., None]
      x = jnp.where(valid[..., None, None], x, 0)
    return x

  def frame_to_frame(self, q, t, q_len=None, t_len=None):
    """q [A, Tq, R, D], t [B, Tt, R, D] (indexed) -> f2f [A, B, Tq, Tt], zero outside the valid area."""
    c = self.config
    f2f = sim_lib.frame_to_frame(q, t, c.f2f_sim_module, c.f_topk_rate, c.symmetric, self.precision)
    if q_len is not None or t_len is not None:
      a, b, tq, tt = f2f.shape
      q_ok = jnp.arange(tq) < jnp.broadcast_to(jnp.asarray(tq if q_len is None else q_len), (a,))[:, None]
      t_ok = jnp.arange(tt) < jnp.broadcast_to(jnp.asarray(tt if t_len is None else t_len), (b,))[:, None]
      f2f = jnp.where(q_ok[:, None, :, None] & t_ok[None, :, None, :], f2f, 0.)
    return f2f

  def comparator_input(self, f2f):
    """With binarization the original divides the map the CNN sees by the number of bits (not the
    frame_level_sim it returns for the inner-AP loss)."""
    return f2f / self.config.binary_bits if self.config.binarization else f2f

  def compare(self, f2f, q_len=None, t_len=None):
    """f2f [A, B, Tq, Tt] -> raw comparator output C [A, B, Tq//4, Tt//4] and the pooled valid lengths."""
    a, b, tq, tt = f2f.shape
    q_len = jnp.broadcast_to(jnp.asarray(tq if q_len is None else q_len, jnp.int32), (a,))
    t_len = jnp.broadcast_to(jnp.asarray(tt if t_len is None else t_len, jnp.int32), (b,))
    rows = jnp.repeat(q_len, b)
    cols = jnp.tile(t_len, a)
    out, rows, cols = self.comparator_module(f2f.reshape(a * b, tq, tt), rows, cols)
    return out.reshape(a, b, *out.shape[1:]), rows.reshape(a, b), cols.reshape(a, b)

  def video_to_video(self, s, q_len=None, t_len=None):
    """s [A, B, I, J] (after the activation) -> [A, B] with the configured temporal reduction."""
    c = self.config
    return sim_lib.reduce_rows(s, q_len, t_len, c.v2v_sim_module, c.v_topk_rate, c.symmetric)

  def calculate_video_similarity(self, q, t, q_len=None, t_len=None, apply_visil: bool = True):
    """Evaluation similarity of indexed videos q [A, Tq, R, D] and t [B, Tt, R, D]: [A, B] in [-1, 1]."""
    f2f = self.comparator_input(self.frame_to_frame(q, t, q_len, t_len))
    if not apply_visil:   # the original's `features_only` mode: v2v directly on the f2f map
      return self.video_to_video(f2f, None if q_len is None else jnp.asarray(q_len)[:, None],
                                 None if t_len is None else jnp.asarray(t_len)[None, :])
    out, rows, cols = self.compare(f2f, q_len, t_len)
    return self.video_to_video(sim_lib.hardtanh(out), rows, cols)

  def __call__(self, x, train: bool = True):
    """Training forward over all ordered pairs of a clip batch x [N, T, R, D] (no padding).

    Returns (frame_level_sim [N, N, T, T], S [N, N] in [0, 1], reg_loss): the similarity regularisation is
    the sum over every comparator output of relu(-1 - C) + relu(C - 1), which pulls the outputs into [-1, 1].
    """
    x = self.index_video(x, train=train)
    f2f = self.frame_to_frame(x, x)
    out, rows, cols = self.compare(self.comparator_input(f2f))
    reg_loss = jnp.sum(nn.relu(-1. - out) + nn.relu(out - 1.))
    s = sim_lib.hardtanh(out) / 2. + 0.5
    return f2f, self.video_to_video(s, rows, cols), reg_loss


def init_params(config: ModelConfig, seed: int = 0, frames: int = 8):
  """Fresh parameters (xavier-uniform weights, zero biases, as the original)."""
  def touch_all(module, x):
    q = module.index_video(x)
    return module.calculate_video_similarity(q, q)
  x = jnp.zeros((1, frames, 9, config.dims), jnp.float32)
  return SimilarityNetwork(config).init(jax.random.PRNGKey(seed), x, method=touch_all)['params']
