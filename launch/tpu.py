r"""Cloud TPU VM launcher: create a slice, run one command on every worker, resume after preemption, delete.

  python launch/tpu.py push   --repo=gs://my-bucket/code.tar.gz                  # this checkout's HEAD, as a tarball
  python launch/tpu.py create --name=hapvr --zone=us-west4-a --accelerator=v5litepod-16 \
      --version=tpu-ubuntu2204-base --repo=gs://my-bucket/code.tar.gz --spot
  python launch/tpu.py run    --name=hapvr --zone=us-west4-a --accelerator=v5litepod-16 \
      --workdir=gs://my-bucket/runs/hapvr_vcdb -- python -m hapvr_jax.main --config=configs/vcdb.py \
      --config.data.path=gs://my-bucket/shards/vcdb
  python launch/tpu.py logs   --name=hapvr --zone=us-west4-a                      # with run --detach
  python launch/tpu.py status --name=hapvr --zone=us-west4-a
  python launch/tpu.py delete --name=hapvr --zone=us-west4-a

Every subcommand takes --dry_run: it prints the gcloud commands it would run (`+ ...`, one per line, ready to
paste) and runs nothing. Without it each command is echoed the same way, then run.

- `create` asks for the slice as a queued resource (it waits in the queue until capacity is there; --spot for
  preemptible capacity, --reserved for a reservation). Its startup script (launch/startup.sh) runs as root on
  every worker at every boot: it fetches the code given by --repo (a gs:// tarball, made by `push`, or a git
  URL with --ref), builds /opt/hapvr/venv with requirements.txt's pins (the jax line as jax[tpu]), installs
  gcsfuse and marks /opt/hapvr/ready. `setup` runs it again on a live slice (after a new `push`).
- `run` starts the same command on all workers at once (`tpu-vm ssh --worker=all`). Each host tees its
  output to ~/logs/NAME/host-HOSTNAME-TIME.log and copies it to WORKDIR/logs/ when the command ends.
  --detach starts it in the background (nohup), so a dropped ssh session does not end a long run;
  `logs` prints the end of each worker's latest log. On a
  multi-host slice it sets COMMON_JAX_DISTRIBUTED=auto, so common_jax.distributed.maybe_initialize() joins
  the workers (Cloud TPU metadata gives the peers); a single-host slice stays one plain process.
- Files: the workers share no disk, so on a multi-host slice the workdir must be a gs:// path. The training
  and evaluation code read and write local paths, so by default (--gcs=fuse) every gs://my-bucket/... in the
  workdir and in the command is mounted with gcsfuse at /mnt/gcs/BUCKET on each worker and the program sees
  /mnt/gcs/BUCKET/...; --gcs=direct passes gs:// paths through unchanged instead.
- Resume: training resumes from its workdir, so after a preemption `delete`, `create` and the same `run`
  (same --workdir) continue from the last checkpoint. A SIGTERM reaching the program saves one first.
"""
from __future__ import annotations

import os
import re
import shlex
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common_jax import cli  # noqa: E402
from launch import common  # noqa: E402

REMOTE_ROOT = '/opt/hapvr'            # code, venv and the ready marker, written by launch/startup.sh
MOUNT_ROOT = '/mnt/gcs'               # gcsfuse mount points, one folder per bucket
STARTUP_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'startup.sh')
# Consistent views across workers (no metadata caching) and directory renames (Orbax finalises a checkpoint by
# renaming its temporary folder), which gcsfuse refuses by default on flat buckets.
GCSFUSE_FLAGS = ('--implicit-dirs', '--rename-dir-limit=1000000', '--metadata-cache-ttl-secs=0')

_NAME = re.compile(r'^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')
_GS = re.compile(r'gs://([^/\s\'"]*)(/[^\s\'"]*)?')
_BUCKET = re.compile(r'[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]')

# Per accelerator family: the divisor from the size in the type name to hosts, and the largest single-host size.
_FAMILIES = {
    'v2': (8, 8), 'v3': (8, 8),                  # size = TensorCores, 8 per host
    'v4': (8, 8), 'v5p': (8, 8),                 # size = TensorCores, 2 per chip, 4 chips per host
    'v5litepod': (4, 8), 'v5e': (4, 8), 'v6e': (4, 8),   # size = chips; up to 8 on one host, else 4 per host
}


def hosts_of(accelerator: str) -> int:
  """Number of TPU VM workers (hosts) of a slice type such as v5litepod-16 (4) or v4-8 (1)."""
  m = re.fullmatch(r'([a-z0-9]+?)-(\d+)', accelerator.strip().lower())
  if not m or m.group(1) not in _FAMILIES:
    raise ValueError(f'unknown accelerator type {accelerator!r} (known: '
                     f'{", ".join(f"{f}-N" for f in _FAMILIES)}); pass --hosts')
  per_host, single = _FAMILIES[m.group(1)]
  size = int(m.group(2))
  return 1 if size <= single else -(-size // per_host)


def _gcloud_scope(args) -> list[str]:
  scope = [f'--zone={args.zone}']
  if args.project:
    scope.append(f'--project={args.project}')
  return scope


def _ssh_all(args, command: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.name, *_gcloud_scope(args), '--worker=all',
          f'--command={command}']


def create(args, runner: common.Runner) -> None:
  if args.spot and args.reserved:
    common.fail('--spot and --reserved exclude each other')
  if not (args.repo.startswith('gs://') or '://' in args.repo or args.repo.startswith('git@')):
    common.fail(f'--repo={args.repo!r}: expected gs://my-bucket/code.tar.gz (see `push`) or a git URL')
  metadata = [f'hapvr-repo={args.repo}', f'hapvr-python={args.python}']
  if args.ref:
    metadata.append(f'hapvr-ref={args.ref}')
  if any(',' in m for m in metadata):
    common.fail('--repo, --ref and --python may not contain commas (gcloud metadata separator)')
  cmd = ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', args.name, *_gcloud_scope(args),
         f'--node-id={args.name}', f'--accelerator-type={args.accelerator}', f'--runtime-version={args.version}',
         f'--metadata-from-file=startup-script={STARTUP_SCRIPT}', f'--metadata={",".join(metadata)}']
  if args.spot:
    cmd.append('--spot')
  if args.reserved:
    cmd.append('--reserved')
  if args.service_account:
    cmd.append(f'--service-account={args.service_account}')
  if args.valid_until:
    cmd.append(f'--valid-until-duration={args.valid_until}')
  try:
    hosts = f'{hosts_of(args.accelerator)} host(s)'
  except ValueError:
    hosts = 'host count unknown to this script (give `run` --hosts)'
  runner.note(f'{args.accelerator}: {hosts}; the request waits in the queue until capacity is there (`status` '
              'shows its state), then the startup script installs the environment')
  runner.run(cmd)


def setup(args, runner: common.Runner) -> None:
  runner.run(_ssh_all(args, 'sudo google_metadata_script_runner startup'))


def push(args, runner: common.Runner) -> None:
  if not (args.repo.startswith('gs://') and args.repo.endswith(('.tar.gz', '.tgz'))):
    common.fail(f'--repo={args.repo!r}: push writes a gs://my-bucket/....tar.gz')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  local = os.path.join('/tmp', f'hapvr-code-{os.getpid()}.tar.gz')
  runner.note('uploads the committed HEAD of this checkout (uncommitted changes are not included)')
  runner.run(['git', '-C', root, 'archive', '--format=tar.gz', f'--output={local}', args.ref or 'HEAD'])
  runner.run(['gcloud', 'storage', 'cp', local, args.repo])
  if not runner.dry_run:
    os.remove(local)


def _map_gcs(text: str, buckets: list[str]) -> str:
  def repl(m):
    if not _BUCKET.fullmatch(m.group(1)):
      raise ValueError(f'{m.group(0)!r}: {m.group(1)!r} is not a bucket name (lowercase letters, digits, -_.)')
    if m.group(1) not in buckets:
      buckets.append(m.group(1))
    return f'{MOUNT_ROOT}/{m.group(1)}{m.group(2) or ""}'
  return _GS.sub(repl, text)


def remote_command(args, program: list[str], hosts: int) -> str:
  """The shell command each worker runs: environment, gcsfuse mounts, the program with --workdir, the log."""
  workdir = args.workdir.rstrip('/')
  buckets: list[str] = []
  if args.gcs == 'fuse':
    program = [_map_gcs(a, buckets) for a in program]
    run_workdir = _map_gcs(workdir, buckets)
  else:
    run_workdir = workdir
  program = program + [f'--workdir={run_workdir}']
  log_dir = f'"$HOME"/logs/{args.name}'
  steps = [
      'set -o pipefail',
      f'test -f {REMOTE_ROOT}/ready || {{ echo "error: $(hostname): the startup script has not finished '
      f'(sudo journalctl -u google-startup-scripts; rerun with: launch/tpu.py setup)" >&2; exit 1; }}',
      f'cd {REMOTE_ROOT}/code && . {REMOTE_ROOT}/venv/bin/activate || exit 1',
  ]
  for b in buckets:
    mount = f'{MOUNT_ROOT}/{b}'
    steps.append(f'{{ mountpoint -q {mount} || {{ mkdir -p {mount} && gcsfuse {" ".join(GCSFUSE_FLAGS)} '
                 f'{b} {mount}; }}; }} || exit 1')
  env = {'COMMON_JAX_DISTRIBUTED': 'auto'} if hosts > 1 else {}
  env.update(dict(e.split('=', 1) for e in args.env))
  exports = ' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())
  steps += [f'mkdir -p {log_dir}', f'export log={log_dir}/host-$(hostname)-$(date -u +%Y%m%dT%H%M%SZ).log']
  if exports:
    steps.append(f'export {exports}')
  job = [f'{shlex.join(program)} 2>&1 | tee -a "$log"', 'rc=$?']
  if args.gcs == 'fuse' or not workdir.startswith('gs://'):
    job.append(f'mkdir -p {shlex.quote(run_workdir + "/logs")} && cp "$log" {shlex.quote(run_workdir + "/logs/")}')
  else:
    job.append(f'gcloud storage cp "$log" {shlex.quote(workdir + "/logs/")}')
  job.append('exit $rc')
  if args.detach:   # immune to the ssh session ending; `logs` shows the output
    inner = '; '.join(['set -o pipefail'] + job)
    steps.append(f'nohup bash -c {shlex.quote(inner)} >/dev/null 2>&1 </dev/null & '
                 'echo "$(hostname): started in the background; log: $log"')
  else:
    steps.append('echo "$(hostname): logging to $log"')
    steps += job
  return '; '.join(steps)


def logs(args, runner: common.Runner) -> None:
  latest = f'"$(ls -t "$HOME"/logs/{args.name}/*.log | head -n 1)"'
  runner.run(_ssh_all(args, f'echo "== $(hostname): "{latest}; tail -n {args.lines} {latest}'))


def run(args, program: list[str], runner: common.Runner) -> None:
  if not program:
    common.fail('run: give the command after --, e.g. -- python -m hapvr_jax.main --config=configs/vcdb.py')
  if any(a == '--workdir' or a.startswith('--workdir=') for a in program):
    common.fail('run: give the workdir as `tpu.py run --workdir=...`, not in the command (it is passed on, '
                'mapped to the gcsfuse mount)')
  for e in args.env:
    if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*=.*', e):
      common.fail(f'--env={e!r}: expected NAME=VALUE')
  if args.hosts:
    hosts = args.hosts
  elif args.accelerator:
    hosts = hosts_of(args.accelerator)
  elif runner.dry_run:
    runner.note('neither --accelerator nor --hosts given: a dry run queries nothing, so it assumes a multi-host '
                'slice')
    hosts = 2
  else:
    accelerator = runner.run(['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', args.name, *_gcloud_scope(args),
                              '--format=value(acceleratorType)'], capture=True).strip()
    hosts = hosts_of(accelerator.rsplit('/', 1)[-1])
  if hosts > 1 and not args.workdir.startswith('gs://'):
    common.fail(f'--workdir={args.workdir!r}: a multi-host slice ({hosts} hosts) needs a gs:// workdir: its '
                'workers share no disk, and checkpoints written on one are invisible to the others')
  if not args.workdir.startswith('gs://'):
    runner.note('a local workdir is lost with the VM (a preempted spot slice is deleted): prefer gs://')
  runner.run(_ssh_all(args, remote_command(args, program, hosts)))


def status(args, runner: common.Runner) -> None:
  runner.run(['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', args.name, *_gcloud_scope(args)])


def delete(args, runner: common.Runner) -> None:
  runner.run(['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', args.name, *_gcloud_scope(args),
              '--force', '--quiet'])


def _slice_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('name', None, 'queued resource and TPU VM name (a-z, 0-9, -)', flag_values=fv, required=True)
  flags.DEFINE_string('zone', None, 'e.g. us-west4-a', flag_values=fv, required=True)
  flags.DEFINE_string('project', '', 'GCP project (default: gcloud config)', flag_values=fv)
  common.define_dry_run(fv)


def _create_flags(fv: flags.FlagValues) -> None:
  _slice_flags(fv)
  flags.DEFINE_string('accelerator', None, 'e.g. v5litepod-16, v4-32, v6e-8', flag_values=fv, required=True)
  flags.DEFINE_string('version', None, 'TPU VM runtime, e.g. tpu-ubuntu2204-base', flag_values=fv, required=True)
  flags.DEFINE_string('repo', None, 'gs://my-bucket/code.tar.gz (`push`) or a git URL', flag_values=fv, required=True)
  flags.DEFINE_string('ref', '', 'git branch, tag or commit for a git --repo', flag_values=fv)
  flags.DEFINE_string('python', 'python3.11', 'interpreter the startup script installs (apt)', flag_values=fv)
  flags.DEFINE_bool('spot', False, 'preemptible Spot capacity', flag_values=fv)
  flags.DEFINE_bool('reserved', False, 'use the project reservation', flag_values=fv)
  flags.DEFINE_string('service_account', '', 'service account of the VMs (needs storage access)', flag_values=fv)
  flags.DEFINE_string('valid_until', '', 'give up the queued request after this long, e.g. 6h', flag_values=fv)


def _push_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('repo', None, 'gs://my-bucket/code.tar.gz', flag_values=fv, required=True)
  flags.DEFINE_string('ref', '', 'git revision to upload (default HEAD)', flag_values=fv)
  common.define_dry_run(fv)


def _run_flags(fv: flags.FlagValues) -> None:
  _slice_flags(fv)
  flags.DEFINE_string('workdir', None, 'run directory (gs://... on multi-host)', flag_values=fv, required=True)
  flags.DEFINE_string('accelerator', '', 'slice type, for the host count (default: ask gcloud)', flag_values=fv)
  flags.DEFINE_integer('hosts', 0, 'host count, instead of --accelerator', flag_values=fv)
  flags.DEFINE_enum('gcs', 'fuse', ['fuse', 'direct'], 'fuse: mount gs:// buckets with gcsfuse and pass local '
                    'paths; direct: pass gs:// paths', flag_values=fv)
  flags.DEFINE_multi_string('env', [], 'NAME=VALUE exported on every worker (repeatable)', flag_values=fv)
  flags.DEFINE_bool('detach', False, 'run in the background on the workers (survives ssh); see `logs`', flag_values=fv)


def _logs_flags(fv: flags.FlagValues) -> None:
  _slice_flags(fv)
  flags.DEFINE_integer('lines', 20, 'lines per worker', flag_values=fv)


ACTIONS = {  # action: (help, its flags)
    'create': ('request the slice as a queued resource, with the startup script', _create_flags),
    'setup': ('rerun the startup script (fetch code, install) on every worker', _slice_flags),
    'push': ('upload the committed HEAD as a tarball for --repo', _push_flags),
    'run': ('run one command on all workers (rerun to resume)', _run_flags),
    'logs': ('print the end of the latest log of every worker', _logs_flags),
    'status': ('show the queued resource state', _slice_flags),
    'delete': ('delete the queued resource and its TPU VMs', _slice_flags),
}


def main(argv=None) -> int:
  action, args, program = common.parse(ACTIONS, argv, __doc__, 'launch/tpu.py')
  if getattr(args, 'name', None) is not None and not _NAME.match(args.name):
    common.fail(f'--name={args.name!r}: lowercase letters, digits and -, starting with a letter')
  if program and action != 'run':
    common.fail(f'{action} takes no command after --')
  runner = common.Runner(args.dry_run)
  try:
    if action == 'run':
      run(args, program, runner)
    else:
      globals()[action](args, runner)
  except ValueError as e:
    common.fail(str(e))
  return 0


if __name__ == '__main__':
  cli.run_main(main)
