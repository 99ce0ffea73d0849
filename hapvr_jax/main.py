r"""HAP-VR self-supervised training (spec §4, §10): the command-line entry point.

  python -m hapvr_jax.main --config=configs/vcdb.py --workdir=runs/hapvr_vcdb --config.data.path=SHARDS
  python -m hapvr_jax.main --config=configs/vcdb.py:demo --workdir=/tmp/hapvr_train_demo   # synthetic demo

Rerunning the same command resumes from the workdir. SIGTERM/SIGINT save a checkpoint and stop. Bad input
(missing shards, wrong feature shapes, unknown config keys) ends with one `error: ...` line and exit code 2;
a non-finite loss stops the run with exit code 3, naming the step. See configs/vcdb.py for the fields.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from common_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config (configs/vcdb.py[:demo]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, TensorBoard events.')


def main(argv):
  del argv
  from hapvr_jax import train
  result = cli.run_training(train.train_and_evaluate, _CONFIG.value, _WORKDIR.value, train.TrainingError,
                            'configs/vcdb.py:demo')
  print(f'finished at step {result["step"]}; outputs in {_WORKDIR.value} (train.jsonl, metrics.jsonl, '
        'tensorboard/, ckpt/)', flush=True)
  return 0


if __name__ == '__main__':
  cli.run(main)
