"""Host memory reuse for XLA:CPU's temporaries.

XLA:CPU allocates every call's intermediate buffers afresh and frees them at the end. glibc serves blocks above
its mmap threshold (which adapts up to 32 MB) with new mappings, whose pages fault in, zeroed, on first touch,
and returns them to the system when freed; so a call whose intermediates are tens to hundreds of MB (the
evaluation engine's frame-to-frame products and comparator activations) pays those page faults again on every
call: about a tenth of the engine's time on a 2-core CPU (docs/performance.md). Raising the threshold and
keeping freed memory makes later calls reuse the same pages; the process keeps its peak in memory instead of
returning it between calls, which the engine's memory budget bounds.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30    # blocks up to 1 GiB from the heap (larger ones still get their own mapping)
TRIM_THRESHOLD = (1 << 31) - 1   # keep up to 2 GiB of freed memory at the top of the heap
TOP_PAD = 256 << 20         # grow the heap in 256 MiB steps


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc options above for this process; False (nothing changed) without glibc. Call it early,
  before the large allocations it should affect."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):   # another C library (musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(option, value) == 1 for option, value in (
      (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
