r"""How the search indexes scale: build throughput, bytes per hour of video, query latency and memory, for
HAP-VR's coarse stage (FAISS float index) and AVHash's codes (FAISS binary indexes vs the packed-bit top-k),
with a projection to FIVR-200K (225,960 videos).

  python -m bench.index_scale --sizes=10000,100000,1000000 --json=/tmp/index_scale.json

Synthetic data throughout (numbers on synthetic data do not transfer to real collections): HAP-VR coarse
descriptors of hapvr_jax.coarse.dim(512) drawn around 1,000 cluster centres (unit norm), AVHash 64-bit codes
uniformly random, the queries near-copies of database items (a few bits flipped / small noise) and random
ones. HAP-VR's exact index (IndexFlatIP) keeps float32 vectors (2 KB a video: 2 GB at 1M, which fits); the
IVF-PQ index is measured at 100k (256 lists) and 1M (1,024 lists), trained on a sample of 64 vectors a list;
its recall is against the exact index. Latency: the median of 5 single queries, and a batch of
--queries per call (per query). Memory: the bytes each index holds (its serialised size for FAISS's
compressed indexes). Build throughput from features goes through the real index code (hapvr_jax.index,
avhash_jax.index) on synthetic features; from video files it is the extractor's cost, measured by
bench/extract_video.py (docs/performance.md: 5.5 s/video HAP-VR, 130 s/video AVHash on a 2-core CPU).
"""
from __future__ import annotations

import json
import os
import resource
import tempfile
import time

import numpy as np
from absl import flags

from bench import common
from common_jax import cli, hamming

FIVR_200K = 225_960


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_enum('part', 'all', ['all', 'hapvr', 'avhash'], 'which system', flag_values=fv)
  flags.DEFINE_list('sizes', ['10000', '100000', '1000000'], 'database sizes (videos)', flag_values=fv)
  flags.DEFINE_integer('queries', 100, 'queries per batch', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('top_k', 100, 'results per query', flag_values=fv, lower_bound=1)
  flags.DEFINE_integer('bits', 64, 'AVHash code length', flag_values=fv)
  flags.DEFINE_integer('build_videos', 256, 'videos added through the real index code', flag_values=fv)
  flags.DEFINE_float('fivr_mean_seconds', 120.0, 'assumed mean FIVR-200K video length for the projection',
                     flag_values=fv)
  flags.DEFINE_string('json', '', 'write the figures here', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'random seed', flag_values=fv)


def _rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _latency(search, queries):
  """(median seconds of one query, seconds per query in one batch)."""
  search(queries[:1])
  one = common.median_time(lambda it=iter(range(5)): search(queries[next(it) % len(queries):][:1]))[0]
  t = time.perf_counter()
  search(queries)
  return one, (time.perf_counter() - t) / len(queries)


def _folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# -------------------------------------------------------------------------------------------------- HAP-VR
def hapvr_build(n: int, rng) -> dict:
  from hapvr_jax import index as hindex
  with tempfile.TemporaryDirectory() as tmp:
    ix = hindex.open_or_create(os.path.join(tmp, 'idx'), hindex.index_config('bench', 512, 9, 1.0))
    lengths = rng.integers(30, 181, n)   # 0.5 to 3 minutes at 1 frame/s
    t = time.perf_counter()
    for s in range(0, n, 64):
      ix.add(hindex.video_entry(ix, f'v{i:06d}', rng.normal(size=(lengths[i], 9, 512)).astype(np.float16),
                                {'path': ''}) for i in range(s, min(n, s + 64)))
    add = time.perf_counter() - t
    t = time.perf_counter()
    hindex.refresh_coarse(ix, force=True)
    coarse = time.perf_counter() - t
    size = _folder_bytes(ix.path)
  return {'videos': n, 'videos_per_s': n / (add + coarse), 'coarse_build_s': coarse,
          'bytes_per_hour': float(size / (lengths.sum() / 3600)), 'bytes_per_video': size / n}


def _descriptors(n: int, d: int, rng, centres) -> np.ndarray:
  out = np.empty((n, d), np.float32)
  for s in range(0, n, 100_000):
    m = min(n, s + 100_000) - s
    x = centres[rng.integers(0, len(centres), m)] + 0.5 * rng.normal(size=(m, d)).astype(np.float32) / np.sqrt(d)
    out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def hapvr_coarse(n: int, args, rng) -> list:
  from common_jax.index_dir import FloatIndex
  from hapvr_jax import coarse
  d = coarse.dim(512)
  centres = rng.normal(size=(1000, d)).astype(np.float32) / np.sqrt(d)
  db = _descriptors(n, d, rng, centres)
  q = db[rng.choice(n, args.queries, replace=False)] + 0.2 * rng.normal(size=(args.queries, d)).astype(
      np.float32) / np.sqrt(d)
  rows, exact = [], None
  for kind in ('flat', 'ivfpq') if n >= 100_000 else ('flat',):
    t = time.perf_counter()
    if kind == 'flat':
      index = FloatIndex.build(db, kind)
    else:   # trained on a sample of 64 vectors a list (all of them: over 5 minutes at 100k on 2 cores)
      nlist = 1024 if n >= 1_000_000 else 256
      index = FloatIndex.build(db[rng.choice(n, 64 * nlist, replace=False)], kind, nlist=nlist)
      index.index.reset()
      for s in range(0, n, 100_000):
        index.index.add(db[s:s + 100_000])
    build = time.perf_counter() - t
    one, per = _latency(lambda x: index.search(x, args.top_k), q)
    found = index.search(q, args.top_k)[1]
    if exact is None:
      exact = found
    import faiss
    memory = n * d * 4 if kind == 'flat' else len(faiss.serialize_index(index.index))
    recall = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)])
    rows.append({'system': 'hapvr', 'videos': n, 'index': kind, 'build_s': build, 'query_ms': 1e3 * one,
                 'batch_query_ms': 1e3 * per, f'recall@{args.top_k}': float(recall), 'index_bytes': memory,
                 'peak_rss_gb': _rss_gb()})
    print(f'  {rows[-1]}', flush=True)
    index = None   # the next kind is built without this one in memory
  return rows


# -------------------------------------------------------------------------------------------------- AVHash
def avhash_build(n: int, rng) -> dict:
  import h5py
  from avhash_jax import index as aindex
  from avhash_jax import model as model_lib
  from common_jax import checkpoint
  config = model_lib.ModelConfig(bits=64)
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = checkpoint.save_params(os.path.join(tmp, 'ckpt'), model_lib.init_params(config, 0), config.to_dict())
    files = [os.path.join(tmp, f'{m}.h5') for m in ('image', 'audio')]
    for path in files:
      with h5py.File(path, 'w') as f:
        for i in range(n):
          f.create_group(f'v{i:06d}').create_dataset('vectors', data=rng.normal(size=(25, 768)).astype(np.float32))
    model = aindex.load_checkpoint(ckpt)
    ix = aindex.open_or_create(os.path.join(tmp, 'idx'), aindex.index_config(model[0], model[2]))
    aindex.add_feature_files(ix, model, *files, ids=[f'v{i:06d}' for i in range(8)])   # compile
    t = time.perf_counter()
    aindex.add_feature_files(ix, model, *files)
    aindex.codes_of(ix)
    seconds = time.perf_counter() - t
    size = _folder_bytes(ix.path)
  return {'videos': n, 'videos_per_s': (n - 8) / seconds, 'bytes_per_video': size / n,
          'bytes_per_hour': 'independent of length (one code a video)'}


def avhash_search(n: int, args, rng) -> list:
  nbytes = args.bits // 8
  db = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
  picks = rng.choice(n, args.queries, replace=False)
  q = db[picks].copy()
  q[: args.queries // 2, 0] ^= 0b101                       # half near-copies (2 bits flipped), half random
  q[args.queries // 2:] = rng.integers(0, 256, (args.queries - args.queries // 2, nbytes), dtype=np.uint8)
  rows, exact = [], None
  for backend in ('numpy', 'faiss_flat', 'jax', 'faiss_hash', 'faiss_ivf'):
    if backend == 'jax' and n > 100_000:
      continue   # 35 s a batch at 1M on CPU: measured once, far behind the others
    t = time.perf_counter()
    s = hamming.Searcher(db, backend)
    s.search(q[:1], args.top_k)                              # builds the backend's structure
    build = time.perf_counter() - t
    one, per = _latency(lambda x: s.search(x, args.top_k), q)
    dist, idx = s.search(q, args.top_k)
    exact = dist if exact is None else exact
    memory = n * nbytes
    if backend in ('faiss_hash', 'faiss_ivf'):
      import faiss
      memory = len(faiss.serialize_index_binary(s._impl(backend)))
    rows.append({'system': 'avhash', 'videos': n, 'index': backend, 'build_s': build, 'query_ms': 1e3 * one,
                 'batch_query_ms': 1e3 * per, 'exact_distances': float(np.mean(dist == exact)),
                 'near_copy_first': float(np.mean(idx[: args.queries // 2, 0] == picks[: args.queries // 2])),
                 'index_bytes': memory, 'peak_rss_gb': _rss_gb()})
    print(f'  {rows[-1]}', flush=True)
  return rows


# ------------------------------------------------------------------------------------------------ report
def _project(rows, build, n: int, seconds_per_video: float | None) -> dict:
  """Linear in N between (or beyond) the two measured sizes closest to n, per index kind."""
  out = {}
  for kind in sorted({r['index'] for r in rows}):
    pts = sorted((r['videos'], r['batch_query_ms'], r['query_ms'], r['index_bytes']) for r in rows
                 if r['index'] == kind)
    if not pts:
      continue
    lo, hi = (pts[-2], pts[-1]) if len(pts) > 1 else (pts[0], pts[0])
    scale = lambda a, b: a if hi[0] == lo[0] else a + (b - a) * (n - lo[0]) / (hi[0] - lo[0])
    out[kind] = {'query_ms': scale(lo[2], hi[2]), 'batch_query_ms': scale(lo[1], hi[1]),
                 'index_bytes': int(scale(lo[3], hi[3]))}
  out['build_hours_from_features'] = n / build['videos_per_s'] / 3600
  if seconds_per_video:
    out['storage_bytes'] = int(build['bytes_per_hour'] * n * seconds_per_video / 3600)
  else:
    out['storage_bytes'] = int(build['bytes_per_video'] * n)
  return out


def _table(rows) -> None:
  keys = [k for k in rows[0] if k != 'system']
  print('  '.join(f'{k:>16}' for k in keys))
  for r in rows:
    print('  '.join(f'{r[k]:>16.4g}' if isinstance(r[k], float) else f'{r[k]!s:>16}' for k in keys))


def run(args) -> dict:
  rng = np.random.default_rng(args.seed)
  sizes = [int(s) for s in args.sizes]
  out = {'load': common.load(), 'cpus': os.cpu_count(), 'fivr_200k': {}}
  for system in ('hapvr', 'avhash') if args.part == 'all' else (args.part,):
    build = (hapvr_build if system == 'hapvr' else avhash_build)(args.build_videos, rng)
    print(f'\n{system}: index build from features: {build}')
    rows = []
    for n in sizes:
      rows += hapvr_coarse(n, args, rng) if system == 'hapvr' else avhash_search(n, args, rng)
      print(f'  {n} videos done (peak RSS {_rss_gb():.1f} GB)', flush=True)
    _table(rows)
    out[system] = {'build': build, 'rows': rows}
    out['fivr_200k'][system] = _project(rows, build, FIVR_200K,
                                        args.fivr_mean_seconds if system == 'hapvr' else None)
    print(f'{system}: FIVR-200K projection ({FIVR_200K} videos'
          + (f', {args.fivr_mean_seconds:g} s a video assumed' if system == 'hapvr' else '') + '): '
          + json.dumps(out['fivr_200k'][system]))
  if args.json:
    from common_jax import io_util
    io_util.write_json(args.json, out)
  return out


main = cli.program(define_flags, run, __doc__)


if __name__ == '__main__':
  cli.run_main(main)
