"""The checks of HAP-VR's config values (configs/vcdb.py, configs/common.py), run before any work starts.

`training(config)` for `hapvr_jax.main`, `evaluation(config)` for `hapvr_jax.evaluate`. A bad size, period,
count or rate raises `cli.UsageError` naming the field (`config.log_every=0: must be a positive integer`).
A new numeric field in those configs needs a line here: tests/common/config_check_test.py sets every numeric field
to a bad value and expects it to be named.
"""
from __future__ import annotations

from common_jax import config_check as cc

MIN_FRAMES = 4   # the comparator pools the frame-similarity map twice by 2: shorter inputs have no output


def evaluation(config, at: str = '') -> None:
  """An evaluation config (configs/common.hapvr_eval_config); `at` is its place in a larger config."""
  min_len = cc.get(config, at + 'min_len')
  if min_len != -1:
    cc.at_least(config, MIN_FRAMES, at + 'min_len', why="or -1 for the checkpoint's")
  cc.non_negative_number(config, at + 'save_every_s')
  cc.mesh(config, at + 'mesh')
  e = at + 'engine.'
  cc.non_negative(config, e + 'chunk_size', why='0: never split a video into chunks')
  cc.non_negative(config, e + 'prefetch_blocks')
  cc.positive(config, e + 'min_bucket', e + 'query_block', e + 'max_block_targets')
  cc.non_negative(config, e + 'memory_budget_mb', why='0: the smallest blocks')
  cc.number(config, e + 'bucket_ratio', e + 'query_bucket_ratio', low=1., low_open=True)
  cc.positive(config, at + 'demo.num_queries', at + 'demo.num_database')
  cc.non_negative(config, at + 'demo.seed')


def training(config) -> None:
  """A training config (configs/vcdb.py), its evaluation part included."""
  cc.non_negative(config, 'seed')
  cc.positive(config, 'total_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints')
  cc.non_negative(config, 'eval_every', why='0: never evaluate')
  cc.one_of(config, 'compute_dtype', ('float32', 'bfloat16'))
  cc.mesh(config)
  cc.positive(config, 'model.dims', 'model.binary_bits')
  cc.number(config, 'model.f_topk_rate', 'model.v_topk_rate', low=0., low_open=True, high=1.)
  cc.at_least(config, MIN_FRAMES, 'model.min_len', why='shorter videos have no comparator output')
  cc.at_least(config, MIN_FRAMES, 'data.window', why='shorter clips have no comparator output')
  cc.positive(config, 'data.sources_per_group', 'data.groups')
  cc.non_negative(config, 'data.workers', why='0: read in the main process')
  cc.sequence(config, 'data.viv_lambda', 2)   # the range of the mixing weight
  cc.fraction(config, 'data.viv_prob', 'data.viv_lambda.0', 'data.viv_lambda.1')
  probs = {k: cc.get(config, f'data.tt_probs.{k}') for k in config.data.tt_probs}
  cc.fraction(config, *(f'data.tt_probs.{k}' for k in probs))
  if abs(sum(probs.values()) - 1.) > 1e-6:
    cc.bad('data.tt_probs', probs, 'must sum to 1')
  o = 'optim.'
  cc.positive_number(config, o + 'lr', o + 'eps')
  cc.non_negative_number(config, o + 'min_lr', o + 'warmup_lr', o + 'weight_decay')
  cc.non_negative(config, o + 'warmup_steps')
  cc.positive(config, o + 'decay_steps')
  cc.number(config, o + 'b1', o + 'b2', low=0., high=1., high_open=True)
  cc.non_negative_number(config, *(f'loss.weights.{k}' for k in config.loss.weights))
  cc.positive_number(config, 'loss.temperature', 'loss.qlap_sigma', 'loss.inner_sigma',
                     'loss.max_pairs_factor')
  cc.non_negative_number(config, 'loss.sshn_eps', 'loss.qlap_rho', 'loss.inner_rho')
  cc.fraction(config, 'loss.top_rate', 'loss.bottom_rate')
  cc.positive(config, 'demo.train_videos', 'demo.num_queries', 'demo.num_database', 'demo.dims')
  evaluation(config, at='eval.')
