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


# ------------------------------------------------------------------------------------------------------------
# Flag programs: the `python -m` entry points without a config file
# ------------------------------------------------------------------------------------------------------------
# Each defines its absl flags on a FRESH flags.FlagValues per call, never on the global flags.FLAGS: absl
# names are process-global, so two programs with an --output would collide (DuplicateFlagError) in one test
# process, and a test could not call `main([...])` twice. The programs with a config file (ml_collections,
# `run` above) keep the global FLAGS: only one of them runs per process.

HELP_FLAGS = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull')


def parse_flags(define_flags, argv=None, doc: str = '', positional: str | None = None):
  r"""Parses `argv` (no program name; sys.argv[1:] when None) into a namespace of flag values.

  `define_flags(fv)` defines the program's flags on a new flags.FlagValues. --help prints `doc` (the module
  docstring: what the program does and an example command) and the flags, and exits 0. A parse error (unknown
  flag, bad value, missing required flag, a stray argument) is one `error: ...` line and exit code 2.
  Arguments after `--` and other positional arguments are refused, unless `positional` names the attribute
  that collects them (a list, possibly empty: the program checks it).

  The pattern, one program `pkg/prog.py` (this is how an argparse program is converted, line by line):

    r'''What the program does, in one line.

      python -m pkg.prog --input=in.h5 --output=out        # the example command --help shows
    '''
    from absl import flags
    from common_jax import cli

    def define_flags(fv: flags.FlagValues) -> None:
      flags.DEFINE_string('input', None, 'what it is', flag_values=fv, required=True)   # required=True
      flags.DEFINE_string('name', 'x', 'what it is', flag_values=fv)                    # default='x'
      flags.DEFINE_integer('n', None, 'what it is', flag_values=fv)                     # type=int
      flags.DEFINE_float('fps', 1.0, 'what it is', flag_values=fv)                      # type=float
      flags.DEFINE_enum('mode', 'eval', ['eval', 'train'], 'what', flag_values=fv)      # choices=
      flags.DEFINE_bool('dry_run', False, 'what it is', flag_values=fv)                 # store_true: --x/--nox
      flags.DEFINE_multi_string('list', [], 'repeatable', flag_values=fv)              # action='append'
      shared.define_flags(fv)                               # a shared group (argparse: shared.add_flags(parser))

    def main(argv=None) -> int:
      args = cli.parse_flags(define_flags, argv, __doc__)   # args.input, args.n, ... (dest= becomes the name)
      with cli.clear_errors():                              # bad input: one `error: ...` line, exit code 2
        ...
      return 0

    if __name__ == '__main__':
      cli.run_main(main)

  Positional arguments (argparse nargs='+'): `cli.parse_flags(define_flags, argv, __doc__, positional='parts')`
  gives `args.parts`; `if not args.parts: return cli.fail('give ...')`. Sub-commands (`script ACTION --flags
  -- program`): launch.common.parse. Tests call `prog.main(['--input=a', '--n', '3'])` and get the exit code
  back; `--flag value`, `--flag=value`, `--x`/`--nox` for booleans and --flagfile work as absl parses them.
  """
  import types

  from absl import flags
  argv = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  define_flags(fv)
  head = argv[:argv.index('--')] if '--' in argv else argv
  if any(a in HELP_FLAGS for a in head):
    print_help(fv, doc)
    sys.exit(0)
  try:
    rest = fv(['prog'] + argv)[1:]
  except flags.Error as e:
    fail(_one_line(str(e)))
  if rest and positional is None:
    fail(f'unexpected argument {rest[0]!r} (flags are written --name=value)')
  args = types.SimpleNamespace(**fv.flag_values_dict())
  if positional is not None:
    setattr(args, positional, rest)
  return args


def print_help(fv, doc: str = '') -> None:
  """The docstring, then each flag with its help and default (absl's layout, without the module headings) and
  the required ones (absl's help does not mark them)."""
  text = fv.get_help(include_special_flags=False)
  lines = [line for line in text.splitlines() if line.startswith(' ')]
  required = [f'--{name}' for name in sorted(fv)
              if any('must have a value other than None' in getattr(v, 'message', '') for v in fv[name].validators)]
  print((doc or '').strip('\n'))
  if lines:
    print('\nflags:\n' + '\n'.join(lines))
  if required:
    print(f'required: {", ".join(required)}')
  sys.stdout.flush()


def _one_line(message: str) -> str:
  """absl's parse errors as one line; a missing required flag reads `--x is required`."""
  import re
  message = re.sub(r'flag --(\w+)=None: Flag --\1 must have a value other than None\.', r'--\1 is required',
                   message)
  return '; '.join(line.strip() for line in message.splitlines() if line.strip())


def run_main(main) -> None:
  """The `if __name__ == '__main__':` body of a flag program: absl's start-up (app.run: logging, fault
  handler), then `sys.exit(main(sys.argv[1:]))`. The program parses its own flags (parse_flags); absl's global
  ones keep their defaults, logging at WARNING so that library INFO lines stay off the console."""
  from absl import flags

  def parse_none(argv):
    flags.FLAGS(argv[:1])
    flags.FLAGS.verbosity = -1   # WARNING; app.run would otherwise switch an unset verbosity to INFO
    return argv

  app.run(lambda argv: main(argv[1:]), flags_parser=parse_none)
