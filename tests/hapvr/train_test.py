"""The HAP-VR training loop: sharding, resume after SIGTERM, restore onto another device count, CLI errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import helpers
from tests.conftest import FAST_COMPILE

from common_jax import mesh as mesh_lib
from configs import vcdb
from hapvr_jax import demo_data
from hapvr_jax import model as model_lib
from hapvr_jax import train
from hapvr_jax import train_step as step_lib

from tests.conftest import ROOT  # noqa: E402
STEPS = 6


def tiny_config(shards, **overrides):
  c = vcdb.get_config('demo')
  c.demo.enabled = False
  c.model.dims = 24
  c.data.update(path=shards, window=8, sources_per_group=4, groups=2)
  c.total_steps = STEPS
  c.log_every = 1
  c.checkpoint_every = 2
  c.eval_every = 0
  c.eval.features = ''
  c.compilation_cache = ''
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('train') / 'shards')
  return demo_data.write_training_shards(demo_data.World(seed=1, dims=24), d, videos=24, window=8)


def losses(workdir):
  with open(os.path.join(workdir, 'train.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


@pytest.fixture(scope='module')
def uninterrupted(shards, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run_full'))
  result = train.train_and_evaluate(tiny_config(shards), workdir)
  assert result['step'] == STEPS
  return losses(workdir)


def test_sharded_step_equals_single_device(shards):
  c = tiny_config(shards)
  mc = model_lib.ModelConfig.from_dict(dict(c.model))
  rng = np.random.default_rng(0)
  g, n, t = c.data.groups, 2 * c.data.sources_per_group, c.data.window
  y = np.tile(np.eye(n // 2), (2, 2))
  y[n // 2, n - 1] = y[n - 1, n // 2] = 1   # a ViV-style extra positive
  batch = {'regions': rng.normal(size=(g, n, t, 9, 24)).astype(np.float16),
           'teacher': rng.normal(size=(g, n, t, 8)).astype(np.float16),
           'y': np.stack([y] * g).astype(np.float32)}
  out = {}
  for n_dev in (1, 8):
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:n_dev])
    state = jax.device_put(step_lib.init_state(mc, c, 0), mesh_lib.replicated(mesh))
    fn = step_lib.make_train_step(mc, c, mesh)
    for _ in range(2):
      state, metrics = fn(state, step_lib.put_batch(batch, mesh, c))
    out[n_dev] = jax.device_get((state['params'], metrics))
  assert out[8][1]['loss'] == pytest.approx(out[1][1]['loss'], rel=1e-5)
  for k in out[1][1]:
    np.testing.assert_allclose(out[8][1][k], out[1][1][k], rtol=1e-4, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out[8][0], out[1][0])


def test_bfloat16_step_is_close_to_float32(shards):
  c32, c16 = tiny_config(shards), tiny_config(shards, compute_dtype='bfloat16')
  mc = model_lib.ModelConfig.from_dict(dict(c32.model))
  rng = np.random.default_rng(1)
  g, n, t = c32.data.groups, 2 * c32.data.sources_per_group, c32.data.window
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  batch = {'regions': unit(rng.normal(size=(g, n, t, 9, 24))).astype(np.float16),
           'teacher': rng.normal(size=(g, n, t, 8)).astype(np.float16),
           'y': np.stack([np.tile(np.eye(n // 2), (2, 2))] * g).astype(np.float32)}
  mesh = mesh_lib.make_mesh()
  out = {}
  for c in (c32, c16):
    state = jax.device_put(step_lib.init_state(mc, c, 0), mesh_lib.replicated(mesh))
    _, metrics = step_lib.make_train_step(mc, c, mesh)(state, step_lib.put_batch(batch, mesh, c))
    out[c.compute_dtype] = jax.device_get(metrics)
  assert np.isfinite(out['bfloat16']['loss'])
  assert out['bfloat16']['loss'] == pytest.approx(out['float32']['loss'], rel=0.05)
  assert out['bfloat16']['grad_norm'] == pytest.approx(out['float32']['grad_norm'], rel=0.2)


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(shards, uninterrupted, tmp_path):
  workdir = str(tmp_path)
  killer = helpers.sigterm_after_first_step(workdir)
  first = train.train_and_evaluate(tiny_config(shards), workdir)
  killer.join()
  assert first['step'] < STEPS, 'the run was expected to stop early on SIGTERM'
  stopped_at = first['step']
  assert os.path.isdir(os.path.join(workdir, 'ckpt', str(stopped_at)))
  second = train.train_and_evaluate(tiny_config(shards), workdir)
  assert second['step'] == STEPS
  resumed = losses(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), step


def test_restore_onto_four_devices(shards, uninterrupted, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(shards, total_steps=2), workdir)   # 8 devices, checkpoint at 2
  make = mesh_lib.make_mesh
  monkeypatch.setattr(mesh_lib, 'make_mesh', lambda spec=(('data', -1),), devices=None: make(
      spec, devices=jax.devices()[:4]))
  result = train.train_and_evaluate(tiny_config(shards), workdir)
  assert result['step'] == STEPS
  resumed = losses(workdir)
  for step in range(3, STEPS + 1):
    assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4), step


def test_model_config_written_for_evaluation(shards, uninterrupted, tmp_path):
  from common_jax import checkpoint
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(shards, total_steps=1), workdir)
  params, model_dict = checkpoint.load_params(workdir)
  assert model_dict['dims'] == 24 and model_dict['source'] == 'jax'
  assert params['attention']['transform']['kernel'].shape == (24, 24)


def _run_main(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count=1 {FAST_COMPILE}')
  return subprocess.run([sys.executable, '-m', 'hapvr_jax.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('args, expected', [
    (['--config=configs/vcdb.py', '--config.data.path=/nonexistent/shards'], '/nonexistent/shards'),
    (['--config=configs/vcdb.py', '--config.data.nope=1'], 'nope'),
    (['--config=configs/vcdb.py:bogus'], 'bogus'),
    (['--config=configs/vcdb.py'], 'config.data.path is empty'),
])
def test_cli_errors_are_one_line(tmp_path, args, expected):
  r = _run_main(f'--workdir={tmp_path}', *args)
  assert r.returncode == 2, r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and expected in errors[0], r.stderr
  assert 'Traceback' not in r.stderr


def test_demo_learns(tmp_path):
  """The embedded demo, shortened to 50 steps: the trained network must beat the untrained one by >= 0.15
  mAP and the raw-feature Chamfer baseline (the full demo reaches 1.00 from step 150 on)."""
  c = vcdb.get_config('demo')
  c.total_steps = 50
  c.eval_every = 50
  c.compilation_cache = ''
  train.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    evals = {(r['step'], r['model']): r['mAP'] for r in map(json.loads, f)}
  untrained, raw = evals[(0, 'untrained')], evals[(0, 'raw-feature Chamfer baseline')]
  trained = evals[(50, 'trained')]
  assert trained >= untrained + 0.15 and trained > raw, evals
  assert (tmp_path / 'plots' / 'map.png').stat().st_size > 1000
  assert (tmp_path / 'plots' / 'similarity_000050.png').stat().st_size > 1000
