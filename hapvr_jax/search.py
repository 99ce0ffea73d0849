r"""Search a HAP-VR index (hapvr_jax.index) for the videos that contain a query video, or parts of it.

  python -m hapvr_jax.search --index=my_index --checkpoint=ckpt/hapvr --query=clip.mp4 \
      --resnet=ckpt/resnet50_irmac --top_k=10

Queries: `--query=video.mp4` (extracted as the index's videos were, with `--resnet`), `--query_id=ID` (a
video already in the index) or `--queries=LIST` (one per line: a video file, or an id in the index).
Stage 1 shortlists `--shortlist` candidates per query (a count, a percentage such as 10%, or `all`) by the
inner product of the coarse descriptors (hapvr_jax.coarse, in FAISS); stage 2 scores the shortlist with the
similarity network through the evaluation engine (bucketed, batched, sharded over the devices).
`--shortlist=all` scores every video: the same scores as hapvr_jax.evaluate. The region attention of the
index's videos is kept per checkpoint in the index folder (hapvr_jax.index_attention): the first search after
the index or the checkpoint changes computes it. Prints a ranked table per query
(rank, id, path, score, coarse score) and the time of each stage, and writes results.jsonl, results.csv and the
VSC descriptor-track candidates.csv (query_id,ref_id,score) into `--output`.

`--localize` also finds where each reported pair matches (hapvr_jax.matches, hapvr_jax.localize): zero or more
segments (query_start, query_end, ref_start, ref_end, score) in seconds per result, in results.jsonl and in the
VSC matching-track matches.csv. `--report=DIR` writes DIR/index.html, a self-contained page with the frame
strips, scores, segments and frame-similarity maps of every result (hapvr_jax.report):

  python -m hapvr_jax.search --index=my_index --checkpoint=ckpt/hapvr --resnet=ckpt/resnet50_irmac \
      --queries=queries.txt --localize --report=report --output=results
 Bad input (an unreadable query video, an empty index, an unknown id, a checkpoint or
backbone whose feature size differs from the index's, a corrupt index file) is one error line, exit 2.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time

import numpy as np
from absl import flags

from common_jax import cli, io_util
from common_jax.index_dir import IndexDir, IndexDirError
from hapvr_jax import coarse
from hapvr_jax import index as index_lib
from hapvr_jax import index_attention
from hapvr_jax.features import tile_min_len, tiled_length

COLUMNS = ('query', 'rank', 'id', 'path', 'score', 'coarse_score')


class Source:
  """What the engine reads (`read`, `lengths`): the index's stored features, plus query videos held in
  memory, tiled to the network's min_len as the evaluation's feature file is. With `weights`
  (hapvr_jax.index_attention) the index's videos come out already weighed by their attention."""

  def __init__(self, ix: IndexDir, min_len: int, extra: dict | None = None, weights=None):
    self.ix, self.min_len, self.extra, self.weights = ix, min_len, dict(extra or {}), weights

  def read(self, video_id: str) -> np.ndarray:
    if video_id in self.extra:
      x = self.extra[video_id]
    else:
      x = self.ix.read(video_id, 'features')
      x = x if self.weights is None else self.weights.apply(video_id, x)
    return tile_min_len(np.asarray(x, np.float32), self.min_len)

  def lengths(self, video_ids) -> np.ndarray:
    n = [len(self.extra[v]) if v in self.extra else self._frames(v) for v in video_ids]
    return np.array([tiled_length(k, self.min_len) for k in n], np.int64)

  def _frames(self, video_id: str) -> int:   # from the log's metadata: no HDF5 access for the plan
    frames = self.ix.meta(video_id).get('frames')
    return int(frames) if frames is not None else self.ix.shape(video_id, 'features')[0]


def parse_shortlist(value: str, n: int) -> int:
  """Candidates per query: 'all', a count or a percentage of the `n` indexed videos."""
  text = str(value).strip()
  try:
    if text == 'all':
      return n
    if text.endswith('%'):
      k = int(np.ceil(float(text[:-1]) / 100 * n))
    else:
      k = int(text)
  except ValueError:
    k = 0
  if k < 1 or (text.endswith('%') and not 0 < float(text[:-1]) <= 100):
    raise cli.UsageError(f'--shortlist={value}: expected a positive count, a percentage (10%) or all')
  return min(k, n)


def check_model(ix: IndexDir, model_config, where: str) -> None:
  if model_config.dims != ix.config['dims']:
    raise IndexDirError(f'{where}: the network takes {model_config.dims}-dim features but the index '
                        f'{ix.path} holds {ix.config["dims"]}-dim ones; use a checkpoint for this index')


def check_backbone(ix: IndexDir, net, where: str) -> None:
  """A video query must be extracted by the backbone that built the index (any of the same size for an
  index of a feature file, whose backbone is unknown)."""
  built_by, dims = ix.config['backbone'], ix.config['dims']
  if net.config.out_dims != dims:
    raise IndexDirError(f'{where}: this backbone makes {net.config.out_dims}-dim features but the index '
                        f'{ix.path} holds {dims}-dim ones')
  if built_by != index_lib.FEATURE_FILE_BACKBONE:
    mine = index_lib.extraction.backbone_identity(net)
    if mine != built_by:
      raise IndexDirError(f'{where}: another backbone ({mine}) than the one that built the index {ix.path} '
                          f'({built_by})')


def search(ix: IndexDir, engine, queries: list, shortlist: int, top_k: int = 10, min_score: float = -np.inf,
           progress: bool = False, timings: dict | None = None, query_batch: int = 16, weights=None) -> list:
  """Ranks the index for each query (id, features [T, R, D], descriptor): [[row dict]] per query.

  Stage 1: the `shortlist` best coarse scores (every video when shortlist >= len(ix)); stage 2: the engine
  on the union of the shortlists of consecutive queries (at most `query_batch`, and only while the union stays
  within twice a shortlist: disjoint small shortlists are scored query by query), each query ranked over its
  own shortlist. `weights`: the index's attention (hapvr_jax.index_attention.refresh), for an engine built
  with EngineConfig(indexed_targets=True)."""
  if engine.config.indexed_targets != (weights is not None):
    raise ValueError('an engine with indexed_targets=True needs the attention weights, and only it')
  timings = {} if timings is None else timings
  ids = ix.ids()
  t0 = time.time()
  faiss_index = index_lib.refresh_coarse(ix)
  c_scores, rows = faiss_index.search(np.stack([d for _, _, d in queries]), shortlist)
  timings['coarse_s'] = timings.get('coarse_s', 0.0) + time.time() - t0
  lists = [[(ids[r], float(s)) for s, r in zip(cs, rs) if r >= 0] for cs, rs in zip(c_scores, rows)]
  out = []
  for start, stop in _batches(lists, shortlist, query_batch):
    t0 = time.time()
    part, part_lists = queries[start:stop], lists[start:stop]
    union = sorted({v for lst in part_lists for v, _ in lst})
    qids = [f'\0query:{k}' for k in range(len(part))]   # never confused with an indexed id
    src = Source(ix, engine.model_config.min_len, {q: x for q, (_, x, _) in zip(qids, part)}, weights)
    fine = engine.score(src, qids, union, progress=progress)
    timings['fine_s'] = timings.get('fine_s', 0.0) + time.time() - t0
    col = {v: j for j, v in enumerate(union)}
    out += [_ranked(ix, qid, [(float(fine[k, col[v]]), v, c) for v, c in lst], top_k, min_score)
            for k, ((qid, _, _), lst) in enumerate(zip(part, part_lists))]
  return out


def _batches(lists: list, shortlist: int, query_batch: int) -> list:
  """[(start, stop)]: runs of consecutive queries scored together, at most query_batch of them, while the
  union of their shortlists holds at most 2 x shortlist videos (each query costs the whole union)."""
  out, start, union = [], 0, set()
  for k, lst in enumerate(lists):
    mine = {v for v, _ in lst}
    if k > start and (k - start >= query_batch or len(union | mine) > 2 * shortlist):
      out.append((start, k))
      start, union = k, set()
    union |= mine
  return out + [(start, len(lists))] if lists else out


def _ranked(ix: IndexDir, qid: str, scored: list, top_k: int, min_score: float) -> list:
  """Rows of one query: best score first (ties by id), at most top_k, none below min_score."""
  rows = []
  for score, vid, c in sorted(scored, key=lambda t: (-t[0], t[1])):
    if score < min_score or len(rows) >= top_k:
      break
    rows.append({'query': qid, 'rank': len(rows) + 1, 'id': vid, 'path': ix.meta(vid).get('path', ''),
                 'score': score, 'coarse_score': c})
  return rows


def write_results(output: str, results: list) -> tuple:
  """results.jsonl, results.csv, candidates.csv (and matches.csv of localised results) in `output`, each
  written under a temporary name and renamed."""
  from hapvr_jax import matches, vsc
  os.makedirs(output, exist_ok=True)
  rows = [{k: v for k, v in r.items() if k != 'sim_map'} for per_query in results for r in per_query]
  jsonl, csv_path = os.path.join(output, 'results.jsonl'), os.path.join(output, 'results.csv')
  vsc.write_pairs(os.path.join(output, 'candidates.csv'), matches.vsc_pairs(results))
  if any('segments' in r for r in rows):
    vsc.write_matches(os.path.join(output, 'matches.csv'), matches.vsc_matches(results))
  with io_util.atomic_open(jsonl) as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, COLUMNS, lineterminator='\n', extrasaction='ignore')
  writer.writeheader()
  writer.writerows(rows)
  with io_util.atomic_open(csv_path) as f:
    f.write(buf.getvalue())
  return jsonl, csv_path


def table(results: list) -> str:
  lines = []
  for per_query in results:
    if not per_query:
      continue
    lines.append(f'query {per_query[0]["query"]}')
    lines.append(f'{"rank":>4}  {"id":<24} {"score":>7} {"coarse":>7}  path')
    for r in per_query:
      lines.append(f'{r["rank"]:>4}  {r["id"]:<24} {r["score"]:7.4f} {r["coarse_score"]:7.4f}  {r["path"]}')
      lines += [f'{"":>6}copy: query {s[0]:.1f}-{s[1]:.1f} s = ref {s[2]:.1f}-{s[3]:.1f} s ({s[4]:.3f})'
                for s in r.get('segments', [])]
  return '\n'.join(lines)


def read_queries(args, ix: IndexDir) -> list:
  """[(query id, video path or None)] from --query / --query_id / --queries."""
  if sum(map(bool, (args.query, args.query_id, args.queries))) != 1:
    raise cli.UsageError('give exactly one of --query=VIDEO, --query_id=ID, --queries=LIST')
  if args.query:
    return [(os.path.splitext(os.path.basename(args.query))[0], args.query)]
  if args.query_id:
    ix.meta(args.query_id)   # an unknown id: one error naming it
    return [(args.query_id, None)]
  if not os.path.isfile(args.queries):
    raise cli.UsageError(f'{args.queries}: query list not found')
  out, base = [], os.path.dirname(os.path.abspath(args.queries))
  with open(args.queries) as f:
    for n, line in enumerate(f, 1):
      item = line.strip()
      if not item or item.startswith('#'):
        continue
      path = os.path.join(base, item)
      if os.path.isfile(path):
        out.append((os.path.splitext(os.path.basename(path))[0], path))
      elif item in ix:
        out.append((item, None))
      else:
        raise cli.UsageError(f'{args.queries}:{n}: {item!r} is neither a video file nor an id in {ix.path}')
  if not out:
    raise cli.UsageError(f'{args.queries}: the list holds no queries')
  return out


def query_features(ix: IndexDir, items: list, resnet: str, batch_size: int = 64) -> list:
  """[(id, features, descriptor)]: stored for ids in the index, extracted for video files."""
  out, runner = [], None
  for qid, path in items:
    if path is None:
      out.append((qid, ix.read(qid, 'features'), ix.read(qid, 'coarse')))
      continue
    frames, _ = index_lib.decode_video(path, ix.config['fps'])   # an unreadable video: named before any work
    if runner is None:
      if not resnet:
        raise cli.UsageError('a video query needs --resnet=DIR (the backbone the index was built with)')
      net = index_lib.load_backbone(resnet)
      check_backbone(ix, net, resnet)
      runner = index_lib.features_fn(net, batch_size)
    (_, x), = runner.add(qid, frames) + runner.flush()
    x = np.asarray(x).astype(ix.config['feature_dtype'])
    out.append((qid, x, coarse.describe(x)))
  return out


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('index', None, 'index folder (python -m hapvr_jax.index)', flag_values=fv, required=True)
  flags.DEFINE_string('checkpoint', None, 'converted or trained similarity-network checkpoint', flag_values=fv,
                      required=True)
  flags.DEFINE_string('query', '', 'a query video file', flag_values=fv)
  flags.DEFINE_string('query_id', '', 'or: the id of a video in the index', flag_values=fv)
  flags.DEFINE_string('queries', '', 'or: a list file, one video file or index id per line', flag_values=fv)
  flags.DEFINE_string('resnet', '', 'converted resnet50_irmac directory, for video queries', flag_values=fv)
  flags.DEFINE_integer('top_k', 10, 'results per query', flag_values=fv, lower_bound=1)
  flags.DEFINE_string('shortlist', '1000', 'candidates re-ranked per query: N, P% or all', flag_values=fv)
  flags.DEFINE_float('min_score', float('-inf'), 'drop results scoring below this', flag_values=fv)
  flags.DEFINE_string('output', '.', 'folder for results.jsonl, results.csv, candidates.csv and matches.csv',
                      flag_values=fv)
  flags.DEFINE_bool('localize', False, 'find the copied segments of every reported pair', flag_values=fv)
  # tn on f2f: within 0.02 µAP of the best method on real copies, and it follows speed changes (docs)
  flags.DEFINE_enum('localize_method', 'tn', ['tn', 'hv', 'dp', 'dtw'],
                    'temporal alignment (hapvr_jax.localize)', flag_values=fv)
  flags.DEFINE_enum('localize_map', 'f2f', ['f2f', 'comparator'], 'the map aligned: frame-to-frame '
                    "similarities, or the comparator's output at frame resolution", flag_values=fv)
  flags.DEFINE_string('report', '', 'write an HTML page of the results into this folder (implies --localize)',
                      flag_values=fv)
  flags.DEFINE_bool('progress', True, 'show progress bars', flag_values=fv)
  flags.DEFINE_string('compilation_cache', os.environ.get('JAX_COMPILATION_CACHE_DIR') or '~/.cache/hapvr_jax/xla',
                      "persistent XLA compilation cache ('' = off): later searches skip compiling",
                      flag_values=fv)


def run(args) -> dict:
  from common_jax import host_memory, xla_cpu
  host_memory.reuse_freed_memory()   # before JAX allocates: the engine's temporaries reuse pages
  # before JAX starts; with video queries the backbone runs too, and two models with different sets get XLA's own
  xla_cpu.configure('hapvr_engine', *(('resnet50_irmac',) if args.query or args.queries else ()))
  import jax
  from common_jax import checkpoint
  from common_jax import mesh as mesh_lib
  from hapvr_jax import engine as engine_lib
  from hapvr_jax import model as model_lib
  cli.check_workdir(args.output)
  if args.report:
    cli.check_workdir(args.report)
  timings = {}
  ix = IndexDir.open(args.index, index_lib.KIND)
  if len(ix) == 0:
    raise IndexDirError(f'{args.index}: the index is empty; add videos with python -m hapvr_jax.index')
  shortlist = parse_shortlist(args.shortlist, len(ix))
  items = read_queries(args, ix)
  params, model_dict = checkpoint.load_params(args.checkpoint)
  model_config = model_lib.ModelConfig.from_dict(model_dict, where=args.checkpoint)
  check_model(ix, model_config, args.checkpoint)
  t0 = time.time()
  queries = query_features(ix, items, args.resnet)
  timings['query_features_s'] = time.time() - t0
  cli.enable_compilation_cache(args.compilation_cache)
  t0 = time.time()
  weights = index_attention.refresh(ix, model_config, params)
  timings['attention_s'] = time.time() - t0
  engine = engine_lib.Engine(model_config, params, mesh_lib.make_mesh(devices=jax.local_devices()),
                             engine_lib.EngineConfig(indexed_targets=weights is not None))
  results = search(ix, engine, queries, shortlist, args.top_k, args.min_score, args.progress, timings,
                   weights=weights)
  if args.localize or args.report:
    from hapvr_jax import matches
    t0 = time.time()
    matches.localize_index_results(ix, results, queries, model_config, params, args.localize_map,
                                   args.localize_method, keep_maps=bool(args.report))
    timings['localize_s'] = time.time() - t0
  jsonl, csv_path = write_results(args.output, results)
  if args.report:
    from hapvr_jax import report
    page = report.write_report(args.report, matches.report_queries(ix, results, items, queries))
    print(f'report: {page}')
  print(table(results))
  timings = {k: round(v, 3) for k, v in timings.items()}
  print(f'{len(queries)} quer{"y" if len(queries) == 1 else "ies"}, {shortlist} of {len(ix)} videos re-ranked '
        f'each; ' + ', '.join(f'{k[:-2]} {v:.2f}s' for k, v in timings.items()) + f'; wrote {jsonl}, {csv_path}')
  return {'results': results, 'timings': timings, 'shortlist': shortlist}


main = cli.program(define_flags, run, __doc__)


if __name__ == '__main__':
  cli.run_main(main)
