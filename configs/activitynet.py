r"""AVHash on ActivityNet v1.3 (200 classes, `v_id,frame_count,label[,label...]` lists, 0-based labels).

  python -m avhash_jax.evaluate --config=configs/activitynet.py --workdir=runs/actnet64_eval \
      --config.image_h5=/data/act_vit.h5 --config.audio_h5=/data/AST_act.h5 \
      --config.test_list=lists/actnet/test.txt --config.retrieval_list=lists/actnet/train.txt \
      --config.checkpoint=ckpt/avhash64

queries = test list, database = retrieval list (the training set, as the original); only the first label of
a line is used. Other code lengths: `--config=configs/activitynet.py:bits=16`.
Writes metrics.json, codes.h5, pr_curve.png.
"""
from configs import avhash_common


def get_config(arg=None):
  return avhash_common.avhash_config('actnet', arg)
