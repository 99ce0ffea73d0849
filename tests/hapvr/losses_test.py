"""HAP-VR losses against NumPy float64 references written as explicit loops over the loss formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hapvr_jax import losses

TOL = dict(rtol=1e-5, atol=1e-5)


def _ql(x, sigma):
  return 0. if x < -sigma else ((x / sigma + 1) ** 2 if x <= 0 else 2 * x / sigma + 1)


def _ap_row(s, pos, cand, sigma, rho):
  """Smoothed AP of one ranking: explicit double loop."""
  total, n_pos = 0., 0
  for k in range(len(s)):
    if not pos[k]:
      continue
    n_pos += 1
    r_all = r_pos = 1.
    for j in range(len(s)):
      if j == k:
        continue
      d = s[j] - s[k]
      if pos[j]:
        h = rho * (d > 0)
        r_all += h
        r_pos += h
      elif cand[j]:
        r_all += _ql(d, sigma)
    total += r_pos / r_all
  return total / n_pos


def _labels(n, rng, viv=3):
  """Y of a loss group: clips 0..B-1 weak, B..2B-1 strong, some strong clips pasted into hosts (ViV)."""
  b = n // 2
  m = np.zeros((n, b))
  m[np.arange(b), np.arange(b)] = 1
  m[b + np.arange(b), np.arange(b)] = 1
  for i in rng.choice(b, viv, replace=False):
    m[b + i, (i + 1) % b] = rng.uniform(0.3, 0.7)
  return (m @ m.T > 0).astype(np.float64)


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  n, t = 8, 6
  s = rng.uniform(0, 1, (n, n))
  s[rng.random((n, n)) < 0.2] = 0.5            # ties
  y = _labels(n, rng)
  f = rng.normal(size=(n, n, t, t))
  g = rng.normal(size=(n, t, 12))
  return s, y, f, g


def test_quad_linear_and_qlap(batch):
  s, y, _, _ = batch
  x = np.linspace(-0.2, 0.2, 41)
  np.testing.assert_allclose(losses.quad_linear(jnp.asarray(x), 0.05), [_ql(v, 0.05) for v in x], **TOL)
  want = 1 - np.mean([_ap_row(s[q], y[q], np.ones(len(s)), 0.05, 0.1) for q in range(len(s))])
  np.testing.assert_allclose(losses.qlap_loss(jnp.asarray(s), jnp.asarray(y)), want, **TOL)
  # a perfect ranking with no near-ties has AP 1 and loss 0 (rho only rescales the positive counts)
  perfect = np.where(y > 0, 0.9, 0.1)
  assert float(losses.qlap_loss(jnp.asarray(perfect), jnp.asarray(y))) == pytest.approx(0., abs=1e-6)


def _pseudo_ref(g, top=0.35, bottom=0.35):
  gn = g / np.linalg.norm(g, axis=-1, keepdims=True)
  sim = np.einsum('aic,bjc->abij', gn, gn)
  t = sim.shape[-1]
  kt, kb = max(round(t * top), 1), max(round(t * bottom), 1)
  order = np.argsort(-sim, axis=-1)
  pos, neg = np.zeros_like(sim), np.zeros_like(sim)
  np.put_along_axis(pos, order[..., :kt], 1, -1)
  np.put_along_axis(neg, order[..., t - kb:], 1, -1)
  return pos, neg


def test_pseudo_labels(batch):
  *_, g = batch
  pos_ref, neg_ref = _pseudo_ref(g)
  a, b = np.meshgrid(np.arange(len(g)), np.arange(len(g)), indexing='ij')
  pos, neg = losses.pseudo_labels(jnp.asarray(g[a.ravel()]), jnp.asarray(g[b.ravel()]))
  n, t = g.shape[:2]
  np.testing.assert_array_equal(np.asarray(pos).reshape(n, n, t, t), pos_ref)
  np.testing.assert_array_equal(np.asarray(neg).reshape(n, n, t, t), neg_ref)
  assert np.all(np.diagonal(np.diagonal(pos_ref, axis1=0, axis2=1), axis1=0, axis2=1) == 1)  # frame i in its top


def test_inner_ap_on_positive_pairs_equals_all_pairs_reference(batch):
  _, y, f, g = batch
  t = f.shape[-1]
  pos, neg = _pseudo_ref(g)
  # the reference: every (a, b) pair, weighted by Y (as the original computes it)
  ap = np.zeros((len(y), len(y)))
  for a in range(len(y)):
    for b in range(len(y)):
      ap[a, b] = np.mean([_ap_row(f[a, b, i], pos[a, b, i], np.maximum(pos, neg)[a, b, i], 0.05, 5.0)
                          for i in range(t)])
  want = 1 - np.sum(y * ap) / np.sum(y)
  # the port: only the positive pairs, listed with a static size larger than their count
  max_pairs = int(y.sum()) + 5
  ia, ib, valid, count = losses.positive_pairs(jnp.asarray(y), max_pairs)
  assert int(count) == int(y.sum())
  ia, ib = np.asarray(ia), np.asarray(ib)
  got = losses.inner_ap_loss(jnp.asarray(f[ia, ib]), jnp.asarray(pos[ia, ib]), jnp.asarray(neg[ia, ib]), valid)
  np.testing.assert_allclose(got, want, **TOL)
  # and through pseudo_labels end to end
  p2, n2 = losses.pseudo_labels(jnp.asarray(g[ia]), jnp.asarray(g[ib]))
  got2 = losses.inner_ap_loss(jnp.asarray(f[ia, ib]), p2, n2, valid)
  np.testing.assert_allclose(got2, want, **TOL)


def test_infonce_and_sshn(batch):
  s, y, _, _ = batch
  tau = 0.03
  e = np.exp(s / tau)
  rows = []
  for i in range(len(s)):
    neg_sum = sum(e[i, k] for k in range(len(s)) if y[i, k] == 0)
    terms = [-np.log(e[i, j] / (e[i, j] + neg_sum + 1e-6)) for j in range(len(s)) if j != i and y[i, j] == 1]
    rows.append(np.mean(terms))
  np.testing.assert_allclose(losses.infonce_loss(jnp.asarray(s), jnp.asarray(y), tau), np.mean(rows), **TOL)
  hardest = np.array([max(s[i, k] for k in range(len(s)) if y[i, k] == 0) for i in range(len(s))])
  hn, sl = losses.sshn_losses(jnp.asarray(s), jnp.asarray(y))
  np.testing.assert_allclose(hn, -np.mean(np.log(np.maximum(1 - hardest, 1e-3))), **TOL)
  np.testing.assert_allclose(sl, -np.mean(np.log(np.maximum(np.diag(s), 1e-3))), **TOL)


def test_infonce_is_finite_at_the_largest_logits():
  """exp(S / 0.03) reaches e^33 at S = 1: the stable form keeps float32 finite, gradients included."""
  y = jnp.asarray(_labels(8, np.random.default_rng(1)))
  s = jnp.where(y > 0, 1.0, 0.99)
  value, grad = jax.value_and_grad(losses.infonce_loss)(s, y)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
