"""The database pass of hapvr_jax.engine at scale: resumable partial sums, several processes, progress.

A FIVR-200K run is hours of work, so it must survive being killed. The engine's plan is deterministic (the
same inputs and device count give the same numbered blocks), and each block adds its float64 scores into
running sums; so the state of a run is just (sums, counts, finished block ids). `PartialFile` writes that
atomically every `save_every_s` seconds, at the end and on a stop request; a rerun restores it, skips the
finished blocks (they are not even read from HDF5) and adds the remaining ones in the same order, which gives
bit-identical results. The file carries a fingerprint of everything the sums depend on (query and database
ids, model and engine config, a hash of the parameters, the content of the feature file, the block plan); a
partial from other inputs is refused with a ValueError naming what changed, never silently mixed in nor
silently dropped (a stale partial usually means a wrong command line, and the user should decide). The feature
file is identified by content, not by name and size (a file rewritten in place keeps both): every video's id,
shape, dtype and first, middle and last frame, 3 frame reads a video (FeatureFile.content_digest).

Several processes (multi-host) split the plan round-robin (block b goes to process b % n), each on a mesh of
its own devices with its own partial file `partial-<k>-of-<n>.npz`, and their sums are added at the end. The
sum is exact in practice: a video's few chunk scores are float32 values, whose float64 sums do not round.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import queue
import re
import threading
import time

import numpy as np
import jax
from absl import logging

from common_jax import faults, io_util

FORMAT = 2   # 2: features identified by content


class Stopped(Exception):
  """score() was asked to stop (SIGTERM/SIGINT): the partial results are saved and rerunning resumes."""


def _digest(items) -> str:
  h = hashlib.sha1()
  for x in items:
    h.update(str(x).encode('utf-8') + b'\0')
  return h.hexdigest()[:16]


def params_digest(params) -> str:
  """sha1 over every parameter's path, dtype, shape and bytes (host copies; params are small)."""
  h = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(params)):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}'.encode('utf-8'))
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def fingerprint(*, query_ids, db_ids, model_config: dict, engine_config: dict, params, features_digest: str,
                plan) -> dict:
  """What the partial sums depend on, as short readable strings (they are shown when they differ)."""
  engine = {k: v for k, v in engine_config.items() if k != 'prefetch_blocks'}   # speed only, not results
  return {
      'format': str(FORMAT),
      'queries': f'{len(query_ids)} ids, sha1 {_digest(query_ids)}',
      'database': f'{len(db_ids)} ids, sha1 {_digest(db_ids)}',
      'model_config': json.dumps(model_config, sort_keys=True),
      'engine_config': json.dumps(engine, sort_keys=True),
      'params': f'sha1 {params_digest(params)}',
      'features': f'sha1 {features_digest} (ids, shapes, dtypes, first/middle/last frames)',
      'plan': f'{len(plan)} blocks, sha1 {_digest((length, n, its) for length, its, n in plan)}',
  }


class PartialFile:
  """One process's partial results: `<state_dir>/partial-<k>-of-<n>.npz`."""

  def __init__(self, state_dir: str, process_index: int, process_count: int, fp: dict):
    self.dir, self.fp = state_dir, fp
    self.path = os.path.join(state_dir, f'partial-{process_index}-of-{process_count}.npz')
    others = sorted({int(m.group(1)) for f in glob.glob(os.path.join(state_dir, 'partial-*-of-*.npz'))
                     if (m := re.search(r'-of-(\d+)\.npz$', f)) and int(m.group(1)) != process_count})
    if others:
      raise ValueError(f'{state_dir} holds partial results of a run on {others[0]} process(es), this run has '
                       f'{process_count}: rerun on {others[0]} process(es) to resume, or delete {state_dir} '
                       'to start over')
    self.saved_at = time.time()

  def load(self, n_queries: int, n_db: int):
    """(sums, counts, finished block ids) of an earlier run with the same fingerprint, or None."""
    if not os.path.exists(self.path):
      return None
    try:
      with np.load(self.path, allow_pickle=False) as z:
        old = json.loads(str(z['fingerprint']))
        cols, part, done = z['cols'], z['sums'], z['done']
        counts = z['counts']
    except Exception as e:  # pylint: disable=broad-except  (any unreadable file: one clear line)
      raise ValueError(f'{self.path}: unreadable partial results ({e}); delete {self.dir} to start over') from e
    changed = [f'{k}: was {old.get(k)!r}, now {self.fp.get(k)!r}' for k in sorted(set(old) | set(self.fp))
               if old.get(k) != self.fp.get(k)]
    if changed:
      raise ValueError(f'{self.path}: these partial results were computed with other inputs ({"; ".join(changed)})'
                       f'; rerun with the original inputs to resume, or delete {self.dir} to start over')
    sums = np.zeros((n_queries, n_db), np.float64)
    sums[:, cols] = part
    full_counts = np.zeros(n_db, np.int64)
    full_counts[cols] = counts
    return sums, full_counts, set(int(b) for b in done)

  def save(self, sums: np.ndarray, counts: np.ndarray, done) -> None:
    """Atomic: a kill during the write leaves the previous partial file. Only touched columns are stored."""
    cols = np.flatnonzero(counts)
    with io_util.atomic_open(self.path, 'wb') as f:
      np.savez(f, fingerprint=np.array(json.dumps(self.fp, sort_keys=True)), cols=cols, sums=sums[:, cols],
               counts=counts[cols], done=np.array(sorted(done), np.int64))
    self.saved_at = time.time()
    faults.point('evaluate.partial_saved')


def open_partial(state_dir: str, process_index: int, process_count: int, engine, ff, query_ids, db_ids, plan):
  """(this process's PartialFile, what it restores: (sums, counts, finished block ids) or None)."""
  fp = fingerprint(query_ids=list(query_ids), db_ids=list(db_ids), model_config=engine.model_config.to_dict(),
                   engine_config=dataclasses.asdict(engine.config), params=engine.params,
                   features_digest=ff.content_digest(list(query_ids) + list(db_ids)), plan=plan)
  partial = PartialFile(state_dir, process_index, process_count, fp)
  return partial, partial.load(len(query_ids), len(db_ids))


def allgather_sum(sums: np.ndarray, counts: np.ndarray):
  """The sums and counts of every process, added (in process order): each process gets the same result.

  The arrays travel as uint32 words, since JAX (without x64) would round float64 to float32 on the way.
  """
  from jax.experimental import multihost_utils

  def gather(x):
    x = np.ascontiguousarray(x)
    words = np.asarray(multihost_utils.process_allgather(x.view(np.uint32)))
    return words.view(x.dtype).reshape((-1,) + x.shape).sum(axis=0)
  return gather(sums), gather(counts)


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """An uninitialised array whose data starts on an `align`-byte boundary: a CPU device then uses it in place
  (a block is never written after it is handed over) where an unaligned one is copied, a memory pass per block."""
  size = int(np.prod(shape)) * np.dtype(dtype).itemsize
  buf = np.empty(size + align, np.uint8)
  start = -buf.ctypes.data % align
  return buf[start:start + size].view(dtype).reshape(shape)


def block_layout(its, n: int, length: int, shards: int, cols: int):
  """Where the targets of a block go: (shard, first column) of each, frames end to end within a shard, the
  shard of target j being j // (n / shards); and the [shards, n / shards, length] column of each of their
  frames (`cols`, past the end, for padding: the engine's f2f gives it a zero column)."""
  per = n // shards
  gather = np.full((shards, per, length), cols, np.int32)
  frames = np.zeros(shards, np.int32)
  place = []
  for j, (_, s, e) in enumerate(its):
    k = j // per
    place.append((k, int(frames[k])))
    gather[k, j % per, :e - s] = np.arange(frames[k], frames[k] + e - s)
    frames[k] += e - s
  if frames.max(initial=0) > cols:
    raise ValueError(f'internal error: a shard of {frames.max()} target frames exceeds its {cols} columns')
  return place, gather, frames


def read_blocks(ff, db_ids, blocks, out: queue.Queue, stop: threading.Event, shards: int, cols):
  """The reader thread, a few blocks ahead: each block's targets laid end to end per shard, [shards, C, R, D]
  with C = cols(length, n), with their frame counts, column indices (block_layout) and lengths."""
  try:
    cache_id, cache = None, None
    for length, its, n in blocks:
      c = cols(length, n)
      place, gather, frames = block_layout(its, n, length, shards, c)
      feats, lens = None, np.zeros(n, np.int32)
      for j, (v, s, e) in enumerate(its):
        if cache_id != v:
          cache_id, cache = v, ff.read(db_ids[v])
        if feats is None:
          feats = aligned_empty((shards, c) + cache.shape[1:], np.float32)
        k, start = place[j]
        feats[k, start:start + e - s] = cache[s:e]
        lens[j] = e - s
      for k, used in enumerate(frames):   # only the padding columns are zeroed: a memory pass less a block
        feats[k, used:] = 0
      lens[len(its):] = length   # padding targets: zero columns, discarded afterwards
      while not stop.is_set():
        try:
          out.put((its, feats, frames, gather, lens), timeout=0.5)
          break
        except queue.Full:
          continue
      if stop.is_set():
        return
    out.put(None)
  except BaseException as e:  # surface reader errors (bad features) in the main thread
    out.put(e)


class Progress:
  """A tqdm bar over (query, target chunk) pairs, starting at the resumed pairs, and a log line every
  `log_every_s` seconds (pairs done / total, pairs/s, ETA) for runs whose stderr is a log file."""

  def __init__(self, total: int, initial: int, bar: bool, desc: str, log_every_s: float = 30.0):
    self.total, self.done, self.start_done = total, initial, initial
    self.t0 = self.t_log = time.time()
    self.log_every_s, self.desc = log_every_s, desc
    self.bar = None
    if bar:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit='pair', unit_scale=True, smoothing=0.05, desc=desc,
                      dynamic_ncols=True)
    if initial:
      logging.info('%s: resuming at %d / %d pairs', desc, initial, total)

  def rate(self) -> float:
    return (self.done - self.start_done) / max(time.time() - self.t0, 1e-9)

  def update(self, n: int) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
    if time.time() - self.t_log >= self.log_every_s:
      self.t_log = time.time()
      rate = self.rate()
      eta = (self.total - self.done) / rate if rate > 0 else float('inf')
      logging.info('%s: %d / %d pairs (%.1f%%), %.0f pairs/s, ETA %s', self.desc, self.done, self.total,
                   100 * self.done / max(self.total, 1), rate, _duration(eta))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  s = int(round(seconds))
  return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'
