"""Command-line plumbing shared by every entry point: absl start-up and the one-clear-error policy.

Bad input (a missing or malformed file, a wrong shape, an unknown config key, a bad value) ends the program
with a single `error: ...` line naming the culprit and exit code 2, not a traceback. The project's input
errors all derive from ValueError; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import re
import sys

from absl import app


class UsageError(ValueError):
  pass


def fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


@contextlib.contextmanager
def clear_errors():
  try:
    yield
  except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
    fail(str(e))


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA compilation cache: a second run with the same shapes skips compilation."""
  if not path:
    return
  import os
  import jax
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def _flag_value(args, name: str):
  """The value given to --NAME in `args` (`--NAME=V` or `--NAME V`), or None."""
  for i, arg in enumerate(args):
    if re.fullmatch(rf'--?{name}', arg):
      return args[i + 1] if i + 1 < len(args) else None
    if m := re.fullmatch(rf'--?{name}=(.*)', arg):
      return m.group(1)
  return None


def _missing_key_hint(config, path: str) -> str:
  """'; did you mean ...?' with the keys beside the first part of `path` that the config lacks."""
  import difflib
  node = config
  for part in path.split('.'):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=3)
      return f'; did you mean {" or ".join(repr(c) for c in close)}?' if close else ''
    node = node[part]
  return ''


def _config_override_error(flag_values, argv) -> str | None:
  """'unknown config key ...' for the first --NAME.PATH override whose PATH is not a field of config NAME
  (ml_collections itself reports only the missing part, as a bare KeyError)."""
  from ml_collections.config_flags import config_path
  args = list(argv[1:])
  for arg in args:
    m = re.fullmatch(r'--?(\w+)\.([\w.]+)(=.*)?', arg)
    if not m or m.group(1) not in flag_values:
      continue
    name, path = m.group(1), m.group(2)
    try:
      config = flag_values[name].parser.parse(_flag_value(args, name))
    except Exception:   # not a config flag, or its file does not load: absl's own message stands
      continue
    try:
      config_path.get_type(path, config)
    except Exception:   # any failure to resolve PATH in the config is the answer
      return f'unknown config key {path!r} in {arg}{_missing_key_hint(config, path)}'
  return None


def parse_flags(argv, flag_values=None):
  """absl flag parsing with flag and config-override errors reported as one line and exit code 2."""
  from absl import flags
  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    return flag_values(argv)
  except flags.Error as e:
    message = str(e)
    if 'Traceback (most recent call last)' in message:   # a config file that raised while loading
      head = message.split('\n', 1)[0].rstrip(': ')
      message = f'{head}: {message.strip().splitlines()[-1]}'
    fail(message)
  except (AttributeError, KeyError, ValueError, TypeError) as e:  # ml_collections override errors
    fail(_config_override_error(flag_values, argv) or f'bad config override: {e}')


def run(main):
  """absl's app.run, with flag and config-override errors reported as one line and exit code 2."""
  app.run(main, flags_parser=parse_flags)


def run_training(train_fn, config, workdir: str, training_error, example: str):
  """The shared body of the training entry points: checks --workdir/--config, keeps Orbax's per-save INFO
  lines off the console unless --verbosity is given, runs `train_fn(config, workdir)` under `clear_errors`
  (bad input: one line, exit 2) and turns `training_error` (a non-finite loss) into one line and exit 3.
  Returns the training result, or the exit code of a usage error."""
  from absl import flags, logging
  if not workdir:
    return fail('--workdir is required')
  if config is None:
    return fail(f'--config is required (e.g. --config={example})')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  with clear_errors():
    from common_jax import distributed
    distributed.maybe_initialize()   # before any JAX backend starts; only on multi-process launches
    try:
      return train_fn(config, workdir)
    except training_error as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(3)
