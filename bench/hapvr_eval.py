r"""Benchmark of the HAP-VR evaluation engine against the original's strategy, measured in the same run.

  python bench/hapvr_eval.py                       # 16 queries x 160 database videos, ~64 frames each
  python bench/hapvr_eval.py --queries=50 --database=500 --mean_len=94

Baseline: the original evaluation loop's strategy — every database video indexed once, then, per (query,
target chunk) pair, the same sequence of PyTorch ops as the original's calculate_video_similarity (written
here; weights from tests/references/hapvr_torch.py, an independent implementation with the original's layout), on the
same machine with PyTorch's own threads. Engine: hapvr_jax.engine on the same HDF5 file with the
converted weights. Printed: pairs/s of both and their ratio, the engine's cold start (compilation), the
largest score difference between the two; this device's limits measured in the same run (a matmul in the
engine's dtype/precision, and an elementwise pass for memory bandwidth); the engine's useful FLOP rate (the
pairs' f2f and CNN, and every video's region attention) and the frame-to-frame stage's alone against them; the
split of a block's time between f2f and the comparator CNN; and a projection of the full FIVR-200K evaluation
(100 queries x 225,960 videos, lengths modelled as in bench/padding.py or read from --project_features) at the
measured rate and at the matmul roofline. The warm engine time is the median of --warm_passes passes.
--engine_split also times the engine without its comparator (the original's features_only mode), which gives
the CNN's share of the engine's own blocks; the representative block's maps are square, the engine's are as
wide as a block's targets.

Figures, with their commands and devices: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

import h5py  # noqa: E402
import numpy as np  # noqa: E402

F2F_FLOPS, CNN_FLOPS = 82944, 19024   # per (query frame, target frame) cell: f2f 2 * 81 * 512;
# the CNN: 3x3 convs 1->32 on every cell, 32->64 on 1/4, 64->128 on 1/16, the 1x1 conv on 1/16


def attention_flops(dims: int) -> int:
  """Per video frame: the region attention (9 regions, a dims x dims transform and a context vector), which
  every evaluation computes once for each query and database frame before any pair is compared."""
  return 9 * (2 * dims * dims + 2 * dims)


def useful_flops(q_len, db_len, dims: int) -> tuple:
  """(all the FLOPs an evaluation needs: pairs plus attention, those of the pairs alone) for these lengths."""
  pairs = (F2F_FLOPS + CNN_FLOPS) * q_len.sum() * db_len.sum()
  return pairs + attention_flops(dims) * (q_len.sum() + db_len.sum()), pairs


def make_features(path, n, mean_len, dims, seed):
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.lognormal(np.log(mean_len), 0.5, n).astype(int), 8, 4 * mean_len)
  with h5py.File(path, 'w') as f:
    for i, t in enumerate(lengths):
      x = rng.normal(size=(t, 9, dims)).astype(np.float32)
      f[f'v{i:06d}'] = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return [f'v{i:06d}' for i in range(n)], lengths


def original_ops_similarity(w, q, t, f_topk_rate, v_topk_rate, chunk=2048):
  """One pair scored with the original evaluation's sequence of PyTorch ops (einsum to [a,i,o,p,j,b], top-k
  over target regions, means, padded 3x3 convs, pools, hardtanh, temporal top-k), chunk by chunk."""
  import torch
  import torch.nn.functional as F
  scores = []
  for start in range(0, t.shape[0], chunk):
    s = torch.einsum('aiok,bjpk->aiopjb', q[None], t[None, start:start + chunk])
    k = max(round(s.shape[3] * f_topk_rate), 1)
    s = torch.topk(s, k, 3)[0].mean(3, keepdim=True).mean(2, keepdim=True).squeeze(3).squeeze(2)
    x = s.permute(0, 3, 1, 2).reshape(1, 1, s.shape[1], s.shape[2])
    for i, name in enumerate(('conv1', 'conv2', 'conv3')):
      x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), w[f'comparator_module.{name}.weight'],
                          w[f'comparator_module.{name}.bias']))
      if i < 2:
        x = F.max_pool2d(x, 2, 2)
    x = F.hardtanh(F.conv2d(x, w['comparator_module.fconv.weight'], w['comparator_module.fconv.bias']))
    k = max(round(x.shape[3] * v_topk_rate), 1)
    scores.append(torch.topk(x, k, 3)[0].mean(3).mean(2).reshape(-1))
  return torch.cat(scores).mean()


def timed(fn, *args, repeat=3):
  import jax
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(repeat):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeat


def engine_passes(eng, ff, qids, dids, passes: int) -> tuple:
  """(cold seconds, [warm seconds of each pass], the last scores): one run that compiles, then `passes` more."""
  eng.score(ff, qids, dids, progress=False)
  cold, warm, scores = eng.stats['seconds'], [], None
  for _ in range(passes):
    scores = eng.score(ff, qids, dids, progress=False)
    warm.append(eng.stats['seconds'])
  return cold, warm, scores


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--queries', type=int, default=16)
  p.add_argument('--database', type=int, default=160)
  p.add_argument('--mean_len', type=int, default=64)
  p.add_argument('--dims', type=int, default=512)
  p.add_argument('--baseline_pairs', type=int, default=0, help='time the torch loop on this many pairs '
                 '(0: all); its rate is measured on them and the comparison uses rates')
  p.add_argument('--warm_passes', type=int, default=3, help='warm engine passes; their median is reported')
  p.add_argument('--engine_split', action='store_true',
                 help="also time the engine without its comparator CNN (EngineConfig.features_only, the "
                 "original's features_only mode) on the same workload: the CNN's share of the engine's own blocks")
  p.add_argument('--memory_budget_mb', type=int, default=1024)
  p.add_argument('--bucket_ratio', type=float, default=1.25)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='engine compute dtype; other than float32, its accuracy cost against a float32 engine '
                 'on the same pairs is printed')
  p.add_argument('--precision', default='highest', choices=('highest', 'default'),
                 help="engine matmul precision ('default' = TF32/bf16 passes on GPU/TPU)")
  p.add_argument('--project_features', default='', help='FIVR-200K projection on the real lengths of this '
                 'DnS-format HDF5 (shapes only); default: modelled lengths (bench/padding.py)')
  p.add_argument('--project_queries', type=int, default=100)
  p.add_argument('--host_memory', default='reuse', choices=('reuse', 'default'),
                 help="'reuse': malloc keeps freed memory, as evaluate and search set it (common_jax.host_memory); "
                 "'default': glibc's own settings")
  a = p.parse_args()
  if a.host_memory == 'reuse':   # before JAX allocates anything
    from common_jax import host_memory
    host_memory.reuse_freed_memory()

  import jax
  import torch
  from tests.references import hapvr_torch as ref
  from bench import common, padding
  from common_jax import mesh as mesh_lib
  from hapvr_jax import convert, engine as engine_lib, features as features_lib, model as model_lib

  torch.manual_seed(a.seed)
  torch.set_grad_enabled(False)
  tmp = tempfile.mkdtemp()
  path = os.path.join(tmp, 'features.hdf5')
  ids, lengths = make_features(path, a.queries + a.database, a.mean_len, a.dims, a.seed)
  qids, dids = ids[:a.queries], ids[a.queries:]
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()}, torch threads {torch.get_num_threads()}')
  print(f'{a.queries} queries x {a.database} database videos, lengths {lengths.min()}-{lengths.max()} '
        f'(mean {lengths.mean():.0f}), dims {a.dims}')

  torch_net = ref.SimilarityNetworkRef(dims=a.dims, f_topk_rate=0.1, v_topk_rate=0.03).eval()
  weights = ref.original_state_dict(torch_net)
  params, cfg = convert.convert_state_dict(ref.original_state_dict(torch_net), None)
  cfg = model_lib.ModelConfig.from_dict({**cfg.to_dict(), 'v_topk_rate': 0.03})
  ff = features_lib.FeatureFile(path, dims=a.dims, min_len=cfg.min_len)

  # --- baseline: the original's per-pair loop -------------------------------------------------------------
  rng = np.random.default_rng(a.seed)
  pairs = [(i, j) for i in range(a.queries) for j in range(a.database)]
  if a.baseline_pairs and a.baseline_pairs < len(pairs):
    pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), a.baseline_pairs, replace=False))]
  t0 = time.perf_counter()
  q_t = [torch_net.index_video(torch.from_numpy(ff.read(q))) for q in qids]
  base_scores, t_cache = {}, {}
  for i, j in pairs:
    if j not in t_cache:
      t_cache = {j: torch_net.index_video(torch.from_numpy(ff.read(dids[j])))}
    base_scores[i, j] = float(original_ops_similarity(weights, q_t[i], t_cache[j], 0.1, 0.03))
  base_s = time.perf_counter() - t0
  base_rate = len(pairs) / base_s

  # --- engine --------------------------------------------------------------------------------------------
  mesh = mesh_lib.make_mesh()
  eng = engine_lib.Engine(cfg, params, mesh, engine_lib.EngineConfig(
      memory_budget_mb=a.memory_budget_mb, bucket_ratio=a.bucket_ratio, dtype=a.dtype, precision=a.precision))
  cold, warm_times, scores = engine_passes(eng, ff, qids, dids, a.warm_passes)
  warm = float(np.median(warm_times))   # the median, as the matmul roofline below is measured
  n_pairs = a.queries * a.database
  diff = max(abs(scores[i, j] - s) for (i, j), s in base_scores.items())

  ql = ff.lengths(qids).astype(np.float64)
  dl = ff.lengths(dids).astype(np.float64)
  useful, useful_pairs = useful_flops(ql, dl, a.dims)
  # The rooflines of this device, measured now: a matmul in the engine's dtype/precision, and memory traffic.
  peak = common.matmul_peak(2048, dtype=a.dtype, precision=a.precision)
  peak32 = peak if (a.dtype, a.precision) == ('float32', 'highest') else common.matmul_peak(2048)
  bandwidth = common.device_bandwidth(256)

  # --- where the time goes: the engine's own blocks without the CNN, and one representative block ---------
  split = None
  if a.engine_split:   # features_only: the video-to-video step on the f2f maps themselves, no comparator
    eng_fo = engine_lib.Engine(cfg, params, mesh, engine_lib.EngineConfig(
        memory_budget_mb=a.memory_budget_mb, bucket_ratio=a.bucket_ratio, dtype=a.dtype, precision=a.precision,
        features_only=True))
    without_cnn = float(np.median(engine_passes(eng_fo, ff, qids, dids, a.warm_passes)[1]))
    chunks = eng.index_queries([ff.read(x) for x in qids])   # the comparator's padded cells, from the plan
    computed = sum(gather.size * n * length for length, _, n in eng.plan(ff.lengths(dids), chunks)
                   for ch in chunks for gather, _, _ in ch.groups)
    split = dict(without_cnn_s=without_cnn, cnn_s=warm - without_cnn,
                 rest_gflops=(useful - CNN_FLOPS * ql.sum() * dl.sum()) / without_cnn / 1e9,
                 cnn_cells_computed_per_valid=computed / (ql.sum() * dl.sum()))
  net = model_lib.SimilarityNetwork(cfg)
  L = engine_lib.bucket_of(int(np.median(dl)), engine_lib.bucket_lengths(int(dl.max()), a.bucket_ratio))
  nq, nb = min(16, a.queries), 16
  q = jax.random.normal(jax.random.PRNGKey(0), (nq, L, 9, a.dims)).astype(a.dtype)
  t = jax.random.normal(jax.random.PRNGKey(1), (nb, L, 9, a.dims)).astype(a.dtype)
  f2f_fn = jax.jit(lambda q, t: net.apply({'params': params}, q, t, method=net.frame_to_frame))
  f2f = f2f_fn(q, t)
  cnn_fn = jax.jit(lambda m: net.apply({'params': params}, m, method=net.compare)[0])
  t_f2f, t_cnn = timed(f2f_fn, q, t), timed(cnn_fn, f2f)

  print(f'baseline (torch, one call per pair): {base_rate:9.1f} pairs/s  ({len(pairs)} pairs in {base_s:.1f}s)')
  print(f'engine (warm):                       {n_pairs / warm:9.1f} pairs/s  ({n_pairs} pairs in {warm:.1f}s, '
        f'{eng.stats["blocks"]} blocks; median of {len(warm_times)}: '
        f'{", ".join(f"{t:.2f}" for t in warm_times)} s)')
  print(f'engine (cold, with compilation):     {n_pairs / cold:9.1f} pairs/s  ({cold:.1f}s)')
  print(f'ratio engine/baseline: warm {n_pairs / warm / base_rate:.2f}x, cold {n_pairs / cold / base_rate:.2f}x')
  print(f'max |engine - baseline| over the {len(base_scores)} baseline pairs: {diff:.2e}')
  print(f'device limits measured now: matmul {a.dtype}/{a.precision} {peak / 1e9:.1f} GFLOP/s'
        + ('' if peak32 == peak else f' (float32/highest {peak32 / 1e9:.1f})')
        + f'; memory {bandwidth / 1e9:.1f} GB/s')
  print(f'engine useful FLOP rate: {useful / warm / 1e9:.1f} GFLOP/s = {useful / warm / peak:.2f} of the matmul '
        f'(pairs and region attention; the pairs\' FLOPs alone: {useful_pairs / warm / peak:.2f})')
  if a.dtype != 'float32' or a.precision != 'highest':
    ref_scores = engine_lib.Engine(cfg, params, mesh, engine_lib.EngineConfig(
        memory_budget_mb=a.memory_budget_mb, bucket_ratio=a.bucket_ratio)).score(ff, qids, dids, progress=False)
    d = np.abs(scores - ref_scores)
    top1 = np.mean(np.argmax(scores, 1) == np.argmax(ref_scores, 1))
    order = lambda s: np.argsort(-s, axis=1, kind='stable')[:, :10]
    top10 = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(order(scores), order(ref_scores))])
    print(f'accuracy cost of dtype={a.dtype} precision={a.precision} vs float32/highest: max |d score| '
          f'{d.max():.2e}, mean {d.mean():.2e} (scores span {ref_scores.min():.2f}..{ref_scores.max():.2f}); '
          f'same top-1 for {100 * top1:.0f}% of queries, top-10 overlap {100 * top10:.1f}%')
  if split:
    print(f"in the engine's own blocks: {split['without_cnn_s']:.2f} s without the comparator CNN, so the CNN takes "
          f"{split['cnn_s']:.2f} s of {warm:.2f} s ({100 * split['cnn_s'] / warm:.0f}%; "
          f"{CNN_FLOPS * ql.sum() * dl.sum() / max(split['cnn_s'], 1e-9) / 1e9:.1f} GFLOP/s of useful cells); the "
          f"rest (f2f, attention, gathers, the temporal reduction) {split['rest_gflops']:.1f} GFLOP/s = "
          f"{split['rest_gflops'] * 1e9 / peak:.2f} of the matmul; the comparator computes "
          f"{split['cnn_cells_computed_per_valid']:.2f}x the valid cells (padded query groups and target lengths)")
  print(f'one {nq}x{nb} block at {L} frames: f2f {t_f2f * 1e3:.0f} ms ({100 * t_f2f / (t_f2f + t_cnn):.0f}%), '
        f'CNN {t_cnn * 1e3:.0f} ms ({100 * t_cnn / (t_f2f + t_cnn):.0f}%)')
  # The frame-to-frame stage on its own, against both rooflines: FLOPs of the region dot products and their
  # reductions; bytes = the two feature blocks read once plus the [nq, L, nb, L] similarity written once.
  f2f_flops = F2F_FLOPS * nq * L * nb * L
  f2f_bytes = (nq + nb) * L * 9 * a.dims * q.dtype.itemsize + nq * nb * L * L * 4
  print(f'f2f stage: {f2f_flops / t_f2f / 1e9:.1f} GFLOP/s = {f2f_flops / t_f2f / peak:.2f} of the matmul; '
        f'{f2f_bytes / t_f2f / 1e9:.2f} GB/s = {f2f_bytes / t_f2f / bandwidth:.3f} of memory '
        f'(intensity {f2f_flops / f2f_bytes:.0f} FLOP/byte: compute-bound)')

  # The comparator CNN, counted as if each layer's output went through memory once (written, read back):
  # per f2f cell 1 input + 32 (conv1) + 32/4 (pool) + 64/4 (conv2) + 64/16 (pool) + 128/16 (conv3) + 1/16
  # channels of float32. Its low intensity is why it can dominate on an accelerator despite 19% of the FLOPs.
  cells = nq * nb * L * L
  cnn_flops = CNN_FLOPS * cells
  cnn_bytes = 4 * cells * (1 + 2 * (32 + 32 / 4 + 64 / 4 + 64 / 16 + 128 / 16 + 1 / 16))
  print(f'CNN stage: {cnn_flops / t_cnn / 1e9:.1f} GFLOP/s = {cnn_flops / t_cnn / peak32:.2f} of the float32 '
        f'matmul; {cnn_bytes / t_cnn / 1e9:.2f} GB/s = {cnn_bytes / t_cnn / bandwidth:.2f} of memory '
        f'(intensity {cnn_flops / cnn_bytes:.0f} FLOP/byte, unfused)')

  # --- projection: the full FIVR-200K evaluation at this run's measured rate ------------------------------
  if a.project_features:
    pf = features_lib.FeatureFile(a.project_features, dims=a.dims, min_len=cfg.min_len)
    db_len = pf.lengths(sorted(pf.ids())).astype(np.float64)
    source = a.project_features
  else:
    db_len = padding.modelled_lengths(min_len=cfg.min_len).astype(np.float64)
    source = 'modelled lengths (bench/padding.py)'
  q_len = np.random.default_rng(a.seed).choice(db_len, a.project_queries, replace=False)
  total = useful_flops(q_len, db_len, a.dims)[0]
  waste = padding.waste(db_len.astype(int), a.bucket_ratio)[0]
  read = db_len.sum() * 9 * a.dims * 4
  print(f'projection, {a.project_queries} queries x {len(db_len)} videos ({source}): {total:.2e} useful FLOPs; '
        f'at this run\'s engine rate {total / (useful / warm) / 60:.1f} min; at the matmul roofline plus '
        f'{100 * waste:.1f}% padding {total / (1 - waste) / peak / 60:.1f} min; features to read '
        f'{read / 1e9:.0f} GB (float32)')
  cost = (dict(max_abs_diff=float(d.max()), mean_abs_diff=float(d.mean()), same_top1=float(top1),
               top10_overlap=float(top10)) if a.dtype != 'float32' or a.precision != 'highest' else None)
  print('RESULT ' + json.dumps(dict(
      device=jax.devices()[0].device_kind, platform=jax.default_backend(), dtype=a.dtype, precision=a.precision,
      queries=a.queries, database=a.database, mean_len=a.mean_len, baseline_pairs=len(pairs),
      baseline_pairs_per_s=base_rate, baseline_device='cpu', engine_pairs_per_s=n_pairs / warm,
      engine_cold_s=cold, max_abs_diff_vs_baseline=diff, matmul_gflops=peak / 1e9, matmul32_gflops=peak32 / 1e9,
      bandwidth_gb_s=bandwidth / 1e9, engine_gflops=useful / warm / 1e9, engine_fraction=useful / warm / peak,
      engine_fraction_pairs_only=useful_pairs / warm / peak, engine_split=split,
      accuracy_vs_float32=cost, block=dict(queries=nq, targets=nb, frames=L),
      f2f_gflops=f2f_flops / t_f2f / 1e9, f2f_fraction=f2f_flops / t_f2f / peak, cnn_gflops=cnn_flops / t_cnn / 1e9,
      cnn_fraction_float32=cnn_flops / t_cnn / peak32, cnn_fraction_bandwidth=cnn_bytes / t_cnn / bandwidth,
      f2f_share=t_f2f / (t_f2f + t_cnn), projection=dict(
          queries=a.project_queries, videos=len(db_len), source=source, flops=total,
          minutes_at_engine_rate=total / (useful / warm) / 60,
          minutes_at_roofline=total / (1 - waste) / peak / 60, padding=waste, features_gb=read / 1e9)), default=float))


if __name__ == '__main__':
  main()
