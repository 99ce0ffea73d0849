"""Helpers shared by the launch scripts (launch/tpu.py, launch/gpu.py): argument parsing with the project's
one-line errors, and a command runner with a dry-run mode.

Every command a script would run goes through `Runner.run`: it is echoed as one `+ ...` line, shell-quoted
with shlex.join so it can be pasted into a shell, and executed unless the runner is a dry run. Environment
variables set for a command are echoed as `env K=V ... cmd`, which is what the line means in a shell too.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Mapping, Sequence


class Parser(argparse.ArgumentParser):
  """argparse with `error: ...` on one line and exit code 2 (no usage block), as the project's other CLIs."""

  def error(self, message):
    print(f'error: {self.prog}: {message}', file=sys.stderr, flush=True)
    sys.exit(2)


def fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


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
