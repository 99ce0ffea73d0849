"""Independent PyTorch reference of the HAP-VR training loss and train step.

Written from the loss formulas, in the *original's* style rather than the port's: every loss works on full
tensors, with no restriction to the positive pairs and no numerical shortcuts —

  * pseudo frame labels: the cosine similarity of every (clip a, frame i, clip b, frame j) teacher pair,
    [N, N, T, T], then top-k / bottom-k along j, turned into 0/1 masks by scattering ones;
  * frame-level TB-Inner QuadLinear-AP: the pairwise difference tensor of every (a, b, i) ranking,
    [N, N, T, T, T], for every clip pair, and only then weighted by Y[a, b];
  * video-level QuadLinear-AP: the [N, N, N] difference tensor of every query row;
  * InfoNCE with the plain exp (no shift), SSHN, and the regulariser as the SUM over all
    comparator outputs (returned by `SimilarityNetworkRef.forward`, tests/references/hapvr_torch.py).

  L = NCE + 6 * inner + 4 * QLAP + 3 * (hard-negative + self) + 1 * reg

A batch holds G loss groups; `torch_train_step` averages the groups' totals, steps the learning
rate by the original schedule before the update (timm's CosineLRScheduler with no warm-up offset) and
applies torch.optim.AdamW(weight_decay=0.01 on every parameter). The memory of the full tensors grows as
N^2 T^3 (3.6e8 elements per tensor for N = 128, T = 28), like the original's.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

# The original's hard-coded loss weights (training_tools.py four-loss branch).
LOSS_WEIGHTS = {'infonce': 1.0, 'inner_ap': 6.0, 'qlap': 4.0, 'sshn': 3.0, 'reg': 1.0}
# The original's scripts/train.sh values (not its argparse defaults).
LOSS_DEFAULTS = dict(temperature=0.03, sshn_eps=1e-3, qlap_sigma=0.05, qlap_rho=0.1, inner_sigma=0.05,
                     inner_rho=5.0, top_rate=0.35, bottom_rate=0.35)
OPTIM_DEFAULTS = dict(lr=4e-5, min_lr=4e-6, warmup_lr=4e-7, warmup_steps=1000, decay_steps=30000,
                      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


# --------------------------------------------------------------------------------------------- surrogates
def step_fn(x: torch.Tensor) -> torch.Tensor:
  """Heaviside 1[x > 0] as a constant (no gradient)."""
  return (x > 0).to(x.dtype)


def quad_linear(x: torch.Tensor, sigma: float) -> torch.Tensor:
  """0 for x < -sigma; (1 + x/sigma)^2 on [-sigma, 0]; 1 + 2x/sigma for x > 0."""
  zero = torch.zeros_like(x)
  quad = (1.0 + x / sigma) ** 2
  lin = 1.0 + 2.0 * x / sigma
  return torch.where(x > 0, lin, torch.where(x < -sigma, zero, quad))


# ----------------------------------------------------------------------------------------- pseudo labels
def topk_count(n: int, rate: float) -> int:
  return max(round(n * rate), 1)


@torch.no_grad()
def pseudo_frame_labels(teacher: torch.Tensor, top_rate: float, bottom_rate: float):
  """teacher [N, T, C] -> (pos, neg) [N, N, T, T]: for every (a, b, i) the top / bottom frames j of clip b
  by cosine similarity to frame i of clip a, as 0/1 masks."""
  g = teacher / teacher.norm(dim=-1, keepdim=True).clamp_min(1e-12)
  sim = torch.einsum('aic,bjc->abij', g, g)
  t = sim.shape[-1]
  top = torch.topk(sim, topk_count(t, top_rate), dim=-1).indices
  bottom = torch.topk(sim, topk_count(t, bottom_rate), dim=-1, largest=False).indices
  pos = torch.zeros_like(sim).scatter_(-1, top, 1.0)
  neg = torch.zeros_like(sim).scatter_(-1, bottom, 1.0)
  return pos, neg


# ------------------------------------------------------------------------------------------------ losses
def _smoothed_ap(scores, pos, neg_candidates, sigma, rho):
  """Smoothed AP of rankings scores[..., K] (one per leading index), full pairwise tensors [..., K, K].

  Entry [k, j] compares candidate j with the ranked positive k: rho * step(s_j - s_k) when both are positive,
  quad_linear(s_j - s_k) when j is in `neg_candidates` (and not positive), nothing on the diagonal.
  AP = sum over positives k of rank_pos(k) / rank_all(k), divided by the number of positives.
  """
  kk = scores.shape[-1]
  diff = scores.unsqueeze(-2) - scores.unsqueeze(-1)                # [..., k, j] = s_j - s_k
  not_self = 1.0 - torch.eye(kk, dtype=scores.dtype, device=scores.device)
  pos_k, pos_j = pos.unsqueeze(-1), pos.unsqueeze(-2)
  pos_pair = pos_k * pos_j
  mixed_pair = pos_k * neg_candidates.unsqueeze(-2) * (1.0 - pos_pair)
  pos_contrib = rho * step_fn(diff) * pos_pair * not_self
  neg_contrib = quad_linear(diff, sigma) * mixed_pair * not_self
  rank_pos = 1.0 + pos_contrib.sum(-1)
  rank_all = 1.0 + (pos_contrib + neg_contrib).sum(-1)
  return ((rank_pos / rank_all) * pos).sum(-1) / pos.sum(-1)


def qlap_loss(s, y, sigma, rho):
  """Video-level QuadLinear-AP: every clip of the row is a candidate, the query included."""
  ap = _smoothed_ap(s, y, torch.ones_like(y), sigma, rho)          # [N]
  return 1.0 - ap.mean()


def inner_ap_loss(frame_sim, pos, neg, y, sigma, rho):
  """Frame-level TB-Inner QuadLinear-AP on the full [N, N, T, T, T] tensors: AP of every
  (a, b, i) ranking over j, mean over i, then the Y-weighted mean over clip pairs (self-pairs included)."""
  ap = _smoothed_ap(frame_sim, pos, neg, sigma, rho)               # [N, N, T]
  ap_pair = ap.mean(-1)                                            # [N, N]
  return 1.0 - (ap_pair * y).sum() / y.sum()


def infonce_loss(s, y, temperature):
  """InfoNCE: p_ij = e_ij / (e_ij + sum of the row's negatives + 1e-6), averaged over positives j != i."""
  e = torch.exp(s / temperature)
  neg_sum = (e * (y == 0).to(e.dtype)).sum(1, keepdim=True)
  p = e / (e + neg_sum + 1e-6)
  pos = y * (1.0 - torch.eye(y.shape[0], dtype=y.dtype, device=y.device))
  return ((-torch.log(p) * pos).sum(1) / pos.sum(1)).mean()


def sshn_losses(s, y, eps):
  """SSHN: (hard-negative loss, self loss)."""
  masked = torch.where(y == 0, s, torch.full_like(s, -100.0))
  hardest = masked.max(dim=1).values
  hard_neg = -torch.log(torch.clamp(1.0 - hardest, min=eps)).mean()
  self_loss = -torch.log(torch.clamp(torch.diagonal(s), min=eps)).mean()
  return hard_neg, self_loss


def torch_group_loss(model, regions, teacher, y, weights: Optional[Dict[str, float]] = None, **loss_kwargs
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
  """Total loss of one loss group and its terms.

  model: tests/torch_reference.SimilarityNetworkRef; regions [N, T, R, D]; teacher [N, T, C]; y [N, N] 0/1
  (tensors or arrays; cast to the model's dtype and device). Terms: infonce, inner_ap, qlap, sshn (hard
  negative + self), hard_neg, self, reg; the total uses `weights` (default: the original's).
  """
  cfg = {**LOSS_DEFAULTS, **loss_kwargs}
  weights = LOSS_WEIGHTS if weights is None else weights
  ref_param = next(model.parameters())
  as_t = lambda x: torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(
      device=ref_param.device, dtype=ref_param.dtype)
  regions, teacher, y = as_t(regions), as_t(teacher), as_t(y)

  pos, neg = pseudo_frame_labels(teacher, cfg['top_rate'], cfg['bottom_rate'])
  frame_sim, s, reg = model(regions)
  hard_neg, self_loss = sshn_losses(s, y, cfg['sshn_eps'])
  terms = {
      'infonce': infonce_loss(s, y, cfg['temperature']),
      'inner_ap': inner_ap_loss(frame_sim, pos, neg, y, cfg['inner_sigma'], cfg['inner_rho']),
      'qlap': qlap_loss(s, y, cfg['qlap_sigma'], cfg['qlap_rho']),
      'sshn': hard_neg + self_loss,
      'hard_neg': hard_neg,
      'self': self_loss,
      'reg': reg,
  }
  total = sum(weights[k] * terms[k] for k in LOSS_WEIGHTS if weights.get(k))
  return total, terms


# ------------------------------------------------------------------------------------- schedule and step
def torch_learning_rate(step: int, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int,
                        decay_steps: int) -> float:
  """The original's per-iteration lr (timm CosineLRScheduler, t_in_epochs=False, no warm-up prefix)."""
  if step < warmup_steps:
    return warmup_lr + step * (lr - warmup_lr) / warmup_steps
  if step >= decay_steps:
    return min_lr
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * step / decay_steps))


def make_torch_optimizer(model, **optim_kwargs) -> torch.optim.Optimizer:
  cfg = {**OPTIM_DEFAULTS, **optim_kwargs}
  return torch.optim.AdamW(model.parameters(), lr=cfg['lr'], betas=(cfg['b1'], cfg['b2']), eps=cfg['eps'],
                           weight_decay=cfg['weight_decay'])


def torch_batch_loss(model, batch, weights=None, **loss_kwargs):
  """Mean over the G groups of batch {'regions' [G, N, T, R, D], 'teacher' [G, N, T, C], 'y' [G, N, N]}:
  (total, terms averaged over groups)."""
  groups = len(batch['y'])
  totals, all_terms = [], []
  for g in range(groups):
    total, terms = torch_group_loss(model, batch['regions'][g], batch['teacher'][g], batch['y'][g], weights,
                                    **loss_kwargs)
    totals.append(total)
    all_terms.append(terms)
  total = torch.stack(totals).mean()
  terms = {k: torch.stack([t[k] for t in all_terms]).mean() for k in all_terms[0]}
  return total, terms


def torch_train_step(model, optimizer, batch, step: int, optim: Optional[dict] = None, weights=None,
                     scaler=None, autocast_dtype=None, **loss_kwargs):
  """One original-style training iteration at global step `step`: lr(step) set before the update (as
  timm's step_update), loss averaged over groups, backward, AdamW. Returns (loss, terms, lr) as floats.

  `autocast_dtype` (CUDA only) runs the forward and losses under torch.autocast, with `scaler` (a
  torch.amp.GradScaler) for float16, like the original's use_fp16 path.
  """
  cfg = {**OPTIM_DEFAULTS, **(optim or {})}
  lr = torch_learning_rate(step, cfg['lr'], cfg['min_lr'], cfg['warmup_lr'], cfg['warmup_steps'],
                           cfg['decay_steps'])
  optimizer.zero_grad(set_to_none=True)
  if autocast_dtype is not None:
    with torch.autocast('cuda', dtype=autocast_dtype):
      loss, terms = torch_batch_loss(model, batch, weights, **loss_kwargs)
  else:
    loss, terms = torch_batch_loss(model, batch, weights, **loss_kwargs)
  for group in optimizer.param_groups:
    group['lr'] = lr
  if scaler is not None:
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
  else:
    loss.backward()
    optimizer.step()
  return loss.detach(), {k: v.detach() for k, v in terms.items()}, lr
