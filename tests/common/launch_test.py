"""The launch scripts' dry runs (launch/tpu.py, launch/gpu.py) and common_jax.distributed.maybe_initialize.

No network and no gcloud: a dry run only prints the commands. The remote command a TPU worker would run is
checked for shell syntax and executed once locally against a stand-in /opt/hapvr, and the GPU launcher's
multi-process environment is exercised for real with two CPU processes joining one JAX job.
"""
import os
import shlex
import socket
import subprocess
import sys

import pytest

from common_jax import distributed
from launch import gpu, tpu

from tests.conftest import ROOT  # noqa: E402
CREATE = ['create', '--name=hapvr', '--zone=us-west4-a', '--accelerator=v5litepod-16',
          '--version=tpu-ubuntu2204-base', '--repo=gs://bkt/code.tar.gz', '--dry_run']
RUN = ['run', '--name=hapvr', '--zone=us-west4-a', '--accelerator=v5litepod-16', '--workdir=gs://bkt/runs/vcdb',
       '--dry_run', '--', 'python', '-m', 'hapvr_jax.main', '--config=configs/vcdb.py',
       '--config.data.path=gs://data-bkt/shards/vcdb']


def commands(main, argv, capsys):
  """The `+ ...` lines a dry run prints, each split back into its argv."""
  assert main(argv) == 0
  out = capsys.readouterr().out
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith('+ ')]


def remote(argv):
  return next(a for a in argv if a.startswith('--command='))[len('--command='):]


def error_of(main, argv, capsys):
  with pytest.raises(SystemExit) as e:
    main(argv)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith('error: '), err
  return err


def test_tpu_create_is_a_queued_resource_with_startup_script(capsys):
  [cmd] = commands(tpu.main, CREATE + ['--spot'], capsys)
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'hapvr']
  for flag in ('--zone=us-west4-a', '--node-id=hapvr', '--accelerator-type=v5litepod-16',
               '--runtime-version=tpu-ubuntu2204-base', '--spot',
               f'--metadata-from-file=startup-script={os.path.join(ROOT, "launch", "startup.sh")}'):
    assert flag in cmd
  assert any(a.startswith('--metadata=') and 'hapvr-repo=gs://bkt/code.tar.gz' in a for a in cmd)
  [cmd] = commands(tpu.main, CREATE + ['--reserved', '--project=p1'], capsys)
  assert '--reserved' in cmd and '--spot' not in cmd and '--project=p1' in cmd
  assert 'spot' in error_of(tpu.main, CREATE + ['--spot', '--reserved'], capsys)


def test_startup_script_installs_pinned_tpu_jax():
  path = os.path.join(ROOT, 'launch', 'startup.sh')
  assert subprocess.run(['bash', '-n', path]).returncode == 0
  text = open(path).read()
  assert 's/^jax==/jax[tpu]==/' in text and 'pip" install -q -r "$ROOT/requirements-tpu.txt"' in text
  assert 'touch "$ROOT/ready"' in text and tpu.REMOTE_ROOT == '/opt/hapvr'
  pins = [l for l in open(os.path.join(ROOT, 'requirements.txt')) if l.startswith('jax==')]
  assert len(pins) == 1     # the line the startup script rewrites


def test_tpu_run_all_workers_per_host_log_workdir_and_distributed(capsys):
  [cmd] = commands(tpu.main, RUN, capsys)
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'hapvr'] and '--worker=all' in cmd
  script = remote(cmd)
  assert subprocess.run(['bash', '-n', '-c', script]).returncode == 0
  assert 'host-$(hostname)' in script and '| tee -a "$log"' in script
  # gs:// paths reach the program as the gcsfuse mounts of their buckets, both buckets mounted.
  assert '--workdir=/mnt/gcs/bkt/runs/vcdb' in script and '--config.data.path=/mnt/gcs/data-bkt/shards/vcdb' in script
  assert 'gcsfuse' in script and ' bkt /mnt/gcs/bkt' in script and ' data-bkt /mnt/gcs/data-bkt' in script
  assert 'cp "$log" /mnt/gcs/bkt/runs/vcdb/logs/' in script
  assert 'export COMMON_JAX_DISTRIBUTED=auto' in script           # 4 hosts
  [cmd] = commands(tpu.main, [a.replace('v5litepod-16', 'v5litepod-8') for a in RUN], capsys)
  assert 'COMMON_JAX_DISTRIBUTED' not in remote(cmd)                # one host: a plain process
  i = RUN.index('--')
  [cmd] = commands(tpu.main, RUN[:i] + ['--gcs=direct', '--detach'] + RUN[i:], capsys)
  script = remote(cmd)
  assert subprocess.run(['bash', '-n', '-c', script]).returncode == 0
  assert 'gcsfuse' not in script and 'nohup bash -c' in script and 'gs://bkt/runs/vcdb' in script


def test_tpu_run_needs_gs_workdir_on_multi_host(capsys):
  local = [a.replace('gs://bkt/runs/vcdb', '/tmp/runs/vcdb') for a in RUN]
  err = error_of(tpu.main, local, capsys)
  assert 'gs://' in err and '4 hosts' in err and 'share no disk' in err
  err = error_of(tpu.main, [a for a in local if not a.startswith('--accelerator')], capsys)   # unknown: assume many
  assert 'gs://' in err
  [cmd] = commands(tpu.main, [a.replace('v5litepod-16', 'v4-8') for a in local], capsys)     # one host: allowed
  assert '--workdir=/tmp/runs/vcdb' in remote(cmd)
  assert 'not in the command' in error_of(tpu.main, RUN + ['--workdir=x'], capsys)
  assert 'after --' in error_of(tpu.main, RUN[:RUN.index('--')], capsys)
  assert 'not a bucket name' in error_of(tpu.main, [a.replace('gs://bkt', 'gs://BUCKET') for a in RUN], capsys)


def test_tpu_remote_command_runs(tmp_path, capsys, monkeypatch):
  """The worker's command, executed by bash against a stand-in install: program, workdir, log, exit code."""
  root, home, work = tmp_path / 'opt', tmp_path / 'home', tmp_path / 'work'
  (root / 'code').mkdir(parents=True)
  (root / 'venv' / 'bin').mkdir(parents=True)
  (root / 'venv' / 'bin' / 'activate').write_text('export ACTIVATED=1\n')
  monkeypatch.setattr(tpu, 'REMOTE_ROOT', str(root))
  argv = ['run', '--name=t', '--zone=z', '--hosts=1', f'--workdir={work}', '--env=FOO=a b', '--dry_run', '--',
          sys.executable, '-c', 'import os, sys; print("ran", os.getcwd(), os.environ["ACTIVATED"], '
          'os.environ["FOO"], sys.argv[1:]); sys.exit(5)']
  [cmd] = commands(tpu.main, argv, capsys)
  result = subprocess.run(['bash', '-c', remote(cmd)], env={**os.environ, 'HOME': str(home)}, capture_output=True,
                          text=True)
  assert result.returncode == 1 and 'startup script has not finished' in result.stderr
  (root / 'ready').touch()
  result = subprocess.run(['bash', '-c', remote(cmd)], env={**os.environ, 'HOME': str(home)}, capture_output=True,
                          text=True)
  assert result.returncode == 5, result.stderr
  expected = f"ran {root / 'code'} 1 a b ['--workdir={work}']"
  assert expected in result.stdout
  [log] = list((home / 'logs' / 't').iterdir())
  assert log.name.startswith(f'host-{socket.gethostname()}-') and expected in log.read_text()
  assert (work / 'logs' / log.name).read_text() == log.read_text()


def test_tpu_status_delete_setup_push(capsys):
  scope = ['--name=hapvr', '--zone=us-west4-a', '--dry_run']
  [cmd] = commands(tpu.main, ['delete'] + scope, capsys)
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'hapvr'] and '--force' in cmd
  [cmd] = commands(tpu.main, ['status'] + scope, capsys)
  assert cmd[4:6] == ['describe', 'hapvr']
  [cmd] = commands(tpu.main, ['setup'] + scope, capsys)
  assert '--worker=all' in cmd and 'google_metadata_script_runner startup' in remote(cmd)
  [cmd] = commands(tpu.main, ['logs'] + scope, capsys)
  assert 'tail -n 20' in remote(cmd)
  archive, upload = commands(tpu.main, ['push', '--repo=gs://bkt/code.tar.gz', '--dry_run'], capsys)
  assert archive[:4] == ['git', '-C', ROOT, 'archive'] and upload[:3] == ['gcloud', 'storage', 'cp']
  assert upload[-1] == 'gs://bkt/code.tar.gz'


def test_tpu_usage_errors_are_one_line(capsys):
  assert '--zone' in error_of(tpu.main, ['delete', '--name=hapvr', '--dry_run'], capsys)
  assert '--version' in error_of(tpu.main, [a for a in CREATE if not a.startswith('--version')], capsys)
  assert '--name' in error_of(tpu.main, ['status', '--name=Bad_Name', '--zone=z', '--dry_run'], capsys)
  assert 'invalid choice' in error_of(tpu.main, ['launch'], capsys)
  assert 'unknown accelerator' in error_of(tpu.main, [a.replace('v5litepod-16', 'x9-4') for a in RUN], capsys)
  # as a script, from another directory
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'tpu.py'), 'delete', '--name=hapvr'],
                          capture_output=True, text=True, cwd='/')
  assert result.returncode == 2 and result.stderr.count('\n') == 1 and '--zone' in result.stderr


def test_tpu_hosts_of():
  assert [tpu.hosts_of(a) for a in ('v4-8', 'v4-32', 'v5p-8', 'v5p-128', 'v5litepod-8', 'v5litepod-16', 'v6e-4',
                                      'v6e-256', 'v2-8', 'v3-32')] == [1, 4, 1, 16, 1, 4, 1, 64, 1, 4]


def test_gpu_single_process_has_no_distributed_env(capsys):
  [cmd] = commands(gpu.main, ['run', '--dry_run', '--', 'python', '-m', 'hapvr_jax.main', '--workdir=w'], capsys)
  assert cmd[:4] == ['python', '-m', 'hapvr_jax.main', '--workdir=w'] and cmd[-4:-1] == ['|', 'tee', '-a']
  [cmd] = commands(gpu.main, ['run', '--gpus=4', '--mem_fraction=0.9', '--dry_run', '--', 'python', 'x.py'],
                   capsys)
  assert cmd[:3] == ['env', 'CUDA_VISIBLE_DEVICES=0,1,2,3', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9']
  assert not any(a.startswith('JAX_') for a in cmd)


def test_gpu_multi_node_and_local_processes_env(capsys):
  [cmd] = commands(gpu.main, ['run', '--gpus=8', '--nodes=2', '--node_rank=1', '--coordinator=10.0.0.2:12355',
                              '--dry_run', '--', 'python', '-m', 'hapvr_jax.main', '--workdir=/shared/w'], capsys)
  assert {'JAX_COORDINATOR_ADDRESS=10.0.0.2:12355', 'JAX_NUM_PROCESSES=2', 'JAX_PROCESS_ID=1',
          'CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7'} <= set(cmd) and '--workdir=/shared/w' in cmd
  assert cmd[-1].endswith('-process-1.log')
  cmds = commands(gpu.main, ['run', '--gpus=4', '--nodes=2', '--node_rank=1', '--coordinator=h:1',
                             '--local_processes', '--dry_run', '--', 'python', 'x.py'], capsys)
  assert [[a for a in c if a.startswith(('CUDA_', 'JAX_PROCESS_ID', 'JAX_NUM'))] for c in cmds] == [
      [f'CUDA_VISIBLE_DEVICES={i}', 'JAX_NUM_PROCESSES=8', f'JAX_PROCESS_ID={4 + i}'] for i in range(4)]
  assert '--node_rank' in error_of(gpu.main, ['run', '--nodes=2', '--dry_run', '--', 'python', 'x.py'], capsys)
  assert 'not in' in error_of(gpu.main, ['run', '--nodes=2', '--node_rank=2', '--coordinator=h:1', '--', 'p'], capsys)
  assert '--gpus' in error_of(gpu.main, ['run', '--local_processes', '--', 'python', 'x.py'], capsys)
  assert 'after --' in error_of(gpu.main, ['run', '--dry_run'], capsys)
  assert '--gpus=two: invalid literal for int()' in error_of(gpu.main, ['run', '--gpus=two', '--', 'p'], capsys)


def test_gpu_local_processes_join_one_jax_job(tmp_path, capsys):
  """Two real processes (CPU) get the launcher's environment and maybe_initialize joins them into one job."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  program = tmp_path / 'job.py'
  program.write_text(f'import sys; sys.path.insert(0, {ROOT!r})\n'
                     'from common_jax import distributed\nimport jax\n'
                     'assert distributed.maybe_initialize()\n'
                     'print("process", jax.process_index(), "of", jax.process_count(), flush=True)\n')
  code = gpu.main(['run', '--gpus=2', '--local_processes', f'--coordinator=127.0.0.1:{port}',
                   f'--log_dir={tmp_path / "logs"}', '--', sys.executable, str(program)])
  assert code == 0
  logs = sorted((tmp_path / 'logs').iterdir())
  assert [p.read_text().strip() for p in logs] == ['process 0 of 2', 'process 1 of 2']
  assert 'process 0 of 2' in capsys.readouterr().out


class _Recorder:

  def __init__(self):
    self.calls = []

  def __call__(self, **kwargs):
    self.calls.append(kwargs)


@pytest.fixture
def recorder(monkeypatch):
  import jax
  rec = _Recorder()
  monkeypatch.setattr(jax.distributed, 'initialize', rec)
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(distributed, '_initialized', False)
  return rec


def test_maybe_initialize_single_process_does_nothing(recorder):
  for env in ({}, {'JAX_NUM_PROCESSES': '1'}, {'JAX_NUM_PROCESSES': '1', distributed.MODE_VAR: 'auto'},
              {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_PROCESS_ID': '0'}, {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'},
              {distributed.MODE_VAR: 'off', 'JAX_NUM_PROCESSES': '2'}):
    assert distributed.maybe_initialize(env) is False
  assert recorder.calls == []


def test_maybe_initialize_multi_process_uses_the_env(recorder):
  env = {'JAX_COORDINATOR_ADDRESS': '10.0.0.2:12355', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3',
         'JAX_LOCAL_DEVICE_IDS': '0,1'}
  assert distributed.maybe_initialize(env) is True
  assert distributed.maybe_initialize(env) is False          # once per process
  assert recorder.calls == [dict(coordinator_address='10.0.0.2:12355', num_processes=4, process_id=3,
                                 local_device_ids=[0, 1])]
  distributed._initialized = False
  assert distributed.maybe_initialize({distributed.MODE_VAR: 'auto'}) is True
  assert recorder.calls[-1] == {}                             # JAX's own detection (TPU metadata, SLURM, MPI)


@pytest.mark.parametrize('env, message', [
    ({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0'}, 'JAX_COORDINATOR_ADDRESS'),
    ({'JAX_NUM_PROCESSES': '2', 'JAX_COORDINATOR_ADDRESS': 'h:1'}, 'JAX_PROCESS_ID'),
    ({'JAX_NUM_PROCESSES': '2', 'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_PROCESS_ID': '2'}, 'not in'),
    ({'JAX_NUM_PROCESSES': 'two'}, 'integer'),
    ({distributed.MODE_VAR: 'yes'}, 'auto'),
])
def test_maybe_initialize_rejects_bad_settings(recorder, env, message):
  with pytest.raises(ValueError, match=message):
    distributed.maybe_initialize(env)
  assert recorder.calls == []
