"""The AVHash train step: three dropout forwards, the five InfoNCE terms, Adam, sharded jit.

A batch holds B tuples (anchor, positive, n_neg negatives); `input_pipeline.avhash.pipeline` delivers

  image   [B, 2 + n_neg, T, D]   CLIP frame features of the tuple's videos
  audio   [B, 2 + n_neg, T, D]   AST segment features
  weight  [B]                    1 for a real tuple, 0 for the padding of an epoch's last batch

sharded over the mesh's data axis along B (every device holds whole tuples). The tuples' videos go through
one forward with dropout on (see `loss_fn`), masks drawn from a key derived from (seed, step), so a resumed
run draws the same masks. L = L_V + 50 (L_AA + L_II + L_AI + L_IA), averaged
over the real tuples. Optimiser: Adam(lr 1e-4, b1 0.9, b2 0.999, eps 1e-3 outside the sqrt), no schedule, no
weight decay (torch.optim.Adam defaults otherwise). The CLS vector is read through stop_gradient: its
gradient is 0, so Adam never moves it.

The state is a plain pytree {'params', 'opt_state', 'step', 'nonfinite_step'} that Orbax saves as is. A step
whose loss or gradient is not finite leaves the state untouched except for `nonfinite_step`, which records
the first such step (the loop stops the run and names it).
"""
from __future__ import annotations

import functools
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding

from avhash_jax import losses
from avhash_jax import model as model_lib
from common_jax import mesh as mesh_lib
from common_jax import train_loop
from common_jax.train_loop import NO_STEP  # noqa: F401  (re-exported)

BATCH_NDIM = {'image': 4, 'audio': 4, 'weight': 1}


def make_optimizer(config) -> optax.GradientTransformation:
  return optax.adam(config.lr, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)


def init_state(params, config) -> Dict[str, Any]:
  return train_loop.new_state(params, make_optimizer(config))


def abstract_state(model_config: model_lib.ModelConfig, config, mesh):
  """ShapeDtypeStructs of the state, replicated on `mesh`: the restore target on any device count."""
  shapes = jax.eval_shape(lambda: init_state(model_lib.init_params(model_config, 0), config))
  rep = mesh_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)


def batch_shardings(mesh, batch_size: int) -> Dict[str, NamedSharding]:
  n = mesh_lib.batch_size_multiple(mesh)
  if batch_size % n:
    raise ValueError(f'config.batch_size={batch_size} tuples do not divide evenly over the {n} devices of the '
                     'data axis')
  return {k: mesh_lib.batch_sharding(mesh, 0, ndim) for k, ndim in BATCH_NDIM.items()}


def loss_fn(net, params, batch, key, config, train: bool = True):
  """(total, terms) of one batch; `key` seeds the dropout masks (unused when not `train`).

  The original runs the model three times (anchors, positives, negatives), each with fresh dropout masks.
  Here the tuples' 2 + n_neg videos go through ONE forward as a [B · (2 + n_neg)] batch (tuple-major, so each
  device keeps its own tuples and nothing moves between devices); every video still gets its own
  independent dropout masks, which is what the three passes amount to, and the compiled step is a third of
  the size (without dropout the two are the same computation, which the PyTorch parity test checks).
  """
  image, audio = batch['image'], batch['audio']
  b, width = image.shape[:2]
  flat = lambda x: x.reshape((b * width,) + x.shape[2:])
  out = net.apply({'params': params}, flat(image), flat(audio), deterministic=not train,
                  rngs={'dropout': key} if train else {})
  out = [o.reshape((b, width) + o.shape[1:]) for o in out]          # (p_A, p_I, h), each [B, 2 + n_neg, ·]
  anchor = [o[:, 0] for o in out]
  positive = [o[:, 1] for o in out]
  negatives = [o[:, 2:] for o in out]
  return losses.avhash_loss(anchor, positive, negatives, temperature=config.temperature,
                            feature_weight=config.feature_weight, weights=batch['weight'])


HYPER = ('lr', 'adam_b1', 'adam_b2', 'adam_eps', 'seed', 'temperature', 'feature_weight', 'batch_size')


def make_train_step(model_config: model_lib.ModelConfig, config, mesh, train: bool = True):
  """jit((state, batch) -> (state, metrics)); the state is replicated and donated, the batch sharded.

  `train=False` turns dropout off (the parity tests compare that step with PyTorch's eval-mode step). The
  jitted function is cached per (architecture, config.HYPER values, mesh, train), so a run restarted in the
  same process (tests, notebooks) does not compile it again.
  """
  hyper = tuple((k, config[k]) for k in HYPER)
  return _make_train_step(model_config, hyper, mesh, bool(train))


@functools.lru_cache(maxsize=16)
def _make_train_step(model_config, hyper, mesh, train):
  config = ml_collections.ConfigDict(dict(hyper))
  net = model_lib.AVHash(model_config)
  tx = make_optimizer(config)
  base_key = jax.random.key(config.seed)

  def step_fn(state, batch):
    key = jax.random.fold_in(base_key, state['step'])
    (loss, terms), grads = jax.value_and_grad(
        lambda p: loss_fn(net, p, batch, key, config, train), has_aux=True)(state['params'])
    new_state, grad_norm = train_loop.apply_if_finite(tx, state, loss, grads)
    metrics = {'loss': loss, **{f'loss/{k}': v for k, v in terms.items()}, 'grad_norm': grad_norm,
               'param_norm': optax.tree.norm(state['params']), 'tuples': jnp.sum(batch['weight'])}
    return new_state, metrics

  rep = mesh_lib.replicated(mesh)
  shardings = batch_shardings(mesh, config.batch_size)
  return jax.jit(step_fn, in_shardings=(rep, shardings), out_shardings=(rep, rep), donate_argnums=0)


def put_batch(batch, mesh, config) -> Dict[str, jax.Array]:
  """Global [B, ...] arrays from this process's contiguous rows [B_local, ...] (see av_pipeline)."""
  shardings = batch_shardings(mesh, config.batch_size)
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k])) for k in shardings}
