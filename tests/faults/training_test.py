"""Training survives SIGKILL anywhere: the real command, killed at the kill points of common_jax.train_loop
(JAX_VR_KILL_AT), then rerun, must end exactly as an uninterrupted run does.

For each system one workdir goes through a chain of killed runs, each resuming what the previous one left:
killed before the first step compiles, in the middle of the steps between two checkpoints, right after the
checkpoint of a step that evaluates, between the final evaluation and the final checkpoint (with the
temporary folder a save cut short leaves), right after the final checkpoint; then the final checkpoint's data
files are overwritten with garbage, and the last rerun must fall back to the checkpoint before it, naming the
damaged step. The losses, the evaluation rows (none missing, none repeated), the TensorBoard events, the
plots, the best checkpoint and AVHash's test mAP must equal those of the uninterrupted reference.
"""
import glob
import json
import os
import re
import signal
import subprocess
import sys

import jax
import pytest

from avhash_jax import demo_data as avhash_demo
from common_jax import faults
from common_jax import mesh as mesh_lib
from configs import fcvid
from configs import vcdb
from hapvr_jax import demo_data as hapvr_demo
from tests.common.train_loop_test import damage_checkpoint

from tests.conftest import ROOT  # noqa: E402
def _env(kill=None):
  """The tests' environment (compilation cache, platform), one device: the runs compare with a 1-device
  reference in this process. Every compilation is cached, however short: the chain repeats them all."""
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                            env.get('XLA_FLAGS', '')) + ' --xla_force_host_platform_device_count=1'
  env.pop(faults.ENV, None)
  if kill:
    env[faults.ENV] = kill
  return env


def _run(module, args, workdir, kill=None):
  r = subprocess.run([sys.executable, '-m', module, *args, f'--workdir={workdir}'], cwd=ROOT, env=_env(kill),
                     capture_output=True, text=True, timeout=300)
  want = -signal.SIGKILL if kill else 0
  assert r.returncode == want, f'{module} {kill}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
  return r


@pytest.fixture
def one_device(monkeypatch):
  make = mesh_lib.make_mesh
  monkeypatch.setattr(mesh_lib, 'make_mesh', lambda spec=(('data', -1),), devices=None: make(
      spec, devices=jax.devices()[:1]))


def _rows(workdir, name, *keys):
  with open(os.path.join(workdir, name)) as f:
    return [tuple(r.get(k) for k in ('step', *keys)) for r in map(json.loads, f)]


def _events(workdir):
  """(tag, step, value) of every scalar event, read by TensorBoard's own loader with its repair of restarted
  runs (purge_orphaned_data) off, so that a repeated step shows."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(os.path.join(workdir, 'tensorboard'), purge_orphaned_data=False)
  acc.Reload()
  return sorted((tag, e.step, e.value) for tag in acc.Tags()['scalars'] for e in acc.Scalars(tag)
                if tag in ('loss', 'mAP'))


def _committed(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'ckpt')) if d.isdigit())


def _interrupted_save(workdir, step):
  """What a kill in the middle of Orbax's save of `step` leaves: its temporary folder, half written."""
  tmp = os.path.join(workdir, 'ckpt', f'{step}.orbax-checkpoint-tmp-1700000000000000')
  os.makedirs(os.path.join(tmp, 'state'))
  with open(os.path.join(tmp, 'state', 'manifest.ocdbt'), 'wb') as f:
    f.write(b'\0' * 10)


def _assert_same_run(got, want, train_keys=('loss',), eval_keys=('model', 'mAP')):
  train = [_rows(d, 'train.jsonl', *train_keys) for d in (got, want)]
  assert [r[0] for r in train[0]] == [r[0] for r in train[1]], 'train.jsonl steps'
  assert train[0] == pytest.approx(train[1], rel=1e-6)
  evals = [_rows(d, 'metrics.jsonl', *eval_keys) for d in (got, want)]
  assert [r[:-1] for r in evals[0]] == [r[:-1] for r in evals[1]], 'metrics.jsonl rows'
  assert [r[-1] for r in evals[0]] == pytest.approx([r[-1] for r in evals[1]], rel=1e-6)
  events = [_events(d) for d in (got, want)]
  assert [e[:2] for e in events[0]] == [e[:2] for e in events[1]], 'TensorBoard events'


# ------------------------------------------------------------------------------------------------- HAP-VR
HAPVR_STEPS = 6     # log every step, checkpoints at 2, 4, 6, evaluations at 0 (two rows), 4, 6


@pytest.fixture(scope='module')
def hapvr_data(tmp_path_factory):
  return hapvr_demo.make_demo(str(tmp_path_factory.mktemp('hapvr_data')), dims=24, window=8, train_videos=24,
                              num_queries=2, num_database=20)


def _hapvr_args(data):
  return ['--config=configs/vcdb.py:demo', f'--config.total_steps={HAPVR_STEPS}', '--config.log_every=1',
          '--config.checkpoint_every=2', '--config.eval_every=4', '--config.compilation_cache=',
          '--config.demo.enabled=False', '--config.model.dims=24', f'--config.data.path={data["shards"]}',
          '--config.data.window=8', '--config.data.sources_per_group=4',
          f'--config.eval.features={data["features"]}', f'--config.eval.annotations={data["annotations"]}']


def test_hapvr_training_survives_kills(hapvr_data, one_device, tmp_path):
  from hapvr_jax import train
  reference = str(tmp_path / 'reference')
  c = vcdb.get_config('demo')
  c.demo.enabled = False
  c.model.dims = 24
  c.data.update(path=hapvr_data['shards'], window=8, sources_per_group=4)
  c.eval.update(features=hapvr_data['features'], annotations=hapvr_data['annotations'])
  c.update(total_steps=HAPVR_STEPS, log_every=1, checkpoint_every=2, eval_every=4, compilation_cache='')
  train.train_and_evaluate(c, reference)

  w, args = str(tmp_path / 'run'), _hapvr_args(hapvr_data)
  run = lambda kill=None: _run('hapvr_jax.main', args, w, kill)
  run('train.step@1')               # after the step-0 evaluations, before the first step compiles
  assert sorted(os.listdir(w)) == ['metrics.jsonl', 'plots', 'tensorboard']   # no checkpoint, no model config
  run('train.step@4')               # steps 1-3 done, checkpoint 2
  assert _committed(w) == [2] and [r[0] for r in _rows(w, 'train.jsonl')] == [1, 2, 3]
  run('train.checkpointed@1')       # resumed from 2: steps 3, 4, evaluation 4, checkpoint 4, killed
  assert _committed(w) == [2, 4] and (4, 'trained') in [r[:2] for r in _rows(w, 'metrics.jsonl', 'model')]
  assert os.path.exists(os.path.join(w, 'plots', 'similarity_000004.png'))
  run('train.evaluated@1')          # resumed from 4: steps 5, 6, final evaluation; killed before its save
  _interrupted_save(w, HAPVR_STEPS)
  run('train.checkpointed@1')       # again from 4, killed right after the final checkpoint
  assert _committed(w) == [2, 4, 6] and _rows(w, 'metrics.jsonl')[-1][0] == HAPVR_STEPS
  damage_checkpoint(w, HAPVR_STEPS)
  r = run()
  assert re.search(rf'checkpoint step {HAPVR_STEPS} in \S+ cannot be read .*resuming from step 4', r.stderr), \
      r.stderr[-3000:]
  assert _committed(w) == [2, 4, 6] and os.path.isdir(os.path.join(w, 'ckpt', f'{HAPVR_STEPS}.corrupt'))
  assert not glob.glob(os.path.join(w, 'ckpt', '*tmp*'))
  _assert_same_run(w, reference)
  assert sorted(os.listdir(os.path.join(w, 'plots'))) == sorted(os.listdir(os.path.join(reference, 'plots')))

  # The evaluator refuses the damaged step with one line naming the directory and the step.
  damaged = tmp_path / 'damaged'
  os.makedirs(damaged / 'ckpt')
  os.replace(os.path.join(w, 'ckpt', f'{HAPVR_STEPS}.corrupt'), damaged / 'ckpt' / str(HAPVR_STEPS))
  os.replace(os.path.join(w, 'model_config.json'), damaged / 'model_config.json')
  r = subprocess.run([sys.executable, '-m', 'hapvr_jax.evaluate', '--config=configs/fivr_5k.py',
                      f'--workdir={tmp_path / "eval"}', f'--config.checkpoint={damaged}',
                      f'--config.features={hapvr_data["features"]}',
                      f'--config.annotations={hapvr_data["annotations"]}', '--config.compilation_cache='],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
  assert f'{damaged}: checkpoint step {HAPVR_STEPS} cannot be read' in errors[0]
  assert 'Traceback' not in r.stderr


# ------------------------------------------------------------------------------------------------- AVHash
AVHASH_EPOCHS, STEPS_PER_EPOCH = 3, 3   # checkpoints and validations at every epoch end; the best is epoch 2's


@pytest.fixture(scope='module')
def avhash_data(tmp_path_factory):
  return avhash_demo.make_demo(str(tmp_path_factory.mktemp('avhash_data')), dim=32, tokens=5, visual_groups=2,
                               audio_groups=3, styles=2, train_per_class=4, val_per_class=2, test_per_class=2)


AVHASH_CONFIG = dict(batch_size=8, epochs=AVHASH_EPOCHS, lr=1e-3, log_every=1, checkpoint_every=0,
                     train_dropout=False, compilation_cache='', progress=False, plots=False, read_threads=1,
                     num_classes=6, bits=16)
AVHASH_MODEL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, tokens=5)


def test_avhash_training_survives_kills(avhash_data, one_device, tmp_path):
  from avhash_jax import train
  reference = str(tmp_path / 'reference')
  c = fcvid.get_config('demo')
  c.demo.enabled = False
  c.model.update(AVHASH_MODEL)
  c.update(AVHASH_CONFIG)
  c.update(avhash_data)
  want = train.train_and_evaluate(c, reference)
  assert want['best']['step'] == 2 * STEPS_PER_EPOCH   # the epoch the kill after its checkpoint used to skip

  w = str(tmp_path / 'run')
  args = ['--config=configs/fcvid.py:demo', *(f'--config.{k}={v}' for k, v in AVHASH_CONFIG.items()),
          *(f'--config.model.{k}={v}' for k, v in AVHASH_MODEL.items()), '--config.demo.enabled=False',
          *(f'--config.{k}={v}' for k, v in avhash_data.items())]
  run = lambda kill=None: _run('avhash_jax.main', args, w, kill)
  run('train.step@1')               # after the step-0 validation (best/ written), before the first step
  assert 'ckpt' not in os.listdir(w) and 'model_config.json' not in os.listdir(w)
  run('train.step@5')               # steps 1-4 done, checkpoint 3
  assert _committed(w) == [3]
  run('train.checkpointed@1')       # resumed from 3: steps 4-6, validation 6 (the best), checkpoint 6, killed
  assert _committed(w) == [3, 6]   # config.keep_checkpoints=2
  assert json.load(open(os.path.join(w, 'best', 'best.json')))['step'] == 6
  run('train.evaluated@1')          # resumed from 6: steps 7-9, final validation; killed before its save
  _interrupted_save(w, 9)
  run('train.checkpointed@1')       # again from 6, killed right after the final checkpoint: no test yet
  assert _committed(w) == [6, 9] and not os.path.exists(os.path.join(w, 'test'))
  damage_checkpoint(w, 9)
  r = run()
  assert re.search(r'checkpoint step 9 in \S+ cannot be read .*resuming from step 6', r.stderr), r.stderr[-3000:]
  assert _committed(w) == [6, 9] and os.path.isdir(os.path.join(w, 'ckpt', '9.corrupt'))
  _assert_same_run(w, reference)
  best = [json.load(open(os.path.join(d, 'best', 'best.json'))) for d in (w, reference)]
  assert best[0] == best[1]
  test = [json.load(open(os.path.join(d, 'test', 'metrics.json'))) for d in (w, reference)]
  assert test[0]['mAP@all'] == pytest.approx(test[1]['mAP@all'], rel=1e-6)
