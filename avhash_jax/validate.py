"""The checks of AVHash's config values (configs/avhash_common.py), run before any work starts.

`evaluation(config)` for `avhash_jax.evaluate` (and the trainer's final test), `training(config)` for
`avhash_jax.main`. A bad size, period, count or rate raises `cli.UsageError` naming the field
(`config.eval_every_epochs=0: must be a positive integer`). A new numeric field in the config needs a line
here: tests/common/config_check_test.py sets every numeric field to a bad value and expects it to be named.
"""
from __future__ import annotations

from common_jax import config_check as cc


def evaluation(config) -> None:
  from avhash_jax.model import BITS
  cc.positive(config, 'num_classes', 'eval_batch_size', 'metric_chunk')
  cc.one_of(config, 'bits', BITS)
  cc.each_positive(config, 'ks')
  cc.mesh(config)


def training(config) -> None:
  evaluation(config)
  cc.non_negative(config, 'seed')
  cc.positive(config, 'batch_size', 'epochs', 'n_neg', 'eval_every_epochs', 'log_every', 'keep_checkpoints',
              'read_threads', 'prefetch_batches')
  cc.non_negative(config, 'checkpoint_every', why='0: at epoch ends only')
  cc.non_negative(config, 'workers', why='0: read in the main process')
  cc.positive_number(config, 'lr', 'adam_eps', 'temperature')
  cc.number(config, 'adam_b1', 'adam_b2', low=0., high=1., high_open=True)
  cc.non_negative_number(config, 'feature_weight')
  m = 'model.'
  cc.positive(config, *(m + k for k in ('hidden_size', 'num_attention_heads', 'intermediate_size',
                                        'num_hidden_layers', 'max_position_embeddings', 'type_vocab_size',
                                        'tokens')))
  cc.positive_number(config, m + 'layer_norm_eps')
  cc.number(config, m + 'hidden_dropout_prob', m + 'attention_probs_dropout_prob', low=0., high=1.,
            high_open=True)
  d = 'demo.'
  cc.positive(config, *(d + k for k in ('visual_groups', 'audio_groups', 'styles', 'train_per_class',
                                        'val_per_class', 'test_per_class')))
  cc.non_negative(config, d + 'seed')
