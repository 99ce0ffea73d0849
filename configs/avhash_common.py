"""The AVHash config shared by FCVID and ActivityNet (python -m avhash_jax.evaluate, and the trainer).

Fields mirror the original's `Json/{fcvid,Anet}.json` (dataset, Image/Audio HDF5 files, num_class, the four
split lists) plus the code length, the checkpoint to evaluate, the evaluation protocol and the training
settings of the original code.
Variants (`--config=configs/fcvid.py:bits=16,all_vs_all`): `bits` (16/32/64/128) and
`all_vs_all` (FCVID's SSVH protocol: the retrieval list is both the queries and the database).
"""
from __future__ import annotations

import ml_collections

from configs import common

DATASETS = {'fcvid': 239, 'actnet': 200}      # config name -> num_class of the original JSON
LIST_FORMAT = {'fcvid': 'fcvid', 'actnet': 'activitynet'}   # config name -> input_pipeline.avhash.lists format


def avhash_config(dataset: str, arg=None) -> ml_collections.ConfigDict:
  assert dataset in DATASETS, dataset
  variant = common.parse_arg(arg, bits=64, all_vs_all=False, demo=False, epochs=0)
  c = ml_collections.ConfigDict()
  c.dataset = dataset                  # 'fcvid' (1-based labels) | 'actnet' (0-based, v_ ids)
  # Features (the original's HDF5 layout): one group per video id with a float32 `vectors` [25, 768] dataset.
  c.image_h5 = ''                      # original: fcvid_vit_train.h5 / act_vit.h5 (CLIP frames)
  c.audio_h5 = ''                      # original: AST_fcvid_5s.h5 / AST_act.h5 (AST segments)
  c.shards = ''                        # training: ArrayRecord shards of both (input_pipeline.avhash.make_shards),
                                       # read instead of the two HDF5 files when set
  c.num_classes = DATASETS[dataset]
  # Split lists, in the original's formats; the original's retrieval list is the training list.
  c.train_list = ''
  c.val_list = ''
  c.test_list = ''
  c.retrieval_list = ''
  c.bits = variant.bits                # code length L (one model per length)
  c.checkpoint = ''                    # converted (avhash_jax.convert) or trained checkpoint directory

  # Evaluation. Queries = test list, database = retrieval list; with all_vs_all the retrieval list
  # is both (FCVID's 45,600 x 45,600 SSVH protocol, the query is its own first hit).
  c.ks = (5, 10, 20, 40, 60, 80, 100, 200)
  c.all_vs_all = variant.all_vs_all
  c.eval_batch_size = 256              # videos per jitted forward when extracting codes (padded, static)
  c.metric_chunk = 128                 # queries ranked at a time (memory: chunk x N_db)
  c.progress = True
  c.plots = True                       # OUT/pr_curve.png
  c.compilation_cache = '~/.cache/avhash_jax/xla'   # persistent XLA cache ('' = off)

  # Training: python -m avhash_jax.main.
  c.model = ml_collections.ConfigDict(dict(   # the original's BertConfig/config.json; bits above
      hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=1,
      max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, hidden_dropout_prob=0.1,
      attention_probs_dropout_prob=0.1, tokens=25))
  c.init_checkpoint = ''               # '' = BERT-style random init; or `avhash_jax.convert --bert_checkpoint`
                                       # output (bert-base-uncased encoders, the recommended start)
  c.train_dropout = True               # dropout 0.1 in all three training passes, as the original
  c.lr = 1e-4
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-3                    # the original's unusually large eps
  c.batch_size = 128                   # tuples per step (anchor, positive, n_neg negatives): 768 videos
  c.epochs = 100                       # the original README's 100, best-val selection (its code says 300)
  c.seed = 3346
  c.n_neg = 4
  c.temperature = 0.1
  c.feature_weight = 50.0              # L = L_V + 50 (L_AA + L_II + L_IA + L_AI)
  c.eval_every_epochs = 1              # validation (val list vs retrieval list, mAP@all) and best checkpoint
  c.log_every = 50                     # steps between train.jsonl lines (and at every epoch end)
  c.checkpoint_every = 0               # steps between extra checkpoints (0: epoch ends and SIGTERM only)
  c.keep_checkpoints = 2
  c.workers = 8                        # Grain worker processes reading features (0: in the main process)
  c.read_threads = 4                   # reader threads per worker
  c.prefetch_batches = 4
  c.demo = ml_collections.ConfigDict(dict(enabled=False, visual_groups=4, audio_groups=4, styles=6,
                                          train_per_class=24, val_per_class=6, test_per_class=6, seed=0))

  c.mesh = (('data', -1),)
  if variant.demo:
    _demo(c)
  if variant.epochs:
    c.epochs = variant.epochs
  return c


def _demo(c) -> None:
  """SYNTHETIC class-structured features (avhash_jax.demo_data) and a small model that trains on a CPU."""
  c.demo.enabled = True
  c.model.update(hidden_size=64, num_attention_heads=4, intermediate_size=128, max_position_embeddings=32)
  c.bits = 32
  c.batch_size = 32
  c.epochs = 12
  c.lr = 1e-3
  # Dropout off: from a random init, a 64-d model's CLS output carries the video only through ~3% of its
  # norm, and 0.1 dropout noise drowns it (the demo with and without it: docs/performance.md). The full
  # configs keep the original's dropout (and start from bert-base, see init_checkpoint).
  c.train_dropout = False
  c.workers = 0
  c.log_every = 12
  c.eval_batch_size = 128
  c.ks = (5, 10, 20, 40)
