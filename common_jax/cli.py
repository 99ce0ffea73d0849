"""Command-line plumbing shared by every entry point: absl start-up and the one-clear-error policy.

Bad input (a missing or malformed file, a wrong shape, an unknown config key, a bad value) ends the program
with a single `error: ...` line naming the culprit and exit code 2, not a traceback. The project's input
errors all derive from ValueError; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
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


def run(main):
  """absl's app.run, with flag and config-override errors reported as one line and exit code 2."""
  def flags_parser(argv):
    from absl import flags
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      message = str(e)
      if 'Traceback (most recent call last)' in message:   # a config file that raised while loading
        head = message.split('\n', 1)[0].rstrip(': ')
        message = f'{head}: {message.strip().splitlines()[-1]}'
      fail(message)
    except (AttributeError, KeyError, ValueError, TypeError) as e:  # ml_collections override errors
      fail(f'bad config override: {e}')
  app.run(main, flags_parser=flags_parser)


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
