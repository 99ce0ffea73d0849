"""The project's one metric writer (both systems): JSON lines plus TensorBoard-readable event files.

Only process 0 writes. Each `write_scalars(step, {...})` appends one JSON line `{"step": s, ...}` to
`workdir/<name>.jsonl` (or `workdir/<stream>.jsonl` with `stream=`, e.g. training scalars apart from
evaluations) (flushed at once, so a killed run keeps every line it logged) and one scalar event per
key under `workdir/tensorboard/`. Event files are written with the `tensorboard` package's own writer and
protobufs, so no TensorFlow is needed.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping, Optional

import jax


def _to_float(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


class MetricWriter:

  def __init__(self, workdir: str, name: str = 'metrics', tensorboard: bool = True,
               is_writer: Optional[bool] = None):
    self.is_writer = jax.process_index() == 0 if is_writer is None else is_writer
    self.path = os.path.join(workdir, f'{name}.jsonl')
    self._jsonl = None
    self._events = None
    if not self.is_writer:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(self.path, 'a')
    self._streams = {name: self._jsonl}
    if tensorboard:
      try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._events = EventFileWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:  # tensorboard is in requirements.txt; degrade to JSONL only if it is absent
        self._events = None

  def write_scalars(self, step: int, scalars: Mapping[str, object], stream: Optional[str] = None) -> None:
    if not self.is_writer:
      return
    if stream is not None and stream not in self._streams:
      self._streams[stream] = open(os.path.join(os.path.dirname(self.path), f'{stream}.jsonl'), 'a')
    out = self._jsonl if stream is None else self._streams[stream]
    record = {'step': int(step)}
    for key, value in scalars.items():
      f = _to_float(value)
      record[key] = value if f is None else (f if math.isfinite(f) else str(f))
    out.write(json.dumps(record, sort_keys=False) + '\n')
    out.flush()
    if self._events is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      values = [summary_pb2.Summary.Value(tag=k, simple_value=_to_float(v))
                for k, v in scalars.items() if _to_float(v) is not None]
      if values:
        self._events.add_event(event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))
        self._events.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      for f in self._streams.values():
        f.close()
      self._jsonl, self._streams = None, {}
    if self._events is not None:
      self._events.close()
      self._events = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
