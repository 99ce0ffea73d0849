"""The shapes the evaluation engine compiles for, and their compilation ahead of use.

Every jitted call of hapvr_jax.engine has shapes taken from a few ladders, never from the number of queries,
their ids or the database size: padded lengths grow geometrically (bucket_lengths), targets per block and
queries per comparator group come from a short ladder of sizes (block_size). So a new query set, or a search
with another query, mostly reuses compilations (and common_jax.executables keeps them across processes). On small workloads a compilation costs more than the work it serves, so merge_buckets pads the
targets of a small length bucket to the next one when that extra work is smaller than `merge_cells`.

`Compiler` compiles the engine's calls in a background thread in the order the blocks will need them, so the
compilation of the next shape overlaps the scoring of the current block.
"""
from __future__ import annotations

import concurrent.futures
import time
from typing import Sequence

import numpy as np
import jax

from common_jax import executables

LADDER_RATIO = 1.125   # block and group sizes: 1-8, then growing by this factor (at most 12.5% padding)


def bucket_lengths(max_len: int, ratio: float, min_bucket: int = 8) -> list:
  """Padded lengths: multiples of 4 growing geometrically by `ratio`, up to one >= max_len."""
  out = [int(np.ceil(min_bucket / 4) * 4)]
  while out[-1] < max_len:
    out.append(int(np.ceil(max(out[-1] + 4, out[-1] * ratio) / 4) * 4))
  return out


def bucket_of(n: int, buckets: Sequence[int]) -> int:
  return int(buckets[int(np.searchsorted(buckets, n))])


def split_chunks(n: int, chunk_size: int, fold_short_tail: bool = True) -> list:
  """[(start, stop)] of the original's target chunking (utils.batching over frames)."""
  if chunk_size <= 0 or n <= chunk_size:
    return [(0, n)]
  chunks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
  if fold_short_tail and chunks[-1][1] - chunks[-1][0] < 4:
    chunks[-2:] = [(chunks[-2][0], n)]
  return chunks


def ladder(limit: int) -> list:
  """The sizes 1..8, then each the previous times LADDER_RATIO rounded up, to the first one >= limit."""
  out = list(range(1, 9))
  while out[-1] < limit:
    out.append(int(np.ceil(out[-1] * LADDER_RATIO)))
  return out[:int(np.searchsorted(out, limit)) + 1]


def block_size(items: int, cap: int, multiple: int = 1) -> int:
  """Targets per block for `items` chunks of one bucket: `multiple` (the mesh's shards) times a ladder size,
  at most cap (or `multiple`), the one with the fewest padded slots counting each block as 2 more (a call's
  overhead): 75 items under a cap of 64 make two blocks of 40, not 64 + 64."""
  fits = [s * multiple for s in ladder(max(items, cap, 1)) if s * multiple <= cap] or [multiple]
  cost = lambda n: -(-items // n) * (n + 2)
  return min(fits[::-1], key=cost)


def merge_buckets(by_bucket: dict, query_frames: int, merge_cells: float) -> dict:
  """{padded length: items} with small buckets padded to the next longer one, shortest first, while the
  (query frame, target frame) cells it adds are fewer than `merge_cells` (about one compilation's time)."""
  lengths = sorted(by_bucket)
  out, carry = {}, []
  for i, length in enumerate(lengths):
    items = carry + by_bucket[length]
    if i + 1 < len(lengths) and len(items) * (lengths[i + 1] - length) * query_frames < merge_cells:
      carry = items
    else:
      out[length], carry = items, []
  return out


class Compiler:
  """Compiles jitted functions for given argument shapes in one background thread, in submission order.

  submit(key, fn, *args): args may be ShapeDtypeStructs (with their shardings); get(key) waits for the
  executable. `waited` is the time the caller spent waiting for compilations. Executables come from
  common_jax.executables (no tracing on a warm run) under `fingerprint`, which must change whenever the
  traced code or its configuration does."""

  def __init__(self, fingerprint: str = ''):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='engine-compile')
    self._jobs = {}
    self.waited = 0.0
    self.fingerprint = fingerprint

  def submit(self, key, fn, *args) -> None:
    name = f'hapvr_jax.engine.{key[0]}/{len(key)}'
    if self.fingerprint:
      self._jobs[key] = self._pool.submit(executables.compiled, fn, args, name, self.fingerprint)
    else:
      self._jobs[key] = self._pool.submit(lambda: fn.lower(*args).compile())

  def __contains__(self, key) -> bool:
    return key in self._jobs

  def get(self, key):
    t0 = time.perf_counter()
    out = self._jobs[key].result()
    self.waited += time.perf_counter() - t0
    return out

  def cancel_pending(self) -> None:
    """Drops the compilations not yet started (a run that ends early must not wait for them at exit)."""
    for key, job in list(self._jobs.items()):
      if job.cancel():
        del self._jobs[key]


def struct(x, sharding=None) -> jax.ShapeDtypeStruct:
  """The abstract value of an array (or of a shape-dtype pair) with the given sharding."""
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else
                              getattr(x, 'sharding', None))
