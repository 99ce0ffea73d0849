"""common_jax.xla_cpu (XLA:CPU option sets merged into XLA_FLAGS) and the backbones under every option set and
both formulations (matmul patch projections / head-major attention / 1x1 convolutions as matmuls, and the former
convolution ones), against the PyTorch references: tiny configs, random weights, float32, rtol = atol = 1e-5.

XLA options are read once per process, so each option set runs the four models in a subprocess of its own
(started together: about the cost of one); XLA's default set is the one this process runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backbones import registry
from bench.backbones import bench_reference, example_input
from common_jax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = ('resnet50_irmac', 'dino_vits16', 'clip_vitl14', 'ast')
TOL = dict(rtol=1e-5, atol=1e-5)


def test_merged_adds_options_but_keeps_the_users_value():
  user = '--xla_force_host_platform_device_count=8 --xla_cpu_use_onednn=false'
  got = xla_cpu.merged(user, ('--xla_cpu_use_onednn=true', xla_cpu.NO_YNN))
  assert got == f'{user} {xla_cpu.NO_YNN}'
  assert xla_cpu.merged('', ()) == '' and xla_cpu.merged('  ', (xla_cpu.NO_YNN,)) == xla_cpu.NO_YNN
  assert xla_cpu.merged(got, (xla_cpu.NO_YNN,)) == got   # applied twice: no duplicate


def test_options_for_models_and_sets():
  assert xla_cpu.options_for(['onednn']) == (xla_cpu.NO_YNN, '--xla_cpu_use_onednn=true')
  assert xla_cpu.options_for(['resnet50_irmac']) == xla_cpu.OPTION_SETS[xla_cpu.RECOMMENDED['resnet50_irmac']]
  assert xla_cpu.options_for(['no_ynn', 'onednn']) == ()   # models wanting different sets: XLA's defaults
  with pytest.raises(ValueError, match="unknown XLA:CPU option set 'fast'"):
    xla_cpu.options_for(['fast'])


def test_configure_after_the_backend_started_changes_nothing():
  jax.devices()
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert xla_cpu.configure('no_ynn', environ=env) is False
  assert env == {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}


@pytest.fixture(scope='module')
def cases():
  """arch -> (params, config, preprocessed input, torch output) of the tiny models."""
  out = {}
  for arch in ARCHS:
    mod = registry.module(arch)
    tiny = mod.Config.tiny()
    fn, sd, extra = bench_reference(arch, tiny, seed=4)
    if arch != 'resnet50_irmac':   # not a multiple of 64 wide: the head count is given
      extra['num_heads'] = getattr(tiny, 'num_heads', None) or tiny.num_attention_heads
    if arch == 'ast':
      extra['max_length'] = tiny.max_length
    params, cfg = mod.convert(sd, where=arch, **extra)
    x = np.asarray(mod.preprocess(example_input(arch, mod, cfg, 2, np.random.default_rng(5)), cfg), np.float32)
    out[arch] = (params, cfg, x, np.asarray(fn(x), np.float32))
  return out


def forward(arch, params, cfg, x, fast=True):
  mod = registry.module(arch)
  kw = {} if arch == 'ast' else {'pointwise_as_dot': fast} if arch == 'resnet50_irmac' else {'fast_layout': fast}
  with jax.default_matmul_precision('highest'):
    return np.asarray(jax.jit(mod.Model(cfg, **kw).apply)({'params': params}, jnp.asarray(x)))


@pytest.mark.parametrize('arch', ('resnet50_irmac', 'dino_vits16', 'clip_vitl14'))
def test_both_formulations_match_torch(cases, arch):
  params, cfg, x, want = cases[arch]
  for fast in (True, False):
    got = forward(arch, params, cfg, x, fast)
    print(f'[max rel err] {arch} fast={fast}: {np.abs(got - want).max() / np.abs(want).max():.2g}')
    np.testing.assert_allclose(got, want, **TOL)


def run_saved(folder):
  """Subprocess side: the four models (current formulation) on the saved cases; outputs to out.npz."""
  meta = json.load(open(os.path.join(folder, 'meta.json')))
  data = np.load(os.path.join(folder, 'in.npz'))
  outs = {}
  for arch in ARCHS:
    cfg = registry.module(arch).Config.from_dict(meta[arch])
    flat = {tuple(k.split('/')[1:]): data[k] for k in data.files if k.startswith(arch + '/')}
    outs[arch] = forward(arch, flax.traverse_util.unflatten_dict(flat), cfg, data[f'x_{arch}'])
  np.savez(os.path.join(folder, 'out.npz'), **outs)


def test_every_option_set_matches_torch(cases, tmp_path):
  arrays, meta = {}, {}
  for arch, (params, cfg, x, _) in cases.items():
    arrays.update({'/'.join((arch, *k)): v for k, v in flax.traverse_util.flatten_dict(params).items()})
    arrays[f'x_{arch}'], meta[arch] = x, cfg.to_dict()
  np.savez(tmp_path / 'in.npz', **arrays)
  (tmp_path / 'meta.json').write_text(json.dumps(meta))
  code = f'import sys; sys.path.insert(0, {ROOT!r}); from tests.backbones import xla_options_test as t; t.run_saved(sys.argv[1])'
  procs = {}
  # the default: the test above, in-process; 'fast_compile' only lowers LLVM's optimisation level (no
  # fast-math), which the suite's own -O0 already covers
  for name in sorted(set(xla_cpu.OPTION_SETS) - {'xla_default', 'fast_compile'}):
    folder = tmp_path / name
    folder.mkdir()
    for f in ('in.npz', 'meta.json'):
      os.link(tmp_path / f, folder / f)
    env = dict(os.environ, PYTHONPATH=ROOT)
    env['XLA_FLAGS'] = xla_cpu.merged(env.get('XLA_FLAGS', ''), xla_cpu.OPTION_SETS[name])
    procs[name] = subprocess.Popen([sys.executable, '-c', code, str(folder)], env=env, stderr=subprocess.PIPE)
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    got = np.load(tmp_path / name / 'out.npz')
    for arch, (*_, want) in cases.items():
      print(f'[max rel err] {name} {arch}: {np.abs(got[arch] - want).max() / np.abs(want).max():.2g}')
      np.testing.assert_allclose(got[arch], want, **TOL, err_msg=f'{name} {arch}')


def test_the_environment_variable_replaces_every_commands_choice(monkeypatch):
  monkeypatch.setattr(xla_cpu, 'backend_started', lambda: False)
  env = {'XLA_FLAGS': '--a=1', xla_cpu.ENV: 'no_ynn'}
  assert xla_cpu.configure('resnet50_irmac', environ=env) and env['XLA_FLAGS'] == '--a=1 ' + xla_cpu.NO_YNN
  env = {xla_cpu.ENV: 'xla_default'}
  assert xla_cpu.configure('resnet50_irmac', environ=env) and env['XLA_FLAGS'] == ''
  env = {}
  assert xla_cpu.configure('resnet50_irmac', environ=env)
  assert env['XLA_FLAGS'] == ' '.join(xla_cpu.OPTION_SETS['onednn'])
