r"""FIVR-5K: the 50 FIVR queries against the 5,000-video FIVR-5K database (DSVR/CSVR/ISVR mAP, DSVD/... µAP).

  python -m hapvr_jax.evaluate --config=configs/fivr_5k.py --workdir=runs/fivr_5k \
      --config.features=/data/fivr_5k.hdf5 --config.checkpoint=ckpt/hapvr \
      --config.annotations=/data/annotations          # fivr_audio.pickle + fivr_easy_duplicates.txt

Writes runs/fivr_5k/metrics.json (and similarities.pk with --config.store_similarities=True).
250K pairs; at ~100 frames per video about 2.5e14 FLOP (what that means in time: docs/performance.md).

  python -m hapvr_jax.evaluate --config=configs/fivr_5k.py:demo --workdir=/tmp/hapvr_eval_demo

runs the whole pipeline on a small SYNTHETIC FIVR-format corpus (written to the workdir), fast on a CPU:
a fresh, untrained network and the raw-feature Chamfer baseline, whose mAP is close to 1 on
this easy synthetic data.
"""
from configs import common


def get_config(arg=None):
  return common.hapvr_eval_config('fivr_5k', arg)
