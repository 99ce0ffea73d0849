"""The HAP-VR training losses, as pure jnp functions of one loss group of N clips.

  L = InfoNCE + 6 * InnerAP + 4 * QLAP + 3 * (hard-negative + self) + 1 * regularisation   (fixed in the original)

S [N, N] is the video-level similarity in [0, 1] (the training forward's second output), Y [N, N] the 0/1
positive-pair matrix (Y = 1[M M^T > 0]), F [.., T, T] the pre-CNN frame-to-frame similarity. All losses are
computed in float32. Self-pairs count as positives in QLAP and the inner AP, as in the original.

The frame-level inner AP is computed on the positive clip pairs only: the original builds
[N, N, T, T, T] tensors and then weights every (a, b) by Y[a, b], so restricting to the pairs with Y = 1 gives
exactly the same value with ~N/3 times less memory. `positive_pairs` lists them with a static size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

WEIGHTS = {'infonce': 1.0, 'inner_ap': 6.0, 'qlap': 4.0, 'sshn': 3.0, 'reg': 1.0}


def heaviside(x):
  return (x > 0).astype(x.dtype)


def quad_linear(x, sigma):
  """0 below -sigma, (x/sigma + 1)^2 on [-sigma, 0], 2x/sigma + 1 above 0 (C1, linear growth)."""
  return jnp.where(x > 0, 2 * x / sigma + 1, jnp.where(x >= -sigma, (x / sigma + 1) ** 2, 0.))


def _ap_from_scores(s, pos, cand, sigma, rho):
  """AP of each row of s[..., K] with positives `pos` (0/1) among candidates `cand` (0/1, pos ⊆ cand).

  rank_all(k) = 1 + sum_{j != k} [rho H(s_j - s_k) if j, k both positive, else QL(s_j - s_k) if j a candidate]
  rank_pos(k) = 1 + sum_{j != k, j positive} rho H(s_j - s_k);  AP = mean over positives k of rank_pos/rank_all.
  """
  diff = s[..., None, :] - s[..., :, None]               # [..., k, j] = s_j - s_k
  off_diag = 1. - jnp.eye(s.shape[-1], dtype=s.dtype)
  both_pos = pos[..., :, None] * pos[..., None, :]
  pos_term = rho * heaviside(diff) * both_pos * off_diag
  other = quad_linear(diff, sigma) * cand[..., None, :] * (1. - both_pos) * off_diag
  rank_pos = 1. + jnp.sum(pos_term, axis=-1)
  rank_all = rank_pos + jnp.sum(other, axis=-1)
  return jnp.sum(rank_pos / rank_all * pos, axis=-1) / jnp.sum(pos, axis=-1)


def qlap_loss(s, y, sigma: float = 0.05, rho: float = 0.1):
  """Video-level QuadLinear-AP: 1 - mean over queries of the smoothed AP of their row."""
  s, y = s.astype(jnp.float32), y.astype(jnp.float32)
  return 1. - jnp.mean(_ap_from_scores(s, y, jnp.ones_like(y), sigma, rho))


def pseudo_labels(g_a, g_b, top_rate: float = 0.35, bottom_rate: float = 0.35):
  """DINO pseudo frame labels of clip pairs: g_a, g_b [M, T, C] teacher features.

  Cosine similarity G[m, i, j] of frame i of clip a to frame j of clip b; along j, the top
  max(round(T * top_rate), 1) frames are pseudo-positives and the bottom max(round(T * bottom_rate), 1)
  pseudo-negatives. Returns (pos, neg) [M, T, T] as 0/1 float32.
  """
  norm = lambda g: g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
  sim = jnp.einsum('mic,mjc->mij', norm(g_a.astype(jnp.float32)), norm(g_b.astype(jnp.float32)),
                   precision=jax.lax.Precision.HIGHEST)
  t = sim.shape[-1]
  k_top, k_bottom = max(round(t * top_rate), 1), max(round(t * bottom_rate), 1)
  onehot = lambda idx: jnp.sum(jax.nn.one_hot(idx, t, dtype=jnp.float32), axis=-2)
  pos = onehot(jax.lax.top_k(sim, k_top)[1])
  neg = onehot(jax.lax.top_k(-sim, k_bottom)[1])
  return pos, neg


def positive_pairs(y, max_pairs: int):
  """(a, b, valid): the clip pairs with y = 1, padded to a static `max_pairs`, and how many there are."""
  a, b = jnp.nonzero(y > 0, size=max_pairs, fill_value=0)
  count = jnp.sum(y > 0)
  valid = (jnp.arange(max_pairs) < count).astype(jnp.float32)
  return a, b, valid, count


def inner_ap_loss(f, pos, neg, weights, sigma: float = 0.05, rho: float = 5.0):
  """Frame-level TB-Inner QuadLinear-AP over clip pairs.

  f, pos, neg [M, T, T]: frame similarities and pseudo-labels of M clip pairs; weights [M]: Y of each pair (1
  for the positive pairs, 0 for padding). Per (pair, query frame) the candidates are the pseudo-positives and
  pseudo-negatives; AP(pair) = mean over query frames; L = 1 - sum w AP / sum w.
  """
  f = f.astype(jnp.float32)
  ap = jnp.mean(_ap_from_scores(f, pos, jnp.maximum(pos, neg), sigma, rho), axis=-1)
  return 1. - jnp.sum(weights * ap) / jnp.sum(weights)


def infonce_loss(s, y, temperature: float = 0.03):
  """InfoNCE over the similarity matrix: positives j != i against all negatives of row i."""
  s, y = s.astype(jnp.float32), y.astype(jnp.float32)
  logits = s / temperature
  neg = 1. - y
  # log p_ij = l_ij - log(e^l_ij + sum_k neg_ik e^l_ik + 1e-6), computed stably with a per-row shift.
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
  e = jnp.exp(logits - shift)
  denom = e + jnp.sum(neg * e, axis=1, keepdims=True) + 1e-6 * jnp.exp(-shift)
  log_p = logits - shift - jnp.log(denom)
  pos = y * (1. - jnp.eye(y.shape[0], dtype=y.dtype))
  return jnp.mean(jnp.sum(-log_p * pos, axis=1) / jnp.sum(pos, axis=1))


def sshn_losses(s, y, eps: float = 1e-3):
  """(hard-negative loss, self loss): the two SSHN terms."""
  s, y = s.astype(jnp.float32), y.astype(jnp.float32)
  hardest = jnp.max(jnp.where(y == 0, s, -100.), axis=1)
  hard_neg = -jnp.mean(jnp.log(jnp.maximum(1. - hardest, eps)))
  self_loss = -jnp.mean(jnp.log(jnp.maximum(jnp.diagonal(s), eps)))
  return hard_neg, self_loss
