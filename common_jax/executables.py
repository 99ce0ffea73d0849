"""Compiled executables kept on disk and found again without tracing.

JAX's persistent compilation cache is keyed on the lowered program, so a warm run still traces and lowers
every function for every argument shape before it can look the executable up: 20-200 ms a call for the
evaluation engine's functions on a CPU, several seconds for a run over a few dozen shapes, which is most of
what a warm run of a small evaluation spends outside the computation itself. This cache is keyed on what
determines the program instead: a name, a fingerprint of the code and configuration that trace it, the
arguments' tree, shapes, dtypes and shardings, and the JAX version, backend and compiler options. It stores
the serialized executable, so a warm run deserializes it in a few milliseconds.

The entries live beside JAX's own cache (`<compilation cache folder>/executables`), written under a temporary
name and renamed; an entry that cannot be read is compiled again and replaced. With no compilation cache
folder configured, `compiled` simply lowers and compiles.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import sys
import threading
from typing import Optional, Sequence

import jax

from common_jax import io_util

FOLDER = 'executables'


def source_fingerprint(module_names: Sequence[str]) -> str:
  """A hash of the source files of the named (imported) modules: the code whose tracing the entries cache."""
  h = hashlib.sha256()
  for name in sorted(module_names):
    path = getattr(sys.modules[name], '__file__', None)
    h.update(name.encode())
    if path and os.path.exists(path):
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def default_folder() -> Optional[str]:
  """`executables` in JAX's compilation cache folder, or None when no persistent cache is configured."""
  base = jax.config.jax_compilation_cache_dir
  return os.path.join(os.path.expanduser(base), FOLDER) if base else None


def _sharding(s) -> str:
  if s is None:
    return 'none'
  ids = sorted(d.id for d in s.device_set) if hasattr(s, 'device_set') else ()
  return f'{s!r} devices={ids}'


def _environment() -> tuple:
  import jaxlib
  devices = jax.devices()
  return (jax.__version__, jaxlib.__version__, os.environ.get('XLA_FLAGS', ''),
          getattr(devices[0].client, 'platform_version', ''), tuple(d.device_kind for d in devices),
          jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision))


def key_of(name: str, fingerprint: str, args) -> str:
  """The entry's key: name, fingerprint, environment and every argument leaf's path, shape, dtype, weak type
  and sharding."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(args)
  parts = [name, fingerprint, repr(_environment()), str(tree)]
  for path, x in leaves:
    parts.append(f'{jax.tree_util.keystr(path)} {tuple(x.shape)} {x.dtype} {getattr(x, "weak_type", False)} '
                 f'{_sharding(getattr(x, "sharding", None))}')
  return hashlib.sha256('\n'.join(parts).encode()).hexdigest()


def _load(path: str):
  from jax.experimental import serialize_executable
  with open(path, 'rb') as f:
    payload, in_tree, out_tree, device_ids = pickle.load(f)   # written by this module only, in a per-user folder
  by_id = {d.id: d for d in jax.devices()}
  return serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                   execution_devices=[by_id[i] for i in device_ids])


def _store(path: str, compiled) -> None:
  from jax.experimental import serialize_executable
  # the devices it runs on (by default a loaded executable would expect every device of the backend)
  device_ids = [d.id for d in compiled._executable._unloaded_executable.device_list]
  # concurrent writers of one key write the same bytes; the last rename wins
  io_util.write_pickle(path, (*serialize_executable.serialize(compiled), device_ids))


_local = threading.local()
_install_lock = threading.Lock()
_installed = False


def _count_hit(event: str, **_) -> None:
  if event == '/jax/compilation_cache/cache_hits':   # per thread: the engine compiles in a thread of its own
    _local.hits = getattr(_local, 'hits', 0) + 1


def _install() -> None:
  """Once per process: the cache-hit counter, and a bypass of JAX's persistent cache for the thread that
  compiles an entry (JAX asks compilation_cache.is_cache_used before it reads or writes that cache). Where
  this JAX has no such hook, entries are stored only when JAX reports no hit."""
  global _installed
  with _install_lock:
    if _installed:
      return
    _installed = True
    jax.monitoring.register_event_listener(_count_hit)
    from jax._src import compilation_cache as jax_cache
    used = getattr(jax_cache, 'is_cache_used', None)
    if callable(used):
      jax_cache.is_cache_used = lambda backend: False if getattr(_local, 'bypass', False) else used(backend)


def _compile(fn, args):
  """(executable, whether it may be stored). An executable JAX loaded from its own persistent cache serializes
  without its compiled functions on XLA:CPU (the reloaded copy fails with 'Function ... not found'), so
  entries are compiled with that cache bypassed in this thread, and one that JAX still reports taking from
  its cache is not stored."""
  _install()
  hits = getattr(_local, 'hits', 0)
  _local.bypass = True
  try:
    out = fn.lower(*args).compile()
  finally:
    _local.bypass = False
  return out, getattr(_local, 'hits', 0) == hits


def compiled(fn, args: tuple, name: str, fingerprint: str, folder: Optional[str] = None):
  """`fn.lower(*args).compile()` (args: arrays or ShapeDtypeStructs with shardings), through the cache."""
  folder = folder or default_folder()
  if not folder:
    return fn.lower(*args).compile()
  path = os.path.join(folder, key_of(name, fingerprint, args) + '.bin')
  if os.path.exists(path):
    try:
      return _load(path)
    except Exception as e:  # a truncated or foreign entry: compile again and replace it
      logging.warning('executable cache entry %s unreadable (%s: %s); compiling again', path,
                      type(e).__name__, e)
  out, fresh = _compile(fn, args)
  if not fresh:   # it might not serialize whole: leave it unstored (see _compile)
    return out
  try:
    _store(path, out)
  except Exception as e:  # a backend that cannot serialize, a read-only folder: the run goes on uncached
    logging.warning('executable cache: could not store %s (%s: %s)', name, type(e).__name__, e)
  return out
