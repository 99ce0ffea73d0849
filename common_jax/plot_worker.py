"""Figures drawn by a child process started before the work they show.

Importing matplotlib takes about half a second of one core (most of it building its artists' docstrings), as
long as the rest of a small evaluation's start-up. A child started first imports it on another core while the
parent imports JAX and scores, and then only draws when asked:

    worker = plot_worker.start()     # first thing: the child imports matplotlib meanwhile
    ...
    worker.draw('hapvr_jax.datasets:plot_pr_curves', curves, path)   # sends the call, waits for the file
    worker.close()                   # always (a parent that never draws lets the child go)

The call names an importable function that writes its own file (atomically, as common_jax.plots does); its
arguments travel pickled over the child's stdin. A failure in the child comes back as a RuntimeError with the
child's traceback. A child that cannot start, or one that exited, is replaced by drawing in this process.
"""
from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _call(target: str, args: tuple) -> None:
  module, name = target.split(':')
  getattr(importlib.import_module(module), name)(*args)


class Worker:

  def __init__(self):
    self._err = tempfile.TemporaryFile()   # a file, not a pipe: a chatty child can never block on it
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)}
    try:
      self._proc = subprocess.Popen([sys.executable, '-m', 'common_jax.plot_worker'], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=self._err, env=env, cwd=ROOT)
    except OSError:
      self._proc = None

  def draw(self, target: str, *args) -> None:
    """Calls `target` ('module:function') with `args` in the child and waits for it to finish."""
    if self._proc is None or self._proc.poll() is not None:
      self._proc = None
      return _call(target, args)
    try:
      self._proc.communicate(pickle.dumps((target, args)), timeout=600)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      raise RuntimeError(f'drawing {target} took over 600 s') from None
    if self._proc.returncode != 0:
      self._err.seek(0)
      raise RuntimeError(f'drawing {target} failed:\n{self._err.read().decode(errors="replace")[-4000:]}')

  def close(self) -> None:
    """Lets an idle child go (it sees the end of its input and exits without drawing)."""
    if self._proc is not None and self._proc.poll() is None:
      self._proc.stdin.close()
      try:
        self._proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self._proc.kill()
    self._err.close()


def start() -> Worker:
  return Worker()


def main() -> int:
  import matplotlib.backends.backend_agg  # noqa: F401  the slow imports, ahead of the request
  import matplotlib.figure  # noqa: F401
  data = sys.stdin.buffer.read()
  if not data:   # the parent closed without asking for anything
    return 0
  target, args = pickle.loads(data)   # our own parent's message
  try:
    _call(target, args)
  except BaseException:
    traceback.print_exc()
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
