"""bench/accelerator_suite.sh and its table (bench/accelerator_suite.py).

The table is checked on hand-written step logs (every kind of step outcome, figures whose ratios are computed
here by hand); the script itself runs in its --smoke mode on the CPU with the float32 engine step only (the
other benches take 10-50 s each even at their smoke sizes on a 2-core machine; the whole smoke suite is run by
hand: `bash bench/accelerator_suite.sh /tmp/suite --smoke`), plus a step skipped for want of its input.
"""
import json
import os
import subprocess

import pytest

from bench import accelerator_suite as suite

from tests.conftest import ROOT  # noqa: E402
SCRIPT = os.path.join(ROOT, 'bench', 'accelerator_suite.sh')

ENGINE = dict(
    device='cpu', platform='cpu', dtype='bfloat16', precision='default', queries=2, database=4, mean_len=8,
    baseline_pairs=8, baseline_pairs_per_s=50.0, baseline_device='cpu', engine_pairs_per_s=100.0, engine_cold_s=3.0,
    max_abs_diff_vs_baseline=2e-3, matmul_gflops=200.0, matmul32_gflops=100.0, bandwidth_gb_s=4.0,
    engine_gflops=50.0, engine_fraction=0.25, accuracy_vs_float32=dict(max_abs_diff=4e-3, mean_abs_diff=1e-3,
                                                                        same_top1=0.5, top10_overlap=0.75),
    block=dict(queries=2, targets=16, frames=8), f2f_gflops=120.0, f2f_fraction=0.6, cnn_gflops=30.0,
    cnn_fraction_float32=0.3, cnn_fraction_bandwidth=0.5, f2f_share=0.8,
    projection=dict(queries=100, videos=225960, source='modelled', flops=2.4e16, minutes_at_engine_rate=80.0,
                    minutes_at_roofline=20.0, padding=0.108, features_gb=408.0))
TRAIN = dict(device='cpu', platform='cpu', torch_device=None, groups=2, clips=128, frames=28, dims=512,
             compute_dtype='float32', clips_per_step=256, gflop_per_step=8000.0, jax_step_ms=400.0,
             torch_step_ms=None, jax_cold_s=30.0, jax_first_loss=4.0, torch_first_loss=None, jax_gflops=20000.0,
             matmul_gflops=40000.0, fraction=0.5, ratio=None)
AVHASH = {'train': dict(batch_size=128, jax_steps_per_s=4.0, torch_steps_per_s=2.0, ratio=2.0, jax_tuples_per_s=512.0,
                        jax_compile_s=20.0, jax_eval_loss=101.0, torch_eval_loss=100.0, jax_gflops_xla=1e4,
                        matmul_peak_gflops=4e4, fraction_of_peak_xla=0.25, torch_device='cuda')}
C2F = dict(exhaustive=dict(seconds_per_query=2.0), candidates=dict(
    pooled_regions=[dict(fraction=0.02, seconds_per_query=0.1, speedup=20.0, DSVR_ratio=0.9),
                    dict(fraction=0.1, seconds_per_query=0.4, speedup=5.0, DSVR_ratio=1.0)],
    frame_knn=[dict(fraction=0.02, DSVR_ratio=1.0)]))   # not timed: no row
# (step, bench, rc, log text); a RESULT line is the log's last
STEPS = [
    ('engine_bfloat16', 'hapvr_eval', '0', 'human line\nRESULT ' + json.dumps(ENGINE)),
    ('hapvr_train', 'hapvr_train', '0', 'RESULT ' + json.dumps(TRAIN)),
    ('avhash', 'avhash', '0', 'RESULT ' + json.dumps(AVHASH)),
    ('coarse_to_fine', 'coarse_to_fine', '0', 'RESULT ' + json.dumps(C2F)),
    ('backbones', 'backbones', '1', 'Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n\n'),
    ('engine_tf32', 'hapvr_eval', '124', 'compiling...\n'),
    ('engine_float32', 'hapvr_eval', '0', 'no result line\n'),
    ('precision', 'precision', '0', 'RESULT {"rows": []}\n'),           # a RESULT of another shape
    ('later', 'precision', 'not-run', None),
    ('skipped_one', 'precision', 'skipped', None),
]


def write_logs(logs):
  os.makedirs(logs)
  with open(os.path.join(logs, 'steps.tsv'), 'w') as f:
    for name, bench, rc, text in STEPS:
      f.write('\t'.join([name, bench, rc, '1.5', '60', f'{name} setting', 'no CUDA' if name == 'hapvr_train'
                         else f'{name} reason', 'python bench/x.py']) + '\n')
      if text is not None:
        with open(os.path.join(logs, name + '.log'), 'w') as g:
          g.write(text)


def test_table_rows_say_every_outcome_and_compute_the_ratios(tmp_path, capsys):
  logs = str(tmp_path / 'logs')
  write_logs(logs)
  assert suite.main([f'--logs={logs}']) == 0
  table = json.loads((tmp_path / 'table.json').read_text())
  rows = {}
  for r in table['rows']:
    rows.setdefault(r['step'], []).append(r)
  assert list(rows) == [s[0] for s in STEPS]          # a row (at least) per step, in the suite's order
  engine, f2f, cnn, projection = rows['engine_bfloat16']
  assert engine['ratio'] == '2.00x PyTorch; 0.25 of matmul'               # 100 / 50 pairs/s
  assert 'vs float32/highest: max diff 4.0e-03, same top-1 50%, top-10 overlap 75%' in engine['figure']
  assert engine['baseline'].startswith('PyTorch on CPU, per-pair loop: 50.0 pairs/s')
  assert (f2f['ratio'], cnn['ratio']) == ('0.60 of matmul', '0.30 of matmul; 0.50 of memory (unfused)')
  assert projection['ratio'] == '0.25 of the roofline'                   # 20 / 80 minutes
  (train,) = rows['hapvr_train']
  assert train['baseline'] == 'PyTorch skipped: no CUDA' and '400.0 ms/step (640.0 clips/s)' in train['figure']
  (avhash,) = rows['avhash']
  assert 'eval-mode loss rel diff 1.0e-02' in avhash['figure'] and avhash['ratio'].startswith('2.00x PyTorch')
  assert avhash['baseline'].startswith('PyTorch (cuda): 2.00 steps/s')
  (c2f,) = rows['coarse_to_fine']
  assert c2f['bench'] == 'coarse-to-fine (pooled_regions)' and c2f['ratio'] == '20.0x / 5.0x'
  assert c2f['figure'] == 'ms/query 100.0 / 400.0; DSVR ratio 0.900 / 1.000'
  status = {name: rows[name][0]['status'] for name in rows}
  assert status == dict(engine_bfloat16='ok', hapvr_train='ok', avhash='ok', coarse_to_fine='ok', backbones='failed',
                        engine_tf32='timed out', engine_float32='failed', precision='unreadable', later='not-run',
                        skipped_one='skipped')
  assert rows['backbones'][0]['figure'] == 'failed (exit 1); log: RuntimeError: CUDA out of memory'
  assert rows['engine_tf32'][0]['figure'] == 'timed out after 60 s; log: compiling...'
  assert rows['engine_float32'][0]['figure'].startswith('finished without a RESULT line')
  assert rows['later'][0]['figure'] == 'not run: later reason'
  # the Markdown: what was printed, a header and one line of five cells per row
  md = (tmp_path / 'table.md').read_text()
  assert capsys.readouterr().out == md
  lines = [line for line in md.splitlines() if line.startswith('|')]
  assert len(lines) == 2 + len(table['rows']) and all(line.count('|') == 6 for line in lines)


def test_missing_steps_file_is_one_error_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    suite.main([f'--logs={tmp_path}'])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith('error: ') and 'steps.tsv' in err and '\n' not in err


def run_suite(out, env_extra, *args):
  env = {**os.environ, **env_extra}
  return subprocess.run(['bash', SCRIPT, str(out), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize('env, args, message', [
    ({'SUITE_ONLY': 'engine_float32,nope'}, (), "SUITE_ONLY: unknown step 'nope'"),
    ({}, ('--fast',), 'unknown flag --fast'),
    ({}, ('second',), 'unexpected argument second'),
])
def test_bad_usage_is_one_error_line_and_writes_nothing(tmp_path, env, args, message):
  r = run_suite(tmp_path / 'out', env, *args)
  assert r.returncode == 2 and r.stderr.startswith('error: ') and message in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / 'out').exists()


def test_smoke_suite_runs_the_engine_and_writes_its_table(tmp_path):
  out = tmp_path / 'suite'
  r = run_suite(out, {'SUITE_ONLY': 'engine_float32,precision'}, '--smoke')
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  table = json.loads((out / 'table.json').read_text())
  assert table['device']['platform'] == 'cpu'
  assert [(s['step'], s['rc']) for s in table['steps']] == [('engine_float32', '0'), ('precision', 'skipped')]
  rows = [r for r in table['rows'] if r['step'] == 'engine_float32']
  assert [r['bench'] for r in rows] == ['HAP-VR engine', 'f2f stage', 'CNN stage', 'FIVR-200K projection']
  assert all(r['status'] == 'ok' for r in rows)
  # the engine and the PyTorch loop scored the same pairs alike (float32 parity), read back from the RESULT
  result, _ = suite.last_result(str(out / 'logs' / 'engine_float32.log'))
  assert result['max_abs_diff_vs_baseline'] < 1e-4 and result['engine_pairs_per_s'] > 0
  assert r.stdout.endswith((out / 'table.md').read_text())
