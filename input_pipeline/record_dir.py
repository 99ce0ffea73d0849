"""A shard directory being written: rolling ArrayRecord files in a temporary folder, renamed into place at the end.

Shared by the HAP-VR view shards (`input_pipeline.hapvr.shards.ShardWriter`) and the AVHash feature shards
(`input_pipeline.avhash.shards.AVShardWriter`), which add their own record codec, validation and index file:

  out = RecordDir(directory, records_per_shard, options, error=ShardError)
  index = out.write(record)                        # global record index
  files = out.commit(filename, write_index)        # or out.abort()

Nothing appears at `directory` until `commit` succeeds: records go to `shard-00000.tmp`, ... in a private
folder beside it; `commit` closes the last file, renames the files to `filename(i, count)`, lets the caller
write its index into the folder, and renames the folder onto `directory` (which must be absent or empty). Any
failure in between removes the folder. `VideoShardWriter` is the part of the two writers around it (a `with`
block, video-id checks, close and abort); `read_index` reads back their JSON index; `pack_record` and
`unpack_record` frame their records (magic, JSON header, arrays).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from typing import Callable, Dict, List, Type

from array_record.python import array_record_module


def check_output(directory: str, error: Type[Exception] = ValueError) -> None:
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise error(f'{directory}: output exists and is not an empty directory; refusing to overwrite it '
                f'(remove it or choose another --output)')


class RecordDir:

  def __init__(self, directory: str, records_per_shard: int, options: str, error: Type[Exception] = ValueError):
    if records_per_shard < 1:
      raise error(f'records_per_shard={records_per_shard}: must be >= 1')
    self.directory = os.path.abspath(directory)
    self.records_per_shard, self.options, self.error = int(records_per_shard), options, error
    check_output(self.directory, error)
    parent = os.path.dirname(self.directory)
    os.makedirs(parent, exist_ok=True)
    self.tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(self.directory)}.', suffix='.tmp', dir=parent)
    self.counts: List[int] = []        # records per shard file
    self.records = 0
    self._writer = None

  @property
  def open(self) -> bool:
    return self.tmp is not None

  def write(self, record: bytes) -> int:
    """Appends one record; returns its global index."""
    if self._writer is None:
      path = os.path.join(self.tmp, f'shard-{len(self.counts):05d}.tmp')
      self._writer = array_record_module.ArrayRecordWriter(path, self.options)
      self.counts.append(0)
    self._writer.write(record)
    self.counts[-1] += 1
    self.records += 1
    if self.counts[-1] == self.records_per_shard:
      self._writer.close()
      self._writer = None
    return self.records - 1

  def abort(self) -> None:
    """Discards everything written so far."""
    if self._writer is not None:
      with contextlib.suppress(Exception):
        self._writer.close()
      self._writer = None
    if self.tmp is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      self.tmp = None

  def commit(self, filename: Callable[[int, int], str],
             write_index: Callable[[str, List[Dict]], None]) -> List[Dict]:
    """Names the shard files, calls `write_index(folder, files)`, renames the folder into place.

    Returns the files as [{'file': name, 'records': count}]. On any error the folder is removed.
    """
    try:
      if self._writer is not None:
        self._writer.close()
        self._writer = None
      files = []
      for i, count in enumerate(self.counts):
        files.append({'file': filename(i, len(self.counts)), 'records': count})
        os.rename(os.path.join(self.tmp, f'shard-{i:05d}.tmp'), os.path.join(self.tmp, files[-1]['file']))
      write_index(self.tmp, files)
      check_output(self.directory, self.error)
      os.chmod(self.tmp, 0o755)  # mkdtemp made it private
      if os.path.isdir(self.directory):
        os.rmdir(self.directory)
      os.rename(self.tmp, self.directory)
      self.tmp = None
    except BaseException:
      self.abort()
      raise
    return files

  def nbytes(self) -> int:
    return sum(os.path.getsize(os.path.join(self.directory, f)) for f in os.listdir(self.directory))


class VideoShardWriter:
  """A shard directory written video by video; nothing appears at `directory` until `close()` succeeds.

  Used in a `with` block: closed at its end, or aborted (the folder removed) on an exception. A subclass
  validates and writes each video through `self._out` after `_check_new(video_id)`, records the id in
  `self._seen` once written, and gives the shard file names (`_filename`), the index (`_write_index(folder,
  files)`) and its part of the summary (`_summary(files)`).
  """
  error: Type[Exception] = ValueError

  def __init__(self, directory: str, records_per_shard: int, options: str):
    self._out = RecordDir(directory, records_per_shard, options, error=self.error)
    self.directory = self._out.directory
    self._seen = set()
    self.summary = None

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.abort()

  def _check_new(self, video_id: str) -> None:
    if not self._out.open:
      raise self.error(f'{type(self).__name__}: already closed')
    if not isinstance(video_id, str) or not video_id:
      raise self.error(f'video id {video_id!r}: must be a non-empty string')
    if video_id in self._seen:
      raise self.error(f'video {video_id!r} was added twice (duplicate video id)')

  def abort(self) -> None:
    """Discards everything written so far."""
    self._out.abort()

  def close(self) -> dict:
    """Names the shard files, writes the index and renames the folder into place; returns the summary."""
    if not self._out.open:
      return self.summary
    if not self._seen:
      self.abort()
      raise self.error(f'{self.directory}: no videos were added; nothing written')
    files = self._out.commit(self._filename, self._write_index)
    self.summary = {'directory': self.directory, **self._summary(files), 'bytes': self._out.nbytes()}
    return self.summary


def read_index(directory: str, name: str, fmt: str, version: int, what: str, command: str,
               error: Type[Exception] = ValueError) -> dict:
  """The JSON index `name` of a shard directory, checked for format and version (not yet for content).
  `what` names the kind of directory ('HAP-VR shard'), `command` the program that writes one."""
  path = os.path.join(directory, name)
  a = 'an' if what[:1] in 'AEIOU' else 'a'
  if not os.path.isdir(directory):
    raise error(f'{directory}: {what} directory not found')
  if not os.path.isfile(path):
    label = name if name.startswith('index') else f'{name} index'
    raise error(f'{directory}: no {label} here (not {a} {what} directory? write one with python -m {command})')
  try:
    with open(path) as f:
      index = json.load(f)
  except (OSError, ValueError) as e:
    raise error(f'{path}: unreadable index ({type(e).__name__}: {e})') from e
  if not isinstance(index, dict) or index.get('format') != fmt:
    raise error(f'{path}: not {a} {what} index (format '
                f'{index.get("format") if isinstance(index, dict) else None!r}, expected {fmt!r})')
  if index.get('version') != version:
    raise error(f'{path}: index version {index.get("version")!r}; this code reads version {version} '
                f'(rewrite the shards with python -m {command})')
  return index


# A record: 8-byte magic | uint32 LE header length H | H bytes of JSON header, space-padded so that the
# payload starts at a multiple of 8 | the arrays, in the dtypes the header names.
_HEAD = struct.Struct('<8sI')


def pack_record(magic: bytes, header: dict, *payload: bytes) -> bytes:
  text = json.dumps(header, separators=(',', ':'), allow_nan=False).encode()
  text += b' ' * (-(_HEAD.size + len(text)) % 8)
  return b''.join((_HEAD.pack(magic, len(text)), text, *payload))


def unpack_record(data: bytes, magic: bytes, what: str, where: str, check, error: Type[Exception] = ValueError):
  """(header, payload offset) of a `pack_record` record. A wrong magic (`what` names the record kind) or a
  header that does not parse or fails `check(header)` (False, or a KeyError/TypeError/ValueError) is an
  `error` naming `where`."""
  if len(data) < _HEAD.size or bytes(data[:8]) != magic:
    raise error(f'{where}: not {what} (bad magic {bytes(data[:8])!r}; corrupt or foreign file)')
  (_, size), start = _HEAD.unpack_from(data), _HEAD.size
  if start + size > len(data):
    raise error(f'{where}: header length {size} exceeds the record size {len(data)} (corrupt record)')
  try:
    header = json.loads(bytes(data[start:start + size]))
    ok = check(header)
  except (ValueError, KeyError, TypeError) as e:
    raise error(f'{where}: unreadable record header ({e!r}; corrupt record)') from e
  if not ok:
    raise error(f'{where}: invalid record header {header} (corrupt record)')
  return header, start + size
