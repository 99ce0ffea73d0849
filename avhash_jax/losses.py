"""The AVHash training loss: five "paired" InfoNCE terms over (anchor, positive, negatives) tuples.

Each training tuple is an anchor video, one positive (another video of the anchor's class) and M = 4 negatives
(one video from each of 4 distinct other classes; `input_pipeline.avhash.sampling`). The model is run on the B anchors, the
B positives and the B·M negatives, giving for each set the audio and image pooler outputs p_A, p_I and the
continuous hash output h = tanh(·) (`AVHash.__call__` returns exactly `(p_A, p_I, h)`).

InfoNCE with paired negatives (the `info_nce` package's ``negative_mode='paired'``, as the original uses it),
temperature τ = 0.1, mean over the N anchors:

  q̂ = q / max(‖q‖, 1e-12)          (likewise k̂, m̂: torch F.normalize)
  z_n = [ q̂_n·k̂_n , q̂_n·m̂_{n,1} , … , q̂_n·m̂_{n,M} ] / τ
  ℓ(q, k, m) = −(1/N) Σ_n log softmax(z_n)[0]

There are no in-batch negatives and no symmetric term: each anchor only sees its own positive and its own M
negatives. The five terms and the total (the anchor's modality is the query, the other sets' modality
the keys):

  L_AA = ℓ(p_A^anc, p_A^pos, p_A^neg)      L_II = ℓ(p_I^anc, p_I^pos, p_I^neg)
  L_AI = ℓ(p_A^anc, p_I^pos, p_I^neg)      L_IA = ℓ(p_I^anc, p_A^pos, p_A^neg)
  L_V  = ℓ(h^anc,  h^pos,  h^neg)
  L    = L_V + 50 · (L_AA + L_II + L_AI + L_IA)

At initialisation every term is ≈ ln 5, so L ≈ 201 · ln 5 ≈ 323.

Numerics: everything is computed in float32 whatever the input dtype; the norm clamp is written so that its
gradient is finite for a zero vector (it then equals torch's: the clamped norm is a constant), and the
log-softmax is the max-shifted `jax.nn.log_softmax`. Negatives are ``[N, M, D]``; model outputs for the flat
``[N·M, D]`` negative batch (tuple-major, as `x.view(-1, …)` of a ``[B, M, …]`` batch) are reshaped by
`split_negatives`.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp

TEMPERATURE = 0.1
FEATURE_WEIGHT = 50.0
NORM_EPS = 1e-12
TERMS = ('L_V', 'L_AA', 'L_II', 'L_AI', 'L_IA')


class LossInputError(ValueError):
  """The loss inputs have inconsistent shapes; the message names the offending argument."""


def l2_normalize(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """``x / max(‖x‖₂, eps)`` over the last axis (torch ``F.normalize``), with a finite gradient at ``x = 0``."""
  x = jnp.asarray(x, jnp.float32)
  sumsq = jnp.sum(x * x, axis=-1, keepdims=True)
  # Clamp inside the sqrt: below eps the norm is the constant eps (zero gradient, like torch's clamp_min),
  # and sqrt is never differentiated at 0.
  norm = jnp.sqrt(jnp.where(sumsq > eps * eps, sumsq, eps * eps))
  return x / norm


def _check(query, positive, negatives, where: str):
  if query.ndim != 2:
    raise LossInputError(f'{where}: query must be [N, D]; got shape {tuple(query.shape)}')
  if positive.shape != query.shape:
    raise LossInputError(f'{where}: positive has shape {tuple(positive.shape)}; expected the query\'s '
                         f'{tuple(query.shape)}')
  n, d = query.shape
  if negatives.ndim != 3 or negatives.shape[0] != n or negatives.shape[2] != d or negatives.shape[1] < 1:
    raise LossInputError(f'{where}: negatives must be [N={n}, M>=1, D={d}]; got shape {tuple(negatives.shape)}')


def info_nce(query: jax.Array, positive: jax.Array, negatives: jax.Array,
             temperature: float = TEMPERATURE, where: str = 'info_nce', weights=None) -> jax.Array:
  """Paired-negative InfoNCE, mean over anchors: query/positive ``[N, D]``, negatives ``[N, M, D]`` → scalar.

  With ``weights [N]`` (1 for a real tuple, 0 for padding) the mean is over the weighted anchors only: the
  loss of a padded batch equals the loss of its real tuples alone.
  """
  query, positive, negatives = (jnp.asarray(a, jnp.float32) for a in (query, positive, negatives))
  _check(query, positive, negatives, where)
  if not temperature > 0:
    raise LossInputError(f'{where}: temperature must be > 0; got {temperature}')
  q, k, m = l2_normalize(query), l2_normalize(positive), l2_normalize(negatives)
  pos = jnp.sum(q * k, axis=-1, keepdims=True)                                   # [N, 1]
  neg = jnp.einsum('nd,nmd->nm', q, m, precision=jax.lax.Precision.HIGHEST)      # [N, M]
  logits = jnp.concatenate([pos, neg], axis=-1) / temperature
  per_anchor = -jax.nn.log_softmax(logits, axis=-1)[:, 0]
  if weights is None:
    return jnp.mean(per_anchor)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != per_anchor.shape:
    raise LossInputError(f'{where}: weights must be [N={per_anchor.shape[0]}]; got shape {tuple(weights.shape)}')
  return jnp.sum(weights * per_anchor) / jnp.maximum(jnp.sum(weights), 1e-12)


def split_negatives(x: jax.Array, n_neg: int, where: str = 'negatives') -> jax.Array:
  """``[N·M, …]`` (tuple-major: the M negatives of tuple 0 first) → ``[N, M, …]``."""
  if n_neg < 1 or x.ndim < 1 or x.shape[0] % n_neg:
    raise LossInputError(f'{where}: leading size {x.shape[0] if x.ndim else None} is not a multiple of '
                         f'n_neg={n_neg}')
  return x.reshape(x.shape[0] // n_neg, n_neg, *x.shape[1:])


def _unpack(outputs: Sequence[jax.Array], name: str):
  if len(outputs) != 3:
    raise LossInputError(f'{name}: expected the model outputs (p_A, p_I, h); got {len(outputs)} arrays')
  return tuple(jnp.asarray(a, jnp.float32) for a in outputs)


def avhash_loss(anchor: Sequence[jax.Array], positive: Sequence[jax.Array], negatives: Sequence[jax.Array],
                temperature: float = TEMPERATURE,
                feature_weight: float = FEATURE_WEIGHT, weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The original's total loss and its five terms.

  Args:
    anchor, positive: model outputs ``(p_A [N, H], p_I [N, H], h [N, L])`` for the anchors / positives.
    negatives: ``(p_A [N, M, H], p_I [N, M, H], h [N, M, L])``; a flat ``[N·M, ·]`` output may be passed,
      it is split tuple-major with ``M = rows / N``.
    temperature: τ (0.1 in the original). feature_weight: weight of the four pooled terms (50).
    weights: optional ``[N]`` tuple weights (0 = padding), see `info_nce`.

  Returns:
    ``(total, terms)``: ``total = L_V + feature_weight·(L_AA + L_II + L_AI + L_IA)``, ``terms`` maps
    ``'L_V', 'L_AA', 'L_II', 'L_AI', 'L_IA'`` to float32 scalars.
  """
  a_A, a_I, a_h = _unpack(anchor, 'anchor')
  p_A, p_I, p_h = _unpack(positive, 'positive')
  for name, a, p in zip(('p_A', 'p_I', 'h'), (a_A, a_I, a_h), (p_A, p_I, p_h)):
    if a.ndim != 2 or p.shape != a.shape:
      raise LossInputError(f'positive {name} has shape {tuple(p.shape)}; expected [N, D] equal to anchor '
                           f'{name} {tuple(a.shape)}')
  negs = []
  for name, x, ref in zip(('p_A', 'p_I', 'h'), _unpack(negatives, 'negatives'), (a_A, a_I, a_h)):
    if x.ndim == 2:
      n = ref.shape[0]
      if n == 0 or x.shape[0] % n:
        raise LossInputError(f'negatives {name}: {x.shape[0]} rows is not a multiple of the {n} anchors')
      x = split_negatives(x, x.shape[0] // n, f'negatives {name}')
    negs.append(x)
  n_A, n_I, n_h = negs
  terms = {
      'L_V': info_nce(a_h, p_h, n_h, temperature, 'L_V (h)', weights),
      'L_AA': info_nce(a_A, p_A, n_A, temperature, 'L_AA (audio anchor, audio keys)', weights),
      'L_II': info_nce(a_I, p_I, n_I, temperature, 'L_II (image anchor, image keys)', weights),
      'L_AI': info_nce(a_A, p_I, n_I, temperature, 'L_AI (audio anchor, image keys)', weights),
      'L_IA': info_nce(a_I, p_A, n_A, temperature, 'L_IA (image anchor, audio keys)', weights),
  }
  total = terms['L_V'] + feature_weight * (terms['L_AA'] + terms['L_II'] + terms['L_AI'] + terms['L_IA'])
  return total, terms
