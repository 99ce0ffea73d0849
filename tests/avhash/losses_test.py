"""AVHash loss (avhash_jax.losses) against a float64 torch reference, and tuple sampling (input_pipeline.avhash.sampling).

The reference below is written in the original's style (the `info_nce` package, ``negative_mode='paired'``,
as loss.py/train.py use it: F.normalize, positive logit + bmm with the paired negatives, cross-entropy with
target 0) directly from the formulas, in float64. The float32 JAX loss, its five terms and its gradient w.r.t. all
fifteen inputs must match it at rtol 1e-5 (gradients: atol 1e-5 · max|g| for near-zero entries).

Sampling: equal draws for equal (seed, epoch), different ones otherwise; over many epochs every
positive is another video of the anchor's class, the negatives are videos of distinct classes other than the
anchor's, and every admissible positive/negative class occurs; errors name the class or the argument.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avhash_jax import losses
from input_pipeline.avhash import sampling

N, M, H, L = 6, 4, 32, 16


# ----------------------------------------------------------------------------------------------- reference
def torch_info_nce(query, positive_key, negative_keys, temperature=0.1):
  """info_nce(query, positive_key, negative_keys, negative_mode='paired'), reduction='mean'."""
  query, positive_key, negative_keys = (F.normalize(x, dim=-1) for x in (query, positive_key, negative_keys))
  positive_logit = torch.sum(query * positive_key, dim=1, keepdim=True)
  negative_logits = (query.unsqueeze(1) @ negative_keys.transpose(-2, -1)).squeeze(1)
  logits = torch.cat([positive_logit, negative_logits], dim=1)
  labels = torch.zeros(len(logits), dtype=torch.long, device=query.device)
  return F.cross_entropy(logits / temperature, labels, reduction='mean')


def torch_avhash_loss(anc, pos, neg):
  """train.py: L = L_V + 50 (L_AA + L_II + L_IA + L_AI); tuples (p_A, p_I, h)."""
  (aA, aI, ah), (pA, pI, ph), (nA, nI, nh) = anc, pos, neg
  terms = {'L_AA': torch_info_nce(aA, pA, nA), 'L_II': torch_info_nce(aI, pI, nI),
           'L_AI': torch_info_nce(aA, pI, nI), 'L_IA': torch_info_nce(aI, pA, nA),
           'L_V': torch_info_nce(ah, ph, nh)}
  return terms['L_V'] + 50 * (terms['L_AA'] + terms['L_II'] + terms['L_IA'] + terms['L_AI']), terms


def random_outputs(seed, n=N, m=M, scale=1.0):
  rng = np.random.default_rng(seed)
  shapes = [(n, H), (n, H), (n, L)], [(n, H), (n, H), (n, L)], [(n, m, H), (n, m, H), (n, m, L)]
  return [[np.tanh(scale * rng.standard_normal(s)).astype(np.float32) for s in group] for group in shapes]


_loss_and_grad = jax.jit(jax.value_and_grad(lambda groups: losses.avhash_loss(*groups), has_aux=True))


def jax_loss_and_grad(groups):
  (total, terms), grads = _loss_and_grad([[jnp.asarray(x) for x in g] for g in groups])
  return total, terms, grads


def torch_loss_and_grad(groups):
  tg = [[torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in g] for g in groups]
  total, terms = torch_avhash_loss(*tg)
  total.backward()
  return total, terms, [[x.grad.numpy() for x in g] for g in tg]


def assert_grads_close(got, want):
  for g_got, g_want in zip(got, want):
    for a, b in zip(g_got, g_want):
      assert a.dtype == jnp.float32
      np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


# ----------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize('seed,scale', [(0, 1.0), (1, 3.0), (2, 0.2)])
def test_loss_and_gradient_match_torch(seed, scale):
  groups = random_outputs(seed, scale=scale)
  total, terms, grads = jax_loss_and_grad(groups)
  t_total, t_terms, t_grads = torch_loss_and_grad(groups)
  assert total.dtype == jnp.float32 and set(terms) == set(losses.TERMS)
  np.testing.assert_allclose(float(total), t_total.item(), rtol=1e-5)
  for k in losses.TERMS:
    np.testing.assert_allclose(float(terms[k]), t_terms[k].item(), rtol=1e-5, err_msg=k)
  assert_grads_close(grads, t_grads)


def test_pair_assignment_is_not_symmetric():
  """L_AI uses the audio anchor with image keys, L_IA the image anchor with audio keys (not interchangeable)."""
  groups = random_outputs(3)
  _, terms = losses.avhash_loss(*groups)
  (aA, aI, _), (pA, pI, _), (nA, nI, _) = groups
  np.testing.assert_allclose(float(terms['L_AI']), float(losses.info_nce(aA, pI, nI)), rtol=1e-6)
  np.testing.assert_allclose(float(terms['L_IA']), float(losses.info_nce(aI, pA, nA)), rtol=1e-6)
  assert abs(float(terms['L_AI']) - float(losses.info_nce(aI, pA, nI))) > 1e-3


def test_flat_negatives_are_split_tuple_major():
  groups = random_outputs(4)
  flat = [x.reshape(N * M, -1) for x in groups[2]]
  want, _ = losses.avhash_loss(*groups)
  got, _ = losses.avhash_loss(groups[0], groups[1], flat)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_zero_vectors_are_finite_and_match_torch():
  groups = random_outputs(5)
  groups[0][0][1] = 0.0          # an all-zero anchor p_A
  groups[2][2][2, 3] = 0.0       # an all-zero negative hash code
  total, terms, grads = jax_loss_and_grad(groups)
  t_total, _, t_grads = torch_loss_and_grad(groups)
  assert np.isfinite(float(total)) and all(np.all(np.isfinite(np.asarray(g))) for gs in grads for g in gs)
  np.testing.assert_allclose(float(total), t_total.item(), rtol=1e-5)
  assert_grads_close(grads, t_grads)


def test_sanity_value_ln5_at_random_directions():
  """Nearly orthogonal inputs give every term ≈ ln 5 and L ≈ 201 ln 5."""
  rng = np.random.default_rng(6)
  mk = lambda *s: rng.standard_normal(s).astype(np.float32)
  groups = [[mk(256, 768)] * 3, [mk(256, 768)] * 3, [mk(256, 4, 768)] * 3]
  total, terms = losses.avhash_loss(*groups)
  for k in losses.TERMS:
    assert abs(float(terms[k]) - math.log(5)) < 0.1, k
  assert abs(float(total) - 201 * math.log(5)) < 10


def test_extreme_similarities_are_stable():
  """Identical anchor/positive and opposite negatives: logits ±10, loss ≈ log(1 + 4e-20) → 0, no NaN."""
  q = np.ones((2, 8), np.float32)
  loss = losses.info_nce(q, q, -np.ones((2, 4, 8), np.float32))
  assert np.isfinite(float(loss)) and 0 <= float(loss) < 1e-6
  loss = losses.info_nce(q, -q, np.ones((2, 4, 8), np.float32))   # positive the worst: log(4) + 20
  np.testing.assert_allclose(float(loss), math.log(4) + 20, rtol=1e-6)


def test_shape_errors_name_the_argument():
  q = np.zeros((3, 8), np.float32)
  with pytest.raises(losses.LossInputError, match='positive'):
    losses.info_nce(q, np.zeros((3, 7), np.float32), np.zeros((3, 4, 8), np.float32))
  with pytest.raises(losses.LossInputError, match='negatives'):
    losses.info_nce(q, q, np.zeros((2, 4, 8), np.float32))
  with pytest.raises(losses.LossInputError, match='temperature'):
    losses.info_nce(q, q, np.zeros((3, 4, 8), np.float32), temperature=0.0)
  groups = random_outputs(7)
  with pytest.raises(losses.LossInputError, match='anchor'):
    losses.avhash_loss(groups[0][:2], groups[1], groups[2])
  with pytest.raises(losses.LossInputError, match='negatives h'):
    losses.avhash_loss(groups[0], groups[1], [groups[2][0], groups[2][1], np.zeros((N * M + 1, L))])
  with pytest.raises(losses.LossInputError, match='positive p_A'):
    losses.avhash_loss(groups[0], [groups[1][0][:, :5], groups[1][1], groups[1][2]], groups[2])
  with pytest.raises(losses.LossInputError, match=r'L_II \(image anchor, image keys\): negatives'):
    losses.avhash_loss(groups[0], groups[1], [groups[2][0], groups[2][1][:, :, :5], groups[2][2]])


# ----------------------------------------------------------------------------------------------- sampling
LABELS = np.repeat(np.array([3, 7, 10, 11, 20, 42, 99]), [2, 3, 2, 6, 2, 4, 5])   # unbalanced, non-contiguous


def test_sampling_is_deterministic_per_seed_and_epoch():
  a = sampling.sample_tuples(LABELS, seed=3346, epoch=5)
  assert a.shape == (LABELS.size, 6) and a.dtype == np.int64
  np.testing.assert_array_equal(a, sampling.TupleSampler(LABELS, seed=3346).sample(5))
  assert not np.array_equal(a, sampling.sample_tuples(LABELS, seed=3346, epoch=6))
  assert not np.array_equal(a, sampling.sample_tuples(LABELS, seed=3347, epoch=5))
  np.testing.assert_array_equal(a[:, 0], np.arange(LABELS.size))


def test_shuffle_permutes_rows_of_an_equally_valid_draw():
  s = sampling.TupleSampler(LABELS, seed=1)
  a = s.sample(2, shuffle=True)
  np.testing.assert_array_equal(a, s.sample(2, shuffle=True))
  np.testing.assert_array_equal(np.sort(a[:, 0]), np.arange(LABELS.size))
  assert not np.array_equal(a[:, 0], np.arange(LABELS.size))
  check_valid(a, LABELS, 4)


def check_valid(t, labels, n_neg):
  assert t.shape == (labels.size, 2 + n_neg)
  anc, pos, neg = t[:, 0], t[:, 1], t[:, 2:]
  assert np.all(pos != anc) and np.all(labels[pos] == labels[anc])
  neg_cls = labels[neg]
  assert np.all(neg_cls != labels[anc][:, None])
  assert all(len(set(row)) == n_neg for row in neg_cls)


@pytest.mark.parametrize('n_neg', [4, 6, 1])
def test_sampling_validity_and_coverage_over_many_epochs(n_neg):
  s = sampling.TupleSampler(LABELS, n_neg=n_neg, seed=0)
  seen_pos, neg_counts = {}, np.zeros((LABELS.size, LABELS.size), np.int64)
  for epoch in range(200):
    t = s.sample(epoch)
    check_valid(t, LABELS, n_neg)
    for a, p in t[:, :2]:
      seen_pos.setdefault(a, set()).add(p)
    np.add.at(neg_counts, (np.repeat(t[:, 0], n_neg), t[:, 2:].ravel()), 1)
  for a in range(LABELS.size):     # every other video of the class is drawn as positive
    assert seen_pos[a] == set(np.flatnonzero(LABELS == LABELS[a])) - {a}
  # every video of every other class is drawn as a negative, and each other class equally often (± 5 σ)
  other = LABELS[None, :] != LABELS[:, None]
  assert np.all(neg_counts[other] > 0) and np.all(neg_counts[~other] == 0)
  classes = np.unique(LABELS)
  per_class = np.stack([neg_counts[:, LABELS == c].sum(1) for c in classes], 1)     # [N, C]
  p = n_neg / (classes.size - 1)
  assert np.all(np.abs(per_class[per_class > 0] - 200 * p) < 5 * math.sqrt(200 * p * (1 - p)) + 1e-9)


def test_negative_positions_are_in_random_order():
  """The order of the negative classes is random (not sorted by class)."""
  t = sampling.sample_tuples(LABELS, seed=0, epoch=0)
  cls = LABELS[t[:, 2:]]
  assert not np.all(np.diff(cls, axis=1) > 0)


def test_sampling_errors_name_the_culprit():
  with pytest.raises(sampling.SamplingError, match='class 7 has a single video'):
    sampling.TupleSampler([1, 1, 7, 2, 2, 3, 3, 4, 4, 5, 5])
  with pytest.raises(sampling.SamplingError, match='4 classes; 4 negatives .* need >= 5'):
    sampling.TupleSampler([0, 0, 1, 1, 2, 2, 3, 3])
  sampling.TupleSampler([0, 0, 1, 1, 2, 2, 3, 3], n_neg=3)           # enough for 3 negatives
  with pytest.raises(sampling.SamplingError, match='epoch'):
    sampling.TupleSampler(LABELS).sample(-1)
  with pytest.raises(sampling.SamplingError, match='seed'):
    sampling.sample_tuples(LABELS, seed=1.5, epoch=0)
  with pytest.raises(sampling.SamplingError, match='n_neg'):
    sampling.TupleSampler(LABELS, n_neg=0)
  with pytest.raises(sampling.SamplingError, match='integers'):
    sampling.TupleSampler(LABELS.astype(np.float32))
  with pytest.raises(sampling.SamplingError, match='1-D'):
    sampling.TupleSampler([])
  assert issubclass(sampling.SamplingError, ValueError) and issubclass(losses.LossInputError, ValueError)
