"""Checks of config values made before any work starts: sizes, periods, counts and rates.

Each check takes the root config and dotted keys, and raises `cli.UsageError` naming the field and what is
wrong (`config.log_every=0: must be a positive integer`), so the entry points end with one error line and
exit code 2 before a workdir is created. Each system writes one `validate` per config kind out of these.
"""
from __future__ import annotations

import math
import numbers

from common_jax.cli import UsageError


def get(config, key: str):
  value = config
  for part in key.split('.'):
    value = value[int(part)] if part.isdigit() and isinstance(value, (tuple, list)) else value[part]
  return value


def bad(key: str, value, what: str):
  raise UsageError(f'config.{key}={value!r}: {what}')


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:   # a finite int or float; NaN and inf are never a valid size or rate
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def at_least(config, minimum: int, *keys, why: str = '') -> None:
  for key in keys:
    v = get(config, key)
    if not _is_int(v) or v < minimum:
      what = {1: 'a positive integer', 0: 'a non-negative integer'}.get(minimum, f'an integer >= {minimum}')
      bad(key, v, f'must be {what}' + (f' ({why})' if why else ''))


def positive(config, *keys, why: str = '') -> None:
  """Sizes, counts and periods that must be >= 1 (`0` would divide by zero, loop forever or do nothing)."""
  at_least(config, 1, *keys, why=why)


def non_negative(config, *keys, why: str = '') -> None:
  """Integers where 0 has a documented meaning (`why`: e.g. "0: never")."""
  at_least(config, 0, *keys, why=why)


def each_positive(config, key: str) -> None:
  v = get(config, key)
  if isinstance(v, (str, bytes)) or not hasattr(v, '__len__') or not len(v) or not all(
      _is_int(x) and x >= 1 for x in v):
    bad(key, tuple(v) if isinstance(v, list) else v, 'must be a non-empty sequence of positive integers')


def number(config, *keys, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> None:
  """Finite numbers in [low, high]; `low_open`/`high_open` exclude that end."""
  for key in keys:
    v = get(config, key)
    ok = _is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
      bad(key, v, 'must be a finite number ' + _interval(low, high, low_open, high_open))


def _interval(low, high, low_open, high_open) -> str:
  if high == math.inf:
    return f'{">" if low_open else ">="} {low:g}'
  return f'in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'


def positive_number(config, *keys) -> None:
  number(config, *keys, low=0., low_open=True)


def non_negative_number(config, *keys) -> None:
  number(config, *keys, low=0.)


def fraction(config, *keys) -> None:
  """Probabilities and rates in [0, 1]."""
  number(config, *keys, low=0., high=1.)


def sequence(config, key: str, length: int) -> None:
  """A tuple of `length` items (check the items with their dotted indices, e.g. 'viv_lambda.0')."""
  v = get(config, key)
  if not isinstance(v, (tuple, list)) or len(v) != length:
    bad(key, v, f'must be a sequence of {length} values')


def one_of(config, key: str, choices) -> None:
  v = get(config, key)
  if v not in tuple(choices) or isinstance(v, bool):
    bad(key, v, f'must be one of {tuple(choices)}')


def mesh(config, key: str = 'mesh') -> None:
  """((axis name, size), ...): each size a positive integer, or -1 (once) for "the remaining devices"."""
  v = get(config, key)
  try:
    sizes = [size for _, size in v]
  except (TypeError, ValueError):
    sizes = None
  if (not sizes or not all(_is_int(s) and (s >= 1 or s == -1) for s in sizes) or sizes.count(-1) > 1):
    bad(key, v, 'must be ((axis name, size), ...) with positive sizes and at most one -1 (the remaining '
         'devices)')
