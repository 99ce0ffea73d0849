"""The evaluation engine: every query against every database video, batched, jitted and spread over the mesh.

The original scores one (query, target, 2048-frame chunk) at a time in a Python loop. Here:

* queries are read once, tiled to min_len, laid end to end (frames of all queries in one array, so the
  frame-to-frame similarity, most of the FLOPs, wastes little on query padding), indexed once and kept on
  the devices; for the comparator, queries of similar length are gathered into padded groups;
* database videos are cut into the original's 2048-frame chunks (a final chunk of 1-3 frames, which crashes
  the original, is folded into the chunk before it), each chunk is assigned to a length bucket, and a bucket's
  chunks are scored in blocks of B targets, sharded over the mesh's data axis: one jitted call per (query
  chunk, block) indexes the targets, computes the f2f maps of all query frames against the block's target
  frames laid end to end (no FLOPs on padding frames), gathers them into padded maps, and runs the comparator
  and the temporal reduction of every comparator group;
* compiled shapes come from a few ladders (hapvr_jax.engine_shapes), never from the number of queries or
  their ids; small workloads merge their length buckets; the next shapes compile while a block is scored, and
  a warm run loads them without tracing (common_jax.executables);
* padding is exact: prefix lengths mask the f2f map, the pooled comparator maps and the per-pair top-k
  (hapvr_jax.model), so a padded pair scores exactly as the unpadded pair does;
* features are streamed from the HDF5 file by a reader thread a few blocks ahead: memory stays bounded by
  the block sizes, whatever the size of the database;
* a video's score is the mean of its chunk scores, as in the original;
* at scale (hapvr_jax.engine_state): the partial sums are saved as the run goes and a rerun resumes them
  exactly; several processes score interleaved blocks on their own devices and add their sums at the end.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np
import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from common_jax import executables, faults, mesh as mesh_lib
from hapvr_jax import engine_state as state_lib
from hapvr_jax.engine_shapes import (PRECISIONS, Compiler, EngineConfig, block_size, bucket_lengths,  # noqa: F401
                                     bucket_of, ladder, layout_queries, merge_buckets, plan_blocks,
                                     split_chunks, struct)
from hapvr_jax import similarity as sim_lib
from hapvr_jax.features import FeatureFile
from hapvr_jax.model import ModelConfig, SimilarityNetwork

TRACED_MODULES = ('hapvr_jax.engine', 'hapvr_jax.model', 'hapvr_jax.similarity', 'common_jax.mesh')


@dataclasses.dataclass
class _QueryChunk:
  rows: np.ndarray      # positions in the query list of this chunk's output rows
  flat: jax.Array       # [n_rows + 1, R, D]: the chunk's queries, frames end to end, indexed; zero padded
  groups: list          # [(gather index [n, Lq] into flat's rows, query lengths [n])]: comparator groups
  frames: int           # real query frames (the rest of flat is padding)


class Engine:

  def __init__(self, model_config: ModelConfig, params, mesh, config: EngineConfig = EngineConfig()):
    self.model_config = model_config
    self.config = config
    self.mesh = mesh
    self.n_shards = mesh_lib.batch_size_multiple(mesh)
    dtype = jnp.dtype(config.dtype)
    self.net = SimilarityNetwork(model_config, dtype=dtype, precision=PRECISIONS[config.precision])
    self.params = jax.device_put(params, mesh_lib.replicated(mesh))
    self._replicated = mesh_lib.replicated(mesh)
    self._target_sharding = mesh_lib.batch_sharding(mesh, 0, 4)
    self._len_sharding = mesh_lib.batch_sharding(mesh, 0, 1)
    # rank-3 arrays split on their first axis: the column indices [S, B / S, Lt] and the f2f maps [B, rows, Lt]
    self._column_sharding = self._f2f_sharding = mesh_lib.batch_sharding(mesh, 0, 3)
    self._out_sharding = NamedSharding(mesh, P(None, *self._len_sharding.spec))
    net, apply_visil = self.net, not config.features_only
    call = lambda p, *a, method: net.apply({'params': p}, *a, method=method)
    self._index = jax.jit(lambda p, x, n: call(p, x.astype(dtype), n, method=SimilarityNetwork.index_video),
                          out_shardings=self._replicated)

    def f2f(p, flat, t, frames, columns):   # [B, rows, Lt]: every query frame of the chunk x every target's
      # t [S, C, R, D]: each shard's targets end to end (no padding to the bucket length in the f2f matmul, most
      # of the FLOPs), `frames` of them real; columns [S, B / S, Lt]: each target's frames, C for padding
      if config.indexed_targets:   # frames past `frames` are masked out of the map by frame_to_frame
        t = t.astype(dtype)
      else:
        t = call(p, t.astype(dtype), frames, method=SimilarityNetwork.index_video)
      m = call(p, flat[None], t, None, frames, method=SimilarityNetwork.frame_to_frame)[0]   # [S, rows, C]
      m = jnp.pad(m, ((0, 0), (0, 0), (0, 1)))                 # column C: zeros, for the padding frames
      m = jax.vmap(lambda x, cols: x[:, cols])(m, columns)     # [S, rows, B / S, Lt]
      rows, lt = m.shape[1], m.shape[3]
      m = jnp.moveaxis(m, 2, 1).reshape(-1, rows, lt)          # [B, rows, Lt]
      return call(p, m, method=SimilarityNetwork.comparator_input)

    def group(p, f2f, gather, q_len, t_len):   # one comparator group's scores [n, B]
      m = jnp.transpose(f2f[:, gather], (1, 0, 2, 3))        # [n, B, Lq, Lt]
      if not apply_visil:
        return call(p, m, q_len[:, None], t_len[None, :], method=SimilarityNetwork.video_to_video)
      c, rows, cols = call(p, m, q_len, t_len, method=SimilarityNetwork.compare)
      return call(p, sim_lib.hardtanh(c), rows, cols, method=SimilarityNetwork.video_to_video)

    def block(p, flat, t, frames, columns, t_len, groups):   # [scores [n, B] of each comparator group]
      m = jax.lax.with_sharding_constraint(f2f(p, flat, t, frames, columns), self._f2f_sharding)
      return [group(p, m, gather, q_len, t_len) for gather, q_len in groups]

    # one executable per (query chunk, block shape): a warm run loads, and a cold one compiles, a few
    self._block = jax.jit(block, out_shardings=self._out_sharding)
    # a change to the traced code or to a configuration changes every executable's key
    self._compiler = Compiler(executables.source_fingerprint(TRACED_MODULES) +
                              repr((model_config, config, flax.__version__)))
    self.stats = {}

  def set_params(self, params) -> None:
    """New parameters of the same architecture (e.g. during training); compiled scorers are reused."""
    self.params = jax.device_put(params, mesh_lib.replicated(self.mesh))

  # --------------------------------------------------------------------------------------------- queries
  def index_queries(self, videos: Sequence[np.ndarray]) -> list:
    """Lays the queries out in chunks (frames end to end, padded to the rows ladder), indexes them once and
    forms the comparator groups (queries of one padded length, a ladder size of them)."""
    lens = np.array([len(v) for v in videos])
    out = []
    for part, offsets, n_rows, groups_np, rows in layout_queries(lens, self.config):
      r, d = videos[part[0]].shape[1:]
      flat = np.zeros((n_rows + 1, r, d), np.float32)   # the last row stays zero: gathered for padding
      for k, i in enumerate(part):
        flat[offsets[k]:offsets[k + 1]] = videos[i]
      groups = [(jax.device_put(gather, self._replicated), jax.device_put(q_len, self._replicated), used)
                for gather, q_len, used in groups_np]
      x = jax.device_put(flat[None], self._replicated)
      n_frames = jax.device_put(np.array([offsets[-1]], np.int32), self._replicated)
      key = ('index', x.shape)
      if key not in self._compiler:
        self._compiler.submit(key, self._index, self.params, x, n_frames)
      flat_indexed = self._compiler.get(key)(self.params, x, n_frames)[0]
      flat_indexed = jax.device_put(flat_indexed, self._replicated)   # the sharding its scorers expect
      out.append(_QueryChunk(np.array(rows), flat_indexed, groups, int(offsets[-1])))
    return out

  # -------------------------------------------------------------------------------------------- database
  def plan(self, lengths: np.ndarray, chunks: list) -> list:
    """Blocks of (bucket length, [(video index, start, stop)], block size) covering every target chunk."""
    blocks, self._cols = plan_blocks(lengths, max(int(ch.flat.shape[0]) for ch in chunks),
                                     sum(ch.frames for ch in chunks), chunks[0].flat.shape[1:], self.config,
                                     self.n_shards)
    return blocks

  def _columns(self, length: int, n: int) -> int:
    return self._cols[length, n]

  def _compile_ahead(self, chunks, blocks) -> None:
    """Queues the compilation of every (query chunk, block shape) call in the order the blocks use them."""
    r, d = chunks[0].flat.shape[1:]
    s = self.n_shards
    for length, _, n in blocks:
      t = struct(jax.ShapeDtypeStruct((s, self._columns(length, n), r, d), np.float32), self._target_sharding)
      frames = struct(jax.ShapeDtypeStruct((s,), np.int32), self._len_sharding)
      columns = struct(jax.ShapeDtypeStruct((s, n // s, length), np.int32), self._column_sharding)
      tl = struct(jax.ShapeDtypeStruct((n,), np.int32), self._len_sharding)
      for ch in chunks:
        key = self._block_key(ch, n, length, t.shape[1])
        if key not in self._compiler:
          groups = tuple((struct(gather), struct(q_len)) for gather, q_len, _ in ch.groups)
          self._compiler.submit(key, self._block, self.params, struct(ch.flat), t, frames, columns, tl, groups)

  @staticmethod
  def _block_key(ch, n: int, length: int, cols: int) -> tuple:
    return ('block', ch.flat.shape, n, length, cols) + tuple(gather.shape for gather, _, _ in ch.groups)

  def score(self, ff: FeatureFile, query_ids: Sequence[str], db_ids: Sequence[str], progress: bool = True, *,
            state_dir: Optional[str] = None, save_every_s: float = 60.0, stop: Optional[Callable[[], bool]] = None,
            process_index: Optional[int] = None, process_count: Optional[int] = None,
            combine: Optional[Callable] = None, log_every_s: float = 30.0) -> np.ndarray:
    """Similarity [len(query_ids), len(db_ids)] (float32), as the original evaluation would compute it.

    state_dir: keep resumable partial results there (hapvr_jax.engine_state); a rerun with the same inputs
      skips the finished blocks and returns exactly what an uninterrupted run returns.
    stop: polled after every block; when it returns True the partial results are saved and
      engine_state.Stopped is raised.
    process_index / process_count / combine: this process scores blocks b % process_count == process_index
      (default: jax's process index and count; the mesh must hold only this process's devices), then
      `combine(sums, counts)` returns the sums and counts of all processes (default: an all-gather, or nothing
      on one process). Tests pass them to run the processes one after another in one interpreter.
    """
    t0 = time.time()
    k = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if jax.process_count() > 1 and any(d.process_index != jax.process_index() for d in self.mesh.devices.flat):
      raise ValueError('with several processes the engine scores its own blocks on a mesh of its own devices: '
                       'build it with mesh_lib.make_mesh(spec, devices=jax.local_devices())')
    if combine is None:
      combine = state_lib.allgather_sum if n > 1 else (lambda s, c: (s, c))
    chunks = self.index_queries([ff.read(q) for q in query_ids])
    lengths = ff.lengths(db_ids)
    blocks = self.plan(lengths, chunks)
    sums = np.zeros((len(query_ids), len(db_ids)), np.float64)
    counts = np.zeros(len(db_ids), np.int64)
    done, partial, restored = set(), None, None
    if state_dir:
      partial, restored = state_lib.open_partial(state_dir, k, n, self, ff, query_ids, db_ids, blocks)
    if restored is not None:
      sums, counts, done = restored
    mine = [b for b in range(len(blocks)) if b % n == k]
    todo = [b for b in mine if b not in done]
    waited = self._compiler.waited
    if todo:
      self._compile_ahead(chunks, [blocks[b] for b in todo])
    pairs_of = lambda bs: sum(len(blocks[b][1]) for b in bs) * len(query_ids)
    bar = state_lib.Progress(pairs_of(mine), pairs_of(mine) - pairs_of(todo), progress,
                             'query x database' + (f' [process {k}/{n}]' if n > 1 else ''), log_every_s)
    q = queue.Queue(maxsize=max(1, self.config.prefetch_blocks))
    halt = threading.Event()
    reader = threading.Thread(target=state_lib.read_blocks, daemon=True,
                              args=(ff, list(db_ids), [blocks[b] for b in todo], q, halt, self.n_shards,
                                    self._columns))
    reader.start()
    try:
      for b in todo:
        got = q.get()
        if isinstance(got, BaseException):   # nothing half-added: the sums so far are worth keeping
          if partial is not None:
            partial.save(sums, counts, done)
          raise got
        self._add_block(chunks, *got, sums, counts)
        done.add(b)
        faults.point('evaluate.block_scored')   # scored, not yet saved
        bar.update(len(got[0]) * len(query_ids))
        if stop is not None and stop():
          if partial is not None:
            partial.save(sums, counts, done)
          raise state_lib.Stopped(f'stopped after {bar.done:,} of {bar.total:,} pairs' +
                                  (f'; partial results saved in {state_dir}' if partial is not None else ''))
        if partial is not None and time.time() - partial.saved_at >= save_every_s:
          partial.save(sums, counts, done)
    finally:
      halt.set()
      self._compiler.cancel_pending()
      bar.close()
    if partial is not None:
      partial.save(sums, counts, done)
    rate = bar.rate()
    sums, counts = combine(sums, counts)
    expected = [len(split_chunks(int(x), self.config.chunk_size, self.config.fold_short_tail)) for x in lengths]
    if not np.array_equal(counts, expected):
      raise RuntimeError('internal error: database chunks were scored 0 or several times (with several '
                         'processes: do all of them have the same number of local devices?)')
    seconds = time.time() - t0
    n_items = sum(len(its) for _, its, _ in blocks)
    scored = pairs_of(todo) / max(pairs_of(mine), 1)   # this session's share of the work (resumed: less)
    self.stats = {'pairs': int(len(query_ids) * len(db_ids)), 'chunk_pairs': int(n_items * len(query_ids)),
                  'blocks': len(blocks), 'blocks_resumed': len(mine) - len(todo), 'blocks_scored': len(todo),
                  'processes': n, 'seconds': seconds, 'compile_wait_seconds': self._compiler.waited - waited,
                  'chunk_pairs_per_second_this_process': rate,
                  'pairs_per_second': scored * len(query_ids) * len(db_ids) / max(seconds, 1e-9)}
    return (sums / counts[None, :]).astype(np.float32)

  def _add_block(self, chunks, its, feats, frames, columns, lens, sums, counts) -> None:
    """Scores one block against every query chunk and adds it to the float64 sums (always in plan order)."""
    t = jax.device_put(feats, self._target_sharding)
    frames = jax.device_put(frames, self._len_sharding)
    cols = jax.device_put(columns, self._column_sharding)
    tl = jax.device_put(lens, self._len_sharding)
    n, length = len(lens), columns.shape[2]
    results = []
    for ch in chunks:
      run = self._compiler.get(self._block_key(ch, n, length, feats.shape[1]))
      outs = run(self.params, ch.flat, t, frames, cols, tl, tuple((g, q) for g, q, _ in ch.groups))
      start = 0
      for (_, _, used), res in zip(ch.groups, outs):
        results.append((ch.rows[start:start + used], res, used))
        start += used
    video = np.array([v for v, _, _ in its])
    host = [(rows, np.asarray(res, np.float64)[:used, :len(its)]) for rows, res, used in results]
    for rows, res in host:   # all fetched before adding
      np.add.at(sums, (rows[:, None], video[None, :]), res)
    np.add.at(counts, video, 1)
