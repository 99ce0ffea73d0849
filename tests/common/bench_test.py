"""bench/first_results.py's plumbing at toy sizes: the workloads it writes are what the evaluation and search
programs read, its baseline loop computes the network's similarity, and its report divides the right times.
(The timings themselves need full sizes on a quiet machine: python -m bench.first_results.)"""
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from bench import first_results
from common_jax import cli
from tests.references import hapvr_torch as ref

ARGS = ['--queries=2', '--database=4', '--index_videos=3', '--dims=16', '--query_len=3,5',
        '--database_len=6,9']


def _args(tmp_path, *extra):
  return cli.parse_flags(first_results.define_flags, [f'--workdir={tmp_path}', *ARGS, *extra])



@pytest.fixture(autouse=True)
def _torch_grad_mode():
  """The per-pair loop turns autograd off for its whole process (as a bench does): give it back afterwards, or
  later torch tests in this worker would see no gradients."""
  import torch
  was = torch.is_grad_enabled()
  yield
  torch.set_grad_enabled(was)

def test_workload_and_baseline_loop(tmp_path):
  from common_jax import checkpoint
  from hapvr_jax import datasets, features
  args = _args(tmp_path)
  w = first_results.make_workload(args)
  bench = datasets.load_benchmark('fivr_5k', w['eval'])
  assert list(bench.queries) == w['queries'] and len(w['database']) == 4
  ff = features.FeatureFile(w['features'], dims=16)
  lengths = ff.lengths(w['queries'] + w['database'])
  assert list(lengths[:2]) >= [3, 3] and max(lengths[:2]) <= 5 and 6 <= min(lengths[2:]) <= max(lengths[2:]) <= 9
  assert ff.read(w['queries'][0]).shape[1:] == (9, 16)
  assert checkpoint.load_params(w['checkpoint'])[1]['dims'] == 16
  scores, seconds = first_results.loop_scores(w)
  assert seconds > 0 and len(scores) == 8
  # the reference network's own pair similarity on the tiled features (min_len 8, as evaluate reads them)
  torch.set_grad_enabled(False)
  net = ref.SimilarityNetworkRef(dims=16, f_topk_rate=0.1, v_topk_rate=0.03).eval()
  net.load_state_dict(torch.load(w['weights']))
  tiled = features.FeatureFile(w['features'], dims=16, min_len=8)
  x = lambda v: net.index_video(torch.from_numpy(tiled.read(v)))
  for (q, d), s in scores.items():
    np.testing.assert_allclose(s, float(ref.original_style_similarity(net, x(q), x(d))), atol=1e-6, rtol=0)


def test_report_divides_the_loop_by_each_run(tmp_path, capsys):
  """A stand-in runner: evaluate 4 s cold and 2 s warm, the loop 6 s, search 3 s and 1 s."""
  from hapvr_jax import search
  args = _args(tmp_path)
  q, d = 'Q', 'D'
  w = {'features': 'f.hdf5', 'eval': 'ann', 'checkpoint': 'ck', 'index': 'ix', 'query_id': 'v0'}
  walls = iter([4.0, 2.0, 6.0, 3.0, 1.0])
  commands = []

  def run(cmd, until=None):
    commands.append(cmd)
    lines = ['done']
    if 'hapvr_jax.evaluate' in cmd:
      workdir = next(a.split('=', 1)[1] for a in cmd if a.startswith('--workdir='))
      os.makedirs(workdir)
      with open(os.path.join(workdir, 'similarities.pk'), 'wb') as f:
        pickle.dump({q: {d: 0.5 + 2e-7}}, f)
    if '--loop_only' in cmd:
      lines = [json.dumps({'seconds': 6.0, 'scores': {f'{q}\t{d}': 0.5}})]
    return {'wall': next(walls), 'exit': 0.0, 'cpu': 1.0, 'lines': lines, 'load': '0.00 0.00 0.00'}

  figures = first_results.report(args, w, first_results.measure(args, w, run))
  out = capsys.readouterr().out
  assert figures['loop_over_evaluate_cold'] == 1.5 and figures['loop_over_evaluate_warm'] == 3.0
  assert 'evaluate cold: 4.00s, the loop 6.00s: 1.50x' in out and 'warm 1.00s to the first result' in out
  assert abs(figures['max_score_difference'] - 2e-7) < 1e-9
  evaluate_cache = {a for c in commands[:2] for a in c if a.startswith('--config.compilation_cache=')}
  assert len(evaluate_cache) == 1                 # warm: the cache the cold run filled
  assert commands[0][:2] == [sys.executable, '-m']
  parsed = cli.parse_flags(search.define_flags, commands[3][3:])   # what search is given parses
  assert parsed.query_id == 'v0' and parsed.compilation_cache == commands[4][-2].split('=', 1)[1]
