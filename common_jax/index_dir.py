"""Index directories: a searchable collection of per-video arrays that survives a kill at any moment.

Layout of an index directory:

  manifest.json      format, format version, kind ('hapvr', 'avhash') and the config that fixes what the
                     stored arrays mean (backbone, feature dims, ...); another kind or config is refused
  log.jsonl          the commit log: one JSON line per committed change, {"op": "add", "segment": FILE,
                     "ids": [...], "meta": [...]} or {"op": "remove", "ids": [...]}; replaying it gives the
                     live videos. A line is committed once it ends with a newline (a torn last line from a
                     kill is ignored and cut off by the next commit)
  segments/*.h5      immutable HDF5 files of per-video arrays, written under a temporary name and renamed
                     before the log names them (a segment the log does not name is left-over work of a
                     killed run, deleted by the next writer)
  derived files      e.g. a FAISS index (common_jax.float_index), rebuilt from the segments; they record the log length they were built
                     from, so a stale one is rebuilt, never trusted

A later add of an id replaces the earlier one; a remove hides it. The live ids are kept sorted, so any two ways
of reaching the same content (one build, an interrupted build resumed, batches added later, several hosts'
parts merged) give the same rows in the same order.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from common_jax import faults, io_util
from common_jax.float_index import FloatIndex  # noqa: F401  (the FAISS index of an index directory)

FORMAT = 'jax-vr-index'
FORMAT_VERSION = 1
MANIFEST, LOG, SEGMENTS = 'manifest.json', 'log.jsonl', 'segments'


class IndexDirError(ValueError):
  """Bad input about an index directory: one clear line naming the file and what is wrong."""


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      out = json.load(f)
  except FileNotFoundError:
    raise
  except (OSError, ValueError) as e:
    raise IndexDirError(f'{path}: corrupt ({e}); rebuild the index or restore this file') from None
  if not isinstance(out, dict):
    raise IndexDirError(f'{path}: corrupt (not a JSON object)')
  return out


def config_differences(want: Mapping, have: Mapping) -> list:
  """'key: index has A, given B' for every key whose values differ."""
  keys = sorted(set(want) | set(have))
  return [f'{k}: index has {have.get(k)!r}, given {want.get(k)!r}' for k in keys if want.get(k) != have.get(k)]


def _write_segment(path: str, rows: Sequence[Mapping]) -> None:
  """An HDF5 file of `{name}/{row}` datasets, under a temporary name renamed when complete."""
  tmp = f'{path}.{uuid.uuid4().hex[:8]}.tmp'
  try:
    with h5py.File(tmp, 'w') as h5:
      for row, arrays in enumerate(rows):
        for key, value in arrays.items():
          h5.create_dataset(f'{key}/{row}', data=value)
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    io_util.remove_if_exists(tmp)
    raise


class IndexDir:
  """One index directory. `IndexDir.create` makes a new one (or opens an existing compatible one),
  `IndexDir.open` opens an existing one; both check the manifest."""

  def __init__(self, path: str, manifest: dict):
    self.path = path
    self.manifest = manifest
    self._handles: dict = {}
    self._load_log()

  # --------------------------------------------------------------------------------------- opening
  @classmethod
  def create(cls, path: str, kind: str, config: Mapping) -> 'IndexDir':
    """A new empty index at `path`, or the existing one there if its kind and config match."""
    if os.path.exists(os.path.join(path, MANIFEST)):
      return cls.open(path, kind, config)
    if os.path.exists(path) and not os.path.isdir(path):
      raise IndexDirError(f'{path}: exists and is not a directory')
    if os.path.isdir(path) and os.listdir(path):
      raise IndexDirError(f'{path}: not an index (no {MANIFEST}) and not empty; give a new or empty folder')
    os.makedirs(os.path.join(path, SEGMENTS), exist_ok=True)
    manifest = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'kind': kind, 'config': dict(config)}
    io_util.write_json(os.path.join(path, MANIFEST), manifest)
    return cls(path, manifest)

  @classmethod
  def open(cls, path: str, kind: str | None = None, config: Mapping | None = None) -> 'IndexDir':
    """The index at `path`; an error naming the manifest if it is missing, corrupt, of another format
    version or kind, or built with another config (each differing key named)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
      raise IndexDirError(f'{path}: index not found')
    try:
      manifest = _read_json(mpath)
    except FileNotFoundError:
      raise IndexDirError(f'{path}: not an index ({MANIFEST} missing)') from None
    if manifest.get('format') != FORMAT or not isinstance(manifest.get('config'), dict):
      raise IndexDirError(f'{mpath}: corrupt (not a {FORMAT} manifest)')
    if manifest.get('format_version') != FORMAT_VERSION:
      raise IndexDirError(f'{mpath}: format version {manifest.get("format_version")!r}; this program reads '
                          f'version {FORMAT_VERSION}: rebuild the index')
    if kind is not None and manifest.get('kind') != kind:
      raise IndexDirError(f'{path}: a {manifest.get("kind")!r} index, not a {kind!r} one')
    if config is not None and (diff := config_differences(dict(config), manifest['config'])):
      raise IndexDirError(f'{path}: built with other settings ({"; ".join(diff)})')
    return cls(path, manifest)

  @property
  def kind(self) -> str:
    return self.manifest['kind']

  @property
  def config(self) -> dict:
    return self.manifest['config']

  # ------------------------------------------------------------------------------------------- state
  def _load_log(self) -> None:
    """Replays the commit log: id -> (segment, row, meta) of the live videos."""
    self._where: dict = {}
    self._entries, self._committed_bytes = 0, 0
    path = os.path.join(self.path, LOG)
    if not os.path.exists(path):
      return
    with open(path, 'rb') as f:
      data = f.read()
    end = data.rfind(b'\n') + 1   # past the last complete line: anything after it is a torn write
    for n, line in enumerate(data[:end].splitlines(), 1):
      try:
        entry = json.loads(line)
        self._apply(entry)
      except (ValueError, KeyError, TypeError) as e:
        raise IndexDirError(f'{path}: line {n} is corrupt ({e}); rebuild the index') from None
      self._entries += 1
    self._committed_bytes = end

  def _apply(self, entry: dict) -> None:
    if entry['op'] == 'add':
      for row, (vid, meta) in enumerate(zip(entry['ids'], entry['meta'], strict=True)):
        self._where[vid] = (entry['segment'], row, meta)
    elif entry['op'] == 'remove':
      for vid in entry['ids']:
        self._where.pop(vid, None)
    else:
      raise ValueError(f'unknown op {entry["op"]!r}')

  @property
  def version(self) -> int:
    """Committed log entries: derived files built at another version are stale."""
    return self._entries

  def ids(self) -> list:
    return sorted(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, video_id) -> bool:
    return video_id in self._where

  def meta(self, video_id: str) -> dict:
    return dict(self._where[self._check_id(video_id)][2])

  def _check_id(self, video_id: str) -> str:
    if video_id not in self._where:
      raise IndexDirError(f'{self.path}: video id {video_id!r} is not in the index ({len(self)} videos)')
    return video_id

  # ------------------------------------------------------------------------------------------ reading
  def _segment(self, name: str) -> h5py.File:
    if name not in self._handles:
      if len(self._handles) >= 64:   # bounded file handles for collections of many segments
        self._handles.pop(next(iter(self._handles))).close()
      path = os.path.join(self.path, SEGMENTS, name)
      try:
        self._handles[name] = h5py.File(path, 'r')
      except OSError as e:
        raise IndexDirError(f'{path}: missing or corrupt segment ({e}); rebuild the index') from None
    return self._handles[name]

  def read(self, video_id: str, name: str) -> np.ndarray:
    """The stored array `name` of one video, as stored (e.g. float16 features)."""
    segment, row, _ = self._where[self._check_id(video_id)]
    try:   # h5py's low-level calls: half the time of dataset[()] per read, which a search makes per video
      ds = h5py.h5d.open(self._segment(segment).id, f'{name}/{row}'.encode())
      out = np.empty(ds.shape, ds.dtype)
      if out.size:
        ds.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
      return out
    except (KeyError, OSError) as e:
      raise IndexDirError(f'{os.path.join(self.path, SEGMENTS, segment)}: cannot read {name!r} of video '
                          f'{video_id!r} ({e}); rebuild the index') from None

  def shape(self, video_id: str, name: str) -> tuple:
    segment, row, _ = self._where[self._check_id(video_id)]
    return tuple(self._segment(segment)[f'{name}/{row}'].shape)

  def stack(self, name: str, ids: Sequence[str]) -> np.ndarray:
    """One fixed-size array per video, stacked in the order of `ids`."""
    return np.stack([self.read(v, name) for v in ids]) if ids else np.zeros((0,), np.float32)

  def close(self) -> None:
    for h in self._handles.values():
      h.close()
    self._handles.clear()

  # ------------------------------------------------------------------------------------------ writing
  @contextlib.contextmanager
  def _writing(self):
    """One writer at a time (a lock file); the log reread so that this writer sees every commit."""
    with open(os.path.join(self.path, '.lock'), 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      self._load_log()
      yield
      self._load_log()

  def _commit(self, entry: dict) -> None:
    """Appends one log line (a torn line left by a kill is cut off first); committed once fsynced."""
    path = os.path.join(self.path, LOG)
    with open(path, 'ab') as f:
      f.truncate(self._committed_bytes)
      f.write(json.dumps(entry, sort_keys=True).encode() + b'\n')
      f.flush()
      os.fsync(f.fileno())

  def add(self, items: Iterable[tuple]) -> int:
    """Adds (video id, {name: array}, meta dict) items as one segment and one commit; returns the count.
    A kill before the commit leaves the index as it was."""
    items = list(items)
    if not items:
      return 0
    ids = [vid for vid, _, _ in items]
    if len(set(ids)) != len(ids):
      raise IndexDirError(f'{self.path}: duplicate video ids in one batch')
    with self._writing():
      self._remove_orphans()
      name = f'seg-{self._entries:06d}-{uuid.uuid4().hex[:8]}.h5'
      path = os.path.join(self.path, SEGMENTS, name)
      _write_segment(path, [arrays for _, arrays, _ in items])
      faults.point('index_dir.segment_written')   # written, not yet committed: an orphan
      self._commit({'op': 'add', 'segment': name, 'ids': ids, 'meta': [dict(m) for _, _, m in items]})
    faults.point('index_dir.committed')
    return len(items)

  def remove(self, ids: Iterable[str]) -> int:
    """Hides `ids` (each must be in the index: an unknown id is an error and nothing changes)."""
    ids = list(dict.fromkeys(ids))
    with self._writing():
      for vid in ids:
        self._check_id(vid)
      if ids:
        self._commit({'op': 'remove', 'ids': ids})
    return len(ids)

  def merge(self, other: 'IndexDir') -> int:
    """Adds every live video of `other` (an index of the same kind and config, e.g. another host's part)
    that this index lacks: a merge killed half-way resumes when run again."""
    if other.kind != self.kind or (diff := config_differences(other.config, self.config)):
      raise IndexDirError(f'{other.path}: cannot be merged into {self.path} (another kind or settings: '
                          f'{"; ".join(diff) if other.kind == self.kind else other.kind})')
    by_segment: dict = {}
    for vid in other.ids():
      if vid in self:
        continue
      segment, row, meta = other._where[vid]
      by_segment.setdefault(segment, []).append((vid, row, meta))
    count = 0
    for segment, videos in sorted(by_segment.items()):
      h5 = other._segment(segment)
      names = list(h5.keys())
      count += self.add((vid, {k: h5[f'{k}/{row}'][()] for k in names}, meta) for vid, row, meta in videos)
    return count

  def _remove_orphans(self) -> None:
    named = {w[0] for w in self._where.values()} | set(self._logged_segments())
    folder = os.path.join(self.path, SEGMENTS)
    for name in os.listdir(folder):
      if name.endswith('.h5') and name not in named or name.endswith('.tmp'):
        io_util.remove_if_exists(os.path.join(folder, name))

  def _logged_segments(self) -> list:
    path = os.path.join(self.path, LOG)
    if not os.path.exists(path):
      return []
    with open(path, 'rb') as f:
      data = f.read(self._committed_bytes)
    return [json.loads(line).get('segment') for line in data.splitlines()]

  # ------------------------------------------------------------------------------------ derived files
  def derived_path(self, name: str) -> str:
    return os.path.join(self.path, name)
