r"""Search an AVHash index by Hamming distance: which indexed videos are closest to a query video.

  python -m avhash_jax.search --index=my_index --query=clip.mp4 --checkpoint=ckpt/avhash_64 \
      --clip=ckpt/clip_vitl14 --ast=ckpt/ast

  python -m avhash_jax.search --index=my_index --query_id=video1            # a video already in the index
  python -m avhash_jax.search --index=my_index --queries=queries.txt       # one id or video path a line

A query video goes through the same extractor and checkpoint as the index (a checkpoint other than the one
the index was built with is refused). Its code is compared with every indexed code (common_jax.hamming: the
fastest exact backend for the collection size, or --backend). Prints a ranked table (rank, id, path, distance,
score = 1 - distance/bits) with per-stage timings, and writes results.jsonl and results.csv into --output.
A query id is left out of its own results.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import flags

from avhash_jax import index as index_lib
from common_jax import cli, hamming, io_util
from common_jax.index_dir import IndexDir, IndexDirError
from extraction import runner as extraction

FIELDS = ('query', 'rank', 'id', 'path', 'distance', 'score')


class QueryError(ValueError):
  """A query that cannot be answered: the message names the video, id or list line."""


def open_index(path: str):
  """(IndexDir, ids, packed codes); an empty index is an error."""
  ix = IndexDir.open(path, index_lib.KIND)
  ids, codes = index_lib.codes_of(ix, write=False)
  if not ids:
    raise IndexDirError(f'{path}: the index is empty; add videos with python -m avhash_jax.index')
  return ix, ids, codes


def check_model(ix: IndexDir, model, checkpoint: str) -> None:
  want = index_lib.index_config(model[0], model[2])
  if diff := [f'{k}: index has {ix.config.get(k)!r}, checkpoint has {want[k]!r}' for k in want
              if want[k] != ix.config.get(k)]:
    raise QueryError(f'{checkpoint}: not the checkpoint the index {ix.path} was built with ({"; ".join(diff)})')


def code_videos(paths, model, clip: str, ast: str, workers: int = 4) -> np.ndarray:
  """Packed codes of video files, in order; an unreadable video is an error naming it."""
  videos = [extraction.Video(f'q{i:06d}', p) for i, p in enumerate(paths)]
  for v in videos:
    if not os.path.isfile(v.path):
      raise QueryError(f'{v.path}: query video not found')
  from absl import logging
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)   # a failed query is reported once, as the error below
  try:
    with tempfile.TemporaryDirectory(prefix='avhash_query.') as work:
      return _code_in(work, videos, model, clip, ast, workers)
  finally:
    logging.set_verbosity(level)


def _code_in(work, videos, model, clip, ast, workers):
  image, audio, failures = index_lib.extract_features(videos, work, clip, ast, workers)
  for f in failures:
    raise QueryError(f'{f["path"]}: cannot read the query video ({f["reason"]}: {f["error"]})')
  from input_pipeline.avhash.lists import AVFeatures
  feats = AVFeatures(image, audio, frames=model[0].tokens, dim=model[0].hidden_size)
  try:
    return index_lib.code_features(model[0], model[1], feats, [v.video_id for v in videos])
  finally:
    feats.close()


def read_queries(path: str, ix: IndexDir) -> list:
  """('id', ID) or ('video', PATH) per line of a query list (relative paths from the list's folder)."""
  if not os.path.isfile(path):
    raise QueryError(f'{path}: query list not found')
  out, base = [], os.path.dirname(os.path.abspath(path))
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      if line in ix:
        out.append(('id', line))
      elif os.path.isfile(os.path.join(base, line)):
        out.append(('video', os.path.join(base, line)))
      else:
        raise QueryError(f'{path}:{n}: {line!r} is neither a video id in the index nor a video file')
  if not out:
    raise QueryError(f'{path}: the query list is empty')
  return out


def search_codes(searcher, ids, q_codes, q_names, top_k: int, exclude=(), min_score: float = 0.0):
  """Result rows (dicts of FIELDS but path) for packed query codes; `exclude[i]`: an id left out of query i."""
  bits = 8 * searcher.nbytes
  dist, idx = searcher.search(q_codes, top_k + 1)
  rows = []
  for i, name in enumerate(q_names):
    rank = 0
    for d, j in zip(dist[i], idx[i]):
      if j < 0 or (i < len(exclude) and ids[j] == exclude[i]):
        continue
      score = 1.0 - d / bits
      if rank == top_k or score < min_score:
        break
      rank += 1
      rows.append({'query': name, 'rank': rank, 'id': ids[j], 'distance': int(d), 'score': round(score, 6)})
  return rows


def write_results(folder: str, rows) -> None:
  os.makedirs(folder, exist_ok=True)
  with io_util.atomic_open(os.path.join(folder, 'results.jsonl')) as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, FIELDS)
  writer.writeheader()
  writer.writerows(rows)
  with io_util.atomic_open(os.path.join(folder, 'results.csv')) as f:
    f.write(buf.getvalue())


def print_table(rows, timings: dict, out=None) -> None:
  out, query = out or sys.stdout, None
  for r in rows:
    if r['query'] != query:
      query = r['query']
      print(f'\nquery {query}\n{"rank":>4}  {"id":<24} {"distance":>8} {"score":>7}  path', file=out)
    print(f'{r["rank"]:>4}  {r["id"]:<24} {r["distance"]:>8} {r["score"]:>7.4f}  {r["path"]}', file=out)
  print('\ntimings: ' + ', '.join(f'{k} {v:.3f} s' for k, v in timings.items()), file=out)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('index', None, 'index directory (python -m avhash_jax.index)', flag_values=fv, required=True)
  flags.DEFINE_string('query', '', 'a query video file', flag_values=fv)
  flags.DEFINE_string('query_id', '', 'or: the id of a video in the index', flag_values=fv)
  flags.DEFINE_string('queries', '', 'or: a list file, one video id or video path a line', flag_values=fv)
  flags.DEFINE_string('checkpoint', '', 'the index\'s AVHash checkpoint (for query videos)', flag_values=fv)
  flags.DEFINE_string('clip', '', 'converted clip_vitl14 directory (for query videos)', flag_values=fv)
  flags.DEFINE_string('ast', '', 'converted ast directory (for query videos)', flag_values=fv)
  flags.DEFINE_integer('top_k', 20, 'results per query', flag_values=fv, lower_bound=1)
  flags.DEFINE_float('min_score', 0.0, 'drop results scoring below this (score = 1 - distance/bits)',
                     flag_values=fv)
  flags.DEFINE_enum('backend', 'auto', ['auto', *hamming.BACKENDS], 'Hamming top-k backend', flag_values=fv)
  flags.DEFINE_string('output', '.', 'folder for results.jsonl and results.csv', flag_values=fv)
  flags.DEFINE_integer('workers', 4, 'decoding threads (query videos)', flag_values=fv, lower_bound=1)


def run(args):
  """(result rows, timings)."""
  if sum(map(bool, (args.query, args.query_id, args.queries))) != 1:
    raise cli.UsageError('give exactly one of --query, --query_id and --queries')
  t0 = time.perf_counter()
  ix, ids, codes = open_index(args.index)
  queries = ([('video', args.query)] if args.query else [('id', args.query_id)] if args.query_id
             else read_queries(args.queries, ix))
  timings = {'open': time.perf_counter() - t0}
  names, q_codes, exclude = [], np.zeros((len(queries), codes.shape[1]), np.uint8), []
  position = {v: i for i, v in enumerate(ids)}
  videos = [i for i, (kind, _) in enumerate(queries) if kind == 'video']
  if videos:
    if not (args.checkpoint and args.clip and args.ast):
      raise cli.UsageError('a query video needs --checkpoint, --clip and --ast (those the index was built with)')
    t = time.perf_counter()
    model = index_lib.load_checkpoint(args.checkpoint)
    check_model(ix, model, args.checkpoint)
    q_codes[videos] = code_videos([queries[i][1] for i in videos], model, args.clip, args.ast, args.workers)
    timings['query codes'] = time.perf_counter() - t
  for i, (kind, value) in enumerate(queries):
    if kind == 'id':
      if value not in position:
        raise QueryError(f'{args.index}: video id {value!r} is not in the index ({len(ids)} videos)')
      q_codes[i] = codes[position[value]]
    names.append(value)
    exclude.append(value if kind == 'id' else None)
  t = time.perf_counter()
  searcher = hamming.Searcher(codes, args.backend)
  rows = search_codes(searcher, ids, q_codes, names, args.top_k, exclude, args.min_score)
  timings['search'] = time.perf_counter() - t
  for r in rows:
    r['path'] = ix.meta(r['id']).get('path', '')
  write_results(args.output, [{k: r[k] for k in FIELDS} for r in rows])
  return rows, timings


def main(argv=None) -> int:
  args = cli.parse_flags(define_flags, argv, __doc__)
  with cli.clear_errors():
    rows, timings = run(args)
  print_table(rows, timings)
  return 0


if __name__ == '__main__':
  cli.run_main(main)
