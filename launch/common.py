"""Helpers shared by the launch scripts (launch/tpu.py, launch/gpu.py): `script ACTION --flag=... -- program`
parsing with absl flags and the project's one-line errors, and a command runner with a dry-run mode.

Every command a script would run goes through `Runner.run`: it is echoed as one `+ ...` line, shell-quoted
with shlex.join so it can be pasted into a shell, and executed unless the runner is a dry run. Environment
variables set for a command are echoed as `env K=V ... cmd`, which is what the line means in a shell too.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Callable, Mapping, Sequence

from absl import flags

from common_jax import cli
from common_jax.cli import fail


def define_dry_run(fv: flags.FlagValues) -> None:
  flags.DEFINE_bool('dry_run', False, 'print the commands, run nothing', flag_values=fv)


def parse(actions: Mapping[str, tuple[str, Callable]], argv, doc: str, prog: str):
  """(action, flag values, program) from `ACTION [--flag=value ...] [-- program ...]`. `actions` maps each
  action to (one line of help, define_flags(fv)); each action has its own flags (cli.parse_flags). --help
  alone lists the actions, after an action also its flags."""
  launcher, program = split_command(sys.argv[1:] if argv is None else argv)
  listing = '\n'.join(f'  {name:<8}{text}' for name, (text, _) in actions.items())
  if not launcher or launcher[0] in cli.HELP_FLAGS:
    if launcher:
      print(f'{doc.strip()}\n\nactions ({prog} ACTION --help for its flags):\n{listing}', flush=True)
      sys.exit(0)
    fail(f'{prog}: give an action: {", ".join(actions)}')
  action = launcher[0]
  if action not in actions:
    fail(f'{prog}: invalid choice {action!r} for the action (choose from {", ".join(actions)})')
  text, define_flags = actions[action]
  args = cli.parse_flags(define_flags, launcher[1:], f'{doc.strip()}\n\n{prog} {action}: {text}')
  return action, args, program


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits `launcher args -- program args` at the first `--`; the program part may be empty."""
  argv = list(argv)
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
  return argv, []


def shell_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
  prefix = ['env'] + [f'{k}={v}' for k, v in env.items()] if env else []
  return shlex.join(prefix + list(argv))


class Runner:
  """Echoes each command as `+ ...` and runs it (or, on a dry run, only echoes it)."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def echo(self, line: str) -> None:
    print(f'+ {line}', file=self.out, flush=True)

  def note(self, text: str) -> None:
    print(f'# {text}', file=self.out, flush=True)

  def run(self, argv: Sequence[str], check: bool = True, capture: bool = False) -> str:
    """Runs argv (no shell); returns its stdout when `capture`. A failure ends the launcher with its code."""
    self.echo(shell_line(argv))
    if self.dry_run:
      return ''
    try:
      result = subprocess.run(list(argv), check=False, text=True,
                              stdout=subprocess.PIPE if capture else None)
    except FileNotFoundError:
      fail(f'{argv[0]} is not installed or not on PATH')
    if check and result.returncode:
      fail(f'{argv[0]} exited with code {result.returncode}', code=result.returncode)
    return result.stdout or ''
