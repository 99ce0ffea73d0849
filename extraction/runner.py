"""The extraction driver shared by `hapvr_jax.extract` and `avhash_jax.extract`.

  videos = read_video_list(list_path, video_dir)           # (id, path) pairs; errors name file:line
  videos = select_shard(videos, num_shards, shard_index)    # host k of n takes every n-th video
  stats = run(videos, decode, compute, write, done=writer.done, ...)

`run` decodes videos on a thread pool (PyAV releases the GIL while decoding), a bounded number ahead of the
accelerator, and hands each decoded video to `compute` (the jitted backbones, see `PackedRunner`) and then to
`write`, in list order. A video whose decoding or computation fails (`VideoError`, bad frames, any exception
raised for that video) is recorded in the failure log and the run goes on; the failures are summarised at the
end and written as JSON lines. A SIGTERM/SIGINT stops after the video in flight, and a full disk
(`feature_writer.NoSpace`) stops the run with one error: what was written stays resumable (`feature_writer`).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
import tqdm
from absl import flags, logging

from common_jax import io_util
from extraction import feature_writer

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.webm', '.mov', '.flv', '.mpg', '.mpeg', '.m4v', '.wmv', '.3gp')


class ListError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Video:
  video_id: str
  path: str


def read_video_list(list_path: str = '', video_dir: str = '', keep_extension: bool = False) -> List[Video]:
  """Videos from a list file (lines `path` or `id<TAB or space>path`; `#` comments; relative paths are relative
  to the list's folder) or from every video file in `video_dir`. Ids are file names without the extension
  unless `keep_extension` (SVD's ids are `<name>.mp4`)."""
  if bool(list_path) == bool(video_dir):
    raise ListError('give exactly one of --videos (a list file) and --video_dir')
  name = (lambda p: os.path.basename(p)) if keep_extension else (lambda p: os.path.splitext(os.path.basename(p))[0])
  out = []
  if video_dir:
    if not os.path.isdir(video_dir):
      raise ListError(f'{video_dir}: --video_dir is not a folder')
    files = sorted(f for f in os.listdir(video_dir) if f.lower().endswith(VIDEO_EXTENSIONS))
    if not files:
      raise ListError(f'{video_dir}: no video files ({", ".join(VIDEO_EXTENSIONS)})')
    out = [Video(name(f), os.path.join(video_dir, f)) for f in files]
  else:
    if not os.path.isfile(list_path):
      raise ListError(f'{list_path}: video list not found')
    base = os.path.dirname(os.path.abspath(list_path))
    with open(list_path) as f:
      for n, line in enumerate(f, 1):
        line = line.strip()
        if not line or line.startswith('#'):
          continue
        parts = line.split('\t') if '\t' in line else line.split(None, 1)
        if len(parts) > 2 or not all(p.strip() for p in parts):
          raise ListError(f'{list_path}:{n}: expected "path" or "id<TAB>path", got {line!r}')
        path = os.path.join(base, parts[-1].strip())
        out.append(Video(parts[0].strip() if len(parts) == 2 else name(path), path))
    if not out:
      raise ListError(f'{list_path}: the list holds no videos')
  seen = {}
  for v in out:
    if v.video_id in seen:
      raise ListError(f'video id {v.video_id!r} appears twice ({seen[v.video_id]} and {v.path})')
    if '/' in v.video_id or v.video_id in ('.', '..'):
      raise ListError(f'video id {v.video_id!r} cannot be an HDF5 key')
    seen[v.video_id] = v.path
  return out


def select_shard(videos: Sequence[Video], num_shards: int, shard_index: int) -> List[Video]:
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ListError(f'--shard_index={shard_index} must be in [0, --num_shards={num_shards})')
  return list(videos[shard_index::num_shards])


def shard_path(path: str, num_shards: int, shard_index: int) -> str:
  """`feats.h5` -> `feats-00001-of-00004.h5` when the collection is split over several hosts."""
  if num_shards == 1:
    return path
  root, ext = os.path.splitext(path)
  return f'{root}-{shard_index:05d}-of-{num_shards:05d}{ext}'


class FailureLog:
  """Per-video failures of one run: logged as they happen, summarised and written (atomically) at the end."""

  def __init__(self, path: str):
    self.path, self.failures = path, []

  def add(self, video: Video, error: BaseException) -> None:
    reason = getattr(error, 'reason', type(error).__name__)
    self.failures.append({'id': video.video_id, 'path': video.path, 'reason': reason, 'error': str(error)})
    logging.warning('skipped %s (%s): %s', video.video_id, reason, error)

  def summary(self) -> str:
    if not self.failures:
      return 'no failures'
    counts = collections.Counter(f['reason'] for f in self.failures)
    return f'{len(self.failures)} failed (' + ', '.join(f'{r}: {n}' for r, n in counts.most_common()) + ')'

  def write(self) -> None:
    if self.failures:
      with io_util.atomic_open(self.path, 'w') as f:
        f.write(''.join(json.dumps(x) + '\n' for x in self.failures))
    elif os.path.exists(self.path):
      os.remove(self.path)   # left by an earlier run whose failures have now been extracted


class BatchError(Exception):
  """The batch function raised on a packed batch. `keys`: every video with rows in the failed batch(es), dropped
  from the runner (a rerun redoes them); `completed`: the videos finished before or after it in the same call,
  still to be written; `cause`: the first exception."""

  def __init__(self, keys, cause: BaseException, completed=()):
    super().__init__(f'a packed batch of {len(keys)} video(s) failed: {type(cause).__name__}: {cause}')
    self.keys, self.cause, self.completed = list(keys), cause, list(completed)


class PackedRunner:
  """Runs a jitted batch function over the frames of many videos, packed into fixed-size batches.

  `fn(x)` maps a batch [B, ...] to an array or a tuple of arrays with leading dimension B. Frames of several
  videos share a batch (no padding per video); only the final flush pads. One shape, one compilation. If `fn`
  raises, every video with rows in that batch is dropped and named in a BatchError; the others go on.
  """

  def __init__(self, fn: Callable, batch_size: int):
    self.fn, self.batch_size = fn, batch_size
    self._queue = collections.deque()   # (key, array, first row not yet sent)
    self._pending = {}                  # key -> [n rows, list of output chunks, rows received]
    self.batches = self.padded_rows = 0

  def add(self, key, x: np.ndarray) -> list:
    """Queues one video's rows; returns the videos completed so far as (key, outputs)."""
    if len(x) == 0:
      raise ValueError(f'{key}: no frames to run')
    self._pending[key] = [len(x), [], 0]
    self._queue.append([key, x, 0])
    return self._drain(full_only=True)

  def flush(self) -> list:
    return self._drain(full_only=False)

  def _drain(self, full_only: bool) -> list:
    done, failed, cause = [], [], None
    while self._queue and (not full_only or sum(len(a) - s for _, a, s in self._queue) >= self.batch_size):
      try:
        done += self._run_batch()
      except BatchError as e:
        failed += e.keys
        cause = cause or e.cause
    if failed:
      raise BatchError(failed, cause, done)
    return done

  def _run_batch(self) -> list:
    parts, owners, need = [], [], self.batch_size
    while need and self._queue:
      item = self._queue[0]
      key, x, start = item
      take = min(need, len(x) - start)
      parts.append(x[start:start + take])
      owners.append((key, take))
      item[2] += take
      need -= take
      if item[2] == len(x):
        self._queue.popleft()
    batch = np.concatenate(parts)
    if need:
      self.padded_rows += need
      batch = np.concatenate([batch, np.zeros((need,) + batch.shape[1:], batch.dtype)])
    try:
      outs = self.fn(batch)
      single = not isinstance(outs, tuple)
      outs = tuple(np.asarray(o) for o in ((outs,) if single else outs))
    except Exception as e:  # pylint: disable=broad-except  (reported per video by the caller)
      keys = list(dict.fromkeys(key for key, _ in owners))
      for key in keys:
        del self._pending[key]
      self._queue = collections.deque(item for item in self._queue if item[0] not in keys)
      raise BatchError(keys, e) from e
    self.batches += 1
    done, row = [], 0
    for key, take in owners:
      entry = self._pending[key]
      entry[1].append(tuple(o[row:row + take] for o in outs))
      entry[2] += take
      row += take
      if entry[2] == entry[0]:
        chunks = entry[1]
        result = tuple(np.concatenate([c[i] for c in chunks]) for i in range(len(outs)))
        done.append((key, result[0] if single else result))
        del self._pending[key]
    return done


def run(videos: Sequence[Video], decode: Callable, compute: Callable, write: Callable, flush: Callable = lambda: (),
        done: Iterable[str] = (), failures: Optional[FailureLog] = None, workers: int = 4, stop=None,
        desc: str = 'videos') -> dict:
  """Extracts every video not in `done`:

    decode(video) -> item                      on `workers` threads, a bounded number ahead, in list order
    compute(video, item) -> [(video, out)]     this thread: queue the video's frames, return completed videos
    write(video, out)                          this thread: store one completed video
    flush() -> [(video, out)]                  at the end (and on a stop): the videos still queued

  An exception in decode/compute is recorded against that video, one in write against the video written, and a
  BatchError from compute/flush against every video it names (its completed videos are still written); the
  run goes on. Returns counts and timing."""
  done = set(done)
  todo = [v for v in videos if v.video_id not in done]
  stats = {'videos': len(videos), 'skipped_done': len(videos) - len(todo), 'extracted': 0, 'failed': 0,
           'stopped': False}
  failures = failures or FailureLog(os.devnull)
  start = time.time()
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
      tqdm.tqdm(total=len(todo), desc=desc, unit='video', dynamic_ncols=True) as bar:

    def fail(video, e):
      failures.add(video, e)
      stats['failed'] += 1
      bar.update(1)
      bar.set_postfix(failed=stats['failed'], refresh=False)

    def store(completed):
      for video, out in completed:
        try:
          write(video, out)
          stats['extracted'] += 1
          bar.update(1)
        except feature_writer.NoSpace:   # every later video would fail the same way
          raise
        except Exception as e:  # pylint: disable=broad-except  (one bad video must not stop the collection)
          fail(video, e)

    def batch_failed(e):
      for video in e.keys:
        fail(video, e.cause)
      return e.completed

    ahead, it = collections.deque(), iter(todo)

    def submit():
      video = next(it, None)
      if video is not None:
        ahead.append((video, pool.submit(decode, video)))

    for _ in range(2 * max(1, workers)):
      submit()
    while ahead:
      if stop is not None and stop.requested(sync=False):
        stats['stopped'] = True
        for _, fut in ahead:
          fut.cancel()
        break
      video, fut = ahead.popleft()
      submit()
      try:
        completed = compute(video, fut.result())
      except BatchError as e:
        completed = batch_failed(e)
      except Exception as e:  # pylint: disable=broad-except
        fail(video, e)
        continue
      store(completed)
    try:
      store(flush())
    except BatchError as e:
      store(batch_failed(e))
  stats['seconds'] = round(time.time() - start, 3)
  stats['videos_per_s'] = round(stats['extracted'] / max(stats['seconds'], 1e-9), 3)
  return stats


def frames_or_error(video: Video, frames: np.ndarray, what: str = 'frames') -> np.ndarray:
  """Checks a decoded frame array: non-empty uint8 [T, H, W, 3]."""
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
    raise ValueError(f'{video.path}: decoded {what} have shape {frames.shape} {frames.dtype}, expected '
                     'non-empty uint8 [T, H, W, 3]')
  return frames


# ------------------------------------------------------------------------------- shared CLI pieces

def require_positive(fv: flags.FlagValues, name: str) -> None:
  """A float flag must be finite and > 0: absl's lower_bound is inclusive and lets nan through."""
  flags.register_validator(name, lambda x: x is not None and math.isfinite(x) and x > 0,
                           message='must be a positive number', flag_values=fv)


def define_flags(fv: flags.FlagValues) -> None:
  """The flags every extraction CLI has: the video collection, the host split, decoding threads, --strict."""
  flags.DEFINE_string('videos', '', 'list file: "path" or "id<TAB>path" per line', flag_values=fv)
  flags.DEFINE_string('video_dir', '', 'or: every video file in this folder', flag_values=fv)
  flags.DEFINE_bool('keep_extension', False, 'ids keep the file extension (SVD)', flag_values=fv)
  flags.DEFINE_integer('workers', 4, 'decoding threads', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('num_shards', None, 'hosts sharing the collection (default: the JAX process count)',
                       flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('shard_index', None, 'this host (default: the JAX process index)', flag_values=fv,
                       lower_bound=0)
  flags.DEFINE_bool('strict', False, 'exit 1 if any video failed', flag_values=fv)


def program_main(program_flags, extract, argv, doc: str) -> int:
  """The `main` of an extraction program: its flags (`program_flags(fv)`) parsed by `cli.parse_flags`, then
  `extract(args)` under the one-clear-error policy; returns extract's exit code."""
  from common_jax import cli
  args = cli.parse_flags(program_flags, argv, doc)
  with cli.clear_errors():
    return extract(args)


def backbone_identity(backbone) -> str:
  """A backbone's architecture and a sha1 of its config and weights: recorded with the features it made."""
  import jax
  h = hashlib.sha1(json.dumps(backbone.config.to_dict(), sort_keys=True).encode('utf-8'))
  for path, leaf in jax.tree_util.tree_leaves_with_path(backbone.params):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}'.encode('utf-8'))
    h.update(a.tobytes())
  return f'{backbone.arch}, sha1 {h.hexdigest()[:16]}'


def this_host(args):
  """(this host's videos, num_shards, shard_index), after joining a multi-process launch if there is one."""
  import jax
  from common_jax import distributed
  distributed.maybe_initialize()   # multi-process launches only; sets the default host split
  num_shards = args.num_shards or jax.process_count()
  shard_index = jax.process_index() if args.shard_index is None else args.shard_index
  videos = read_video_list(args.videos, args.video_dir, args.keep_extension)
  return select_shard(videos, num_shards, shard_index), num_shards, shard_index


def run_resumable(videos, writer, failures: FailureLog, decode, compute, write, flush, workers: int, desc: str):
  """`run` under a SIGTERM/SIGINT handler; writes the failure log. Returns the stats, or None after a stop
  (the writer is then closed with its partial files kept, and the message says how to resume)."""
  from common_jax import preemption
  stop = preemption.StopSignal()
  try:
    stats = run(videos, decode, compute, write, flush, done=writer.done, failures=failures, workers=workers,
                stop=stop, desc=desc)
  except feature_writer.NoSpace:
    writer.close()   # the committed videos stay in the .partial files; failed ones are retried by the rerun
    raise
  finally:
    stop.restore()
  failures.write()
  if stats['stopped']:
    writer.close()
    print(f'stopped by {stop.signal_name}: {stats["extracted"]} videos written, rerun the command to resume')
    return None
  return stats
