r"""The table of bench/accelerator_suite.sh: one row per figure, built from the `RESULT {json}` line each bench
prints last, never from its prose.

  python -m bench.accelerator_suite --logs=/tmp/accelerator_suite/logs --output=/tmp/accelerator_suite

The suite writes one log per step into --logs and a line per step into steps.tsv there (step, bench, exit code
or 'skipped' / 'not-run', seconds, time limit, setting, reason, command); this program prints the table as
Markdown and writes table.md and table.json into --output. A step that failed, timed out or was skipped is a
row saying so, with the last line of its log. `--probe` instead writes device.json into --logs (what JAX and
PyTorch see) and prints `PLATFORM TORCH_HAS_CUDA` for the script.
"""
from __future__ import annotations

import json
import os

from absl import flags

from common_jax import cli, io_util

COLUMNS = ('bench', 'setting', 'figure', 'baseline', 'ratio')
TIMED_OUT = ('124', '137')   # timeout(1): the limit was reached (137: killed after it)
NAMES = {'hapvr_eval': 'HAP-VR engine', 'hapvr_train': 'HAP-VR train step', 'avhash': 'AVHash train step',
         'backbones': 'backbones', 'coarse_to_fine': 'coarse-to-fine', 'precision': 'engine precision'}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('logs', None, "the suite's folder of step logs and steps.tsv", flag_values=fv, required=True)
  flags.DEFINE_string('output', '', 'folder of table.md and table.json (default: the parent of --logs)',
                      flag_values=fv)
  flags.DEFINE_bool('probe', False, 'write device.json into --logs and print the platform and whether PyTorch '
                    'has CUDA, instead of the table', flag_values=fv)


def probe(logs: str) -> str:
  import jax
  import torch
  dev = jax.devices()[0]
  cuda = torch.cuda.is_available()
  info = dict(device=dev.device_kind, platform=dev.platform, count=jax.device_count(), jax=jax.__version__,
              torch=torch.__version__, torch_cuda=cuda, torch_device=torch.cuda.get_device_name(0) if cuda else 'cpu',
              cpu_count=os.cpu_count())
  io_util.write_json(os.path.join(logs, 'device.json'), info)
  return f'{dev.platform} {int(cuda)}'


# ------------------------------------------------------------------------------------------------ formatting
def num(x: float) -> str:
  """A rate or time with the digits that matter: 1,234 / 123.4 / 1.23 / 0.0123."""
  return f'{x:,.0f}' if abs(x) >= 1000 else f'{x:.1f}' if abs(x) >= 10 else f'{x:#.3g}'


def torch_where(device: str) -> str:
  return 'PyTorch on CPU' if device.startswith('cpu') else f'PyTorch ({device})'


def engine_rows(r, step):
  kind = f'{r["dtype"]}/{r["precision"]}'
  figure = (f'{num(r["engine_pairs_per_s"])} pairs/s warm, {num(r["engine_gflops"])} GFLOP/s useful; cold start '
            f'{num(r["engine_cold_s"])} s; max diff vs PyTorch {r["max_abs_diff_vs_baseline"]:.1e}')
  if r.get('accuracy_vs_float32'):
    c = r['accuracy_vs_float32']
    figure += (f'; vs float32/highest: max diff {c["max_abs_diff"]:.1e}, same top-1 {100 * c["same_top1"]:.0f}%, '
               f'top-10 overlap {100 * c["top10_overlap"]:.0f}%')
  b, p = r['block'], r['projection']
  yield ('HAP-VR engine', f'{kind}, {step["setting"]}', figure,
         f'{torch_where(r["baseline_device"])}, per-pair loop: {num(r["baseline_pairs_per_s"])} pairs/s; matmul '
         f'{num(r["matmul_gflops"])} GFLOP/s; memory {num(r["bandwidth_gb_s"])} GB/s',
         f'{r["engine_pairs_per_s"] / r["baseline_pairs_per_s"]:.2f}x PyTorch; {r["engine_fraction"]:.2f} of matmul')
  block = f'{kind}, {b["queries"]} x {b["targets"]} videos at {b["frames"]} frames'
  yield ('f2f stage', block, f'{num(r["f2f_gflops"])} GFLOP/s, {100 * r["f2f_share"]:.0f}% of the block',
         f'matmul {num(r["matmul_gflops"])} GFLOP/s', f'{r["f2f_fraction"]:.2f} of matmul')
  yield ('CNN stage', block, f'{num(r["cnn_gflops"])} GFLOP/s', f'float32 matmul {num(r["matmul32_gflops"])} '
         f'GFLOP/s; memory {num(r["bandwidth_gb_s"])} GB/s',
         f'{r["cnn_fraction_float32"]:.2f} of matmul; {r["cnn_fraction_bandwidth"]:.2f} of memory (unfused)')
  yield ('FIVR-200K projection', f'{kind}, {p["queries"]} queries x {p["videos"]:,} videos ({p["source"]})',
         f'{num(p["minutes_at_engine_rate"])} min at the engine rate ({p["flops"]:.2e} FLOPs, {num(p["features_gb"])} '
         f'GB of features)', f'{num(p["minutes_at_roofline"])} min at the matmul roofline + '
         f'{100 * p["padding"]:.1f}% padding', f'{p["minutes_at_roofline"] / p["minutes_at_engine_rate"]:.2f} of '
         'the roofline')


def train_rows(r, step):
  figure = (f'{num(r["jax_step_ms"])} ms/step ({num(r["clips_per_step"] / r["jax_step_ms"] * 1e3)} clips/s), '
            f'{num(r["jax_gflops"])} GFLOP/s; first step (compile) {num(r["jax_cold_s"])} s')
  if r['torch_step_ms'] is None:
    reason = step['reason']
    yield ('HAP-VR train step', step['setting'], figure, f'PyTorch skipped{": " + reason if reason else ""}',
           f'{r["fraction"]:.2f} of matmul')
    return
  loss = abs(r['jax_first_loss'] - r['torch_first_loss']) / abs(r['torch_first_loss'])
  yield ('HAP-VR train step', step['setting'], f'{figure}; first-step loss rel diff {loss:.1e}',
         f'{torch_where(r["torch_device"])}: {num(r["torch_step_ms"])} ms/step; matmul {num(r["matmul_gflops"])} '
         'GFLOP/s', f'{r["ratio"]:.2f}x PyTorch; {r["fraction"]:.2f} of matmul')


def avhash_rows(r, step):
  t = r['train']
  loss = abs(t['jax_eval_loss'] - t['torch_eval_loss']) / abs(t['torch_eval_loss'])
  yield ('AVHash train step', step['setting'],
         f'{num(t["jax_steps_per_s"])} steps/s ({num(t["jax_tuples_per_s"])} tuples/s), {num(t["jax_gflops_xla"])} '
         f'GFLOP/s; compile {num(t["jax_compile_s"])} s; eval-mode loss rel diff {loss:.1e}',
         f'{torch_where(t["torch_device"])}: {num(t["torch_steps_per_s"])} steps/s; matmul '
         f'{num(t["matmul_peak_gflops"])} GFLOP/s', f'{t["ratio"]:.2f}x PyTorch; {t["fraction_of_peak_xla"]:.2f} '
         'of matmul')


def backbone_rows(r, step):
  for b in r['results']:
    yield (f'backbone {b["arch"]}', f'{b["dtype"]}, batch {b["batch"]} {b["unit"]}, {step["setting"]}',
           f'{num(b["jax_per_s"])} {b["unit"]}/s, {num(b["jax_gflops"])} GFLOP/s; max rel err {b["max_rel_err"]:.1e}',
           f'{torch_where(r.get("torch_device", "cpu"))}: {num(b["torch_per_s"])} {b["unit"]}/s; matmul '
           f'{num(r["peak_gflops"])} GFLOP/s', f'{b["ratio_jax_over_torch"]:.2f}x PyTorch; '
           f'{b["fraction_of_matmul_peak"]:.2f} of matmul')


def shortlist_rows(r, step):
  full = r['exhaustive']
  for name, table in r['candidates'].items():
    timed = [t for t in table if 'seconds_per_query' in t]
    if not timed:
      continue
    at = ' / '.join(f'{100 * t["fraction"]:g}%' for t in timed)
    yield (f'coarse-to-fine ({name})', f'{step["setting"]}; shortlist {at}',
           'ms/query ' + ' / '.join(num(1e3 * t['seconds_per_query']) for t in timed) + '; DSVR ratio '
           + ' / '.join(f'{t["DSVR_ratio"]:.3f}' for t in timed),
           f'exhaustive engine {num(1e3 * full["seconds_per_query"])} ms/query (compile included)',
           ' / '.join(f'{t["speedup"]:.1f}x' for t in timed))


def precision_rows(r, step):
  ref = r['rows'][0]
  note = '' if r['trained'] else ' (fresh network: the metric means nothing)'
  for p in r['rows']:
    yield ('engine precision', f'{p["dtype"]}/{p["precision"]}, {step["setting"]}',
           f'{num(p["pairs_per_s"])} pairs/s; {p["metric"]} {p["value"]:.4f}{note}',
           f'{ref["dtype"]}/{ref["precision"]}: {num(ref["pairs_per_s"])} pairs/s',
           f'{p["pairs_per_s"] / ref["pairs_per_s"]:.2f}x; max diff {p["max_abs_diff"]:.1e}, top-10 order '
           f'unchanged {100 * p["top10_unchanged"]:.0f}%')


FORMATS = {'hapvr_eval': engine_rows, 'hapvr_train': train_rows, 'avhash': avhash_rows, 'backbones': backbone_rows,
           'coarse_to_fine': shortlist_rows, 'precision': precision_rows}


# ---------------------------------------------------------------------------------------------------- table
def read_steps(logs: str) -> list:
  """The steps.tsv lines as dicts (step, bench, rc, seconds, limit, setting, reason, command)."""
  keys = ('step', 'bench', 'rc', 'seconds', 'limit', 'setting', 'reason', 'command')
  path = os.path.join(logs, 'steps.tsv')
  steps = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      fields = line.rstrip('\n').split('\t')
      if len(fields) != len(keys):
        raise cli.UsageError(f'{path} line {number}: {len(fields)} tab-separated fields, expected {len(keys)}')
      steps.append(dict(zip(keys, fields)))
  return steps


def last_result(log: str):
  """(the JSON of the log's last `RESULT ` line or None, the log's last non-empty line)."""
  result, last = None, ''
  if os.path.exists(log):
    with open(log, errors='replace') as f:
      for line in f:
        if line.strip():
          last = line.strip()
        if line.startswith('RESULT '):
          result = json.loads(line[len('RESULT '):])
  return result, last


def step_rows(s: dict, logs: str) -> list:
  """The rows of one step: its figures, or one row saying why there are none."""
  name = NAMES.get(s['bench'], s['bench'])
  if s['rc'] in ('skipped', 'not-run'):
    return [dict(step=s['step'], status=s['rc'], bench=name, setting=s['setting'],
                 figure=f'{"skipped" if s["rc"] == "skipped" else "not run"}: {s["reason"]}', baseline='', ratio='')]
  try:
    result, last = last_result(os.path.join(logs, s['step'] + '.log'))
  except ValueError as e:   # a RESULT line that is not JSON
    result, last = None, f'RESULT line not JSON: {e}'
  if s['rc'] != '0' or result is None:
    why = (f'timed out after {s["limit"]} s' if s['rc'] in TIMED_OUT else
           f'failed (exit {s["rc"]})' if s['rc'] != '0' else 'finished without a RESULT line')
    return [dict(step=s['step'], status='timed out' if s['rc'] in TIMED_OUT else 'failed', bench=name,
                 setting=s['setting'], figure=f'{why}; log: {last[:200]}', baseline='', ratio='')]
  try:
    rows = list(FORMATS[s['bench']](result, s))
    if not rows:
      raise ValueError('no figures in it')
  except (LookupError, TypeError, ValueError, ZeroDivisionError) as e:   # a bench whose RESULT changed shape
    return [dict(step=s['step'], status='unreadable', bench=name, setting=s['setting'],
                 figure=f'RESULT not understood ({type(e).__name__}: {e})', baseline='', ratio='')]
  return [dict(step=s['step'], status='ok', **dict(zip(COLUMNS, row))) for row in rows]


def build(logs: str) -> dict:
  device_path = os.path.join(logs, 'device.json')
  device = {}
  if os.path.exists(device_path):
    with open(device_path) as f:
      device = json.load(f)
  steps = read_steps(logs)
  rows = [row for s in steps for row in step_rows(s, logs)]
  return dict(device=device, seconds=sum(float(s['seconds']) for s in steps), steps=steps, rows=rows)


def markdown(table: dict) -> str:
  d = table['device']
  head = (f'Device: {d.get("device", "?")} ({d.get("platform", "?")} x{d.get("count", "?")}), JAX '
          f'{d.get("jax", "?")}, PyTorch {d.get("torch", "?")} on {d.get("torch_device", "?")}, '
          f'{d.get("cpu_count", "?")} CPU cores; the steps took {table["seconds"]:.0f} s.')
  cell = lambda text: str(text).replace('|', '/').replace('\n', ' ')
  lines = [head, '', '| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  lines += ['| ' + ' | '.join(cell(row[c]) for c in COLUMNS) + ' |' for row in table['rows']]
  return '\n'.join(lines) + '\n'


def run(args) -> None:
  if args.probe:
    print(probe(args.logs))
    return
  table = build(args.logs)
  out = args.output or os.path.dirname(os.path.abspath(args.logs))
  text = markdown(table)
  with io_util.atomic_open(os.path.join(out, 'table.md')) as f:
    f.write(text)
  io_util.write_json(os.path.join(out, 'table.json'), table)
  print(text, end='')


main = cli.program(define_flags, run, __doc__)


if __name__ == '__main__':
  cli.run_main(main)
