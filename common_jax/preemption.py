"""Stopping cleanly on SIGTERM / SIGINT (preemption, `kill`, Ctrl-C): the training loops poll `requested()`.

The handler only sets a flag; the loop finishes the step in flight, writes a checkpoint and returns, so the
same command resumes later. On several processes the flag is agreed on with an all-gather at a step every
process reaches (a process that missed the signal stops with the others), never in the middle of a
collective. A second signal while stopping restores the default behaviour (a second Ctrl-C kills).
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class StopSignal:

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self.signal_name = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self._event.is_set():   # second signal: give up waiting
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    self._event.set()

  def request(self, reason: str = 'requested') -> None:
    self.signal_name = reason
    self._event.set()

  def requested(self, sync: bool = True) -> bool:
    """True once any process got a signal (with `sync`, agreed across processes: call it on all of them)."""
    local = self._event.is_set()
    if not sync or jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([local]))))

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
