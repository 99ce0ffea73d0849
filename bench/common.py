"""Timing helpers shared by the benchmarks: medians of repeated runs and the device limits they are compared to.

Every benchmark prints its figures next to a baseline measured in the same run (the PyTorch reference, or
the device's own matmul rate / copy bandwidth timed here), so a ratio never mixes machines or days.
"""
from __future__ import annotations

import os
import time

import numpy as np


def load() -> str:
  """The 1/5/15-minute load average: a busy machine explains a slow figure."""
  return '%.2f %.2f %.2f' % os.getloadavg()


def median_time(run_one, sync=lambda: None, steps: int = 5):
  """(median, min) seconds of `run_one(); sync()` over `steps` runs (warm up before calling)."""
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run_one()
    sync()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), float(np.min(times))


def warm_then_time(name: str, run_one, sync, warmup: int, steps: int):
  """(median, min, load average): `warmup` untimed runs, then `median_time`; the load average just before
  the timing is printed beside `name`, since a busy machine explains a slow figure."""
  for _ in range(warmup):
    run_one()
  sync()
  loadavg = load()
  print(f'  {name} timing, load average {loadavg}')
  return (*median_time(run_one, sync, steps), loadavg)


def stepper(step, state, batch):
  """(run_one, sync) for timing a jitted train step that donates its state: run_one() advances the state
  by one step on `batch`; sync() waits for it."""
  import jax
  holder = {'state': state}

  def run_one():
    holder['state'], holder['metrics'] = step(holder['state'], batch)
  return run_one, lambda: jax.block_until_ready(holder['state'])


def matmul_peak(n: int = 2048, dtype='float32', precision='highest', k: int | None = None) -> float:
  """FLOP/s of an [n, k] x [k, n] jnp.dot (k = n by default) in `dtype` at `precision` (jax.lax.Precision
  name), median of 5."""
  import jax
  import jax.numpy as jnp
  k = k or n
  a = jax.random.normal(jax.random.PRNGKey(0), (n, k), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32).astype(dtype)
  prec = getattr(jax.lax.Precision, precision.upper())
  f = jax.jit(lambda a, b: jnp.dot(a, b, precision=prec))
  f(a, b).block_until_ready()
  return 2 * n * n * k / median_time(lambda: f(a, b).block_until_ready(), steps=5)[0]


def memory_bandwidth(mib: int = 512) -> float:
  """Bytes/s (read + write) of np.copyto on a mib MiB host array, median of 5."""
  src = np.ones(mib * 2 ** 20 // 8)
  dst = np.empty_like(src)
  return 2 * src.nbytes / median_time(lambda: np.copyto(dst, src), steps=5)[0]


def device_bandwidth(mib: int = 512) -> float:
  """Bytes/s (read + write) of an elementwise pass over a mib MiB float32 array on the default JAX device,
  median of 5: the memory roofline of the accelerator (on a CPU, of host memory through XLA)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones(mib * 2 ** 20 // 4, jnp.float32)
  f = jax.jit(lambda x: x * 1.0001)
  f(x).block_until_ready()
  return 2 * x.nbytes / median_time(lambda: f(x).block_until_ready(), steps=5)[0]
