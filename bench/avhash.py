r"""Benchmark of AVHash: the jitted train step against the original PyTorch step, and Hamming ranking
against a NumPy baseline, both measured in the same run.

  python bench/avhash.py                                   # full-size model, B = 8 (CPU) / 128 (GPU) tuples
  python bench/avhash.py --batch_size=4 --steps=3 --warmup=1 --queries=200
  python bench/avhash.py --skip_ranking --hidden=256 --heads=4 --intermediate=1024 --json=/tmp/avhash.json
  python bench/avhash.py --skip_ranking --xla_options=xla_default   # the train step before the CPU options

`--xla_options` picks the XLA:CPU option set (common_jax.xla_cpu; default: the one recommended for the AVHash
train step, as avhash_jax.main uses); run the command once per set, back to back, to compare them.

1. Train step. Same random batch (image/audio [B, 6, 25, H]: anchor, positive, 4 negatives; weight 1) and
   same initial weights on both sides: tests/references/avhash_torch.make_reference builds the PyTorch model
   (transformers BertModel encoders, eager attention), avhash_jax.convert.convert_state_dict maps its
   state_dict to the Flax params.
   * PyTorch: the original's step — model.train() (dropout on), three forwards (B anchors, B positives, 4B
     negatives flattened tuple-major), L = L_V + 50 (L_AA + L_II + L_AI + L_IA) (tests/avhash/losses_test's
     torch_avhash_loss, the info_nce 'paired' loss), backward, torch.optim.Adam(lr 1e-4, eps 1e-3); on CUDA
     when available, otherwise torch.set_num_threads(os.cpu_count()).
   * JAX: avhash_jax.train_step.make_train_step(train=True), state donated, batch put once.
   Printed: median steps/s of both and the ratio, tuples/s, the JAX compile time, the first-step losses
   (they differ: different dropout masks), an eval-mode check (dropout off, same weights: the two losses must
   agree to 1e-4 relative, i.e. the same computation is timed), and the JAX step's FLOP rate — FLOPs from
   XLA's cost_analysis of the compiled step, and the analytic matmul count (3x forward) for comparison —
   against a 2048^3 float32 jnp.dot (precision HIGHEST, as the model) timed in the same run.
2. Hamming ranking. N random ±1 codes (fixed seed) as the database, Q queries, top-K with ties in database
   order. Ours: avhash_jax.ranking.rank_packed (packed bits, XOR + popcount, chunked top-k; query packing
   timed, database packing not). Baselines, written as a researcher following the original would (the
   database converted to float32 once, untimed; queries in chunks): inner product q @ db.T, d = (L - ip) / 2,
   then (a) 'argsort': a full np.argsort(kind='stable') per row, top-K sliced (the original ranks the whole
   database); (b) 'argpartition': np.partition for the K-th distance, then the items below it plus the first
   items at it in database order. Both must return exactly our top-K for every query (checked). Roofline:
   the bytes of packed database scanned per second by ours (N * L / 8 per query) against a large np.copyto
   timed in the same run (read + write bytes).

Figures, with their commands and devices: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import numpy as np  # noqa: E402

from bench.common import load, matmul_peak, memory_bandwidth, stepper, warm_then_time  # noqa: E402

N_NEG = 4


def analytic_step_flops(c, batch_size):
  """Matmul FLOPs of one step: the three encoders (S = T + 1 tokens), the two cross-attentions, the gates
  and the hash layer per video, times 3 (forward + backward), times B (2 + n_neg) videos."""
  t, s, h = c.tokens, c.tokens + 1, c.hidden_size
  encoder = s * (8 * h * h + 4 * h * c.intermediate_size) + 4 * s * s * h + 2 * h * h
  cross = 8 * t * h * h + 4 * t * t * h
  forward = 3 * encoder + 2 * cross + 3 * 8 * t * h + 2 * h * c.bits
  return 3 * forward * batch_size * (2 + N_NEG)


# --------------------------------------------------------------------------------------------- train step
def bench_train(a, out):
  import jax
  import torch
  from tests.references import avhash_torch as ref
  from tests.avhash.losses_test import torch_avhash_loss
  from avhash_jax import train_step as ts
  from avhash_jax import model as model_lib
  from avhash_jax.convert import convert_state_dict
  from common_jax import mesh as mesh_lib
  from configs import fcvid

  torch.set_num_threads(a.torch_threads or os.cpu_count())
  tdev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  sync = torch.cuda.synchronize if tdev.type == 'cuda' else (lambda: None)
  dev = jax.devices()[0]
  b = a.batch_size or (128 if dev.platform == 'gpu' else 8)
  config = fcvid.get_config()
  config.batch_size = b

  model, cls_token = ref.make_reference(a.seed, a.bits, hidden=a.hidden, heads=a.heads,
                                        intermediate=a.intermediate, max_positions=512)
  # Converted from a snapshot: the torch steps below update the model in place, and the eval-mode check must
  # compare both sides at these initial weights (convert_state_dict copies too).
  snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
  params, mcfg = convert_state_dict(snapshot, cls_token.numpy(), num_heads=a.heads)
  del snapshot
  rng = np.random.default_rng(a.seed)
  shape = (b, 2 + N_NEG, mcfg.tokens, mcfg.hidden_size)
  batch = {'image': rng.standard_normal(shape, np.float32), 'audio': rng.standard_normal(shape, np.float32),
           'weight': np.ones((b,), np.float32)}
  flops = analytic_step_flops(mcfg, b)
  print(f'train: B={b} tuples ({b * (2 + N_NEG)} videos) x {mcfg.tokens} x {mcfg.hidden_size}, heads '
        f'{mcfg.num_attention_heads}, intermediate {mcfg.intermediate_size}, {mcfg.bits} bits; jax '
        f'{dev.platform} x{jax.device_count()}, torch {tdev.type} ({torch.get_num_threads()} threads)')

  # --- PyTorch: eval-mode loss at the initial weights, then the original's train step ----------------------
  tt = {'model': model.to(tdev), **{k: torch.from_numpy(batch[k]).to(tdev) for k in ('image', 'audio')}}

  def torch_loss():
    net, ti, ta = tt['model'], tt['image'], tt['audio']
    anc = net(ti[:, 0], ta[:, 0])
    pos = net(ti[:, 1], ta[:, 1])
    flat = lambda x: x[:, 2:].reshape(b * N_NEG, *x.shape[2:])      # tuple-major, as x.view(-1, ...)
    neg = [x.view(b, N_NEG, -1) for x in net(flat(ti), flat(ta))]
    return torch_avhash_loss(anc, pos, neg)[0]

  tt['model'].eval()
  with torch.no_grad():
    torch_eval = float(torch_loss())
  tt['model'].train()
  tt['opt'] = torch.optim.Adam(tt['model'].parameters(), lr=config.lr, betas=(config.adam_b1, config.adam_b2),
                               eps=config.adam_eps)
  losses = []

  def torch_one():
    tt['opt'].zero_grad(set_to_none=True)
    loss = torch_loss()
    loss.backward()
    tt['opt'].step()
    losses.append(loss.detach())

  torch_one()
  torch_first = float(losses[0])
  torch_med, torch_min, out['load_average_torch'] = warm_then_time('torch', torch_one, sync, a.warmup, a.steps)
  tt.clear()
  if tdev.type == 'cuda':
    torch.cuda.empty_cache()

  # --- JAX ------------------------------------------------------------------------------------------------
  mesh = mesh_lib.make_mesh()
  dbatch = ts.put_batch(batch, mesh, config)
  net = model_lib.AVHash(mcfg)
  eval_loss = jax.jit(lambda p, x: ts.loss_fn(net, p, x, jax.random.key(0), config, train=False)[0])
  jax_eval = float(eval_loss(params, dbatch))
  state = jax.device_put(ts.init_state(params, config), mesh_lib.replicated(mesh))
  t0 = time.perf_counter()
  step = ts.make_train_step(mcfg, config, mesh, train=True).lower(state, dbatch).compile()
  compile_s = time.perf_counter() - t0
  cost = step.cost_analysis()
  xla_flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost).get('flops', 0.0))
  state, metrics = step(state, dbatch)
  jax_first = float(metrics['loss'])
  jax_med, jax_min, out['load_average_jax'] = warm_then_time('jax', *stepper(step, state, dbatch), a.warmup,
                                                             a.steps)
  peak = matmul_peak()

  # --- report ---------------------------------------------------------------------------------------------
  rel = abs(jax_eval - torch_eval) / abs(torch_eval)
  print(f'  {"":24s} {"step ms (median/min)":>21s} {"steps/s":>8s} {"tuples/s":>9s}')
  for name, med, mn in ((f'jax jit ({dev.platform})', jax_med, jax_min),
                        (f'torch original ({tdev.type})', torch_med, torch_min)):
    print(f'  {name:24s} {med * 1e3:10.1f} /{mn * 1e3:9.1f} {1 / med:8.3f} {b / med:9.2f}')
  print(f'  ratio jax/torch: {torch_med / jax_med:.2f}x steps/s; jax compile {compile_s:.1f} s')
  print(f'  first-step loss (dropout on, different masks): jax {jax_first:.6g}, torch {torch_first:.6g}; '
        f'finite: {bool(np.isfinite(jax_first) and np.isfinite(torch_first))}')
  print(f'  eval-mode loss (dropout off, same weights): jax {jax_eval:.8g}, torch {torch_eval:.8g}, relative '
        f'diff {rel:.1e} ({"OK" if rel < 1e-4 else "MISMATCH"})')
  print(f'  jax FLOP rate: {xla_flops / jax_med / 1e9:.1f} GFLOP/s (XLA cost_analysis, {xla_flops / 1e9:.1f} '
        f'GFLOP/step), {flops / jax_med / 1e9:.1f} GFLOP/s (analytic matmuls, {flops / 1e9:.1f} GFLOP/step); '
        f'float32 matmul peak {peak / 1e9:.1f} GFLOP/s; fraction {xla_flops / jax_med / peak:.3f} (XLA), '
        f'{flops / jax_med / peak:.3f} (analytic)')
  if rel >= 1e-4 or not np.isfinite(jax_first) or not np.isfinite(torch_first):
    raise SystemExit('train-step sanity check failed')
  out['train'] = dict(batch_size=b, hidden=mcfg.hidden_size, heads=mcfg.num_attention_heads,
                      intermediate=mcfg.intermediate_size, bits=mcfg.bits, jax_steps_per_s=1 / jax_med,
                      torch_steps_per_s=1 / torch_med, ratio=torch_med / jax_med, jax_tuples_per_s=b / jax_med,
                      torch_tuples_per_s=b / torch_med, jax_compile_s=compile_s, jax_first_loss=jax_first,
                      torch_first_loss=torch_first, jax_eval_loss=jax_eval, torch_eval_loss=torch_eval,
                      xla_flops_per_step=xla_flops, analytic_flops_per_step=flops,
                      jax_gflops_xla=xla_flops / jax_med / 1e9, jax_gflops_analytic=flops / jax_med / 1e9,
                      matmul_peak_gflops=peak / 1e9, fraction_of_peak_xla=xla_flops / jax_med / peak,
                      platform=dev.platform, torch_device=tdev.type)


# ---------------------------------------------------------------------------------------------- ranking
def baseline_topk(qf, dbf, k, mode, chunk=32):
  """The original's distance (L - q.x) / 2 on float32 ±1 codes, then a stable top-k per query."""
  n_db, bits = dbf.shape
  out = np.empty((qf.shape[0], k), np.int64)
  for s in range(0, qf.shape[0], chunk):
    d = (bits - qf[s:s + chunk] @ dbf.T) / 2
    if mode == 'argsort':
      out[s:s + chunk] = np.argsort(d, axis=1, kind='stable')[:, :k]
      continue
    kth = np.partition(d, k - 1, axis=1)[:, k - 1]
    for r, (row, t) in enumerate(zip(d, kth)):
      below = np.flatnonzero(row < t)
      cand = np.concatenate([below, np.flatnonzero(row == t)[:k - below.size]])
      out[s + r] = cand[np.argsort(row[cand], kind='stable')]
  return out


def bench_ranking(a, out):
  from avhash_jax import ranking
  rng = np.random.default_rng(a.seed)
  db = rng.integers(0, 2, (a.database, a.bits), dtype=np.int8) * 2 - 1
  q = rng.integers(0, 2, (a.queries, a.bits), dtype=np.int8) * 2 - 1
  db_packed = ranking.pack(db)                              # the index: built once, not timed
  dbf = db.astype(np.float32)
  print(f'ranking: {a.queries} queries x {a.database:,} codes x {a.bits} bits, top-{a.top_k}, '
        f'load average {load()}')
  t0 = time.perf_counter()
  ours = ranking.rank_packed(ranking.pack(q), db_packed, top_k=a.top_k)
  ours_s = time.perf_counter() - t0
  rows = {'ours (avhash_jax.ranking)': ours_s}
  for mode in ('argpartition', 'argsort'):
    t0 = time.perf_counter()
    base = baseline_topk(q.astype(np.float32), dbf, a.top_k, mode)
    rows[f'numpy {mode}'] = time.perf_counter() - t0
    if not np.array_equal(base, ours):
      bad = int(np.sum(np.any(base != ours, axis=1)))
      raise SystemExit(f'numpy {mode} baseline differs from ours on {bad} of {a.queries} queries')
  bw = memory_bandwidth()
  scanned = a.queries * a.database * a.bits / 8 / ours_s
  print(f'  {"":28s} {"s":>7s} {"queries/s":>10s} {"ours speedup":>13s}')
  for name, s in rows.items():
    print(f'  {name:28s} {s:7.2f} {a.queries / s:10.1f} {s / ours_s:12.2f}x')
  print(f'  top-{a.top_k} identical for all {a.queries} queries (ties in database order): yes')
  print(f'  ours scans {scanned / 1e9:.2f} GB/s of packed codes; np.copyto bandwidth {bw / 1e9:.2f} GB/s '
        f'(read + write); fraction {scanned / bw:.3f}')
  out['ranking'] = dict(queries=a.queries, database=a.database, bits=a.bits, top_k=a.top_k,
                        queries_per_s={k: a.queries / s for k, s in rows.items()},
                        speedup_vs_argpartition=rows['numpy argpartition'] / ours_s,
                        speedup_vs_argsort=rows['numpy argsort'] / ours_s, identical=True,
                        scanned_gb_per_s=scanned / 1e9, copy_bandwidth_gb_per_s=bw / 1e9)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--hidden', type=int, default=768)
  p.add_argument('--heads', type=int, default=12)
  p.add_argument('--intermediate', type=int, default=3072)
  p.add_argument('--batch_size', type=int, default=0, help='tuples per step (0: 128 on a GPU, 8 on CPU)')
  p.add_argument('--bits', type=int, default=64)
  p.add_argument('--steps', type=int, default=5, help='timed train steps per side')
  p.add_argument('--warmup', type=int, default=1, help='untimed train steps per side after the first')
  p.add_argument('--database', type=int, default=1_000_000, help='N: database codes')
  p.add_argument('--queries', type=int, default=200, help='Q (200: ~20 s for the full-argsort baseline on '
                 '2 CPU cores)')
  p.add_argument('--top_k', type=int, default=100)
  p.add_argument('--torch_threads', type=int, default=0, help='0: os.cpu_count() (on a CPU shared with '
                 'another job, 1 avoids the OpenMP spin-wait collapse)')
  p.add_argument('--skip_train', action='store_true')
  p.add_argument('--skip_ranking', action='store_true')
  p.add_argument('--json', default='', help='write the results here')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--xla_options', default='avhash_train', help='XLA:CPU option set (common_jax.xla_cpu) or a '
                 'model name for its recommended set; XLA_FLAGS given by the user win')
  a = p.parse_args()
  from common_jax import xla_cpu
  try:
    xla_cpu.configure(a.xla_options)   # before JAX starts: the options are read once per process
  except ValueError as e:
    raise SystemExit(f'error: --xla_options: {e}')
  out = {'args': vars(a), 'cpu_count': os.cpu_count(), 'load_average_start': load()}
  print(f'{os.cpu_count()} CPU cores, load average {load()}')
  if not a.skip_train:
    bench_train(a, out)
  if not a.skip_ranking:
    bench_ranking(a, out)
  out['load_average_end'] = load()
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(out, f, indent=2)
  print('RESULT ' + json.dumps(out, default=float))


if __name__ == '__main__':
  main()
