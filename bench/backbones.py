r"""Full-size backbones: Flax vs the PyTorch module, parity and throughput in the same run.

  python bench/backbones.py                       # all four, float32, batch 8 frames / 2 audio segments
  python bench/backbones.py --arch=clip_vitl14 --batch=4 --steps=3
  python bench/backbones.py --dtype=bfloat16      # on a GPU/TPU: the bf16 compute option and its accuracy cost
  python bench/backbones.py --variants=before,after --batch=4 --audio_batch=1 --steps=5   # CPU levers, A/B

Variants (`--variants`, comma-separated): `before` (XLA's default options, convolution patch projections,
token-major attention and 1x1 convolutions: the former formulation), `after` (the options
common_jax.xla_cpu recommends for the model, and the current formulation), or OPTION_SET[:legacy] with an
option set of common_jax.xla_cpu.OPTION_SETS. Without `--variants` the Flax model runs in this process with
`after`. With it, every variant runs in its own worker process (XLA options are process-wide) and the timed
steps go round-robin — PyTorch, then each variant — so a busy machine slows all of them alike; each ratio is
the median over the rounds of torch time / variant time.

For each architecture: the PyTorch reference (transformers' module at the real size, random weights, re-keyed
into the checkpoint layout the converter reads: tests/references/<arch>_torch.py) is converted with the product's
converter, both run the same preprocessed batch, and the script prints

  * parity: max |flax - torch| / max |torch| over the batch (float32 target: 1e-4), and per-row cosine;
  * images (or audio segments) per second of each, their ratio, and the Flax run's FLOP/s against the float32
    matmul rate of this device timed in the same run (`bench/common.matmul_peak`).

No weights are downloaded: random weights exercise the same arithmetic as the released checkpoints.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import numpy as np  # noqa: E402

from bench.common import load, matmul_peak  # noqa: E402

ARCHS = ('resnet50_irmac', 'dino_vits16', 'clip_vitl14', 'ast')
UNIT = {'ast': 'segments'}


def example_input(arch, mod, config, batch, rng):
  """A raw model input batch (uint8 frames, or normalised fbank features for AST)."""
  if arch == 'ast':
    return rng.normal(size=(batch, config.max_length, config.num_mel_bins)).astype(np.float32)
  size = getattr(config, 'image_size', 224)
  return rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def bench_reference(arch, config, seed):
  """(torch fn on the preprocessed NHWC / fbank batch -> NumPy, state_dict in the checkpoint layout, converter
  extras): the full-size PyTorch module of backbones/<arch>_torch.py."""
  import torch
  from tests.references import ast_torch
  from tests.references import clip_torch
  from tests.references import dino_torch
  from tests.references import resnet_torch
  if arch == 'resnet50_irmac':
    module, sd = resnet_torch.build(config, seed=seed)

    def fn(x):
      with torch.no_grad():
        return module(torch.from_numpy(np.array(x, np.float32))).double().numpy()
    return fn, sd, {'pca': module.pca, 'pca_dims': config.pca_dims}
  build, layout = {'dino_vits16': (dino_torch.build, 'official'), 'clip_vitl14': (clip_torch.build, 'openai'),
                   'ast': (ast_torch.build, 'hub')}[arch]
  fn, sd = build(config, seed=seed, layout=layout)
  return fn, sd, {}


def flops(mod, config):
  for name in ('flops_per_frame', 'flops_per_image', 'flops_per_segment'):
    if hasattr(mod, name):
      return float(getattr(mod, name)(config))
  return float('nan')


def parse_variant(variant, arch):
  """(XLA option flags, fast formulation?) of 'before', 'after' or OPTION_SET[:legacy]."""
  from common_jax import xla_cpu
  if variant == 'before':
    return xla_cpu.OPTION_SETS['xla_default'], False
  if variant == 'after':
    return xla_cpu.options_for([arch]), True
  name, _, legacy = variant.partition(':')
  if legacy not in ('', 'legacy') or name not in xla_cpu.OPTION_SETS:
    raise SystemExit(f'error: --variants: {variant!r} is not before, after or OPTION_SET[:legacy] with an '
                     f'option set of {", ".join(xla_cpu.OPTION_SETS)}')
  return xla_cpu.OPTION_SETS[name], not legacy


def flax_model(arch, variant, a, state_dict, extra, raw):
  """(jitted forward, params, preprocessed input, config) of `arch` under `variant`'s formulation."""
  import jax
  import jax.numpy as jnp
  from backbones import registry
  mod = registry.module(arch)
  params, config = mod.convert(state_dict, where=f'{arch} (random full-size)', **extra)
  x = np.asarray(mod.preprocess(jnp.asarray(raw), config), np.float32)
  fast = parse_variant(variant, arch)[1]
  kw = {} if arch == 'ast' else {'pointwise_as_dot': fast} if arch == 'resnet50_irmac' else {'fast_layout': fast}
  model = mod.Model(config, dtype=jnp.dtype(a.dtype), **kw)
  fn = jax.jit(lambda p, x: model.apply({'params': p}, x))
  return fn, jax.device_put(params), jax.device_put(x), config


def worker(conn, arch, variant, a, state_dict, extra, raw):
  """A variant in its own process: its XLA options set before JAX starts; sends the output, then one timed
  step per request."""
  os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *parse_variant(variant, arch)[0]]).strip()
  import jax
  fn, params, x, _ = flax_model(arch, variant, a, state_dict, extra, raw)
  with jax.default_matmul_precision('highest' if a.dtype == 'float32' else 'default'):
    conn.send(np.asarray(fn(params, x), np.float64))
    while conn.recv():
      t0 = time.perf_counter()
      fn(params, x).block_until_ready()
      conn.send(time.perf_counter() - t0)


def errors(got, want):
  got2, want2 = got.reshape(len(got), -1), want.reshape(len(want), -1)
  rel = float(np.abs(got2 - want2).max() / np.abs(want2).max())
  cos = float(np.min(np.sum(got2 * want2, 1) / np.linalg.norm(got2, axis=1) / np.linalg.norm(want2, axis=1)))
  return rel, cos


def bench_arch(arch, a, out, variants):
  import torch
  from backbones import registry
  mod = registry.module(arch)
  config = mod.Config.full()
  torch_fn, state_dict, extra = bench_reference(arch, config, a.seed)
  raw = example_input(arch, mod, config, a.batch if arch != 'ast' else a.audio_batch, np.random.default_rng(a.seed))
  x = np.asarray(mod.preprocess(raw, config), np.float32)
  torch.set_num_threads(a.torch_threads or torch.get_num_threads())
  want = np.asarray(torch_fn(x), np.float64)
  ctx = multiprocessing.get_context('spawn')
  conns = []
  for v in variants:
    parent, child = ctx.Pipe()
    ctx.Process(target=worker, args=(child, arch, v, a, state_dict, extra, raw), daemon=True).start()
    conns.append(parent)
  got = [c.recv() for c in conns]
  times = {name: [] for name in ('torch', *variants)}
  for c in conns:   # one untimed step each after the first (warm caches)
    c.send(True)
    c.recv()
  for _ in range(a.steps):
    t0 = time.perf_counter()
    torch_fn(x)
    times['torch'].append(time.perf_counter() - t0)
    for v, c in zip(variants, conns):
      c.send(True)
      times[v].append(c.recv())
  for c in conns:
    c.send(False)
  n, f = len(x), flops(mod, config) * len(x)
  torch_t = np.array(times['torch'])
  for v, g in zip(variants, got):
    rel, cos = errors(g, want)
    jax_t = np.array(times[v])
    med = float(np.median(jax_t))
    res = dict(arch=arch, variant=v, batch=n, dtype=a.dtype, max_rel_err=rel, min_cosine=cos,
               unit=UNIT.get(arch, 'frames'), jax_per_s=n / med, torch_per_s=n / float(np.median(torch_t)),
               ratio_jax_over_torch=float(np.median(torch_t / jax_t)), jax_gflops=f / med / 1e9,
               torch_gflops=f / float(np.median(torch_t)) / 1e9, gflop_per_item=f / n / 1e9)
    out.append(res)
    print(f'{arch:15s} {v:18s} rel err {rel:.2e} (cos {cos:.7f})  JAX {res["jax_per_s"]:8.2f} {res["unit"]}/s  '
          f'torch {res["torch_per_s"]:8.2f}/s  ratio {res["ratio_jax_over_torch"]:.2f}x  '
          f'JAX {res["jax_gflops"]:.1f} GFLOP/s  [load {load()}]', flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', default='all', help=f'one of {", ".join(ARCHS)} or all')
  parser.add_argument('--batch', type=int, default=8, help='frames per batch (image backbones)')
  parser.add_argument('--audio_batch', type=int, default=2, help='audio segments per batch (AST)')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--torch_threads', type=int, default=0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--variants', default='after', help='comma-separated: before, after, or '
                      'OPTION_SET[:legacy] (see the module docstring); each runs in a worker process')
  parser.add_argument('--json', default='', help='also write the results here')
  a = parser.parse_args(argv)
  archs = ARCHS if a.arch == 'all' else tuple(a.arch.split(','))
  variants = tuple(a.variants.split(','))
  for arch in archs:
    for v in variants:
      parse_variant(v, arch)   # an unknown name fails before anything runs
  import jax
  peak = matmul_peak(2048)   # under this process's XLA options (XLA_FLAGS as given)
  print(f'device {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores, '
        f'float32 matmul peak {peak / 1e9:.1f} GFLOP/s, load {load()}', flush=True)
  out = []
  for arch in archs:
    bench_arch(arch, a, out, variants)
  for r in out:
    r['fraction_of_matmul_peak'] = r['jax_gflops'] * 1e9 / peak
  if a.json:
    with open(a.json, 'w') as f:
      json.dump({'peak_gflops': peak / 1e9, 'results': out, 'args': vars(a)}, f, indent=1)
  print('RESULT ' + json.dumps({'peak_gflops': peak / 1e9, 'results': out, 'device': jax.devices()[0].device_kind,
                                'platform': jax.default_backend(), 'torch_device': 'cpu'}))
  return out


if __name__ == '__main__':
  main()
