"""Test setup: 8 fake CPU devices, set before jax is imported anywhere in the test process."""
import os
import sys

# LLVM at -O0: the suite is dominated by compiling many small programs, not by running them; -O0 compiles them
# markedly faster (docs/performance.md) and changes no HLO-level numerics.
FAST_COMPILE = '--xla_backend_optimization_level=0'
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {FAST_COMPILE}')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# commands run in subprocesses compute as the in-process runs they are compared with (XLA's own CPU options)
os.environ.setdefault('JAX_VR_XLA_CPU', 'xla_default')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One persistent XLA compilation cache for the whole run (xdist workers and the subprocesses tests start):
# many tests compile the same tiny steps and engines, and on a 2-core CI machine compiling is most of the
# suite's time.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    __import__('tempfile').gettempdir(), 'hapvr_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
ANNOTATIONS = os.path.join(SHARED, 'data', 'annotations')


@pytest.fixture(scope='session')
def annotations_dir():
  """The real public annotation files, when ../shared is beside the checkout; tests skip otherwise."""
  if not os.path.isdir(ANNOTATIONS):
    pytest.skip('../shared/data/annotations is not present')
  return ANNOTATIONS
