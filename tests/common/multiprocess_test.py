"""Two JAX processes on 127.0.0.1 (jax.distributed, gloo collectives, 4 CPU devices each) run the HAP-VR demo
training and its evaluations; each process reads its own chunks of every step's batch. Losses, metrics and the
checkpoint must equal a single process with 8 devices."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import FAST_COMPILE

from tests.conftest import ROOT  # noqa: E402
STEPS = 4
ARGS = ['--config=configs/vcdb.py:demo', f'--config.total_steps={STEPS}', '--config.log_every=1',
        '--config.checkpoint_every=2', f'--config.eval_every={STEPS}', '--config.compilation_cache=',
        '--config.demo.train_videos=64', '--config.demo.num_queries=4', '--config.demo.num_database=48']


def _coordinator_port():
  """A free port BELOW the kernel's ephemeral range: the coordinator binds it seconds after it is chosen, and
  in between the ephemeral ports handed out for other connections (gloo, gRPC, other tests) can never take it."""
  low = 32768
  try:
    with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
      low = int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    pass
  rng = np.random.default_rng()
  for _ in range(200):
    port = int(rng.integers(max(low // 2, 1024), low))
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
      except OSError:
        continue
      return port
  raise RuntimeError('no free coordinator port')


def _env(devices, **extra):
  env = {k: v for k, v in os.environ.items()
         if not (k.startswith('JAX_') and 'CACHE' not in k) and k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}',
             PYTHONPATH=ROOT, PYTHONFAULTHANDLER='1', **extra)   # SIGABRT on a hang prints every thread's stack
  return env


def _launch(workdir, devices, log, module='hapvr_jax.main', args=ARGS, **extra):
  # Output goes to a file, never a pipe: a process blocked writing to a full pipe nobody reads (the test is busy
  # with its in-process reference, or waiting on the other process) would stall the collectives of both.
  with open(log, 'w') as f:
    p = subprocess.Popen([sys.executable, '-m', module, *args, f'--workdir={workdir}'], cwd=ROOT,
                         env=_env(devices, **extra), stdout=f, stderr=subprocess.STDOUT)
  p.log = log
  return p


def _two(workdir, **kw):
  port = _coordinator_port()
  return [_launch(workdir, 4, f'{workdir}.process{k}.log', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(k),
                  JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', **kw) for k in range(2)]


def _output(p, tail=None):
  with open(p.log, errors='replace') as f:
    out = f.read()
  return out[-tail:] if tail else out


def _finish(procs, timeout=400):
  """Waits for all processes; as soon as one fails or the time is up, the others are stopped with SIGABRT
  (Python's faulthandler then prints where each thread waits) and the test fails with every process's output."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.5)
  if all(p.poll() == 0 for p in procs):
    return [_output(p) for p in procs]
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGABRT)
  for p in procs:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
  hung = time.monotonic() >= deadline
  pytest.fail(('the processes did not finish in %d s' % timeout if hung else 'a process failed') + '\n' +
              '\n'.join(f'--- process {k} (exit {p.returncode}) ---\n{_output(p, 6000)}' for k, p in enumerate(procs)))


def _in_process(module, args, workdir):
  """Runs a training main's config in this pytest process (8 fake devices, compilations shared with the other
  tests through the persistent cache) while the two subprocesses run."""
  import importlib.util
  config_arg = next(a for a in args if a.startswith('--config='))[len('--config='):]
  path, _, variant = config_arg.partition(':')
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(variant) if variant else mod.get_config()
  for a in args:
    if a.startswith('--config.'):
      key, _, value = a[len('--config.'):].partition('=')
      node = config
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      old = node[leaf]
      node[leaf] = (value.lower() == 'true') if isinstance(old, bool) else type(old)(value) if old is not None \
          and not isinstance(old, str) else value
  train = importlib.import_module(module.replace('.main', '.train'))
  train.train_and_evaluate(config, str(workdir))


def _reference(procs, module, args, workdir):
  try:
    _in_process(module, args, workdir)
  except BaseException:
    for p in procs:
      p.kill()
    raise


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_and_evaluate_like_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  procs = _two(two)
  _reference(procs, 'hapvr_jax.main', ARGS, one)   # the one-process reference: this test process has 8 devices
  _finish(procs)

  train = [_jsonl(d / 'train.jsonl') for d in (one, two)]
  assert [r['step'] for r in train[0]] == [r['step'] for r in train[1]] == list(range(1, STEPS + 1))
  for a, b in zip(*train):
    for k in ('loss', 'grad_norm', 'lr'):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=f'step {a["step"]} {k}')
  evals = [{(r['step'], r['model']): r['mAP'] for r in _jsonl(d / 'metrics.jsonl')} for d in (one, two)]
  assert evals[0].keys() == evals[1].keys() and (STEPS, 'trained') in evals[0]
  for k in evals[0]:
    assert abs(evals[0][k] - evals[1][k]) < 1e-6, (k, evals)

  from common_jax import checkpoint
  import jax
  pa, _ = checkpoint.load_params(str(one))
  pb, _ = checkpoint.load_params(str(two))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=str(path))
  assert sorted(os.listdir(two / 'ckpt')) == sorted(os.listdir(one / 'ckpt'))

  # The evaluation CLI on two processes (each scores half of the database blocks on its own devices) loads the
  # checkpoint both processes wrote and reproduces the single-process evaluation run during training.
  data = one / 'demo_data' / 'eval'
  evaluation = tmp_path / 'eval'
  _finish(_two(evaluation, module='hapvr_jax.evaluate', args=[
      '--config=configs/fivr_5k.py', f'--config.checkpoint={two}', f'--config.features={data / "features.hdf5"}',
      f'--config.annotations={data}', '--config.compilation_cache=', '--config.progress=False']))
  with open(evaluation / 'metrics.json') as f:
    metrics = json.load(f)
  assert metrics['processes'] == 2
  assert abs(metrics['DSVR'] - evals[0][(STEPS, 'trained')]) < 1e-6, (metrics, evals[0])
  assert not (evaluation / 'partial').exists()


AVHASH_ARGS = ['--config=configs/fcvid.py:demo,epochs=1', '--config.log_every=2', '--config.compilation_cache=',
               '--config.demo.train_per_class=8', '--config.demo.val_per_class=2', '--config.demo.test_per_class=2',
               '--config.train_dropout=True']


def test_two_processes_train_avhash_like_one(tmp_path):
  """AVHash (dropout on, so the per-video masks must not depend on the process count): the losses, the
  validation, the best checkpoint and the final test of two processes equal one process's."""
  one, two = tmp_path / 'one', tmp_path / 'two'
  procs = _two(two, module='avhash_jax.main', args=AVHASH_ARGS)
  _reference(procs, 'avhash_jax.main', AVHASH_ARGS, one)
  _finish(procs)
  train = [_jsonl(d / 'train.jsonl') for d in (one, two)]
  assert [r['step'] for r in train[0]] == [r['step'] for r in train[1]] and train[0]
  for a, b in zip(*train):
    np.testing.assert_allclose(b['loss'], a['loss'], rtol=2e-5, err_msg=f'step {a["step"]}')
  vals = [[(r['step'], r['mAP']) for r in _jsonl(d / 'metrics.jsonl')] for d in (one, two)]
  assert [s for s, _ in vals[0]] == [s for s, _ in vals[1]]
  np.testing.assert_allclose([m for _, m in vals[1]], [m for _, m in vals[0]], atol=1e-6)
  best = [json.load(open(d / 'best' / 'best.json')) for d in (one, two)]
  assert best[0]['step'] == best[1]['step']
  tests = [json.load(open(d / 'test' / 'metrics.json')) for d in (one, two)]
  assert abs(tests[0]['mAP@all'] - tests[1]['mAP@all']) < 1e-6
