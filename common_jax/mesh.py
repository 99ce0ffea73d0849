"""The project's one mesh helper (both systems).

A mesh is described in the config as a tuple of (axis name, size) pairs, big_vision style, with at most one
size of -1 meaning "all remaining devices": `(('data', -1),)` is pure data parallelism over every device.
Axes are built with `AxisType.Auto` explicitly (jax.make_mesh defaults to Explicit axes, which breaks
uncommitted inputs and with_sharding_constraint).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh(spec: Sequence[Sequence] = (('data', -1),), devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(str(name) for name, _ in spec)
  sizes = [int(size) for _, size in spec]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {tuple(spec)}: at most one axis may have size -1')
  known = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
  if known <= 0 or len(devices) % known:
    raise ValueError(f'mesh {tuple(spec)} does not divide the {len(devices)} available devices')
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'mesh {tuple(spec)} uses {int(np.prod(sizes))} devices but {len(devices)} are available; '
                     'use -1 for one axis')
  return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axis: int = 0, ndim: int = 1, batch_axes=('data',)) -> NamedSharding:
  """Shards dimension `axis` of an ndim-array over the mesh's batch axes; the rest is replicated."""
  names = tuple(a for a in batch_axes if a in mesh.axis_names)
  spec = [None] * ndim
  spec[axis] = names if len(names) > 1 else (names[0] if names else None)
  return NamedSharding(mesh, P(*spec))


def batch_size_multiple(mesh: Mesh, batch_axes=('data',)) -> int:
  """The number of shards along the batch axes: global batch sizes must be a multiple of it."""
  return int(np.prod([mesh.shape[a] for a in batch_axes if a in mesh.axis_names]))
