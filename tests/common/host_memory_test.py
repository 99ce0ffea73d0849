"""common_jax.host_memory: large blocks come from malloc's heap (reused after free) instead of fresh mappings."""
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
import numpy as np
from common_jax import host_memory

class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in
              ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks',
               'keepcost')]

libc = ctypes.CDLL('libc.so.6')
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == 'reuse':
  assert host_memory.reuse_freed_memory()
x = np.ones(64 << 20, np.uint8)    # 64 MiB: above glibc's default mmap threshold (at most 32 MiB)
mapped = libc.mallinfo2().hblkhd    # bytes in blocks with a mapping of their own
del x
y = np.ones(64 << 20, np.uint8)
print(mapped, libc.mallinfo2().arena)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc options')
@pytest.mark.parametrize('mode', ['reuse', 'default'])
def test_large_blocks_come_from_the_heap(mode):
  import os
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, '-c', PROBE, mode], cwd=root, capture_output=True, text=True, timeout=60)
  if 'mallinfo2' in out.stderr:
    pytest.skip('this C library has no mallinfo2')
  assert out.returncode == 0, out.stderr[-2000:]
  mapped, heap = map(int, out.stdout.split())
  if mode == 'reuse':
    assert mapped < (1 << 20) and heap >= (64 << 20)   # on the heap, where a freed block is kept for reuse
  else:
    assert mapped >= (64 << 20)                        # glibc's default: a mapping of its own
