"""Shared pieces of the ml_collections configs: variant parsing and the HAP-VR evaluation config.

Variants follow big_vision: `--config=configs/fivr_5k.py:demo` or `:key=value,other=value`; a bare `name`
means `name=True`. Unknown variant names are an error.
"""
from __future__ import annotations

import ml_collections


def parse_arg(arg, **defaults):
  """'demo,chunk=64' -> ConfigDict(demo=True, chunk=64) over `defaults` (types follow the defaults)."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for part in str(arg).split(','):
    if not part:
      continue
    key, _, value = part.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config variant {key!r}; known variants: {sorted(defaults)}')
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ('', '1', 'true', 'yes') if value else True
    else:
      out[key] = kind(value)
  return out


BENCHMARKS = ('fivr_5k', 'fivr_200k', 'evve', 'svd')


def hapvr_eval_config(dataset: str, arg=None) -> ml_collections.ConfigDict:
  """Evaluation of a similarity network on one of the benchmarks (python -m hapvr_jax.evaluate)."""
  assert dataset in BENCHMARKS, dataset
  variant = parse_arg(arg, demo=False)
  c = ml_collections.ConfigDict()
  c.dataset = dataset
  c.features = ''            # DnS-format HDF5: one float [T, 9, 512] dataset per video id
  c.checkpoint = ''          # a converted (hapvr_jax.convert) or trained checkpoint directory
  c.annotations = ''         # folder with the original annotation files under their original names
  c.store_similarities = False   # also write OUT/similarities.pk {query: {target: similarity}}
  c.min_len = -1             # -1: the checkpoint's (8 for HAP-VR, 4 for S2VS weights)
  c.plots = True             # OUT/pr_curves.png
  c.progress = True
  c.mesh = (('data', -1),)
  c.compilation_cache = '~/.cache/hapvr_jax/xla'   # persistent XLA cache ('' = off): reruns skip compiling
  c.resume = True            # keep partial results in WORKDIR/partial: a killed run's rerun continues where it stopped
  c.save_every_s = 60.0      # how often the partial results are written (also on SIGTERM/SIGINT and at the end)
  c.engine = ml_collections.ConfigDict(dict(
      chunk_size=2048, fold_short_tail=True, bucket_ratio=1.25, query_bucket_ratio=1.5, min_bucket=8,
      query_block=16,
      max_block_targets=256, memory_budget_mb=1024, precision='highest', dtype='float32', features_only=False,
      prefetch_blocks=2))
  # The self-contained demo: a synthetic FIVR-format corpus written to WORKDIR/demo_data, scored with a
  # freshly initialised network and with the raw-feature (features_only) baseline. Synthetic data, labelled so.
  c.demo = ml_collections.ConfigDict(dict(
      enabled=variant.demo, num_queries=10, num_database=200, seed=0))
  if variant.demo:
    c.dataset = 'fivr_5k'
    c.engine.bucket_ratio = 2.0
  return c
