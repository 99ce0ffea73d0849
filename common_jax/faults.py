"""Named kill points for fault-injection tests: a deterministic SIGKILL at a chosen moment of a real run.

Code that must survive a kill calls `faults.point('name')` at the moments that matter (after a checkpoint
commits, before an evaluation, between two videos of an extraction, ...). Normally this is a dictionary
lookup and nothing happens. With the environment variable

  JAX_VR_KILL_AT=name        (or name@N: the N-th time the point is reached, counting from 1)

the process kills itself with SIGKILL there: no handler, no `finally`, no flush, exactly as the OOM killer or
a lost machine would. Tests use it to stop a run at a named place instead of guessing with timers.
"""
from __future__ import annotations

import os
import signal
import sys

ENV = 'JAX_VR_KILL_AT'
_counts: dict = {}


def _target():
  spec = os.environ.get(ENV, '')
  if not spec:
    return None, 0
  name, _, nth = spec.partition('@')
  return name, int(nth) if nth else 1


def point(name: str) -> None:
  """SIGKILLs this process if JAX_VR_KILL_AT names this point (and this is its N-th visit)."""
  target, nth = _target()
  if target != name:
    return
  _counts[name] = _counts.get(name, 0) + 1
  if _counts[name] == nth:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
