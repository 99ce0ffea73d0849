"""Atomic file output: everything is written to a temporary name beside the target and renamed at the end,
so an interrupted or failed run never leaves a half-written metrics file, similarity dump or checkpoint."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w'):
  """Open a temporary file beside `path`; on success it replaces `path`, on error it is removed."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the file what open() would
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json(path: str, obj, **kwargs) -> None:
  with atomic_open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, **kwargs)
    f.write('\n')


def write_pickle(path: str, obj) -> None:
  with atomic_open(path, 'wb') as f:
    pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def remove_if_exists(*paths: str) -> None:
  for p in paths:
    with contextlib.suppress(FileNotFoundError):
      os.remove(p)
