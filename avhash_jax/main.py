r"""AVHash training (spec §3-4): the command-line entry point.

  python -m avhash_jax.main --config=configs/fcvid.py --workdir=runs/fcvid64 \
      --config.image_h5=/data/fcvid_vit_train.h5 --config.audio_h5=/data/AST_fcvid_5s.h5 \
      --config.train_list=lists/fcvid/train.txt --config.val_list=lists/fcvid/val.txt \
      --config.test_list=lists/fcvid/test.txt
  python -m avhash_jax.main --config=configs/fcvid.py:demo --workdir=/tmp/avhash_demo   # synthetic demo

Rerunning the same command resumes from the workdir. SIGTERM/SIGINT save a checkpoint and stop. Bad input
(a missing id, a wrong feature shape, a malformed list line, an unknown config key) ends with one
`error: ...` line and exit code 2; a non-finite loss stops the run with exit code 3, naming the step.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from common_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config (configs/fcvid.py, configs/activitynet.py, configs/fcvid.py:demo).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, best/, test/, metrics, events.')


def main(argv):
  del argv
  from avhash_jax import train
  result = cli.run_training(train.train_and_evaluate, _CONFIG.value, _WORKDIR.value, train.TrainingError,
                            'configs/fcvid.py:demo')
  best = result['best']
  print(f'finished at step {result["step"]}; best val mAP@all={best["mAP"]:.4f} at step {best.get("step")}; '
        f'outputs in {_WORKDIR.value} (best/, test/, train.jsonl, metrics.jsonl, tensorboard/, ckpt/)',
        flush=True)
  return 0


if __name__ == '__main__':
  cli.run(main)
