"""The copy-detection demo end to end on the real clips: corpus, index, search with --localize --report, and the
VSC matching metrics printed, with random weights said so; a rerun resumes from what the first run wrote."""
import json
import os

from hapvr_jax import copy_demo, vsc
from tests.hapvr.search_fixtures import real_clips

SMALL = '--corpus_flags=--refs=2,--queries=3,--no_copy=1,--size=96,--ref_min=8,--ref_max=12'


def test_copy_demo_localizes_copies_in_real_clips(tmp_path, capsys):
  clips = real_clips()
  out = tmp_path / 'demo'
  assert copy_demo.main([f'--videos={clips}', f'--output={out}', SMALL]) == 0
  printed = capsys.readouterr().out
  assert 'RANDOM WEIGHTS: no --resnet and no --checkpoint given' in printed
  metrics = json.loads((out / 'eval' / 'metrics.json').read_text())
  last = printed.strip().splitlines()[-1]
  assert last.startswith(f'matching µAP {metrics["matching_micro_ap"]:.4f}, descriptor µAP')
  gts = vsc.read_matches(str(out / 'corpus' / 'ground_truth.csv'), ground_truth=True)
  found = vsc.read_matches(str(out / 'results' / 'matches.csv'))
  assert metrics['ground_truth_segments'] == len(gts) and metrics['predicted_segments'] == len(found)
  # random weights still see near-identical frames: some copies are found where the ground truth puts them
  assert metrics['matching_micro_ap'] > 0.2 and metrics['segment_precision'] > 0.4, metrics
  page = (out / 'report' / 'index.html').read_text()
  queries = [os.path.splitext(os.path.basename(p))[0] for p in (out / 'corpus' / 'queries.txt').read_text().split()]
  assert len(queries) == 4 and all(q in page for q in queries)

  # a rerun reuses the corpus, the random weights and the index, and prints the same figures
  before = {p: os.path.getmtime(out / p) for p in ('corpus/ground_truth.csv', 'random_hapvr')}
  assert copy_demo.main([f'--videos={clips}', f'--output={out}', SMALL]) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1] == last
  assert before == {p: os.path.getmtime(out / p) for p in before}
