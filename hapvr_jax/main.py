r"""HAP-VR self-supervised training on precomputed feature shards: the command-line entry point.

  python -m hapvr_jax.main --config=configs/vcdb.py --workdir=runs/hapvr_vcdb --config.data.path=SHARDS
  python -m hapvr_jax.main --config=configs/vcdb.py:demo --workdir=/tmp/hapvr_train_demo   # synthetic demo

Rerunning the same command resumes from the workdir. SIGTERM/SIGINT save a checkpoint and stop. Bad input
(missing shards, wrong feature shapes, unknown config keys, a bad config value, a workdir that is a file or
read-only) ends with one `error: ...` line and exit code 2, the config values and the workdir being checked
before anything is written; so does a full disk, which keeps the checkpoints already saved. A non-finite
loss stops the run with exit code 3, naming the step. See configs/vcdb.py for the fields.
"""
from __future__ import annotations

from common_jax import cli

def run(config, workdir) -> int:
  """Checks the config values and the workdir, then trains; bad input: one error line, exit code 2."""
  from hapvr_jax import train, validate
  result = cli.run_training(train.train_and_evaluate, config, workdir, train.TrainingError,
                            'configs/vcdb.py:demo', validate=validate.training)
  print(f'finished at step {result["step"]}; outputs in {workdir} (train.jsonl, metrics.jsonl, '
        'tensorboard/, ckpt/)', flush=True)
  return 0


if __name__ == '__main__':
  cli.run_config_program(run, 'Training config (configs/vcdb.py[:demo]).',
                         'Run directory: checkpoints, metrics, TensorBoard events.')
