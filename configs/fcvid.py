r"""AVHash on FCVID (239 classes, `video_id,label` lists with 1-based labels).

Training (rerun the same command to resume; WORKDIR/best is the best-val checkpoint, WORKDIR/test
its test-list evaluation):

  python -m avhash_jax.main --config=configs/fcvid.py --workdir=runs/fcvid64 \
      --config.image_h5=/data/fcvid_vit_train.h5 --config.audio_h5=/data/AST_fcvid_5s.h5 \
      --config.train_list=lists/fcvid/train.txt --config.val_list=lists/fcvid/val.txt \
      --config.test_list=lists/fcvid/test.txt --config.init_checkpoint=ckpt/bert_init

Embedded demo (SYNTHETIC class-structured features written to WORKDIR/demo_data; runs on a CPU; its time:
docs/performance.md):

  python -m avhash_jax.main --config=configs/fcvid.py:demo --workdir=/tmp/avhash_demo

Expected: val mAP@all 0.13 untrained (step 0), ~0.45 after 4 epochs, a best of 0.75-0.82 by epoch 12; test
mAP@all 0.74-0.82 (later epochs amplify rounding differences between machines).

Evaluation of a converted or trained checkpoint:

  python -m avhash_jax.evaluate --config=configs/fcvid.py --workdir=runs/fcvid64_eval \
      --config.image_h5=/data/fcvid_vit_train.h5 --config.audio_h5=/data/AST_fcvid_5s.h5 \
      --config.test_list=lists/fcvid/test.txt --config.retrieval_list=lists/fcvid/train.txt \
      --config.checkpoint=ckpt/avhash64

queries = test list, database = retrieval list (the training set, as the original). The SSVH protocol
(45,600 x 45,600, the retrieval list as both queries and database):

  python -m avhash_jax.evaluate --config=configs/fcvid.py:all_vs_all --workdir=runs/fcvid64_ava \
      --config.image_h5=... --config.audio_h5=... --config.retrieval_list=lists/fcvid/test.txt \
      --config.checkpoint=ckpt/avhash64

Other code lengths: `--config=configs/fcvid.py:bits=16`. Writes metrics.json, codes.h5, pr_curve.png.
"""
from configs import avhash_common


def get_config(arg=None):
  return avhash_common.avhash_config('fcvid', arg)
