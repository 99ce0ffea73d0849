r"""FIVR-200K: 100 queries against 225,960 database videos (22.6M pairs; the feature file is ~400 GB and is
streamed, never loaded whole).

  python -m hapvr_jax.evaluate --config=configs/fivr_200k.py --workdir=runs/fivr_200k \
      --config.features=/data/fivr_200k.hdf5 --config.checkpoint=ckpt/hapvr --config.annotations=/data/annotations

Writes runs/fivr_200k/metrics.json with DSVR/CSVR/ISVR mAP, DSVD/CSVD/ISVD µAP and their _h variants.
"""
from configs import common


def get_config(arg=None):
  return common.hapvr_eval_config('fivr_200k', arg)
