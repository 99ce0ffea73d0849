"""The project's one metric writer (both systems): JSON lines plus TensorBoard-readable event files.

Only process 0 writes. Each `write_scalars(step, {...})` appends one JSON line `{"step": s, ...}` to
`workdir/<name>.jsonl` (or `workdir/<stream>.jsonl` with `stream=`, e.g. training scalars apart from
evaluations) (flushed at once, so a killed run keeps every line it logged) and one scalar event per
key under `workdir/tensorboard/`. Event files are written with the `tensorboard` package's own writer and
protobufs, so no TensorFlow is needed.

Files are opened on the first row, so a run that fails before logging anything leaves nothing behind.
`rewind(step)` makes a resumed run continue the logs of its checkpoint: rows and events of later steps, written
by the attempt that was killed, are dropped (files rewritten under a temporary name and renamed).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Iterator, Mapping, Optional

import jax

from common_jax import io_util

TENSORBOARD = 'tensorboard'


def _to_float(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _row(line: str) -> Optional[dict]:
  """The row of a complete JSON line; None for anything else (a line cut short by a kill)."""
  if not line.endswith('\n'):
    return None
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return None
  return row if isinstance(row, dict) and isinstance(row.get('step'), int) else None


def read_rows(path: str, until: Optional[int] = None) -> Iterator[dict]:
  """The complete rows of a JSON-lines file written by a MetricWriter (with `until`: of steps <= until)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    for line in f:
      row = _row(line)
      if row is not None and (until is None or row['step'] <= until):
        yield row


def _rewind_jsonl(path: str, step: Optional[int]) -> None:
  if not os.path.exists(path):
    return
  if step is None:
    os.remove(path)
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if (row := _row(line)) is not None and row['step'] <= step]
  if len(keep) < len(lines):
    with io_util.atomic_open(path) as f:
      f.writelines(keep)


def _rewind_events(directory: str, step: Optional[int]) -> None:
  if not os.path.isdir(directory):
    return
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if 'tfevents' not in name or not os.path.isfile(path):
      continue
    if step is None:
      os.remove(path)
      continue
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    records = list(RawEventFileLoader(path).Load())   # stops at a record cut short by a kill
    keep = [r for r in records if event_pb2.Event.FromString(r).step <= step]
    intact = os.path.getsize(path) == sum(len(r) + 16 for r in records)   # 16: a record's length and CRCs
    if len(keep) == len(records) and intact:
      continue
    with io_util.atomic_open(path, 'wb') as f:
      writer = RecordWriter(f)
      for r in keep:
        writer.write(r)
  if step is None and not os.listdir(directory):
    os.rmdir(directory)


class MetricWriter:

  def __init__(self, workdir: str, name: str = 'metrics', tensorboard: bool = True,
               is_writer: Optional[bool] = None, streams=()):
    """`streams`: the other streams this writer may write, so that `rewind` knows their files."""
    self.is_writer = jax.process_index() == 0 if is_writer is None else is_writer
    self.workdir = workdir
    self.path = os.path.join(workdir, f'{name}.jsonl')
    self._name = name
    self._known = [name, *streams]
    self._streams = {}
    self._tensorboard = tensorboard
    self._events = None

  def _stream_path(self, stream: str) -> str:
    return os.path.join(self.workdir, f'{stream}.jsonl')

  def _file(self, stream: str):
    if stream not in self._streams:
      os.makedirs(self.workdir, exist_ok=True)
      self._streams[stream] = open(self._stream_path(stream), 'a')
      if stream not in self._known:
        self._known.append(stream)
    return self._streams[stream]

  def _event_writer(self):
    if self._events is None and self._tensorboard:
      try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._events = EventFileWriter(os.path.join(self.workdir, TENSORBOARD))
      except ImportError:  # tensorboard is in requirements.txt; degrade to JSONL only if it is absent
        self._tensorboard = False
    return self._events

  def rewind(self, step: Optional[int]) -> None:
    """Drops every row and event of a step after `step` (None: all of them), from every stream this writer
    knows. Called when a run resumes from the checkpoint of `step` (None: starts afresh), before its first row:
    what an interrupted attempt logged after that checkpoint is logged again by the resumed run."""
    if not self.is_writer:
      return
    self.close()
    for stream in self._known:
      _rewind_jsonl(self._stream_path(stream), step)
    if self._tensorboard:
      _rewind_events(os.path.join(self.workdir, TENSORBOARD), step)

  def write_scalars(self, step: int, scalars: Mapping[str, object], stream: Optional[str] = None) -> None:
    if not self.is_writer:
      return
    out = self._file(self._name if stream is None else stream)
    record = {'step': int(step)}
    for key, value in scalars.items():
      f = _to_float(value)
      record[key] = value if f is None else (f if math.isfinite(f) else str(f))
    out.write(json.dumps(record, sort_keys=False) + '\n')
    out.flush()
    values = [(k, _to_float(v)) for k, v in scalars.items() if _to_float(v) is not None]
    if values and self._event_writer() is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values])
      self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
      self._events.flush()

  def close(self) -> None:
    for f in self._streams.values():
      f.close()
    self._streams = {}
    if self._events is not None:
      self._events.close()
      self._events = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
