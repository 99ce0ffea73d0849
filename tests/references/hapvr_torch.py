"""Independent PyTorch reference for the ViSiL / S2VS /
HAP-VR similarity network.

It exists to check the Flax port (`hapvr_jax.model`) and the checkpoint converter (`hapvr_jax.convert`)
against a second, deliberately plain implementation. It is written from the method's description, not copied from
the original code, but its parameters carry exactly the original state_dict names and shapes, so a
`state_dict()` of this module is a valid input for the converter:

  attention.transform.{weight [D, D], bias [D]}, attention.context_vector.weight [1, D]   (attention=True)
  binarization.W [D, bits]                                                                 (binarization=True)
  comparator_module.conv{1,2,3}.{weight, bias}, comparator_module.fconv.{weight, bias}
  (S2VS names the comparator `visil_head`: pass `s2vs_naming=True`)

Scope and conventions:

* Evaluation methods take UNPADDED videos, a single one [T, R, D] or a batch [n, T, R, D] of equal length;
  like the original evaluation, nothing here uses masks.
* The module computes in whatever dtype it is cast to (`.double()` gives a float64 reference).
* `forward` is the training forward and returns (frame_level_sim [N, N, T, T], S [N, N], reg_loss) as the
  HAP-VR code does. With binarization the original divides only the comparator input by the number of bits,
  not the returned frame_level_sim (for N > 1 the division hits a reshaped copy); this reference does the same.
* Top-k sizes are k = max(round(n * rate), 1) with Python's round-half-to-even, where n is the size of the
  reduced axis. The original's symmetric TopK-Chamfer ignores the configured rate and uses
  0.3; by default this reference uses the configured rate (as the JAX port does), and
  `symmetric_top_rate=0.3` reproduces the original's behaviour.

Helpers for parity runs: `original_style_similarity` (the original evaluation loop's chunk-and-average over
2048-frame target chunks), `tile_min_len` (the original HDF5 loader's tiling of short videos),
`original_state_dict` / `original_args` (the model's tensors and training namespace as HAP-VR or S2VS would
hold them) and `make_original_checkpoint` (a torch.save file in the original training code's format).
"""
from __future__ import annotations

import argparse
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ('Chamfer', 'TopKChamfer', 'Max', 'Average')


def topk_count(n: int, rate: float) -> int:
  """Number of entries averaged by TopK-Chamfer over an axis of size n (Python round, half to even)."""
  return max(round(n * rate), 1)


def reduce_last_two(s: torch.Tensor, kind: str, rate: float, symmetric: bool = False,
                    symmetric_rate: Optional[float] = None) -> torch.Tensor:
  """Reduces s[..., I, J] to s[...]: the J axis (target) is reduced, the I axis (query) averaged.

  Chamfer: max over J, then mean over I. TopKChamfer: mean of the k largest over J, then mean over I.
  Max: maximum over both. Average: mean over both. `symmetric` averages the I->J and J->I directions for the
  two Chamfer kinds (the original ignores it for Max and Average); `symmetric_rate`, if given, replaces `rate`
  in both directions of a symmetric TopK-Chamfer (0.3 reproduces the original's hard-coded value).
  """
  if kind == 'Max':   # successive max-with-index, so a tie's gradient goes to one entry as in the original
    return s.max(dim=-1).values.max(dim=-1).values
  if kind == 'Average':
    return s.mean(dim=(-2, -1))
  if kind not in ('Chamfer', 'TopKChamfer'):
    raise ValueError(f'unknown similarity kind {kind!r}')

  def directed(x, r):
    if kind == 'Chamfer':
      best = x.max(dim=-1).values
    else:
      best = torch.topk(x, topk_count(x.shape[-1], r), dim=-1).values.mean(dim=-1)
    return best.mean(dim=-1)

  if not symmetric:
    return directed(s, rate)
  # The symmetric form averages both directions; `symmetric_rate` (if given) replaces the rate in both.
  r = rate if symmetric_rate is None else symmetric_rate
  return (directed(s, r) + directed(s.transpose(-1, -2), r)) / 2


class RegionAttention(nn.Module):
  """a = sigmoid(w . tanh(W x + b)) per region; the region vector is scaled by a."""

  def __init__(self, dims: int):
    super().__init__()
    self.transform = nn.Linear(dims, dims)
    self.context_vector = nn.Linear(dims, 1, bias=False)
    nn.init.xavier_uniform_(self.transform.weight)
    nn.init.zeros_(self.transform.bias)
    nn.init.xavier_uniform_(self.context_vector.weight)

  def forward(self, x):
    weights = torch.sigmoid(self.context_vector(torch.tanh(self.transform(x))))
    return x * weights


class ITQBinarization(nn.Module):
  """sign(normalise(x) W) in eval mode, erf(normalise(x) W / sqrt(2 sigma)) in train mode."""

  def __init__(self, dims: int, bits: int, sigma: float = 1e-6):
    super().__init__()
    self.sigma = sigma
    self.W = nn.Parameter(torch.randn(dims, bits))

  def forward(self, x):
    proj = F.normalize(x, p=2.0, dim=-1) @ self.W
    if self.training:
      return torch.erf(proj / math.sqrt(2.0 * self.sigma))
    return torch.sign(proj)


class Comparator(nn.Module):
  """The CNN over one [Ti, Tj] map: zero-pad 1 before each 3x3 conv, ReLU, 2x2/2 max-pool after
  the first two blocks, then a 1x1 conv to one channel. Output [P, 1, Ti//4, Tj//4], raw."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 32, 3)
    self.conv2 = nn.Conv2d(32, 64, 3)
    self.conv3 = nn.Conv2d(64, 128, 3)
    self.fconv = nn.Conv2d(128, 1, 1)
    for conv in (self.conv1, self.conv2, self.conv3, self.fconv):
      nn.init.xavier_uniform_(conv.weight)
      nn.init.zeros_(conv.bias)

  def forward(self, m):
    x = m
    for conv, pool in ((self.conv1, True), (self.conv2, True), (self.conv3, False)):
      x = F.relu(conv(F.pad(x, (1, 1, 1, 1))))
      if pool:
        x = F.max_pool2d(x, 2, 2)
    return self.fconv(x)


class SimilarityNetworkRef(nn.Module):
  """The similarity network, constructor arguments named as in the original ViSiL class."""

  def __init__(self, dims: int = 512, attention: bool = True, binarization: bool = False,
               binary_bits: int = 512, f2f_sim_module: str = 'TopKChamfer', v2v_sim_module: str = 'TopKChamfer',
               f_topk_rate: float = 0.1, v_topk_rate: float = 0.1, symmetric: bool = False,
               s2vs_naming: bool = False, symmetric_top_rate: Optional[float] = None):
    super().__init__()
    if attention and binarization:
      raise ValueError('attention and binarization are mutually exclusive')
    for kind in (f2f_sim_module, v2v_sim_module):
      if kind not in KINDS:
        raise ValueError(f'unknown similarity kind {kind!r}')
    self.dims = dims
    self.use_attention = attention
    self.use_binarization = binarization
    self.binary_bits = binary_bits
    self.f2f_sim_module = f2f_sim_module
    self.v2v_sim_module = v2v_sim_module
    self.f_topk_rate = f_topk_rate
    self.v_topk_rate = v_topk_rate
    self.symmetric = symmetric
    self.s2vs_naming = s2vs_naming
    self.symmetric_top_rate = symmetric_top_rate
    if attention:
      self.attention = RegionAttention(dims)
    if binarization:
      self.binarization = ITQBinarization(dims, binary_bits)
    # The attribute name decides the state_dict prefix.
    self.comparator_name = 'visil_head' if s2vs_naming else 'comparator_module'
    setattr(self, self.comparator_name, Comparator())

  @property
  def comparator(self) -> Comparator:
    return getattr(self, self.comparator_name)

  @staticmethod
  def _batch(x):
    if x.ndim == 3:
      return x[None]
    if x.ndim != 4:
      raise ValueError(f'expected [T, R, D] or [n, T, R, D], got shape {tuple(x.shape)}')
    return x

  # ---- stages -------------------------------------------------------------------------------------------
  def index_video(self, x):
    """Region attention or ITQ binarisation of x [..., R, D] (identity if neither is enabled)."""
    if self.use_attention:
      x = self.attention(x)
    if self.use_binarization:
      x = self.binarization(x)
    return x

  def frame_to_frame(self, q, t, max_elements: int = 1 << 25):
    """f2f [A, B, Tq, Tt] of indexed q [A, Tq, R, D] and t [B, Tt, R, D]: region dot products reduced over
    target regions and averaged over query regions. Query frames are processed in slices to bound memory
    (each (i, j) cell is independent, so slicing is exact). No division by the number of bits here."""
    q, t = self._batch(q), self._batch(t)
    a, tq, r, _ = q.shape
    b, tt, r2, _ = t.shape
    step = max(1, max_elements // max(1, a * b * tt * r * r2))
    parts = []
    for start in range(0, tq, step):
      s = torch.einsum('aiod,bjpd->abijop', q[:, start:start + step], t)
      parts.append(reduce_last_two(s, self.f2f_sim_module, self.f_topk_rate, self.symmetric,
                                   self.symmetric_top_rate))
    return torch.cat(parts, dim=2)

  def comparator_input(self, q, t):
    """The map the CNN sees: f2f, divided by the number of bits when binarization is on."""
    f2f = self.frame_to_frame(q, t)
    if self.use_binarization:
      f2f = f2f / self._batch(t).shape[-1]
    return f2f

  def compare(self, f2f):
    """Raw comparator output [A, B, Tq//4, Tt//4] for a map f2f [A, B, Tq, Tt]."""
    a, b, tq, tt = f2f.shape
    out = self.comparator(f2f.reshape(a * b, 1, tq, tt))
    return out.reshape(a, b, out.shape[-2], out.shape[-1])

  def video_to_video(self, s):
    """[A, B, I, J] -> [A, B] with the configured temporal reduction (input already activated)."""
    return reduce_last_two(s, self.v2v_sim_module, self.v_topk_rate, self.symmetric, self.symmetric_top_rate)

  # ---- evaluation and training ----------------------------------------------------------------------------
  def calculate_video_similarity(self, q, t, apply_visil: bool = True):
    """Similarity [nq, nt] in [-1, 1] of already indexed, unpadded videos ([T, R, D] or [n, T, R, D])."""
    f2f = self.comparator_input(q, t)
    if not apply_visil:
      return self.video_to_video(f2f)
    return self.video_to_video(F.hardtanh(self.compare(f2f)))

  def forward(self, x):
    """Training forward over all ordered pairs of x [N, T, R, D]: (frame_level_sim, S in [0, 1], reg_loss)."""
    x = self.index_video(x)
    frame_level_sim = self.frame_to_frame(x, x)
    cnn_in = frame_level_sim / x.shape[-1] if self.use_binarization else frame_level_sim
    c = self.compare(cnn_in)
    reg_loss = (F.relu(-1.0 - c) + F.relu(c - 1.0)).sum()
    s = self.video_to_video(F.hardtanh(c) / 2.0 + 0.5)
    return frame_level_sim, s, reg_loss


def original_style_similarity(model: SimilarityNetworkRef, query_indexed, target_indexed, chunk: int = 2048):
  """One query-target score the way the original evaluation loop computes it: the indexed target [Tt, R, D]
  is cut into consecutive chunks of `chunk` frames (the last one shorter), each chunk is scored against the
  whole query [Tq, R, D], and the chunk scores are averaged with equal weight. A last chunk of 1-3 frames
  fails inside the comparator's pooling, as in the original."""
  scores = []
  for start in range(0, target_indexed.shape[0], chunk):
    scores.append(model.calculate_video_similarity(query_indexed, target_indexed[start:start + chunk]).reshape(-1))
  return torch.cat(scores).mean()


def tile_min_len(features: np.ndarray, min_len: int) -> np.ndarray:
  """The original HDF5 loader's treatment of one video: while it has fewer than `min_len` frames it is
  concatenated with itself (so the length doubles each time), then a 2-D [T, D] array becomes [T, 1, D]."""
  features = np.asarray(features)
  if features.shape[0] == 0:
    raise ValueError('an empty video cannot be tiled (the original loop would never end)')
  while features.shape[0] < min_len:
    features = np.concatenate([features, features], axis=0)
  if features.ndim == 2:
    features = features[:, None, :]
  return features


def _hapvr_args(model: SimilarityNetworkRef) -> dict:
  """The namespace of the original HAP-VR train.py as scripts/train.sh runs it (after train.py's edits)."""
  return dict(
      dataset_path='../video_data/VCDB/distractors/frames', experiment_path='../experiments/', workers=12,
      load_model=False, saved_model_path=None, log_step=100, use_fp16=True, dist_url='env://',
      backbone='resnet', similarity_network='ViSiL', dims=model.dims, attention=model.use_attention,
      binarization=model.use_binarization, binary_bits=model.binary_bits,
      f2f_sim_module=model.f2f_sim_module, v2v_sim_module=model.v2v_sim_module,
      loss_selected='TBInnerQuadLinearAP,QuadLinearAP,InfoNCE,SSHN', qlap_sigma=0.05, qlap_rho=0.1,
      innerAP_qlap_sigma=0.05, innerAP_qlap_rho=5.0, inner_parameter=6.0,
      f_topk_rate=model.f_topk_rate, v_topk_rate=model.v_topk_rate,
      pseudo_label_top_rate=0.35, pseudo_label_bottom_rate=0.35, use_pseudo_label=True,
      pretrained_DINO_path=None, DINO_arch='vit_small', eval_step=1500, batch_sz=64, batch_sz_fe=512,
      iter_epochs=30000, epochs=20, percentage=1.0, learning_rate=4e-5, final_lr=0.1, warmup_iters=1000,
      warmup_lr_init=0.01, weight_decay=0.01, window_sz=28, temperature=0.03, lambda_parameter=3.0,
      r_parameter=1.0, augmentations='GT,FT,TT,ViV', n_raug=2, m_raug=9, p_overlay=0.3, p_blur=0.5,
      p_tsd=0.5, p_ff=0.1, p_sm=0.1, p_rev=0.1, p_pau=0.1, p_shuffle=0.5, p_dropout=0.3, p_content=0.5,
      p_viv=0.3, lambda_viv=(0.3, 0.7),
      loss_allowed=['QuadLinearAP', 'TBInnerQuadLinearAP', 'InfoNCE', 'SSHN'],
      loss_list=['TBInnerQuadLinearAP', 'QuadLinearAP', 'InfoNCE', 'SSHN'],
      rank=0, world_size=2, gpu=0, distributed=True, dist_backend='nccl')


def _s2vs_args(model: SimilarityNetworkRef) -> dict:
  """The namespace of S2VS's train.py: no similarity-module or top-k fields."""
  return dict(
      dataset_path='data/dns_100k', experiment_path='experiments/', workers=12, load_model=False,
      log_step=100, use_fp16=True, dist_url='env://', backbone='resnet', similarity_network='ViSiL',
      dims=model.dims, attention=model.use_attention, binarization=model.use_binarization,
      binary_bits=model.binary_bits, augmentations='GT,FT,TT,ViV', batch_sz=64, batch_sz_fe=512,
      iter_epochs=30000, percentage=1.0, learning_rate=5e-5, final_lr=0.1, warmup_iters=1000,
      warmup_lr_init=0.01, weight_decay=0.01, window_sz=32, temperature=0.03, lambda_parameter=3.0,
      r_parameter=1.0, n_raug=2, m_raug=9, p_overlay=0.3, p_blur=0.5, p_tsd=0.5, p_ff=0.1, p_sm=0.1,
      p_rev=0.1, p_pau=0.1, p_shuffle=0.5, p_dropout=0.3, p_content=0.5, p_viv=0.3, lambda_viv=(0.3, 0.7),
      rank=0, world_size=2, gpu=0, distributed=True, dist_backend='nccl')


def original_state_dict(model: SimilarityNetworkRef, hapvr: bool = True) -> dict:
  """The model's state_dict with the comparator prefix of the chosen code base (HAP-VR or S2VS)."""
  want, other = ('comparator_module.', 'visil_head.') if hapvr else ('visil_head.', 'comparator_module.')
  out = {}
  for key, value in model.state_dict().items():
    if key.startswith(other):
      key = want + key[len(other):]
    out[key] = value.detach().clone()
  return out


def original_args(model: SimilarityNetworkRef, hapvr: bool = True,
                  overrides: Optional[dict] = None) -> argparse.Namespace:
  """The argparse namespace the original train.py would have saved for this model: HAP-VR fields (including
  the similarity modules and top-k rates) or, with hapvr=False, S2VS fields (which have neither).
  `overrides` adds or replaces fields (a value of None is kept as None)."""
  fields = _hapvr_args(model) if hapvr else _s2vs_args(model)
  fields.update(overrides or {})
  return argparse.Namespace(**fields)


def make_original_checkpoint(path: str, model: SimilarityNetworkRef, hapvr: bool = True,
                             args_overrides: Optional[dict] = None) -> argparse.Namespace:
  """torch.saves {'args', 'model', 'optimizer', 'global_step'} as the original training code would.

  hapvr=True: HAP-VR argparse fields (with the model's similarity modules and top-k rates) and the
  `comparator_module` prefix; hapvr=False: S2VS fields (no similarity-module or top-k fields) and the
  `visil_head` prefix. `args_overrides` adds or replaces namespace fields. Returns the namespace saved.
  """
  args = original_args(model, hapvr, args_overrides)
  torch.save({'args': args, 'model': original_state_dict(model, hapvr), 'optimizer': {}, 'global_step': 10},
             path)
  return args
