"""The jitted HAP-VR train step (hapvr_jax.train_step) against an original-style PyTorch train step.

Ground truth: tests/references/hapvr_train_torch.py (independent, written from the formulas in the original's style: full
[N, N, T, T, T] inner-AP tensors weighted by Y, top-k pseudo labels along j, the sum regulariser, AdamW from
torch.optim), driven by tests/torch_reference.SimilarityNetworkRef in float64. The Flax weights come from the
reference's state_dict through `convert_state_dict`, and torch gradients and parameter updates are mapped back
to the Flax layout by the same function.

Batch: G = 2 loss groups of B = 3 sources (N = 6 clips: weak views, then strong views), T = 8 frames, 9 regions
of D = 16 dims, teacher features of C = 8 dims; in each group one strong clip is a ViV-style mix with another
source (one extra positive in M, so Y has 16 ones). The comparator's weights are scaled (x4, fconv bias -0.5)
so that its output leaves [-1, 1] in places: the regulariser and the hardtanh saturation take part (asserted:
reg > 0.1 per group), and S spreads over ~[0.4, 0.9], so the quad-linear surrogate is hit on all its pieces. The step runs on a 4-device mesh: the 12 clips are sharded 3 per device, so every loss group
spans two devices.

What is compared, and tolerances (float32 JAX vs float64 torch):
  * every loss term of each group and the step's group-averaged terms and total: rtol 2e-5, atol 1e-6;
  * parameter gradients (jax.grad of the step's loss, rebuilt from train_step.group_losses / total_loss and
    tied to the step by its value and its gradient norm) vs torch autograd, entry by entry:
    |diff| <= 1e-4 |g| + 1e-5 max|g| of that parameter (observed: <= 3e-7 max|g|);
  * parameters after two AdamW steps: the updates Δp agree to 2e-7 + 2e-4 |Δp| wherever the gradient is well
    above float32 noise. AdamW's first updates are ~ lr * g / (|g| + eps) ~ ±lr, so an entry whose gradient
    is ~float32 noise may legitimately move by up to 2 lr in the other direction; those entries (counted and
    printed) are only checked to be bounded by the AdamW step size;
  * the learning-rate schedule at steps 0, 500, 999, 1000, 15000, 30000, 31000 against hand-computed values of
    the schedule's closed form, also as applied by the optimizer;
  * a batch with a NaN leaves params and optimizer state unchanged and records its step in nonfinite_step.

Each comparison prints its largest error (`pytest -s`).
"""
from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from common_jax import mesh as mesh_lib
from configs import vcdb
from hapvr_jax import train_step as ts
from hapvr_jax.convert import convert_state_dict
from hapvr_jax.model import ModelConfig, SimilarityNetwork

from tests.references import hapvr_torch as ref
from tests.references import hapvr_train_torch as tref

torch.set_num_threads(1)   # the suite runs with -n 2 on 2 cores

G, B, T, R, D, C = 2, 3, 8, 9, 16, 8
N = 2 * B
TERMS = ('infonce', 'inner_ap', 'qlap', 'sshn', 'reg')
LOSS_RTOL, LOSS_ATOL = 2e-5, 1e-6
GRAD_RTOL, GRAD_ATOL_REL = 1e-4, 1e-5     # |diff| <= GRAD_RTOL |g| + GRAD_ATOL_REL * max|g| of the parameter
UPDATE_RTOL, UPDATE_ATOL = 2e-4, 2e-7
NOISE_REL = 1e-4                          # gradients below this fraction of the parameter's largest are "noise"


def report(name, got, want):
  err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
  print(f'[max abs err] {name}: {err:.3g}')
  return err


def flat(tree):
  return {'/'.join(p.key for p in path): np.array(v, np.float64)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tiny_config():
  c = vcdb.get_config('demo')
  c.compute_dtype = 'float32'
  c.model.dims = D
  c.data.window = T
  c.data.sources_per_group = B
  c.data.groups = G
  # a larger warm-up start than the demo's 1e-5, so that parameter updates stand well above float32 rounding
  c.optim.warmup_lr = 5e-4
  return c


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_batch(seed):
  """G groups: weak clips, their noisy strong views, and in each group one strong clip mixed into another
  source's strong clip (label M[s_i, h] = lambda, so Y gains the ViV positives)."""
  rng = np.random.default_rng(seed)
  regions, teacher, ys = [], [], []
  for _ in range(G):
    weak = unit(rng.normal(size=(B, T, R, D)))
    strong = unit(weak + 0.7 * rng.normal(size=weak.shape))
    g_weak = rng.normal(size=(B, T, C))
    g_strong = g_weak + 0.5 * rng.normal(size=g_weak.shape)
    m = np.zeros((N, B))
    m[np.arange(B), np.arange(B)] = 1
    m[B + np.arange(B), np.arange(B)] = 1
    i = int(rng.integers(B))
    h = (i + 1 + int(rng.integers(B - 1))) % B
    lam = rng.uniform(0.3, 0.7)
    strong[i] = unit(lam * strong[h] + (1 - lam) * strong[i])
    g_strong[i] = lam * unit(g_strong[h]) + (1 - lam) * unit(g_strong[i])
    m[B + i, h] = lam
    regions.append(np.concatenate([weak, strong]))
    teacher.append(np.concatenate([g_weak, g_strong]))
    ys.append((m @ m.T > 0).astype(np.float32))
  batch = {'regions': np.stack(regions).astype(np.float32), 'teacher': np.stack(teacher).astype(np.float32),
           'y': np.stack(ys)}
  assert all(int(y.sum()) == 3 * N - 2 for y in batch['y'])   # 6 diagonal + 6 weak/strong + 4 ViV
  return batch


def make_torch_model():
  torch.manual_seed(0)
  model = ref.SimilarityNetworkRef(dims=D, f_topk_rate=0.1, v_topk_rate=0.03)   # float32 init, exact in f64
  with torch.no_grad():
    for name in ('conv1', 'conv2', 'conv3', 'fconv'):
      getattr(model.comparator, name).weight.mul_(4.0)
    model.comparator.fconv.bias.fill_(-0.5)
  return model.double()


def to_flax(model, tensors):
  """A dict of torch tensors keyed like model.named_parameters() -> the Flax tree (convert_state_dict)."""
  sd = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
  out, _ = convert_state_dict(sd, ref.original_args(model))
  return out


def loss_kwargs(config):
  l = config.loss
  return dict(temperature=l.temperature, sshn_eps=l.sshn_eps, qlap_sigma=l.qlap_sigma, qlap_rho=l.qlap_rho,
              inner_sigma=l.inner_sigma, inner_rho=l.inner_rho, top_rate=l.top_rate, bottom_rate=l.bottom_rate)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def setup():
  config = tiny_config()
  torch_model = make_torch_model()
  params, model_config = convert_state_dict(ref.original_state_dict(torch_model), ref.original_args(torch_model))
  from_config = ModelConfig.from_dict({**config.model.to_dict(), 'source': 'hapvr'})
  assert model_config == from_config, (model_config, from_config)
  devices = jax.devices()
  k = next(k for k in (4, 2, 1) if k <= len(devices) and (G * N) % k == 0)
  mesh = mesh_lib.make_mesh(devices=devices[:k])
  step = ts.make_train_step(model_config, config, mesh)
  batches = [make_batch(1), make_batch(2)]
  return dict(config=config, torch_model=torch_model, params=params, model_config=model_config, mesh=mesh,
              step=step, batches=batches)


def fresh_state(setup):
  params = jax.tree.map(jnp.asarray, setup['params'])
  state = {'params': params, 'opt_state': ts.make_optimizer(setup['config'].optim).init(params),
           'step': jnp.zeros((), jnp.int32), 'nonfinite_step': jnp.full((), ts.NO_STEP, jnp.int32)}
  # committed to the replicated sharding the step returns (as the training loop does), so the step compiles
  # once rather than once for uncommitted and once for committed inputs
  return jax.device_put(state, mesh_lib.replicated(setup['mesh']))


def snapshot(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@pytest.fixture(scope='module')
def jax_run(setup):
  """Two JAX steps: metrics and parameters after each."""
  state = fresh_state(setup)
  out = []
  for batch in setup['batches']:
    state, metrics = setup['step'](state, ts.put_batch(batch, setup['mesh'], setup['config']))
    out.append((snapshot(metrics), snapshot(state['params'])))
  return out


@pytest.fixture(scope='module')
def torch_run(setup):
  """Two torch steps: (loss, terms, lr, gradients, parameters after the update) for each."""
  model = copy.deepcopy(setup['torch_model']).train()
  config = setup['config']
  optimizer = tref.make_torch_optimizer(model, **config.optim.to_dict())
  out = []
  for step, batch in enumerate(setup['batches']):
    loss, terms, lr = tref.torch_train_step(model, optimizer, batch, step, config.optim.to_dict(),
                                            **loss_kwargs(config))
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    out.append(dict(loss=float(loss), terms={k: float(v) for k, v in terms.items()}, lr=lr, grads=grads,
                    params=params))
  return out


@pytest.fixture(scope='module')
def jax_loss(setup):
  """The step's loss function, rebuilt from train_step.group_losses / total_loss: (total, per-group terms)."""
  config, model_config = setup['config'], setup['model_config']
  net = SimilarityNetwork(model_config)
  max_pairs = ts.max_positive_pairs(N, config.loss.max_pairs_factor)
  weights = dict(config.loss.weights)

  def loss_fn(params, batch):
    terms = jax.vmap(lambda r, t, y: ts.group_losses(net, params, r, t, y, config.loss, max_pairs))(
        batch['regions'], batch['teacher'], batch['y'])
    return ts.total_loss(jax.tree.map(jnp.mean, terms), weights), terms

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


# ---------------------------------------------------------------------------------------------- (a) losses
def test_group_terms_match_torch(setup, jax_loss):
  """Every term of every loss group at the initial parameters (no averaging to hide a group's error)."""
  batch = setup['batches'][0]
  (_, terms), _ = jax_loss(setup['params'], jax.tree.map(jnp.asarray, batch))
  config = setup['config']
  for g in range(G):
    with torch.no_grad():
      want_total, want = tref.torch_group_loss(setup['torch_model'], batch['regions'][g], batch['teacher'][g],
                                               batch['y'][g], **loss_kwargs(config))   # original weights
    got = {k: float(terms[k][g]) for k in TERMS}
    for k in TERMS:
      report(f'group {g} {k} ({float(want[k]):.5g})', got[k], float(want[k]))
      np.testing.assert_allclose(got[k], float(want[k]), rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=f'group {g} {k}')
    got_total = float(ts.total_loss(got, dict(config.loss.weights)))
    np.testing.assert_allclose(got_total, float(want_total), rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert float(terms['inner_ap_overflow'][g]) == 0.
  # the setup exercises the regulariser and every branch of the surrogates
  assert float(np.min(np.asarray(terms['reg']))) > 0.1


@pytest.mark.parametrize('step', [0, 1])
def test_step_losses_match_torch(setup, jax_run, torch_run, step):
  """The step's reported total and group-averaged terms; step 1 runs on the parameters after one update."""
  metrics, _ = jax_run[step]
  want = torch_run[step]
  report(f'step {step} total ({want["loss"]:.6g})', metrics['loss'], want['loss'])
  np.testing.assert_allclose(metrics['loss'], want['loss'], rtol=LOSS_RTOL, atol=LOSS_ATOL)
  for k in TERMS:
    report(f'step {step} {k}', metrics[f'loss/{k}'], want['terms'][k])
    np.testing.assert_allclose(metrics[f'loss/{k}'], want['terms'][k], rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=k)
  np.testing.assert_allclose(metrics['lr'], want['lr'], rtol=1e-6)
  assert np.isfinite(metrics['grad_norm'])


def test_gradients_match_torch(setup, jax_loss, jax_run, torch_run):
  """jax.grad of the step's loss vs torch autograd, per parameter entry, at the initial parameters."""
  (loss, _), grads = jax_loss(setup['params'], jax.tree.map(jnp.asarray, setup['batches'][0]))
  # the rebuilt loss is the step's loss
  np.testing.assert_allclose(float(loss), jax_run[0][0]['loss'], rtol=1e-6)
  got = flat(grads)
  want = flat(to_flax(setup['torch_model'], torch_run[0]['grads']))
  assert sorted(got) == sorted(want)
  norm = math.sqrt(sum(float(np.sum(v ** 2)) for v in want.values()))
  np.testing.assert_allclose(float(jax_run[0][0]['grad_norm']), norm, rtol=1e-4)
  for key in got:
    scale = float(np.max(np.abs(want[key])))
    assert scale > 0, key
    report(f'grad {key} (scale {scale:.2g})', got[key], want[key])
    np.testing.assert_allclose(got[key], want[key], rtol=GRAD_RTOL, atol=GRAD_ATOL_REL * scale, err_msg=key)


def test_params_after_two_adamw_steps_match_torch(setup, jax_run, torch_run):
  model = setup['torch_model']
  init = flat(setup['params'])
  init_torch = dict(model.named_parameters())
  lr_sum = sum(r['lr'] for r in torch_run)
  for step in range(2):
    got = {k: v - init[k] for k, v in flat(jax_run[step][1]).items()}
    want = flat(to_flax(model, {k: torch_run[step]['params'][k] - init_torch[k] for k in init_torch}))
    # entries whose gradient, at any step so far, is nonzero but near float32 noise may move either way by up
    # to ~lr; an exactly zero gradient (a dead ReLU channel) must give the same weight-decay-only update
    noisy = {}
    for s in range(step + 1):
      for k, g in flat(to_flax(model, torch_run[s]['grads'])).items():
        small = (g != 0) & (np.abs(g) < NOISE_REL * np.max(np.abs(g)))   # exact zeros (dead ReLUs) are exact
        noisy[k] = noisy.get(k, np.zeros(g.shape, bool)) | small
    n_noisy = 0
    for k in got:
      ok = ~noisy[k]
      n_noisy += int(np.sum(noisy[k]))
      report(f'step {step} update {k} (|dp| <= {np.max(np.abs(want[k])):.2g}; all entries '
             f'{np.max(np.abs(got[k] - want[k])):.2g})', got[k][ok], want[k][ok])
      np.testing.assert_allclose(got[k][ok], want[k][ok], rtol=UPDATE_RTOL, atol=UPDATE_ATOL, err_msg=k)
      # any entry: bounded by the AdamW step (|m_hat / sqrt(v_hat)| <= ~1 each step) plus the weight decay
      bound = lr_sum * (1.05 + setup['config'].optim.weight_decay * 1.0)
      assert np.all(np.abs(got[k] - want[k]) <= 2 * bound), k
    print(f'step {step}: {n_noisy} of {sum(v.size for v in got.values())} entries have noise-level gradients')


# -------------------------------------------------------------------------------------------- (b) schedule
SCHEDULE = {   # timm's cosine with lr 4e-5, min 4e-6, warm-up from 4e-7 over 1000 steps, cosine over 30000
    0: 4e-7,
    500: 4e-7 + 500 * (4e-5 - 4e-7) / 1000,           # 2.02e-5
    999: 4e-7 + 999 * (4e-5 - 4e-7) / 1000,           # 3.99604e-5
    1000: 3.990139411662892e-05,                      # 4e-6 + 1.8e-5 (1 + cos(pi / 30)): no warm-up offset
    15000: 2.2e-5,                                    # 4e-6 + 1.8e-5 (1 + cos(pi / 2))
    30000: 4e-6,
    31000: 4e-6,
}


def test_learning_rate_schedule():
  config = vcdb.get_config()
  assert (SCHEDULE[500], SCHEDULE[999]) == pytest.approx((2.02e-5, 3.99604e-5), rel=1e-12)
  schedule = ts.make_schedule(config.optim)
  tx = ts.make_optimizer(config.optim)
  params = {'w': jnp.ones((3,), jnp.float32)}
  zero = {'w': jnp.zeros((3,), jnp.float32)}
  state = tx.init(params)
  for step, want in SCHEDULE.items():
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6, err_msg=f'step {step}')
    assert tref.torch_learning_rate(step, **{k: config.optim[k] for k in (
        'lr', 'min_lr', 'warmup_lr', 'warmup_steps', 'decay_steps')}) == pytest.approx(want, rel=1e-12)
    # the optimizer at update count `step`: a zero gradient leaves only the decay -lr(step) * wd * p
    counted = optax.tree_utils.tree_set(state, count=jnp.asarray(step, jnp.int32))
    updates, _ = tx.update(zero, counted, params)
    np.testing.assert_allclose(np.asarray(updates['w']), -want * config.optim.weight_decay, rtol=1e-5,
                               err_msg=f'applied lr at step {step}')


# ------------------------------------------------------------------------------------------ (c) non-finite
def test_nonfinite_batch_is_skipped_and_recorded(setup):
  step_fn, mesh, config = setup['step'], setup['mesh'], setup['config']
  good, other = setup['batches']
  bad = copy.deepcopy(good)
  bad['regions'][1, 4, 2, 5, 0] = np.nan                      # one value of one clip of the second group
  state = fresh_state(setup)
  state, _ = step_fn(state, ts.put_batch(good, mesh, config))
  assert int(state['nonfinite_step']) == ts.NO_STEP
  before = snapshot({'params': state['params'], 'opt_state': state['opt_state']})
  state, metrics = step_fn(state, ts.put_batch(bad, mesh, config))
  assert not np.isfinite(float(metrics['loss']))
  assert int(state['step']) == 2 and int(state['nonfinite_step']) == 1
  after = snapshot({'params': state['params'], 'opt_state': state['opt_state']})
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  # a later finite step trains again and keeps the first bad step on record
  state, metrics = step_fn(state, ts.put_batch(other, mesh, config))
  assert np.isfinite(float(metrics['loss']))
  assert int(state['step']) == 3 and int(state['nonfinite_step']) == 1
  moved = flat(state['params'])
  assert any(not np.array_equal(moved[k], v) for k, v in flat(before['params']).items())
