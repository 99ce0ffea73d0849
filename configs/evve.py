r"""EVVE: 620 queries against 2,373 database videos, mAP over all queries (trapezoidal AP, as the original).

  python -m hapvr_jax.evaluate --config=configs/evve.py --workdir=runs/evve \
      --config.features=/data/evve.hdf5 --config.checkpoint=ckpt/hapvr --config.annotations=/data/annotations

Needs evve.pickle in the annotations folder. Writes runs/evve/metrics.json (EVVE_mAP, EVVE_uAP).
"""
from configs import common


def get_config(arg=None):
  return common.hapvr_eval_config('evve', arg)
