"""The evaluation engine: every query against every database video, batched, jitted and spread over the mesh.

The original scores one (query, target, 2048-frame chunk) at a time in a Python loop. Here:

* queries are read once, tiled to min_len, grouped by padded length (a few buckets), indexed once and kept on
  the devices;
* database videos are cut into the original's 2048-frame chunks (a final chunk of 1-3 frames, which crashes
  the original, is folded into the chunk before it), each chunk is assigned to a length bucket, and a bucket's
  chunks are scored in blocks of B targets: one jitted call per (query group, block) computes the f2f maps,
  the comparator and the temporal reduction for all nq x B pairs at once, with the block sharded over the
  mesh's data axis;
* padding is exact: prefix lengths mask the f2f map, every conv and pool output, and the per-pair top-k
  (hapvr_jax.model), so a padded pair scores exactly as the unpadded pair does;
* features are streamed from the HDF5 file by a reader thread a few blocks ahead: memory stays bounded by
  the block sizes, whatever the size of the database;
* a video's score is the mean of its chunk scores, as in the original.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Optional, Sequence

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from common_jax import mesh as mesh_lib
from hapvr_jax.features import FeatureFile
from hapvr_jax.model import ModelConfig, SimilarityNetwork

PRECISIONS = {'highest': lax.Precision.HIGHEST, 'default': lax.Precision.DEFAULT}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  chunk_size: int = 2048          # targets longer than this are scored in chunks and averaged (0: never)
  fold_short_tail: bool = True    # a final chunk of < 4 frames joins the previous chunk (the original crashes)
  bucket_ratio: float = 1.25      # consecutive padded lengths grow by at most this factor
  min_bucket: int = 8
  query_block: int = 16           # queries per jitted call
  max_block_targets: int = 256    # targets per jitted call, at most
  memory_budget_mb: int = 1024    # working memory of one jitted call, which sets the targets per block
  precision: str = 'highest'      # matmul/conv precision: 'highest' (float32 parity) or 'default'
  features_only: bool = False     # the original's features_only mode: no comparator CNN
  prefetch_blocks: int = 2

  def __post_init__(self):
    if self.precision not in PRECISIONS:
      raise ValueError(f'engine.precision={self.precision!r}; expected one of {sorted(PRECISIONS)}')
    if self.bucket_ratio <= 1.0:
      raise ValueError(f'engine.bucket_ratio={self.bucket_ratio} must be > 1')


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


@dataclasses.dataclass
class _Group:
  rows: np.ndarray      # indices into the query list
  feats: jax.Array      # [nq_pad, Lq, R, D] indexed, replicated
  lens: jax.Array       # [nq_pad]


class Engine:

  def __init__(self, model_config: ModelConfig, params, mesh, config: EngineConfig = EngineConfig()):
    self.model_config = model_config
    self.config = config
    self.mesh = mesh
    self.n_shards = mesh_lib.batch_size_multiple(mesh)
    self.net = SimilarityNetwork(model_config, precision=PRECISIONS[config.precision])
    self.params = jax.device_put(params, mesh_lib.replicated(mesh))
    self._target_sharding = mesh_lib.batch_sharding(mesh, 0, 4)
    self._len_sharding = mesh_lib.batch_sharding(mesh, 0, 1)
    net, apply_visil = self.net, not config.features_only
    self._index = jax.jit(lambda p, x, n: net.apply({'params': p}, x, n, method=SimilarityNetwork.index_video))
    self._score = jax.jit(
        lambda p, q, ql, t, tl: net.apply({'params': p}, q, t, ql, tl, apply_visil,
                                          method=SimilarityNetwork.calculate_video_similarity),
        out_shardings=NamedSharding(mesh, P(None, *self._len_sharding.spec)))
    self.stats = {}

  # --------------------------------------------------------------------------------------------- queries
  def _pad(self, videos, length):
    r, d = videos[0].shape[1:]
    out = np.zeros((len(videos), length, r, d), np.float32)
    for i, v in enumerate(videos):
      out[i, :len(v)] = v
    return out

  def index_queries(self, videos: Sequence[np.ndarray]) -> list:
    """Groups the queries, indexes each group once; returns the groups (kept on the devices)."""
    c = self.config
    lens = np.array([len(v) for v in videos])
    buckets = bucket_lengths(int(lens.max()), c.bucket_ratio, c.min_bucket)
    order = np.argsort(lens, kind='stable')
    groups = []
    replicated = mesh_lib.replicated(self.mesh)
    # Consecutive runs of the length-sorted queries, each padded to the bucket of its longest member: few
    # groups (few compilations) and little padding, since queries are few and sorted.
    for s in range(0, len(order), c.query_block):
      part = order[s:s + c.query_block]
      length = bucket_of(int(lens[part].max()), buckets)
      n_pad = min(c.query_block, 1 << int(np.ceil(np.log2(len(part)))))
      feats = self._pad([videos[i] for i in part] + [videos[part[0]][:1]] * (n_pad - len(part)), length)
      qlen = np.concatenate([lens[part], np.full(n_pad - len(part), length)]).astype(np.int32)
      x = jax.device_put(feats, replicated)
      ql = jax.device_put(qlen, replicated)
      groups.append(_Group(part, self._index(self.params, x, ql), ql))
    return groups

  # -------------------------------------------------------------------------------------------- database
  def plan(self, lengths: np.ndarray, groups: list) -> list:
    """Blocks of (bucket length, [(video index, start, stop)]) covering every chunk of every video."""
    c = self.config
    items = [(v, s, e) for v, n in enumerate(lengths) for s, e in split_chunks(int(n), c.chunk_size,
                                                                                c.fold_short_tail)]
    if not items:
      return []
    buckets = bucket_lengths(max(e - s for _, s, e in items), c.bucket_ratio, c.min_bucket)
    by_bucket = {}
    for item in items:
      by_bucket.setdefault(bucket_of(item[2] - item[1], buckets), []).append(item)
    q_cells = max(int(g.feats.shape[0]) * int(g.feats.shape[1]) for g in groups)
    r, d = groups[0].feats.shape[2:]
    blocks = []
    for length, its in sorted(by_bucket.items()):
      # Live memory per target: f2f slices over regions, conv activations (32-128 channels at full and pooled
      # resolution) for every query cell, plus the target's own features.
      per_target = 4 * (q_cells * length * (r + 3 * 32) + 3 * length * r * d)
      n = max(1, int(c.memory_budget_mb * 2**20 // per_target))
      n = min(n, c.max_block_targets, len(its))
      n = int(np.ceil(n / self.n_shards) * self.n_shards)
      blocks += [(length, its[s:s + n], n) for s in range(0, len(its), n)]
    return blocks

  def _reader(self, ff: FeatureFile, db_ids, blocks, out: queue.Queue, stop: threading.Event):
    try:
      cache_id, cache = None, None
      for length, its, n in blocks:
        feats, lens = None, np.zeros(n, np.int32)
        for j, (v, s, e) in enumerate(its):
          if cache_id != v:
            cache_id, cache = v, ff.read(db_ids[v])
          if feats is None:
            feats = np.zeros((n, length) + cache.shape[1:], np.float32)
          feats[j, :e - s] = cache[s:e]
          lens[j] = e - s
        lens[len(its):] = length   # padding targets: zero features, discarded afterwards
        while not stop.is_set():
          try:
            out.put((its, feats, lens), timeout=0.5)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      out.put(None)
    except BaseException as e:  # surface reader errors (bad features) in the main thread
      out.put(e)

  def score(self, ff: FeatureFile, query_ids: Sequence[str], db_ids: Sequence[str],
            progress: bool = True) -> np.ndarray:
    """Similarity [len(query_ids), len(db_ids)] (float32), as the original evaluation would compute it."""
    t0 = time.time()
    groups = self.index_queries([ff.read(q) for q in query_ids])
    lengths = ff.lengths(db_ids)
    blocks = self.plan(lengths, groups)
    sums = np.zeros((len(query_ids), len(db_ids)), np.float64)
    counts = np.zeros(len(db_ids), np.int64)
    n_items = sum(len(its) for _, its, _ in blocks)
    bar = None
    if progress:
      from tqdm import tqdm
      bar = tqdm(total=n_items * len(query_ids), unit='pair', unit_scale=True, smoothing=0.05,
                 desc='query x database', dynamic_ncols=True)
    q = queue.Queue(maxsize=max(1, self.config.prefetch_blocks))
    stop = threading.Event()
    reader = threading.Thread(target=self._reader, args=(ff, list(db_ids), blocks, q, stop), daemon=True)
    reader.start()
    t_first = None
    try:
      while True:
        got = q.get()
        if got is None:
          break
        if isinstance(got, BaseException):
          raise got
        its, feats, lens = got
        t = jax.device_put(feats, self._target_sharding)
        tl = jax.device_put(lens, self._len_sharding)
        t = self._index(self.params, t, tl)
        results = [(g, self._score(self.params, g.feats, g.lens, t, tl)) for g in groups]
        video = np.array([v for v, _, _ in its])
        for g, res in results:
          res = np.asarray(res, np.float64)[:len(g.rows), :len(its)]
          np.add.at(sums, (g.rows[:, None], video[None, :]), res)
        np.add.at(counts, video, 1)
        if t_first is None:
          t_first = time.time()
        if bar is not None:
          bar.update(len(its) * len(query_ids))
    finally:
      stop.set()
      if bar is not None:
        bar.close()
    if np.any(counts == 0):
      raise RuntimeError('internal error: some database videos were not scored')
    seconds = time.time() - t0
    self.stats = {'pairs': int(len(query_ids) * len(db_ids)), 'chunk_pairs': int(n_items * len(query_ids)),
                  'blocks': len(blocks), 'seconds': seconds,
                  'pairs_per_second': len(query_ids) * len(db_ids) / max(seconds, 1e-9)}
    return (sums / counts[None, :]).astype(np.float32)
