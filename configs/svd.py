r"""SVD: 206 queries, each against its labelled candidates plus every unlabelled distractor (sklearn AP).

  python -m hapvr_jax.evaluate --config=configs/svd.py --workdir=runs/svd \
      --config.features=/data/svd.hdf5 --config.checkpoint=ckpt/hapvr --config.annotations=/data/annotations

Needs test_groundtruth and, for the full protocol, unlabeled-data-id (from mever-team/distill-and-select) in the
annotations folder. Without the distractor list the evaluation uses the labelled pairs only, and metrics.json
says so under 'protocol'. Videos are short (~15 frames): min_len tiling matters (8 for HAP-VR, 4 for S2VS).
"""
from configs import common


def get_config(arg=None):
  return common.hapvr_eval_config('svd', arg)
