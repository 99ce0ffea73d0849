"""The HAP-VR train step: losses of a batch of loss groups, AdamW with the original schedule, sharded jit.

A batch holds G loss groups of N = 2B clips (B weak clips, then their B strong views, the original's order); the
pipeline delivers [G, N, ...] and `put_batch` places it on the mesh flattened to [G * N, ...]:

  regions [G, N, T, R, D]   region features (float16/bfloat16/float32)
  teacher [G, N, T, C]      teacher (DINO CLS) frame features, for the pseudo-labels
  y       [G, N, N]         1 where two clips share a source video (Y = 1[M M^T > 0])

Every loss is computed per group, with the group's other clips as the negatives, and the total is averaged
over groups: two groups of 64 sources reproduce the original's two GPUs whatever the device
count. The global batch is sharded over the mesh's data axis: over the groups when the device count divides
G, otherwise over the clips of each group (XLA then gathers the indexed features for the N x N pairs).

The state is a plain pytree {'params', 'opt_state', 'step', 'nonfinite_step'} so that Orbax saves it as is. A
step whose loss or gradient is not finite leaves the parameters untouched and records its number in
`nonfinite_step` (the loop stops the run and names it).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding

from common_jax import mesh as mesh_lib
from common_jax import train_loop
from common_jax.train_loop import NO_STEP  # noqa: F401  (re-exported)
from hapvr_jax import losses
from hapvr_jax import model as model_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# ------------------------------------------------------------------------------------------------ schedule
def learning_rate(step, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, decay_steps: int):
  """timm's CosineLRScheduler as the original uses it: linear warm-up from warmup_lr, then a
  cosine from lr to min_lr over decay_steps that is *not* offset by the warm-up, then min_lr."""
  t = jnp.asarray(step, jnp.float32)
  warm = warmup_lr + t * (lr - warmup_lr) / max(warmup_steps, 1)
  cos = min_lr + 0.5 * (lr - min_lr) * (1. + jnp.cos(math.pi * jnp.minimum(t, decay_steps) / decay_steps))
  return jnp.where(t < warmup_steps, warm, jnp.where(t >= decay_steps, min_lr, cos))


def make_schedule(optim):
  return functools.partial(learning_rate, lr=optim.lr, min_lr=optim.min_lr, warmup_lr=optim.warmup_lr,
                           warmup_steps=optim.warmup_steps, decay_steps=optim.decay_steps)


def make_optimizer(optim) -> optax.GradientTransformation:
  """AdamW(b1, b2, eps, weight decay on every parameter, biases included), lr from the schedule at the
  number of updates done so far (the original steps its scheduler before each update)."""
  return optax.adamw(make_schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay)


# ------------------------------------------------------------------------------------------------- losses
def max_positive_pairs(n_clips: int, factor: float) -> int:
  """Static size of the positive-pair list of a group: Y has N diagonal ones, 2B weak/strong ones and a few
  more per ViV mix (~3N in all); pairs beyond this are counted in `inner_ap_overflow` and left out."""
  return int(math.ceil(factor * n_clips))


def group_losses(net, params, regions, teacher, y, loss_cfg, max_pairs: int) -> Dict[str, jax.Array]:
  """Every loss term of one loss group, plus a few health numbers."""
  f2f, s, reg = net.apply({'params': params}, regions, train=True)
  terms = {'reg': reg}
  terms['infonce'] = losses.infonce_loss(s, y, loss_cfg.temperature)
  hard_neg, self_loss = losses.sshn_losses(s, y, loss_cfg.sshn_eps)
  terms['sshn'] = hard_neg + self_loss
  terms['qlap'] = losses.qlap_loss(s, y, loss_cfg.qlap_sigma, loss_cfg.qlap_rho)
  if loss_cfg.weights.inner_ap:
    a, b, valid, count = losses.positive_pairs(y, max_pairs)
    pos, neg = losses.pseudo_labels(teacher[a], teacher[b], loss_cfg.top_rate, loss_cfg.bottom_rate)
    terms['inner_ap'] = losses.inner_ap_loss(f2f[a, b], pos, neg, valid, loss_cfg.inner_sigma, loss_cfg.inner_rho)
    terms['inner_ap_overflow'] = jnp.maximum(count - max_pairs, 0).astype(jnp.float32)
  n = y.shape[0]
  off = 1. - jnp.eye(n)
  terms['sim_pos'] = jnp.sum(s * y * off) / jnp.maximum(jnp.sum(y * off), 1.)
  terms['sim_neg'] = jnp.sum(s * (1. - y)) / jnp.maximum(jnp.sum(1. - y), 1.)
  return terms


def total_loss(terms, weights) -> jax.Array:
  return sum(weights[k] * terms[k] for k in ('infonce', 'inner_ap', 'qlap', 'sshn', 'reg') if weights[k])


# -------------------------------------------------------------------------------------------------- state
def init_state(model_config: model_lib.ModelConfig, config, seed: int) -> Dict[str, Any]:
  params = model_lib.init_params(model_config, seed=seed)
  return train_loop.new_state(params, make_optimizer(config.optim))


def abstract_state(model_config, config, mesh):
  """ShapeDtypeStructs of the state, replicated on `mesh`: the restore target on any device count."""
  shapes = jax.eval_shape(lambda: init_state(model_config, config, 0))
  rep = mesh_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)


def batch_shardings(mesh, groups: int, clips: int) -> Dict[str, NamedSharding]:
  """The batch travels with groups and clips flattened into one leading axis [G * N, ...], sharded over the
  data axis: each device holds a contiguous run of clips, so the rows a process loads (its groups) are the
  rows its devices hold, on one host or many."""
  n = mesh_lib.batch_size_multiple(mesh)
  if (groups * clips) % n:
    raise ValueError(f'data.groups * 2 * data.sources_per_group = {groups * clips} clips per step do not '
                     f'divide evenly over the {n} devices of the data axis')
  return {k: mesh_lib.batch_sharding(mesh, 0, ndim) for k, ndim in (('regions', 4), ('teacher', 3), ('y', 2))}


def make_train_step(model_config: model_lib.ModelConfig, config, mesh):
  """jit((state, batch) -> (state, metrics)), state replicated and donated, batch sharded (see module doc)."""
  dtype = DTYPES[config.compute_dtype]
  precision = lax.Precision.HIGHEST if config.compute_dtype == 'float32' else lax.Precision.DEFAULT
  net = model_lib.SimilarityNetwork(model_config, dtype=dtype, precision=precision)
  tx = make_optimizer(config.optim)
  schedule = make_schedule(config.optim)
  weights = dict(config.loss.weights)
  n_clips = 2 * config.data.sources_per_group
  max_pairs = max_positive_pairs(n_clips, config.loss.max_pairs_factor)
  shardings = batch_shardings(mesh, config.data.groups, n_clips)

  def loss_fn(params, batch):
    def one_group(regions, teacher, y):
      return group_losses(net, params, regions.astype(dtype), teacher, y.astype(jnp.float32),
                          config.loss, max_pairs)
    terms = jax.vmap(one_group)(batch['regions'], batch['teacher'], batch['y'])
    terms = jax.tree.map(jnp.mean, terms)
    return total_loss(terms, weights), terms

  groups = config.data.groups

  def step_fn(state, batch):
    batch = {k: v.reshape((groups, n_clips) + v.shape[1:]) for k, v in batch.items()}
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'], batch)
    new_state, grad_norm = train_loop.apply_if_finite(tx, state, loss, grads)
    metrics = {'loss': loss, **{f'loss/{k}' if k in weights else k: v for k, v in terms.items()},
               'grad_norm': grad_norm, 'param_norm': optax.tree.norm(state['params']),
               'lr': schedule(state['step'])}
    return new_state, metrics

  rep = mesh_lib.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(rep, shardings), out_shardings=(rep, rep), donate_argnums=0)


def put_batch(batch, mesh, config) -> Dict[str, jax.Array]:
  """Global [G * N, ...] arrays from this process's groups [G_local, N, ...] (see batch_shardings)."""
  shardings = batch_shardings(mesh, config.data.groups, 2 * config.data.sources_per_group)
  flat = lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:])
  return {k: jax.make_array_from_process_local_data(shardings[k], flat(batch[k])) for k in shardings}
