"""common_jax.executables: a warm lookup returns the stored executable without tracing; keys separate what
changes the program; bad entries are replaced."""
import os
import uuid

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from common_jax import executables, mesh as mesh_lib


_SALT = float(uuid.uuid4().int % 2**20)   # a program of this run only: never found in JAX's own persistent cache


def _traced_fn(counter):
  def f(w, x):
    counter.append(1)   # runs only while tracing
    return jnp.tanh(x @ w['a']) * w['b'] + 0.0 * _SALT
  return jax.jit(f)


def _args(n=8, dtype=np.float32):
  w = {'a': np.linspace(-1, 1, 16 * 4, dtype=dtype).reshape(16, 4), 'b': np.float32(0.5)}
  return w, np.arange(n * 16, dtype=dtype).reshape(n, 16) / 100


def _want(w, x):
  return np.tanh(x.astype(np.float64) @ w['a'].astype(np.float64)) * 0.5


def test_a_warm_lookup_loads_the_stored_executable_without_tracing(tmp_path):
  traces = []
  f, args = _traced_fn(traces), _args()
  cold = executables.compiled(f, args, 'f', 'v1', folder=str(tmp_path))
  assert len(traces) == 1 and len(os.listdir(tmp_path)) == 1
  warm = executables.compiled(_traced_fn(traces), args, 'f', 'v1', folder=str(tmp_path))
  assert len(traces) == 1, 'the warm lookup traced the function again'
  np.testing.assert_allclose(np.asarray(warm(*args)), _want(*args), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(warm(*args)), np.asarray(cold(*args)))


@pytest.mark.parametrize('change', ['shape', 'dtype', 'fingerprint', 'name', 'tree', 'sharding'])
def test_what_changes_the_program_changes_the_key(change):
  w, x = _args()
  base = executables.key_of('f', 'v1', (w, x))
  if change == 'shape':
    other = executables.key_of('f', 'v1', _args(n=9))
  elif change == 'dtype':
    other = executables.key_of('f', 'v1', (w, x.astype(np.float16)))
  elif change == 'fingerprint':
    other = executables.key_of('f', 'v2', (w, x))
  elif change == 'name':
    other = executables.key_of('g', 'v1', (w, x))
  elif change == 'tree':
    other = executables.key_of('f', 'v1', ({'a': w['a'], 'c': w['b']}, x))
  else:
    mesh = mesh_lib.make_mesh()
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh_lib.batch_sharding(mesh, 0, 2))
    other = executables.key_of('f', 'v1', (w, spec))
    assert other != executables.key_of('f', 'v1', (w, jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                           sharding=mesh_lib.replicated(mesh))))
  assert other != base
  assert executables.key_of('f', 'v1', _args()) == base   # equal inputs: equal keys


def test_a_sharded_executable_round_trips(tmp_path):
  mesh = mesh_lib.make_mesh()
  traces = []
  w, x = _args(n=16)
  xs = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh_lib.batch_sharding(mesh, 0, 2))
  ws = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,
                                                   sharding=mesh_lib.replicated(mesh)), w)
  executables.compiled(_traced_fn(traces), (ws, xs), 'f', 'v1', folder=str(tmp_path))
  warm = executables.compiled(_traced_fn(traces), (ws, xs), 'f', 'v1', folder=str(tmp_path))
  assert len(traces) == 1
  got = warm(jax.device_put(w, mesh_lib.replicated(mesh)), jax.device_put(x, xs.sharding))
  assert got.sharding.is_equivalent_to(xs.sharding, 2)
  np.testing.assert_allclose(np.asarray(got), _want(w, x), rtol=1e-5, atol=1e-6)


def test_an_unreadable_entry_is_compiled_again_and_replaced(tmp_path):
  traces = []
  args = _args()
  executables.compiled(_traced_fn(traces), args, 'f', 'v1', folder=str(tmp_path))
  (entry,) = os.listdir(tmp_path)
  with open(tmp_path / entry, 'wb') as f:
    f.write(b'truncated')
  again = executables.compiled(_traced_fn(traces), args, 'f', 'v1', folder=str(tmp_path))
  assert len(traces) == 2
  np.testing.assert_allclose(np.asarray(again(*args)), _want(*args), rtol=1e-5, atol=1e-6)
  executables.compiled(_traced_fn(traces), args, 'f', 'v1', folder=str(tmp_path))
  assert len(traces) == 2, 'the replaced entry was not readable'
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.')]   # no temporary file left


def test_without_a_folder_it_compiles_and_stores_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(executables, 'default_folder', lambda: None)
  traces = []
  args = _args()
  out = executables.compiled(_traced_fn(traces), args, 'f', 'v1')
  executables.compiled(_traced_fn(traces), args, 'f', 'v1')
  assert len(traces) == 2
  np.testing.assert_allclose(np.asarray(out(*args)), _want(*args), rtol=1e-5, atol=1e-6)


def test_the_source_fingerprint_follows_the_files(tmp_path, monkeypatch):
  mod = tmp_path / 'fp_probe_mod.py'
  mod.write_text('X = 1\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  import importlib
  m = importlib.import_module('fp_probe_mod')
  a = executables.source_fingerprint([m.__name__])
  mod.write_text('X = 2\n')
  assert executables.source_fingerprint([m.__name__]) != a


_WARM_JAX_CACHE = """
import sys
import numpy as np, jax, jax.numpy as jnp
from common_jax import cli, executables
cli.enable_compilation_cache(sys.argv[1])
f = jax.jit(lambda x, y: (x.reshape(8, 32).astype(jnp.float16) @ y).sum(0))
args = (np.ones(256, dtype=np.float32), np.ones((32, 5), np.float16))
if sys.argv[2] == 'fill':   # the first process only fills JAX's persistent cache
  f.lower(*args).compile()
  sys.exit()
executables.compiled(f, args, 'f', 'v1', folder=sys.argv[2])
warm = executables.compiled(f, args, 'f', 'v1', folder=sys.argv[2])
print(getattr(executables._local, 'hits', 0))   # programs taken from JAX's cache while compiling entries
print(np.asarray(warm(*args), np.float64).tolist())
"""


def test_an_entry_stored_while_jax_persistent_cache_is_warm_runs(tmp_path):
  """An executable JAX loaded from its own persistent cache does not serialize whole on XLA:CPU (its reloaded
  copy fails with 'Function ... not found'); entries are compiled with that cache bypassed, so one stored by a
  process whose JAX cache holds the program still runs. Fresh processes: JAX opens its cache once per
  process."""
  import subprocess
  import sys
  want = [256.0] * 5
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  run = lambda folder: subprocess.run([sys.executable, '-c', _WARM_JAX_CACHE, str(tmp_path / 'jax'), folder],
                                      cwd=root, env=env, capture_output=True, text=True, timeout=120)
  assert run('fill').returncode == 0 and os.listdir(tmp_path / 'jax')
  out = run(str(tmp_path / 'entries'))   # stored while JAX's cache holds the program, then loaded
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-2:] == ['0', str(want)]
  assert len(os.listdir(tmp_path / 'entries')) == 1
