"""The engine's configuration, the shapes it compiles for, and their compilation ahead of use.

`EngineConfig` holds every knob of hapvr_jax.engine. `layout_queries` lays a query set out in chunks and
comparator groups and `plan_blocks` cuts the database into blocks: both plain NumPy, so the shapes a run will
compile are known before anything is traced.

Every jitted call of hapvr_jax.engine has shapes taken from a few ladders, never from the number of queries,
their ids or the database size: padded lengths grow geometrically (bucket_lengths), targets per block and
queries per comparator group come from a short ladder of sizes (block_size). So a new query set, or a search
with another query, mostly reuses compilations (and common_jax.executables keeps them across processes). On
small workloads a compilation costs more than the work it serves, so merge_buckets pads the targets of a small
length bucket to the next one when that extra work is smaller than `merge_cells`. The comparator groups are
as many as coarse length classes would make, but group_queries places their boundaries where the queries'
padding costs the fewest cells.

`Compiler` compiles the engine's calls in a background thread in the order the blocks will need them, so the
compilation of the next shape overlaps the scoring of the current block.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Sequence

import numpy as np
import jax
from jax import lax

from common_jax import executables
from hapvr_jax import similarity as sim_lib

LADDER_RATIO = 1.125   # block and group sizes: 1-8, then growing by this factor (at most 12.5% padding)


def bucket_lengths(max_len: int, ratio: float, min_bucket: int = 8) -> list:
  """Padded lengths: multiples of 4 growing geometrically by `ratio`, up to one >= max_len."""
  out = [int(np.ceil(min_bucket / 4) * 4)]
  while out[-1] < max_len:
    out.append(int(np.ceil(max(out[-1] + 4, out[-1] * ratio) / 4) * 4))
  return out


def bucket_of(n: int, buckets: Sequence[int]) -> int:
  return int(buckets[int(np.searchsorted(buckets, n))])


PRECISIONS = {'highest': lax.Precision.HIGHEST, 'default': lax.Precision.DEFAULT}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  chunk_size: int = 2048          # targets longer than this are scored in chunks and averaged (0: never)
  fold_short_tail: bool = True    # a final chunk of < 4 frames joins the previous chunk (the original crashes)
  bucket_ratio: float = 1.25      # consecutive padded lengths grow by at most this factor
  min_bucket: int = 8
  query_block: int = 16           # queries per comparator group (queries of similar padded length)
  query_bucket_ratio: float = 1.5  # length classes whose count bounds the comparator groups (coarser: fewer
                                   # groups to compile); the groups are then placed to pad the least
  max_query_rows: int = 16384     # query frames per jitted call (more queries: several calls per block)
  query_rows_ratio: float = 1.05  # query frames per call are padded to this geometric ladder (compiled
                                  # shapes then do not follow the number of queries)
  columns_ratio: float = 1.02     # target frames per block are padded to this finer ladder: one count per
                                  # (bucket, block size) of a database, so it adds no compilation to a run,
                                  # and the frame-to-frame products, most of the FLOPs, run on these columns
  merge_cells: float = 2**17      # a length bucket whose padding to the next costs fewer (query frame,
                                  # target frame) cells joins it: a fraction of one bucket's compilations on
                                  # a CPU, so that runs with a warm compilation cache lose little to padding
  max_block_targets: int = 256    # targets per jitted call, at most
  memory_budget_mb: int = 1024    # working memory of one jitted call, which sets the targets per block
  precision: str = 'highest'      # matmul/conv precision: 'highest' (float32 parity) or 'default' (TF32/bf16
                                  # passes on GPUs and TPUs)
  dtype: str = 'float32'          # compute dtype of the network: 'float32' or 'bfloat16' (accuracy cost:
                                  # bench/hapvr_eval.py --dtype=bfloat16; docs/performance.md)
  features_only: bool = False     # the original's features_only mode: no comparator CNN
  indexed_targets: bool = False   # the database features arrive already through the network's index_video
                                  # in float32 (a search index's cached attention): not indexed again
  prefetch_blocks: int = 2

  def __post_init__(self):
    if self.dtype not in ('float32', 'bfloat16'):
      raise ValueError(f'engine.dtype={self.dtype!r}; expected float32 or bfloat16')
    if self.precision not in PRECISIONS:
      raise ValueError(f'engine.precision={self.precision!r}; expected one of {sorted(PRECISIONS)}')
    ratios = ('bucket_ratio', 'query_bucket_ratio', 'query_rows_ratio', 'columns_ratio')
    if min(getattr(self, name) for name in ratios) <= 1.0:
      raise ValueError(', '.join(f'engine.{name}={getattr(self, name)}' for name in ratios) + ' must be > 1')


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


def group_queries(lens: np.ndarray, max_groups: int, block: int, padded) -> list:
  """[(start, stop)]: contiguous groups of the length-sorted query lengths `lens`, at most `block` queries and
  at most `max_groups` groups, that compute the fewest comparator cells: a group costs the ladder size of its
  count times padded(its longest length). Dynamic programming over (queries covered, groups used), vectorised
  over the first; of equal costs the one with fewer groups."""
  n = len(lens)
  longest = np.array([padded(int(x)) for x in lens], np.float64)   # a group ending at query j-1 pads to this
  size = [0] + [ladder(k)[-1] for k in range(1, block + 1)]
  cost = np.full(n + 1, np.inf)
  cost[0] = 0.
  choices, totals = [], []
  for _ in range(max_groups):
    new, take = np.full(n + 1, np.inf), np.zeros(n + 1, np.int64)
    for k in range(1, min(block, n) + 1):   # the last group: queries j-k .. j-1
      cand = cost[:n + 1 - k] + size[k] * longest[k - 1:]
      better = cand < new[k:]
      new[k:] = np.where(better, cand, new[k:])
      take[k:] = np.where(better, k, take[k:])
    cost = new
    choices.append(take)
    totals.append(cost[n])
  g = int(np.argmin(totals))   # the first of the minima: the fewest groups
  out, j = [], n
  for take in choices[g::-1]:
    out.append((j - int(take[j]), j))
    j -= int(take[j])
  return out[::-1]


def layout_queries(lens: np.ndarray, config) -> list:
  """The query layout of EngineConfig `config` for query lengths `lens`: per chunk of the length-sorted queries
  (at most max_query_rows frames), (query positions, frame offsets, padded rows, comparator groups, output
  rows), where a group is (gather [n, Lq] into the chunk's frames, n_rows for padding; lengths [n]; real
  queries) with n a ladder size and Lq its longest query's length on the query_rows_ratio ladder.

  The groups are as many as the query_bucket_ratio length classes would make (query_block queries at most in
  each, which bounds the comparator programs a block compiles), placed where they pad the least."""
  c = config
  order = np.argsort(lens, kind='stable')
  classes = bucket_lengths(int(lens.max()), c.query_bucket_ratio, c.min_bucket)
  rows_ladder = bucket_lengths(int(lens.max()), c.query_rows_ratio, c.min_bucket)
  parts, part, rows_in_part = [], [], 0
  for i in order:   # consecutive runs of the length-sorted queries, at most max_query_rows frames each
    if part and rows_in_part + lens[i] > c.max_query_rows:
      parts.append(part)
      part, rows_in_part = [], 0
    part.append(i)
    rows_in_part += lens[i]
  parts.append(part)
  out = []
  for part in parts:
    offsets = np.concatenate([[0], np.cumsum(lens[part])])
    n_rows = bucket_of(int(offsets[-1]), bucket_lengths(int(offsets[-1]), c.query_rows_ratio))
    per_class = np.unique([bucket_of(int(lens[i]), classes) for i in part], return_counts=True)[1]
    max_groups = int(sum(-(-per_class // c.query_block)))
    groups, rows = [], []
    for start, stop in group_queries(lens[part], max_groups, c.query_block,
                                     lambda x: bucket_of(x, rows_ladder)):
      length = bucket_of(int(lens[part[stop - 1]]), rows_ladder)
      n = ladder(stop - start)[-1]   # the smallest ladder size holding the group
      gather = np.full((n, length), n_rows, np.int32)     # the zero row by default
      q_len = np.full(n, length, np.int32)                # padding queries: discarded rows
      for g, k in enumerate(range(start, stop)):
        gather[g, :lens[part[k]]] = np.arange(offsets[k], offsets[k + 1])
        q_len[g] = lens[part[k]]
      groups.append((gather, q_len, stop - start))
      rows += [part[k] for k in range(start, stop)]
    out.append((part, offsets, n_rows, groups, rows))
  return out


def plan_blocks(lengths: np.ndarray, q_rows: int, query_frames: int, region_dims: tuple, config,
                shards: int) -> tuple:
  """(blocks [(bucket length, [(video index, start, stop)], block size)] covering every target chunk,
  {(length, block size): columns per shard}) for database `lengths` against query chunks of at most `q_rows`
  rows and `query_frames` real frames in all, region features `region_dims` = (R, D)."""
  c = config
  items = [(v, s, e) for v, n in enumerate(lengths) for s, e in split_chunks(int(n), c.chunk_size,
                                                                              c.fold_short_tail)]
  if not items:
    return [], {}
  buckets = bucket_lengths(max(e - s for _, s, e in items), c.bucket_ratio, c.min_bucket)
  by_bucket = {}
  for item in items:
    by_bucket.setdefault(bucket_of(item[2] - item[1], buckets), []).append(item)
  r, d = region_dims
  # A padded target frame costs its f2f cells and its indexing (the attention's [D, D] product on each of
  # its R regions: about D / R cells' worth) unless the targets arrive indexed.
  indexing = 0 if c.indexed_targets else d / r
  by_bucket = merge_buckets(by_bucket, query_frames + indexing, c.merge_cells)
  live_regions = r * r if sim_lib.query_slices(q_rows, r) == 1 else r
  blocks, cols = [], {}
  for length, its in sorted(by_bucket.items()):
    # Live memory per target: the region products of a slice of query frames (all regions of the
    # query frames at once for short query sets: sim_lib.query_slices), the comparator's activations (32
    # channels at full resolution, more at lower ones; padded query rows included with a 2x margin) and
    # the target's own features.
    per_target = 4 * (q_rows * length * (live_regions + 2 + 2 * 32) + 3 * length * r * d)
    cap = min(max(1, int(c.memory_budget_mb * 2**20 // per_target)), c.max_block_targets)
    n = block_size(len(its), cap, shards)
    blocks += [(length, its[s:s + n], n) for s in range(0, len(its), n)]
    # the columns of a shard's targets laid end to end, one count per (length, n) from a ladder: shapes
    # compiled once per bucket, as many as with padded targets
    per = n // shards
    most = max(sum(e - s for _, s, e in its[i:i + per]) for i in range(0, len(its), per))
    cols[length, n] = bucket_of(most, bucket_lengths(most, c.columns_ratio))
  return blocks, cols


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
