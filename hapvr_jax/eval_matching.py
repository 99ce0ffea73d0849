r"""Score copy localisation with the Video Similarity Challenge 2022 and VCSL metrics.

  python -m hapvr_jax.eval_matching --predictions=matches.csv --ground_truth=gt.csv --output=eval

`--predictions` is a matching-track CSV (query_id,ref_id,query_start,query_end,ref_start,ref_end,score),
`--ground_truth` the VSC ground truth (the same columns, score optional). Prints the matching-track micro-AP
(segment level), the descriptor-track micro-AP (pair level; from `--descriptor_predictions`, a
query_id,ref_id,score CSV, or else from the best match score of each predicted pair) and VCSL's segment
precision, recall and F-score; writes metrics.json and pr_curve.png into `--output` (each replaced
atomically). Predictions for a pair the ground truth does not list, even for a query it never names, count
as false positives (their number is reported). A malformed line, a missing column, a negative time or an end
before its start is one error line naming the file and line, exit 2. Formats and metric definitions:
hapvr_jax.vsc, hapvr_jax.vsc_metrics.
"""
from __future__ import annotations

import json
import os

from absl import flags

from common_jax import cli, io_util, plots
from hapvr_jax import vsc
from hapvr_jax import vsc_metrics as metrics_lib


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('predictions', None, 'matching-track CSV of predicted segments', flag_values=fv,
                      required=True)
  flags.DEFINE_string('ground_truth', None, 'VSC ground-truth CSV', flag_values=fv, required=True)
  flags.DEFINE_string('descriptor_predictions', '', 'descriptor-track CSV of candidate pairs (default: the '
                      'best score of each predicted pair)', flag_values=fv)
  flags.DEFINE_string('output', '', 'folder for metrics.json and pr_curve.png (empty: print only)',
                      flag_values=fv)


def evaluate(gts, predictions, pairs=None) -> tuple[dict, dict]:
  """(metrics, PR curves) of `predictions` (Match records) and candidate `pairs` against `gts`."""
  pairs = vsc.pairs_from_matches(predictions) if pairs is None else pairs
  gt_pairs = {g.pair for g in gts}
  gt_queries, gt_refs = {g.query_id for g in gts}, {g.ref_id for g in gts}
  matching = metrics_lib.matching_ap(gts, predictions)
  descriptor = metrics_lib.descriptor_ap(gt_pairs, pairs)
  metrics = {
      'matching_micro_ap': matching.ap,
      'descriptor_micro_ap': descriptor.ap,
      **{f'segment_{k}': v for k, v in metrics_lib.vcsl_prf(gts, predictions).items()},
      'ground_truth_segments': len(gts), 'ground_truth_pairs': len(gt_pairs),
      'predicted_segments': len(predictions), 'predicted_pairs': len({m.pair for m in predictions}),
      'false_pair_predictions': sum(m.pair not in gt_pairs for m in predictions),
      'unknown_id_predictions': sum(m.query_id not in gt_queries or m.ref_id not in gt_refs
                                    for m in predictions),
  }
  return metrics, {'matching': matching, 'descriptor': descriptor}


def plot_curves(curves: dict, path: str) -> None:
  fig = plots.figure((5, 4))
  ax = fig.add_subplot()
  for name, c in curves.items():
    # a step curve from recall 0: the AP is the area under it
    ax.step([0.0, *c.recalls], [c.precisions[0] if len(c.precisions) else 0.0, *c.precisions], where='pre',
            label=f'{name} µAP {c.ap:.3f}')
  ax.set(xlabel='recall', ylabel='precision', xlim=(0, 1.02), ylim=(0, 1.02), title='precision-recall')
  ax.legend(loc='lower left')
  plots.save_png(fig, path)


def run(args) -> dict:
  if args.output:
    cli.check_workdir(args.output)
  gts = vsc.read_matches(args.ground_truth, ground_truth=True)
  if not gts:
    raise vsc.VscFormatError(f'{args.ground_truth}: no ground-truth match: nothing to score against')
  predictions = vsc.read_matches(args.predictions)
  pairs = vsc.read_pairs(args.descriptor_predictions) if args.descriptor_predictions else None
  metrics, curves = evaluate(gts, predictions, pairs)
  for k, v in metrics.items():
    print(f'{k:24s} {v:.4f}' if isinstance(v, float) else f'{k:24s} {v}')
  if args.output:
    os.makedirs(args.output, exist_ok=True)
    with io_util.atomic_open(os.path.join(args.output, 'metrics.json')) as f:
      json.dump(metrics, f, indent=2)
    plot_curves(curves, os.path.join(args.output, 'pr_curve.png'))
    print(f'wrote {os.path.join(args.output, "metrics.json")}, {os.path.join(args.output, "pr_curve.png")}')
  return metrics


main = cli.program(define_flags, run, __doc__)


if __name__ == '__main__':
  cli.run_main(main)
