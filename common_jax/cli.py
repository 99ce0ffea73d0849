"""Command-line plumbing shared by every entry point: absl start-up and the one-clear-error policy.

Bad input (a missing or malformed file, a wrong shape, an unknown config key, a bad value) ends the program
with a single `error: ...` line naming the culprit and exit code 2, not a traceback. The project's input
errors all derive from ValueError; anything else is a bug and keeps its traceback. A file-system error (a
workdir that is a file or read-only, a full disk), whether raised as an OSError or wrapped by a library such
as Orbax, is reported the same way as `error: PATH: what is wrong`, also with exit code 2; work finished
before it (checkpoints, partial results) is kept.
"""
from __future__ import annotations

import contextlib
import errno
import logging as std_logging
import os
import re
import sys

from absl import app


class UsageError(ValueError):
  pass


def fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


# errno values that say a path cannot be used as asked: reported as one line naming the path
FS_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                       errno.EACCES, errno.EPERM, errno.ENOENT})
# libraries that wrap an OSError in their own exception keep its number in the text (TensorStore, via
# Orbax: "... No space left on device [os_error_code='28']"; Python: "[Errno 28] ...")
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]|os_error_code='?(\d+)")
_QUOTED_PATH = re.compile(r'["\'](/[^"\']+)["\']')


def file_system_error(e: BaseException, path: str | None = None) -> str | None:
  """'PATH: what is wrong' when `e` comes from the file system, else None; `path` stands in for a path the
  error does not name."""
  code, where = None, None
  if isinstance(e, OSError) and e.errno in FS_ERRNOS:
    code, where = e.errno, e.filename
  elif m := _ERRNO_TEXT.search(str(e)):
    code, where = int(m.group(1) or m.group(2)), next(iter(_QUOTED_PATH.findall(str(e))), None)
  elif isinstance(e, RuntimeError) and (inner := e.__cause__ or e.__context__) is not None:
    return file_system_error(inner, path)   # a library's wrapper: what it wraps
  if code not in FS_ERRNOS:
    return None
  what = os.strerror(code)
  if code in (errno.ENOSPC, errno.EDQUOT):
    what += '; free some space and rerun the same command'
  return f'{where or path or "(no path reported)"}: {what}'


class _QuietFileSystemErrors(std_logging.Filter):
  """Drops the tracebacks libraries log from their worker threads for a file-system error: the main thread
  reports the same error as one line."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or file_system_error(exc) is None


def _quiet_unraisable(hook):
  """TensorStore futures that finish after Orbax closed its event loop on a failed save raise 'Event loop
  is closed' where nobody can catch it; the failure itself is reported as one line."""
  def quiet(unraisable):
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'):
      hook(unraisable)
  return quiet


@contextlib.contextmanager
def clear_errors(path: str | None = None):
  """Bad input and file-system errors inside become one `error:` line and exit code 2; `path` (a workdir)
  names the place of a file-system error whose message has none."""
  from absl import logging
  handler, quiet, hook = logging.get_absl_handler(), _QuietFileSystemErrors(), sys.unraisablehook
  handler.addFilter(quiet)
  sys.unraisablehook = _quiet_unraisable(hook)
  exiting_on_fs_error = False
  try:
    yield
  except Exception as e:   # anything not named below is re-raised with its traceback
    message = file_system_error(e, path)
    if message is not None:
      # the filters stay: asyncio logs the same failed futures again when they are collected at exit
      exiting_on_fs_error = True
      fail(message)
    if isinstance(e, (ValueError, FileNotFoundError, IsADirectoryError, PermissionError)):
      fail(str(e))
    raise
  finally:
    if not exiting_on_fs_error:
      handler.removeFilter(quiet)
      sys.unraisablehook = hook


def check_workdir(workdir: str) -> None:
  """Refuses, before anything is written, a workdir that is a file, lies under a file or cannot be written
  (read-only file system, no permission)."""
  target = os.path.abspath(workdir)
  existing = target   # the workdir, or the nearest existing folder it would be created in
  while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UsageError(f'{workdir}: ' + ('exists and is not a directory' if existing == target else
                                       f'cannot be created: {existing} is a file'))
  if not os.access(existing, os.W_OK | os.X_OK):
    why = 'read-only file system' if os.statvfs(existing).f_flag & os.ST_RDONLY else 'permission denied'
    raise UsageError(f'{workdir}: ' + (f'cannot be written ({why})' if existing == target else
                                       f'cannot be created: {existing} cannot be written ({why})'))


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA compilation cache: a second run with the same shapes skips compilation."""
  if not path:
    return
  import jax
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  # every executable, however quick to compile: a run of many small ones (the evaluation engine's, one per
  # shape) would otherwise compile them all again
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
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


def parse_config_flags(argv, flag_values=None):
  """absl flag parsing with flag and config-override errors reported as one line and exit code 2."""
  from absl import flags
  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    return flag_values(argv)
  except SystemExit:   # absl's --help exits 1 after printing; asking for help is no error
    if any(a.split('=')[0] in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
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
  app.run(main, flags_parser=parse_config_flags)


def run_config_program(body, config_help: str, workdir_help: str) -> None:
  """The `if __name__ == '__main__':` body of a program with a config file: defines --config (a locked
  ml_collections config file) and --workdir, then runs `body(config, workdir)` through `run`. The flags are
  defined here, not at import, so that tests can import the `run` of every such program in one process."""
  from absl import flags
  from ml_collections import config_flags
  flags.disclaim_key_flags()   # the flags belong to the calling program: its --help lists them
  config = config_flags.DEFINE_config_file('config', None, config_help, lock_config=True)
  workdir = flags.DEFINE_string('workdir', None, workdir_help)
  run(lambda argv: body(config.value, workdir.value))


def _require(config, workdir: str, example: str) -> None:
  if not workdir:
    fail('--workdir is required')
  if config is None:
    fail(f'--config is required (e.g. --config={example})')


@contextlib.contextmanager
def evaluation(config, workdir: str, example: str, outputs, validate):
  """The shared start of the evaluation entry points: checks --workdir/--config, then under `clear_errors`
  (bad input or a file-system error: one line, exit 2) the workdir; removes the `outputs` of an earlier run,
  since a failed run must not leave them looking like its own; checks the config's values
  (`validate(config)`) and starts jax.distributed on multi-process launches. The body evaluates."""
  _require(config, workdir, example)
  with clear_errors(workdir):
    check_workdir(workdir)
    from common_jax import distributed, io_util
    io_util.remove_if_exists(*(os.path.join(workdir, name) for name in outputs))
    validate(config)
    distributed.maybe_initialize()
    yield


def run_training(train_fn, config, workdir: str, training_error, example: str, validate=None):
  """The shared body of the training entry points: checks --workdir/--config, the config's values
  (`validate(config)`) and the workdir before anything is written, keeps Orbax's per-save INFO lines off the
  console unless --verbosity is given, runs `train_fn(config, workdir)` under `clear_errors` (bad input or a
  file-system error: one line, exit 2) and turns `training_error` (a non-finite loss) into one line and
  exit 3. Returns the training result, or the exit code of a usage error."""
  from absl import flags, logging
  _require(config, workdir, example)
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  with clear_errors(workdir):
    if validate is not None:
      validate(config)
    check_workdir(workdir)
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


def program(define_flags, run, doc: str = ''):
  """`main(argv=None) -> int` of a flag program whose whole work is `run(args)`: flags parsed by parse_flags,
  bad input and file-system errors as one line (clear_errors)."""
  def main(argv=None) -> int:
    args = parse_flags(define_flags, argv, doc)
    with clear_errors():
      run(args)
    return 0
  return main


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
