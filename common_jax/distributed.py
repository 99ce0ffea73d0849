"""Joining a multi-process JAX run: `maybe_initialize()` calls `jax.distributed.initialize()` only when asked to.

Every entry point calls it first, before anything touches a JAX backend. It is explicit and conservative: a
plain `python -m ...` (one process, any number of local devices) never initialises the distributed system,
because initialising with nobody to talk to waits for peers, and a single process needs none. Two signals
count, both set by the launch scripts (launch/gpu.py, launch/tpu.py) or by hand:

- `JAX_NUM_PROCESSES` > 1 together with `JAX_COORDINATOR_ADDRESS` (host:port of process 0) and
  `JAX_PROCESS_ID` (0 .. n-1); `JAX_LOCAL_DEVICE_IDS` (e.g. "0,1") optionally restricts the local GPUs.
  `JAX_NUM_PROCESSES=1` (or unset) is a single process: nothing happens.
- `COMMON_JAX_DISTRIBUTED=auto`: let JAX detect the cluster itself (Cloud TPU worker metadata, SLURM under
  srun, Open MPI). launch/tpu.py sets it only on multi-host slices; set it yourself for `srun` jobs.

Anything else — a SLURM allocation the program was started in without srun, a TPU VM with one host — stays a
single process. A malformed setting is a ValueError (one clear line through common_jax.cli), not a hang.
"""
from __future__ import annotations

import os
from typing import Mapping

MODE_VAR = 'COMMON_JAX_DISTRIBUTED'

_initialized = False


def _int(env: Mapping[str, str], name: str) -> int:
  value = env.get(name, '').strip()
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} must be an integer') from None


def settings(env: Mapping[str, str] | None = None) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize` the environment asks for, or None (one process)."""
  env = os.environ if env is None else env
  mode = env.get(MODE_VAR, '').strip().lower()
  if mode not in ('', 'auto', 'off'):
    raise ValueError(f'{MODE_VAR}={mode!r}: expected "auto" (let JAX detect the cluster) or "off"')
  if mode == 'off':
    return None
  if env.get('JAX_NUM_PROCESSES', '').strip():
    num = _int(env, 'JAX_NUM_PROCESSES')
    if num < 1:
      raise ValueError(f'JAX_NUM_PROCESSES={num} must be at least 1')
    if num > 1:
      address = env.get('JAX_COORDINATOR_ADDRESS', '').strip()
      if not address or ':' not in address:
        raise ValueError(f'JAX_NUM_PROCESSES={num} needs JAX_COORDINATOR_ADDRESS=host:port (process 0)')
      if not env.get('JAX_PROCESS_ID', '').strip():
        raise ValueError(f'JAX_NUM_PROCESSES={num} needs JAX_PROCESS_ID (0..{num - 1})')
      pid = _int(env, 'JAX_PROCESS_ID')
      if not 0 <= pid < num:
        raise ValueError(f'JAX_PROCESS_ID={pid} is not in [0, JAX_NUM_PROCESSES={num})')
      kwargs = dict(coordinator_address=address, num_processes=num, process_id=pid)
      ids = env.get('JAX_LOCAL_DEVICE_IDS', '').strip()
      if ids:
        try:
          kwargs['local_device_ids'] = [int(i) for i in ids.split(',')]
        except ValueError:
          raise ValueError(f'JAX_LOCAL_DEVICE_IDS={ids!r} must be comma-separated integers') from None
      return kwargs
    return None                       # JAX_NUM_PROCESSES=1: one process, whatever else is set
  return {} if mode == 'auto' else None


def maybe_initialize(env: Mapping[str, str] | None = None) -> bool:
  """Initialises the JAX distributed system if (and only if) the environment describes a multi-process launch.

  Returns True when it called `jax.distributed.initialize` (at most once per process)."""
  global _initialized
  kwargs = settings(env)
  if kwargs is None or _initialized:
    return False
  import jax
  if jax.distributed.is_initialized():
    _initialized = True
    return False
  # CPU processes need a cross-process collectives backend (the default one is in-process only); it affects
  # only the CPU client, so GPU/TPU runs are unchanged.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  _initialized = True
  return True


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a device collective); a no-op in a single process.
  `name` must be the same on every process and unique among the barriers a run passes."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def primary_first(make, name: str):
  """`make()` on process 0 first, then, past a barrier, on every process, returning its result. For idempotent
  writers (the demo corpora): one process writes, the others only find the finished output."""
  import jax
  if jax.process_count() > 1 and jax.process_index() == 0:
    make()
  barrier(name)
  return make()
