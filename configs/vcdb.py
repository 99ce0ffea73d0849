r"""HAP-VR self-supervised training on VCDB feature shards, and its embedded demo.

Full run (GPU or TPU slice; 30K steps of 2 loss groups x 64 source videos x 2 views x 28 frames):

  python -m hapvr_jax.main --config=configs/vcdb.py --workdir=runs/hapvr_vcdb \
      --config.data.path=/data/vcdb_shards \
      --config.eval.features=/data/fivr_5k.hdf5 --config.eval.annotations=/data/annotations

`data.path` is a shard directory (python -m input_pipeline.hapvr.make_shards) or the extractor's HDF5 files. Rerunning
the same command resumes from the last checkpoint in the workdir (any device count). FIVR-5K is evaluated every
`eval_every` steps when `eval.features` is set (monitoring only: it is a test set). The trained checkpoint is
evaluated like a converted one: python -m hapvr_jax.evaluate --config=configs/fivr_5k.py
--config.checkpoint=runs/hapvr_vcdb ...

Embedded demo (fully SYNTHETIC data, written to WORKDIR/demo_data; runs on a CPU, docs/performance.md):

  python -m hapvr_jax.main --config=configs/vcdb.py:demo --workdir=/tmp/hapvr_train_demo

It evaluates the untrained network and the raw-feature Chamfer baseline on a FIVR-style synthetic
query/database split at step 0, trains, evaluates again, and writes every evaluation as a line of
WORKDIR/metrics.jsonl. Expected: raw-feature baseline mAP 0.43, untrained 0.14, trained 0.92 at
step 50 and 1.00 from step 150 on.

The original's per-GPU negatives: set data.groups to the number of GPUs it used (2) with
data.sources_per_group=64, which is the default; data.groups = the device count gives one loss group per
device.

Variants: `demo`; `steps=N` (shorter run); `bf16` (bfloat16 compute in the similarity network).
"""
import ml_collections

from configs import common


def get_config(arg=None):
  variant = common.parse_arg(arg, demo=False, steps=0, bf16=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 30_500          # 30K cosine steps + the original's epoch-end tail at min lr
  c.compute_dtype = 'bfloat16' if variant.bf16 else 'float32'   # similarity network; losses stay float32
  c.mesh = (('data', -1),)
  c.compilation_cache = '~/.cache/hapvr_jax/xla'

  c.model = ml_collections.ConfigDict(dict(
      dims=512, attention=True, binarization=False, binary_bits=512, f2f_sim_module='TopKChamfer',
      v2v_sim_module='TopKChamfer', f_topk_rate=0.1, v_topk_rate=0.03, symmetric=False, min_len=8))

  c.data = ml_collections.ConfigDict(dict(
      path='',                    # shard directory (shards.json) or HDF5 file/folder of training views
      window=28,                  # frames per clip (at 1 fps)
      sources_per_group=64,       # B: source videos per loss group (2B clips: weak views, then strong views)
      groups=2,                   # G: loss groups per step (global); the original's per-GPU negatives = 2 GPUs
      viv_prob=0.3, viv_lambda=(0.3, 0.7),
      tt_probs=dict(tsd=0.5, fast_forward=0.1, slow_motion=0.1, reverse=0.1, pause=0.1, none=0.1),
      workers=8,                  # Grain worker processes (0: in the main process)
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=4e-5, min_lr=4e-6, warmup_lr=4e-7, warmup_steps=1000, decay_steps=30_000,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))

  c.loss = ml_collections.ConfigDict(dict(
      # the original's hard-coded weights; inner_ap=0 is its three-loss branch (no teacher)
      weights=dict(infonce=1.0, inner_ap=6.0, qlap=4.0, sshn=3.0, reg=1.0),
      temperature=0.03, sshn_eps=1e-3, qlap_sigma=0.05, qlap_rho=0.1, inner_sigma=0.05, inner_rho=5.0,
      top_rate=0.35, bottom_rate=0.35,
      max_pairs_factor=4.5,       # static size of the positive-pair list for the inner AP, in clips
  ))

  c.log_every = 100
  c.checkpoint_every = 1500
  c.keep_checkpoints = 3
  c.eval_every = 1500             # FIVR-5K through the evaluation engine, when eval.features is set
  c.eval = common.hapvr_eval_config('fivr_5k')
  c.eval.progress = False

  c.demo = ml_collections.ConfigDict(dict(enabled=False, train_videos=256, num_queries=12,
                                          num_database=144, dims=64))

  if variant.demo:
    c.demo.enabled = True
    c.model.dims = c.demo.dims
    c.data.window = 16
    c.data.sources_per_group = 8
    c.data.groups = 2
    c.data.workers = 0
    c.total_steps = 300
    c.optim.update(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=20, decay_steps=300)
    c.log_every = 10
    c.checkpoint_every = 50
    c.eval_every = 50
    c.eval.engine.bucket_ratio = 2.0
  if variant.steps:
    c.total_steps = variant.steps
  return c
