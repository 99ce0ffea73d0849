"""The backbone registry: architecture names -> modules, converted checkpoints on disk, jitted apply functions.

Every architecture module (`backbones.resnet`, `.dino`, `.clip`, `.ast`) has the same interface: a frozen
`Config` (with `full()`, `tiny()`, `to_dict()`, `from_dict()`), a Linen `Model(config, dtype)`, `preprocess(x,
config)` (raw model input -> normalised float input, jit-able), `convert(state_dict, where, **extra) -> (params,
Config)` and `init_params(config, seed)`.

A converted backbone is a checkpoint directory of `common_jax.checkpoint` whose model_config.json is
{"arch": NAME, "config": Config.to_dict()}; `load(directory)` gives a `Backbone` whose `apply` runs
preprocess + model under one jit, with the parameters replicated over the mesh and the batch sharded on 'data'.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from common_jax import checkpoint, mesh as mesh_lib

ARCHS = {
    'resnet50_irmac': 'backbones.resnet',   # HAP-VR: ResNet-50 L3-iRMAC (+ ViSiL PCA) -> [9, 512] per frame
    'dino_vits16': 'backbones.dino',        # HAP-VR teacher: DINO ViT-S/16 -> 384 CLS per frame
    'clip_vitl14': 'backbones.clip',        # AVHash: CLIP ViT-L/14 -> 768 image_embeds per frame
    'ast': 'backbones.ast',                 # AVHash: AST (AudioSet) -> 768 pooled per audio segment
}


def module(arch: str):
  if arch not in ARCHS:
    raise ValueError(f'unknown backbone architecture {arch!r}; known: {", ".join(ARCHS)}')
  return importlib.import_module(ARCHS[arch])


def save(directory: str, arch: str, params: Any, config) -> str:
  return checkpoint.save_params(directory, params, {'arch': arch, 'config': config.to_dict()})


@dataclasses.dataclass
class Backbone:
  arch: str
  config: Any
  params: Any
  dtype: Any = jnp.float32

  @property
  def module(self):
    return module(self.arch)

  def model(self):
    return self.module.Model(self.config, dtype=self.dtype)

  def forward(self, params, x):
    """preprocess + model on one batch (traced inside jit)."""
    return self.model().apply({'params': params}, self.module.preprocess(x, self.config))



def batch_fn(backbones: Sequence[Backbone], mesh=None):
  """(fn, multiple): fn(batch) -> tuple of host arrays, one per backbone, all run on the same input batch under
  one jit; parameters placed once (replicated), the batch sharded on 'data' over this process's devices (each
  host extracts its own videos). Batch sizes must be a multiple of `multiple`."""
  mesh = mesh or mesh_lib.make_mesh(devices=jax.local_devices())
  params = jax.device_put([b.params for b in backbones], mesh_lib.replicated(mesh))
  fn = jax.jit(lambda ps, x: tuple(b.forward(p, x) for b, p in zip(backbones, ps)))

  def run(x):
    x = jax.device_put(x, mesh_lib.batch_sharding(mesh, ndim=np.ndim(x)))
    return jax.device_get(fn(params, x))
  return run, mesh_lib.batch_size_multiple(mesh)


def load(directory: str, arch: Optional[str] = None, dtype=jnp.float32) -> Backbone:
  """A converted backbone from `python -m backbones.convert_backbone`; `arch` checks what it holds."""
  params, model_config = checkpoint.load_params(directory)
  found = model_config.get('arch')
  if found not in ARCHS:
    raise checkpoint.CheckpointError(f'{directory}: not a converted backbone (model_config.json has arch '
                                     f'{found!r}; convert one with python -m backbones.convert_backbone)')
  if arch is not None and found != arch:
    raise checkpoint.CheckpointError(f'{directory}: holds a {found} backbone, expected {arch}')
  try:
    config = module(found).Config.from_dict(model_config.get('config', {}))
  except (TypeError, ValueError) as e:
    raise checkpoint.CheckpointError(f'{directory}: bad {found} config in model_config.json: {e}') from e
  return Backbone(found, config, params, dtype)

