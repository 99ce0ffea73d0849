"""The Video Similarity Challenge 2022 CSV formats: matches (matching track), candidate pairs (descriptor
track) and the ground truth, which is a matches file whose score column may be absent.

  matches:  query_id,ref_id,query_start,query_end,ref_start,ref_end,score   (times in seconds)
  pairs:    query_id,ref_id,score

Columns may come in any order (the header names them); extra columns are ignored. Ids are kept as the text
the file holds (VSC's 'Q100001', 'R200001', or any other name). A malformed line (wrong number of fields, a
value that is not a number, an empty id, a negative or non-finite time, an end before its start, a missing
column) raises VscFormatError naming the file and line. Writers replace their file atomically.
"""
from __future__ import annotations

import csv
import dataclasses
import math

from common_jax import io_util

MATCH_COLUMNS = ('query_id', 'ref_id', 'query_start', 'query_end', 'ref_start', 'ref_end', 'score')
PAIR_COLUMNS = ('query_id', 'ref_id', 'score')


class VscFormatError(ValueError):
  """A VSC CSV file that cannot be read: the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Match:
  """A copied segment: [query_start, query_end] of the query is [ref_start, ref_end] of the reference."""
  query_id: str
  ref_id: str
  query_start: float
  query_end: float
  ref_start: float
  ref_end: float
  score: float = 1.0

  @property
  def pair(self) -> tuple[str, str]:
    return self.query_id, self.ref_id

  def interval(self, axis: int) -> tuple[float, float]:
    """Axis 0: the query's time span; axis 1: the reference's."""
    return (self.query_start, self.query_end) if axis == 0 else (self.ref_start, self.ref_end)


@dataclasses.dataclass(frozen=True)
class Pair:
  """A candidate pair of the descriptor track: the query is said to copy part of the reference."""
  query_id: str
  ref_id: str
  score: float

  @property
  def pair(self) -> tuple[str, str]:
    return self.query_id, self.ref_id


def _rows(path: str, required: tuple[str, ...]):
  """(line number, {column: text}) for each data row of `path`, checked for shape."""
  try:
    f = open(path, newline='', encoding='utf-8')
  except FileNotFoundError:
    raise VscFormatError(f'{path}: no such file') from None
  with f:
    reader = csv.reader(f)
    try:
      header = [h.strip() for h in next(reader)]
    except StopIteration:
      raise VscFormatError(f'{path}: empty file, expected a header {",".join(required)}') from None
    except (csv.Error, UnicodeDecodeError) as e:
      raise VscFormatError(f'{path}:1: {e}') from None
    missing = [c for c in required if c not in header]
    if missing:
      raise VscFormatError(f'{path}:1: missing column{"s" if len(missing) > 1 else ""} {", ".join(missing)} '
                           f'(header: {",".join(header)})')
    while True:
      try:
        fields = next(reader)
      except StopIteration:
        return
      except (csv.Error, UnicodeDecodeError) as e:
        raise VscFormatError(f'{path}:{reader.line_num}: {e}') from None
      if not fields or all(not x.strip() for x in fields):
        continue   # blank lines carry nothing
      if len(fields) != len(header):
        raise VscFormatError(f'{path}:{reader.line_num}: {len(fields)} fields, the header has {len(header)}')
      yield reader.line_num, {h: x.strip() for h, x in zip(header, fields)}


def _number(path, line, row, column) -> float:
  try:
    value = float(row[column])
  except ValueError:
    raise VscFormatError(f'{path}:{line}: {column} {row[column]!r} is not a number') from None
  if not math.isfinite(value):
    raise VscFormatError(f'{path}:{line}: {column} is {row[column]}')
  return value


def _ids(path, line, row) -> tuple[str, str]:
  for column in ('query_id', 'ref_id'):
    if not row[column]:
      raise VscFormatError(f'{path}:{line}: empty {column}')
  return row['query_id'], row['ref_id']


def read_matches(path: str, ground_truth: bool = False) -> list[Match]:
  """The matches of a matching-track CSV; `ground_truth`: the score column is optional (1.0)."""
  required = MATCH_COLUMNS[:-1] if ground_truth else MATCH_COLUMNS
  out = []
  for line, row in _rows(path, required):
    ids = _ids(path, line, row)
    times = [_number(path, line, row, c) for c in MATCH_COLUMNS[2:6]]
    for column, t in zip(MATCH_COLUMNS[2:6], times):
      if t < 0:
        raise VscFormatError(f'{path}:{line}: negative time {column}={t:g}')
    for axis in ('query', 'ref'):
      start, end = times[0:2] if axis == 'query' else times[2:4]
      if end < start:
        raise VscFormatError(f'{path}:{line}: {axis}_end {end:g} is before {axis}_start {start:g}')
    score = _number(path, line, row, 'score') if 'score' in row and (row['score'] or not ground_truth) else 1.0
    out.append(Match(*ids, *times, score))
  return out


def read_pairs(path: str) -> list[Pair]:
  """The candidate pairs of a descriptor-track CSV; a pair listed twice is an error (its score is ambiguous)."""
  out, seen = [], {}
  for line, row in _rows(path, PAIR_COLUMNS):
    p = Pair(*_ids(path, line, row), _number(path, line, row, 'score'))
    if p.pair in seen:
      raise VscFormatError(f'{path}:{line}: pair {p.query_id},{p.ref_id} already listed on line {seen[p.pair]}')
    seen[p.pair] = line
    out.append(p)
  return out


def pairs_from_matches(matches) -> list[Pair]:
  """One candidate pair per (query, reference) with the best score of its matches, as VSC derives them."""
  best = {}
  for m in matches:
    best[m.pair] = max(best.get(m.pair, -math.inf), m.score)
  return [Pair(q, r, s) for (q, r), s in best.items()]


def write_matches(path: str, matches) -> None:
  with io_util.atomic_open(path, 'w') as f:
    w = csv.writer(f, lineterminator='\n')
    w.writerow(MATCH_COLUMNS)
    for m in matches:
      w.writerow([m.query_id, m.ref_id, *(repr(float(getattr(m, c))) for c in MATCH_COLUMNS[2:])])


def write_pairs(path: str, pairs) -> None:
  with io_util.atomic_open(path, 'w') as f:
    w = csv.writer(f, lineterminator='\n')
    w.writerow(PAIR_COLUMNS)
    for p in pairs:
      w.writerow([p.query_id, p.ref_id, repr(float(p.score))])
