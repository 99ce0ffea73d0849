r"""Benchmark of the jitted HAP-VR train step against the original-style PyTorch train step, same run.

  python bench/hapvr_train.py                      # 2 groups x 8 sources (32 clips) x 16 frames, D = 64
  python bench/hapvr_train.py --original_batch     # the original's step: 2 x 64 sources x 28 frames, D = 512
  python bench/hapvr_train.py --sources=16 --frames=28 --steps=5 --device-info

Both sides run one full training iteration on the same synthetic batch (G loss groups of N = 2B clips: weak
views, noisy strong views, ViV-style mixes with their extra positives in Y) from the same initial weights:
similarity-network forward, DINO-style pseudo labels, InfoNCE + 6 inner AP + 4 QLAP + 3 SSHN + reg, backward,
AdamW with the original schedule.

  * JAX: hapvr_jax.train_step.make_train_step (jit, state donated, batch sharded over every local device),
    the batch put on the devices once;
  * PyTorch: tests/references/hapvr_train_torch.torch_train_step — the original's style (full [N, N, T, T, T]
    inner-AP tensors, every loss on full tensors, torch.optim.AdamW), on CUDA when available, otherwise on the
    CPU with torch.set_num_threads(os.cpu_count()); `--torch_autocast=fp16` runs it like the original's
    use_fp16 path (autocast + GradScaler; CUDA only).

Printed: the median step time, steps/s and clips/s of both and their ratio, the JAX cold start (compilation),
the first step's loss on both sides (a sanity check: same weights and batch), and the JAX step's useful FLOP
rate from an analytic count — frame-to-frame 2 R^2 D T^2 and the comparator CNN per clip
pair, plus the attention, times 3 for forward + backward — against a large matmul of the step's dtype and
precision timed in the same run (the practical peak of the device).

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

# JAX and PyTorch share the GPU: JAX allocates on demand instead of reserving most of the memory up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import numpy as np  # noqa: E402

R = 9   # regions per frame


# --------------------------------------------------------------------------------------------------- data
def make_batch(groups, sources, frames, dims, teacher_dims, seed, viv_prob=0.3):
  """{'regions' [G, N, T, R, D], 'teacher' [G, N, T, C], 'y' [G, N, N]} float32, as the data pipeline gives."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  n = 2 * sources
  regions = np.empty((groups, n, frames, R, dims), np.float32)
  teacher = np.empty((groups, n, frames, teacher_dims), np.float32)
  ys = np.empty((groups, n, n), np.float32)
  for g in range(groups):
    weak = unit(rng.normal(size=(sources, frames, R, dims)))
    strong = unit(weak + 0.7 * rng.normal(size=weak.shape))
    t_weak = rng.normal(size=(sources, frames, teacher_dims))
    t_strong = t_weak + 0.5 * rng.normal(size=t_weak.shape)
    m = np.zeros((n, sources))
    m[np.arange(sources), np.arange(sources)] = 1
    m[sources + np.arange(sources), np.arange(sources)] = 1
    mixed_strong, mixed_teacher = strong.copy(), t_strong.copy()
    for i in np.flatnonzero(rng.random(sources) < viv_prob):
      h = (i + 1 + int(rng.integers(sources - 1))) % sources
      lam = rng.uniform(0.3, 0.7)
      mixed_strong[i] = unit(lam * strong[h] + (1 - lam) * strong[i])
      mixed_teacher[i] = lam * unit(t_strong[h]) + (1 - lam) * unit(t_strong[i])
      m[sources + i, h] = lam
    regions[g] = np.concatenate([weak, mixed_strong])
    teacher[g] = np.concatenate([t_weak, mixed_teacher])
    ys[g] = (m @ m.T > 0)
  return {'regions': regions, 'teacher': teacher, 'y': ys}


# -------------------------------------------------------------------------------------------------- FLOPs
def forward_flops(clips, frames, dims):
  """Useful FLOPs of one loss group's training forward: attention per region, then per ordered
  clip pair the f2f einsum (2 R^2 D per frame pair) and the comparator CNN at its actual map sizes."""
  t1, t2 = frames // 2, frames // 4
  cnn = 2 * 9 * (1 * 32 * frames * frames + 32 * 64 * t1 * t1 + 64 * 128 * t2 * t2) + 2 * 128 * t2 * t2
  f2f = 2 * R * R * dims * frames * frames
  attention = clips * frames * R * (2 * dims * dims + 2 * dims)
  return attention + clips * clips * (f2f + cnn)


def step_flops(groups, clips, frames, dims):
  return 3 * groups * forward_flops(clips, frames, dims)   # backward ~ 2x forward


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sources', type=int, default=8, help='B: source videos per loss group (N = 2B clips)')
  p.add_argument('--groups', type=int, default=2, help='G: loss groups per step')
  p.add_argument('--frames', type=int, default=16, help='T: frames per clip')
  p.add_argument('--dims', type=int, default=64, help='D: region feature dimension')
  p.add_argument('--teacher_dims', type=int, default=32, help='C: teacher (DINO CLS) dimension')
  p.add_argument('--steps', type=int, default=30, help='timed steps per side')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps per side after the first')
  p.add_argument('--original_batch', action='store_true',
                 help='the original per-step batch: B=64, G=2, T=28, D=512, C=384 (for a GPU)')
  p.add_argument('--compute_dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='the JAX similarity network (losses stay float32)')
  p.add_argument('--torch_autocast', default='none', choices=('none', 'fp16', 'bf16'),
                 help='CUDA only: autocast the torch step (fp16 with a GradScaler, as the original)')
  p.add_argument('--skip_torch', action='store_true')
  p.add_argument('--device-info', '--device_info', dest='device_info', action='store_true',
                 help='print the JAX devices, torch device and library versions')
  p.add_argument('--seed', type=int, default=0)
  a = p.parse_args()
  if a.original_batch:
    a.sources, a.groups, a.frames, a.dims, a.teacher_dims = 64, 2, 28, 512, 384

  import jax
  import jax.numpy as jnp
  import torch
  from tests.references import hapvr_torch as ref
  from tests.references import hapvr_train_torch as tref
  from bench import common
  from common_jax import mesh as mesh_lib
  from configs import vcdb
  from hapvr_jax import train_step as ts
  from hapvr_jax.convert import convert_state_dict
  from hapvr_jax.model import ModelConfig

  torch.set_num_threads(os.cpu_count())
  torch_device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  clips = 2 * a.sources
  per_step = a.groups * clips

  config = vcdb.get_config()
  config.compute_dtype = a.compute_dtype
  config.model.dims = a.dims
  config.data.update(window=a.frames, sources_per_group=a.sources, groups=a.groups)
  model_config = ModelConfig.from_dict({**config.model.to_dict(), 'source': 'jax'})

  dev = jax.devices()[0]
  torch_desc = (torch.cuda.get_device_name(0) if torch_device.type == 'cuda'
                else f'cpu, {torch.get_num_threads()} threads')
  print(f'device: jax {dev.platform} {dev.device_kind} x{jax.device_count()}; torch {torch_desc}; '
        f'{os.cpu_count()} CPU cores')
  if a.device_info:
    print(f'  jax {jax.__version__} devices: {jax.devices()}')
    print(f'  torch {torch.__version__}, device {torch_device}, threads {torch.get_num_threads()}, '
          f'autocast {a.torch_autocast}')
  flops = step_flops(a.groups, clips, a.frames, a.dims)
  print(f'batch: {a.groups} groups x {clips} clips x {a.frames} frames x {R} x {a.dims} (teacher {a.teacher_dims}) '
        f'= {per_step} clips/step; analytic {flops / 1e9:.2f} GFLOP/step; JAX {a.compute_dtype}')

  batch = make_batch(a.groups, a.sources, a.frames, a.dims, a.teacher_dims, a.seed)
  torch.manual_seed(a.seed)
  torch_net = ref.SimilarityNetworkRef(dims=a.dims, f_topk_rate=model_config.f_topk_rate,
                                       v_topk_rate=model_config.v_topk_rate)
  params, _ = convert_state_dict(ref.original_state_dict(torch_net), ref.original_args(torch_net))

  # --- PyTorch (first: on a GPU its memory is released before JAX allocates) ----------------------
  torch_med = torch_first_loss = None
  if not a.skip_torch:
    model = torch_net.to(torch_device).train()
    optimizer = tref.make_torch_optimizer(model, **config.optim.to_dict())
    tbatch = {k: torch.from_numpy(v).to(torch_device) for k, v in batch.items()}
    autocast = {'none': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}[a.torch_autocast]
    if autocast is not None and torch_device.type != 'cuda':
      raise SystemExit('--torch_autocast needs CUDA')
    scaler = torch.amp.GradScaler('cuda') if autocast == torch.float16 else None
    sync = torch.cuda.synchronize if torch_device.type == 'cuda' else (lambda: None)
    counter = {'step': 0}
    loss_kwargs = {k: config.loss[k] for k in ('temperature', 'sshn_eps', 'qlap_sigma', 'qlap_rho',
                                               'inner_sigma', 'inner_rho', 'top_rate', 'bottom_rate')}

    def torch_one():
      loss, _, _ = tref.torch_train_step(model, optimizer, tbatch, counter['step'], config.optim.to_dict(),
                                         dict(config.loss.weights), scaler=scaler, autocast_dtype=autocast,
                                         **loss_kwargs)
      counter['step'] += 1
      return loss

    torch_first_loss = float(torch_one())
    torch_med, torch_min, _ = common.warm_then_time('torch', torch_one, sync, a.warmup, a.steps)
    del model, optimizer, tbatch, torch_net
    if torch_device.type == 'cuda':
      torch.cuda.empty_cache()   # give the reference's [N, N, T, T, T] tensors back before JAX runs

  # --- JAX ----------------------------------------------------------------------------------------------
  mesh = mesh_lib.make_mesh()
  params = jax.tree.map(jnp.asarray, params)
  state = {'params': params, 'opt_state': ts.make_optimizer(config.optim).init(params),
           'step': jnp.zeros((), jnp.int32), 'nonfinite_step': jnp.full((), ts.NO_STEP, jnp.int32)}
  # committed to the step's (replicated) sharding, as the training loop does: one compilation, not two
  state = jax.device_put(state, mesh_lib.replicated(mesh))
  step_fn = ts.make_train_step(model_config, config, mesh)
  device_batch = ts.put_batch(batch, mesh, config)
  jax.block_until_ready(device_batch)
  t0 = time.perf_counter()
  state, metrics = step_fn(state, device_batch)
  jax_first_loss = float(metrics['loss'])
  cold = time.perf_counter() - t0
  jax_med, jax_min, _ = common.warm_then_time('jax', *common.stepper(step_fn, state, device_batch), a.warmup,
                                              a.steps)

  # --- report ---------------------------------------------------------------------------------------------
  precision = 'highest' if a.compute_dtype == 'float32' else 'default'
  peak = common.matmul_peak(8192 if dev.platform == 'gpu' else 4096, a.compute_dtype, precision,
                            k=None if dev.platform == 'gpu' else 512)
  rate = flops / jax_med

  print(f'{"":28s} {"step ms (median/min)":>22s} {"steps/s":>9s} {"clips/s":>9s}')
  row = lambda name, med, mn: print(f'{name:28s} {med * 1e3:11.1f} /{mn * 1e3:8.1f} {1 / med:9.3f} '
                                    f'{per_step / med:9.1f}')
  row(f'jax jit ({dev.platform})', jax_med, jax_min)
  if torch_med is not None:
    row(f'torch reference ({torch_device.type})', torch_med, torch_min)
  print(f'jax cold first step (compile + run): {cold:.1f} s')
  if torch_med is not None:
    print(f'first-step loss (same weights and batch): jax {jax_first_loss:.9g}, torch {torch_first_loss:.9g} '
          f'(relative diff {abs(jax_first_loss - torch_first_loss) / abs(torch_first_loss):.1e})')
  print(f'jax useful FLOP rate: {rate / 1e9:.1f} GFLOP/s; {a.compute_dtype} matmul on this device: '
        f'{peak / 1e9:.1f} GFLOP/s; fraction {rate / peak:.3f}')
  if torch_med is not None:
    print(f'ratio jax/torch: {torch_med / jax_med:.2f}x steps/s')
  print('RESULT ' + json.dumps(dict(
      device=dev.device_kind, platform=dev.platform, torch_device=None if a.skip_torch else torch_desc,
      groups=a.groups, clips=clips, frames=a.frames, dims=a.dims, compute_dtype=a.compute_dtype,
      clips_per_step=per_step, gflop_per_step=flops / 1e9, jax_step_ms=jax_med * 1e3,
      torch_step_ms=None if torch_med is None else torch_med * 1e3, jax_cold_s=cold, jax_first_loss=jax_first_loss,
      torch_first_loss=torch_first_loss, jax_gflops=rate / 1e9, matmul_gflops=peak / 1e9, fraction=rate / peak,
      ratio=None if torch_med is None else torch_med / jax_med), default=float))


if __name__ == '__main__':
  main()
