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

The settings that determine the features (fps, dtype, backbone weights, ...) are recorded in each file's root
attribute `extraction_settings`; resuming or extending a file whose videos were extracted with other settings
is refused, naming each setting and both values, so one file never mixes two kinds of features. HDF5 crashes
(a segfault) when the disk fills during a write, so before each video the free space is checked against its
size plus a margin: a full disk ends the run with `NoSpace`, the finished videos kept for a rerun.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Dict, Mapping, Optional, Set, Union

import h5py
from absl import flags, logging

from common_jax import cli, faults

SETTINGS_ATTR = 'extraction_settings'
MARGIN = 16 * 2**20   # beyond a video's own bytes: HDF5 metadata, chunk indexes, the commit log


class OutputError(ValueError):
  pass


class NoSpace(OutputError):
  """The output's file system cannot take the next video: the run must stop (not skip the video)."""


def free_bytes(folder: str) -> Optional[int]:
  """Bytes an unprivileged writer may still use in `folder`'s file system; None if it reports no sizes."""
  st = os.statvfs(folder)
  return None if st.f_blocks == 0 else st.f_bavail * st.f_frsize


def _read_log(path: str) -> list:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split('\n')
  return [line for line in lines[:-1] if line]  # the last piece has no newline yet if a write was cut


def _recorded(path: str, logged) -> tuple:
  """(the committed ids of output `path`, the settings recorded in it or None, the file read), read-only."""
  partial = path + '.partial'
  source = partial if os.path.exists(partial) else path if os.path.exists(path) else None
  if source is None:
    return set(), None, path
  try:
    with h5py.File(source, 'r') as f:
      keys, text = set(f.keys()), f.attrs.get(SETTINGS_ATTR)
  except OSError:
    return set(), None, source   # unreadable: moved aside when opened, its videos extracted again
  committed = keys & set(logged) if source == partial else keys
  return committed, (json.loads(text) if text is not None else None), source


class ResumableH5:
  """A set of HDF5 files written in step, one commit log (module docstring). `settings`: what determines the
  features, as {name: str}; a file whose committed videos were written with other settings is refused."""

  def __init__(self, files: Mapping[str, str], settings: Optional[Mapping[str, str]] = None):
    if not files:
      raise OutputError('ResumableH5: no output files')
    self.files = dict(files)
    self.settings = None if settings is None else {k: str(v) for k, v in settings.items()}
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

  def _check_settings(self, logged) -> None:
    """Before anything is touched: refuses an output whose committed videos had other settings."""
    for path in self.files.values():
      committed, old, source = _recorded(path, logged)
      if not committed or self.settings is None:
        continue
      if old is None:
        logging.warning('%s: its %d videos carry no record of their extraction settings; assuming they match '
                        'this run (%s)', source, len(committed), self.settings)
        continue
      changed = [f'{k}: was {old.get(k)!r}, this run has {self.settings.get(k)!r}'
                 for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
      if changed:
        raise OutputError(f'{source}: its {len(committed)} videos were extracted with other settings '
                          f'({"; ".join(changed)}); rerun with the original settings to resume or extend it, '
                          'or write to another output')

  def _open(self) -> None:
    logged = _read_log(self.log_path)
    self._check_settings(logged)
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
      if self.settings is not None:
        f.attrs[SETTINGS_ATTR] = json.dumps(self.settings, sort_keys=True)
      f.flush()
    self.done = done
    self.resumed = len(done)
    with open(self.log_path, 'w') as log:   # rewrite the log: exactly the committed ids
      log.write(''.join(v + '\n' for v in sorted(done)))
      log.flush()
      os.fsync(log.fileno())

  def check_space(self, video_id: str, nbytes: Union[int, Mapping[str, int]]) -> None:
    """Raises NoSpace unless each file system can take `nbytes` (per file name, or for every file) + MARGIN."""
    need, where = {}, {}
    for name, path in self.files.items():
      folder = os.path.dirname(os.path.abspath(path))
      n = nbytes.get(name, 0) if isinstance(nbytes, Mapping) else nbytes
      dev = os.stat(folder).st_dev   # files on one file system share its free space
      need[dev] = need.get(dev, MARGIN) + n + n // 8   # + 1/8: compression can grow random bits a little
      where[dev] = (folder, path)
    for dev, n in need.items():
      folder, path = where[dev]
      free = free_bytes(folder)
      if free is not None and free < n:
        raise NoSpace(f'{path}.partial: no space left on device ({free / 2**20:.1f} MiB free in {folder}; video '
                      f'{video_id!r} needs about {n / 2**20:.1f} MiB with the margin); the {len(self.done)} '
                      'videos written so far are kept: free some space and rerun the same command to resume')

  def write(self, video_id: str, writers: Mapping[str, Callable[[h5py.File], None]],
            nbytes: Union[int, Mapping[str, int]] = 0) -> None:
    """Calls writers[name](h5file) for each file (each creates the video's datasets), flushes, logs the id.
    `nbytes`: about how much the writers store (per file name, or for every file), checked first (NoSpace)."""
    if video_id in self.done:
      raise OutputError(f'video {video_id!r} is already in {self.log_path} (duplicate id in the list?)')
    if set(writers) != set(self._h5):
      raise OutputError(f'writers for {sorted(writers)}, files {sorted(self._h5)}')
    self.check_space(video_id, nbytes)
    for name, fn in writers.items():
      fn(self._h5[name])
      self._h5[name].flush()
      faults.point('extraction.video_written')   # in this file, not yet in the others nor in the log
    with open(self.log_path, 'a') as log:
      log.write(video_id + '\n')
      log.flush()
      os.fsync(log.fileno())
    self.done.add(video_id)
    faults.point('extraction.video_committed')

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
    if not os.path.isfile(part):
      raise OutputError(f'{part}: part file not found')
    try:
      with h5py.File(part, 'r') as f:
        ids = list(f)
    except OSError as e:   # truncated or not HDF5: h5py's message names no file
      raise OutputError(f'{part}: not a readable HDF5 file (truncated or still being written?): {e}') from e
    for vid in ids:
      if vid in owner:
        raise OutputError(f'video {vid!r} is in both {owner[vid]} and {part}')
      owner[vid] = part
  with io_util.atomic_open(output, 'wb') as fo, h5py.File(fo, 'w') as f:
    for vid, part in owner.items():
      f[vid] = h5py.ExternalLink(os.path.relpath(os.path.abspath(part), folder), vid)
  return len(owner)


LINK_USAGE = r"""Links per-host extraction outputs into one HDF5 file (external links; nothing is copied).

  python -m extraction.feature_writer --output=fivr_5k.h5 fivr_5k-00000-of-00002.h5 fivr_5k-00001-of-00002.h5
"""


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('output', None, 'the HDF5 file of external links to write (the part files are the arguments)',
                      flag_values=fv, required=True)


def main(argv=None) -> int:
  args = cli.parse_flags(define_flags, argv, LINK_USAGE, positional='parts')
  if not args.parts:
    return cli.fail('give the x-0000k-of-0000n.h5 part files to link after the flags')
  with cli.clear_errors():
    n = link_files(args.output, args.parts)
  print(f'wrote {args.output}: {n} videos linked from {len(args.parts)} files')
  sys.stdout.flush()
  return 0


if __name__ == '__main__':
  cli.run_main(main)
