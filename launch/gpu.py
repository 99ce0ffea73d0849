r"""GPU launcher: one process on one machine, one process per GPU, or one process per machine on several.

  python launch/gpu.py run -- python -m hapvr_jax.main --config=configs/vcdb.py --workdir=runs/hapvr
  python launch/gpu.py run --gpus=4 --local_processes -- python -m hapvr_jax.main ...       # 4 processes
  python launch/gpu.py run --nodes=2 --node_rank=0 --coordinator=10.0.0.2:12355 -- python -m ...   # on node 0
  python launch/gpu.py run --nodes=2 --node_rank=1 --coordinator=10.0.0.2:12355 -- python -m ...   # on node 1

- One machine (the default): a single process that sees every local GPU (or the first --gpus of them);
  the program's mesh spans them. No distributed initialisation: none is needed.
- Several machines: run the same line on each, with its --node_rank; --coordinator is node 0's address and a
  free port. Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
  common_jax.distributed.maybe_initialize() turns into jax.distributed.initialize(). The workdir and data
  must be on a file system all nodes share; rerunning the same lines resumes from the workdir.
- --local_processes: one process per GPU (CUDA_VISIBLE_DEVICES=i), on one or several machines; mostly useful
  to test the multi-process path on one machine.
- --mem_fraction sets XLA_PYTHON_CLIENT_MEM_FRACTION (JAX preallocates 75% of GPU memory by default);
  --env NAME=VALUE adds anything else (NCCL_SOCKET_IFNAME, XLA_FLAGS, ...).

Each process's output goes to the terminal (the first process on this machine) and to
LOG_DIR/host-HOSTNAME[-process-K].log. SIGTERM or Ctrl-C is passed on once to every process, which saves a
checkpoint and stops; if one process fails, the others on this machine are stopped too. --dry_run prints the
command lines (`+ env ... cmd 2>&1 | tee -a LOG`) and runs nothing.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common_jax import cli  # noqa: E402
from launch import common  # noqa: E402


def plan(args, program: list[str], hostname: str) -> list[tuple[dict, str]]:
  """[(extra environment, log file)] per process to start on this machine."""
  base = {}
  if args.mem_fraction:
    base['XLA_PYTHON_CLIENT_MEM_FRACTION'] = str(args.mem_fraction)
  base.update(dict(e.split('=', 1) for e in args.env))
  all_gpus = ','.join(str(i) for i in range(args.gpus)) if args.gpus else ''
  per_node = args.gpus if args.local_processes else 1
  total = args.nodes * per_node
  out = []
  for local in range(per_node):
    env = {}
    if args.local_processes:
      env['CUDA_VISIBLE_DEVICES'] = str(local)
    elif all_gpus:
      env['CUDA_VISIBLE_DEVICES'] = all_gpus
    if total > 1:
      env.update(JAX_COORDINATOR_ADDRESS=args.coordinator, JAX_NUM_PROCESSES=str(total),
                 JAX_PROCESS_ID=str(args.node_rank * per_node + local))
      log = os.path.join(args.log_dir, f'host-{hostname}-process-{args.node_rank * per_node + local}.log')
    else:
      log = os.path.join(args.log_dir, f'host-{hostname}.log')
    env.update(base)
    out.append((env, log))
  return out


def _pump(proc, log_path: str, echo: bool) -> None:
  with open(log_path, 'a') as log:
    for line in proc.stdout:
      log.write(line)
      log.flush()
      if echo:
        sys.stdout.write(line)
        sys.stdout.flush()


def launch(processes, program: list[str]) -> int:
  """Starts the processes (own session: terminal signals reach only this launcher, which passes them on once)."""
  procs, pumps = [], []
  for i, (env, log) in enumerate(processes):
    os.makedirs(os.path.dirname(log) or '.', exist_ok=True)
    proc = subprocess.Popen(program, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    procs.append(proc)
    pumps.append(threading.Thread(target=_pump, args=(proc, log, i == 0), daemon=True))
    pumps[-1].start()

  stopping = []

  def forward(signum, frame):
    del frame
    if stopping:                       # a second signal: stop waiting for checkpoints
      for p in procs:
        if p.poll() is None:
          p.kill()
      return
    stopping.append(signum)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    code = 0
    pending = list(procs)
    while pending:
      for p in list(pending):
        try:
          rc = p.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
          continue
        pending.remove(p)
        if rc and not code:
          code = rc
          for q in pending:            # a failed process leaves the others waiting at the next collective
            q.send_signal(signal.SIGTERM)
    for t in pumps:
      t.join(timeout=5)
    return code if code >= 0 else 128 - code
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _run_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer('gpus', 0, 'GPUs of this machine to use (default: all visible)', flag_values=fv)
  flags.DEFINE_integer('nodes', 1, 'machines in the job', flag_values=fv)
  flags.DEFINE_integer('node_rank', None, 'this machine: 0 .. nodes-1 (several nodes)', flag_values=fv)
  flags.DEFINE_string('coordinator', '', 'host:port of node 0 (several nodes or --local_processes)',
                      flag_values=fv)
  flags.DEFINE_bool('local_processes', False, 'one process per GPU (needs --gpus)', flag_values=fv)
  flags.DEFINE_float('mem_fraction', 0.0, 'XLA_PYTHON_CLIENT_MEM_FRACTION, e.g. 0.9', flag_values=fv)
  flags.DEFINE_multi_string('env', [], 'NAME=VALUE for every process (repeatable)', flag_values=fv)
  flags.DEFINE_string('log_dir', 'logs', 'per-process log files go here', flag_values=fv)
  common.define_dry_run(fv)


ACTIONS = {'run': ('run the command after -- on this machine', _run_flags)}


def check(args, program: list[str]) -> None:
  if not program:
    common.fail('run: give the command after --, e.g. -- python -m hapvr_jax.main --config=configs/vcdb.py '
                '--workdir=runs/hapvr')
  if args.gpus < 0 or args.nodes < 1:
    common.fail('--gpus must be >= 0 and --nodes >= 1')
  if not 0.0 <= args.mem_fraction <= 1.0:
    common.fail(f'--mem_fraction={args.mem_fraction}: expected a fraction in (0, 1]')
  for e in args.env:
    if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*=.*', e):
      common.fail(f'--env={e!r}: expected NAME=VALUE')
  if args.local_processes and not args.gpus:
    common.fail('--local_processes needs --gpus (one process per GPU)')
  if args.nodes > 1:
    if args.node_rank is None or not args.coordinator:
      common.fail(f'--nodes={args.nodes} needs --node_rank (0..{args.nodes - 1}) and --coordinator=HOST:PORT '
                  '(node 0, reachable from every node)')
    if not 0 <= args.node_rank < args.nodes:
      common.fail(f'--node_rank={args.node_rank} is not in [0, --nodes={args.nodes})')
  else:
    if args.node_rank not in (None, 0):
      common.fail(f'--node_rank={args.node_rank} with one node')
    args.node_rank = 0
    if args.local_processes and not args.coordinator:
      args.coordinator = '127.0.0.1:12355'
  if args.coordinator and not re.fullmatch(r'[^\s:]+:\d+', args.coordinator):
    common.fail(f'--coordinator={args.coordinator!r}: expected HOST:PORT')


def main(argv=None) -> int:
  _, args, program = common.parse(ACTIONS, argv, __doc__, 'launch/gpu.py')
  check(args, program)
  processes = plan(args, program, socket.gethostname())
  runner = common.Runner(args.dry_run)
  for env, log in processes:
    runner.echo(f'{common.shell_line(program, env)} 2>&1 | tee -a {common.shlex.quote(log)}')
  if args.dry_run:
    return 0
  return launch(processes, program)


if __name__ == '__main__':
  cli.run_main(main)
