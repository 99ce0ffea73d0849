"""Resumable HDF5 output of the extraction CLIs: video by video, never half-written at the final name.

`ResumableH5({'image': 'img.h5', 'audio': 'aud.h5'})` writes every file of a set while running to
`<file>.partial` and keeps one commit log per set, `<first file>.done`: a video id is appended (and fsynced)
only after the video's datasets are written to *every* file and flushed. So

  * a killed run (SIGKILL, preemption, a crash) leaves `.partial` files and the log; rerunning the same command
    reopens them, deletes any video that is in a file but not in the log (it was being written when the run
    died) and skips every logged id;
  * `commit()` renames each `.partial` onto its final name (and removes the log) only when the run has gone
    through its whole list, so a file at the final name is always complete;
  * a completed file is reopened the same way: rerunning with a longer list appends the new ids.

A `.partial` file HDF5 cannot open (a crash inside an HDF5 metadata write) is moved aside to
`<file>.partial.corrupt` and its ids are extracted again, with a warning.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Mapping, Set

import h5py
from absl import logging


class OutputError(ValueError):
  pass


def _read_log(path: str) -> list:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split('\n')
  return [line for line in lines[:-1] if line]  # the last piece has no newline yet if a write was cut


class ResumableH5:
  """A set of HDF5 files written in step, one commit log (module docstring)."""

  def __init__(self, files: Mapping[str, str]):
    if not files:
      raise OutputError('ResumableH5: no output files')
    self.files = dict(files)
    for name, path in self.files.items():
      folder = os.path.dirname(os.path.abspath(path))
      if not os.path.isdir(folder):
        raise OutputError(f'{path}: the folder {folder} does not exist')
      if os.path.isdir(path):
        raise OutputError(f'{path}: is a directory; --output names an HDF5 file')
    first = next(iter(self.files.values()))
    self.log_path = first + '.done'
    self._h5: Dict[str, h5py.File] = {}
    self.done: Set[str] = set()
    self.resumed = 0
    self._open()

  def _open(self) -> None:
    logged = _read_log(self.log_path)
    finished = {}
    for name, path in self.files.items():
      partial = path + '.partial'
      if os.path.exists(path) and not os.path.exists(partial):
        # A completed output: extend it (its ids are all complete).
        with h5py.File(path, 'r') as f:
          finished[name] = set(f.keys())
        os.replace(path, partial)
      try:
        self._h5[name] = h5py.File(partial, 'a')
      except OSError as e:
        logging.warning('%s: unreadable partial output (%s); moved to %s.corrupt, its videos are extracted again',
                        partial, e, partial)
        os.replace(partial, partial + '.corrupt')
        self._h5[name] = h5py.File(partial, 'w')
    keys = {name: set(f.keys()) for name, f in self._h5.items()}
    done = set(logged) | set.intersection(*finished.values()) if finished else set(logged)
    done &= set.intersection(*keys.values())
    for name, f in self._h5.items():
      for vid in keys[name] - done:   # written when the previous run stopped, never committed
        del f[vid]
      f.flush()
    self.done = done
    self.resumed = len(done)
    with open(self.log_path, 'w') as log:   # rewrite the log: exactly the committed ids
      log.write(''.join(v + '\n' for v in sorted(done)))
      log.flush()
      os.fsync(log.fileno())

  def write(self, video_id: str, writers: Mapping[str, Callable[[h5py.File], None]]) -> None:
    """Calls writers[name](h5file) for each file (each creates the video's datasets), flushes, logs the id."""
    if video_id in self.done:
      raise OutputError(f'video {video_id!r} is already in {self.log_path} (duplicate id in the list?)')
    if set(writers) != set(self._h5):
      raise OutputError(f'writers for {sorted(writers)}, files {sorted(self._h5)}')
    for name, fn in writers.items():
      fn(self._h5[name])
      self._h5[name].flush()
    with open(self.log_path, 'a') as log:
      log.write(video_id + '\n')
      log.flush()
      os.fsync(log.fileno())
    self.done.add(video_id)

  def close(self) -> None:
    """Closes the files, leaving `.partial` + log for a later run."""
    for f in self._h5.values():
      f.close()
    self._h5 = {}

  def commit(self) -> None:
    """Closes and renames every `.partial` onto its final name; removes the log."""
    self.close()
    for path in self.files.values():
      os.replace(path + '.partial', path)
    if os.path.exists(self.log_path):
      os.remove(self.log_path)


def link_files(output: str, parts) -> int:
  """Writes `output`: an HDF5 file of external links, one per video of the per-host `parts`
  (`x-0000k-of-0000n.h5`), so evaluators read the collection as one file without copying it. Links are
  relative to `output`'s folder. Duplicate ids across parts are an error. Returns the number of videos."""
  from common_jax import io_util
  folder = os.path.dirname(os.path.abspath(output))
  owner = {}
  for part in parts:
    with h5py.File(part, 'r') as f:
      for vid in f:
        if vid in owner:
          raise OutputError(f'video {vid!r} is in both {owner[vid]} and {part}')
        owner[vid] = part
  with io_util.atomic_open(output, 'wb') as fo, h5py.File(fo, 'w') as f:
    for vid, part in owner.items():
      f[vid] = h5py.ExternalLink(os.path.relpath(os.path.abspath(part), folder), vid)
  return len(owner)


def main(argv=None) -> int:
  import argparse
  import sys
  from common_jax import cli
  parser = argparse.ArgumentParser(description='Link per-host extraction outputs into one HDF5 file '
                                   '(external links; nothing is copied).')
  parser.add_argument('--output', required=True)
  parser.add_argument('parts', nargs='+', help='the x-0000k-of-0000n.h5 files')
  flags = parser.parse_args(argv)
  with cli.clear_errors():
    n = link_files(flags.output, flags.parts)
  print(f'wrote {flags.output}: {n} videos linked from {len(flags.parts)} files')
  sys.stdout.flush()
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
