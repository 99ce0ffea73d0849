"""The two stages of coarse-to-fine search as the bench runs them: coarse indexes of candidate descriptors (FAISS),
and a scorer of one query against a shortlist with shapes that do not change from query to query.

Coarse candidates (each gives every database video a score for a query):
  pooled_regions  hapvr_jax.coarse.describe: regions averaged and normalised per frame, frames averaged and
                  normalised; one 512-d vector per video in an exact IndexFlatIP (no training).
  frame_knn       the VSC 2022 descriptor-track way: the per-frame vectors of every database video in one
                  IndexFlatIP; each query frame's k nearest frames vote for their videos (a video scores the sum
                  over query frames of its best retrieved frame); unvoted videos follow by pooled_regions.

The scorer computes what the engine computes for a pair (index_video, the frame-to-frame map, the comparator
and the temporal reduction of SimilarityNetwork, padded lengths masked) for one query against blocks of 64 or
16 shortlisted targets of one padded length: a handful of compiled shapes serve every query (the engine,
built for a fixed query set against a whole database, compiles per query set). Targets travel as float16
(as an index stores them) and are cast on the device.
"""
from __future__ import annotations

import time

import faiss
import jax
import jax.numpy as jnp
import numpy as np

from jax import lax

from hapvr_jax import coarse
from hapvr_jax import similarity as sim_lib
from hapvr_jax.engine import bucket_lengths, bucket_of
from hapvr_jax.model import SimilarityNetwork


def load_all(ff, ids):
  """{position: float16 [T, R, D]} of the database (tiled to min_len as the engine reads them)."""
  return {j: ff.read(v).astype(np.float16) for j, v in enumerate(ids)}


class CoarseIndex:

  def __init__(self, method: str, videos: dict, k: int = 64):
    if method not in ('pooled_regions', 'frame_knn'):
      raise ValueError(f'unknown coarse descriptor {method!r}')
    self.method, self.k, self.n = method, k, len(videos)
    desc = np.stack([coarse.describe(videos[j]) for j in range(self.n)])
    self.pooled = faiss.IndexFlatIP(desc.shape[1])
    self.pooled.add(desc)
    if method == 'frame_knn':
      frames = [coarse.frame_descriptors(videos[j]) for j in range(self.n)]
      self.owner = np.concatenate([np.full(len(f), j) for j, f in enumerate(frames)])
      self.frames = faiss.IndexFlatIP(desc.shape[1])
      self.frames.add(np.concatenate(frames))

  def scores(self, x) -> np.ndarray:
    """Coarse score of every database video for the query features x [T, R, D] (higher is closer)."""
    _, order = self.pooled.search(coarse.describe(x)[None], self.n)
    out = np.empty(self.n, np.float64)
    out[order[0]] = -np.arange(self.n) / self.n   # pooled order, in (-1, 0]
    if self.method == 'frame_knn':
      sims, idx = self.frames.search(coarse.frame_descriptors(x), self.k)
      best = np.zeros((len(sims), self.n))
      np.maximum.at(best, (np.arange(len(sims))[:, None], self.owner[idx]), np.maximum(sims, 0))
      votes = best.sum(0)
      out = np.where(votes > 0, 1 + votes, out)
    return out

  def search(self, x, n: int) -> np.ndarray:
    """The n database positions with the highest coarse score."""
    s = self.scores(x)
    top = np.argpartition(-s, n - 1)[:n] if n < self.n else np.arange(self.n)
    return top[np.argsort(-s[top], kind='stable')]

  def rank_all(self, queries):
    """(full coarse order per query [Q, N], seconds for all the searches)."""
    t0 = time.perf_counter()
    ranks = np.stack([self.search(x, self.n) for x in queries])
    return ranks, time.perf_counter() - t0


def _f2f_one_pass(q, t, k):
  """Non-symmetric (TopK)Chamfer f2f of ONE query q [1, Tq, R, D] against t [B, Tt, R, D] as one matmul of all
  query regions (what hapvr_jax.similarity.frame_to_frame does for short query sets, written out here)."""
  _, tq, r, d = q.shape
  b, tt = t.shape[:2]
  s = jnp.matmul(q.reshape(tq * r, d), t.reshape(b * tt * r, d).T, precision=lax.Precision.HIGHEST)
  s = s.reshape(tq, r, b, tt, r)
  red = sim_lib.max_last(s) if k == 1 else jnp.mean(lax.top_k(s, k)[0], axis=-1)
  return jnp.transpose(red.mean(axis=1), (1, 0, 2))[None]   # [1, B, Tq, Tt]


class Scorer:

  def __init__(self, model_config, params, max_target_len: int, max_query_len: int, regions: int = 9,
               features_only: bool = False, blocks=(16, 64), ratio: float = 1.5):
    self.blocks, self.params = tuple(sorted(blocks)), jax.device_put(params)
    self.shape = (regions, model_config.dims)
    self.t_buckets = bucket_lengths(max_target_len, ratio)
    self.q_buckets = bucket_lengths(max_query_len, ratio)
    net, c = SimilarityNetwork(model_config), model_config
    one_pass = c.f2f_sim_module in ('Chamfer', 'TopKChamfer') and not c.symmetric

    def fn(p, q, ql, t, tl):
      call = lambda *a, method: net.apply({'params': p}, *a, method=method)
      q = call(q.astype(jnp.float32), ql, method=SimilarityNetwork.index_video)
      t = call(t.astype(jnp.float32), tl, method=SimilarityNetwork.index_video)
      if not one_pass:
        return call(q, t, ql, tl, not features_only, method=SimilarityNetwork.calculate_video_similarity)[0]
      k = 1 if c.f2f_sim_module == 'Chamfer' else sim_lib.topk_size(q.shape[2], c.f_topk_rate)
      f2f = _f2f_one_pass(q, t, k)
      ok = (jnp.arange(q.shape[1]) < ql[0])[:, None] & (jnp.arange(t.shape[1])[None, :] < tl[:, None, None])
      f2f = call(jnp.where(ok[None], f2f, 0.), method=SimilarityNetwork.comparator_input)
      if features_only:
        return call(f2f, ql[:, None], tl[None, :], method=SimilarityNetwork.video_to_video)[0]
      out, rows, cols = call(f2f, ql, tl, method=SimilarityNetwork.compare)
      return call(sim_lib.hardtanh(out), rows, cols, method=SimilarityNetwork.video_to_video)[0]
    self.fn = jax.jit(fn)

  def warm_up(self) -> float:
    """Compiles every (query bucket, target bucket, block) shape; returns the seconds it took."""
    t0 = time.perf_counter()
    for lq in self.q_buckets:
      for lt in self.t_buckets:
        for b in self.blocks:
          q = np.zeros((1, lq, *self.shape), np.float16)
          t = np.zeros((b, lt, *self.shape), np.float16)
          jax.block_until_ready(self.fn(self.params, q, np.array([lq], np.int32), t, np.full(b, lt, np.int32)))
    return time.perf_counter() - t0

  def score(self, query, targets) -> np.ndarray:
    """Scores [len(targets)] of the query features [T, R, D] against each target [T', R, D]."""
    lq = bucket_of(len(query), self.q_buckets)
    q = np.zeros((1, lq, *self.shape), np.float16)
    q[0, :len(query)] = query
    ql = np.array([len(query)], np.int32)
    order = np.argsort([len(t) for t in targets], kind='stable')
    out = np.empty(len(targets), np.float32)
    pending, s = [], 0
    while s < len(order):   # large blocks while they fill, then small ones
      b = next((b for b in self.blocks[::-1] if b <= len(order) - s), self.blocks[0])
      part, s = order[s:s + b], s + b
      lt = bucket_of(max(len(targets[i]) for i in part), self.t_buckets)
      t = np.zeros((b, lt, *self.shape), np.float16)
      tl = np.ones(b, np.int32)   # padding slots: one zero frame, score discarded
      for k, i in enumerate(part):
        t[k, :len(targets[i])], tl[k] = targets[i], len(targets[i])
      pending.append((part, self.fn(self.params, q, ql, t, tl)))   # dispatched asynchronously
    for part, res in pending:
      out[part] = np.asarray(res)[:len(part)]
    return out
