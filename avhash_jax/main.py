r"""AVHash training: the command-line entry point.

  python -m avhash_jax.main --config=configs/fcvid.py --workdir=runs/fcvid64 \
      --config.image_h5=/data/fcvid_vit_train.h5 --config.audio_h5=/data/AST_fcvid_5s.h5 \
      --config.train_list=lists/fcvid/train.txt --config.val_list=lists/fcvid/val.txt \
      --config.test_list=lists/fcvid/test.txt
  python -m avhash_jax.main --config=configs/fcvid.py:demo --workdir=/tmp/avhash_demo   # synthetic demo

Rerunning the same command resumes from the workdir. SIGTERM/SIGINT save a checkpoint and stop. Bad input
(a missing id, a wrong feature shape, a malformed list line, an unknown config key, a bad config value, a
workdir that is a file or read-only) ends with one `error: ...` line and exit code 2, the config values and
the workdir being checked before anything is written; so does a full disk, which keeps the checkpoints
already saved. A non-finite loss stops the run with exit code 3, naming the step.
"""
from __future__ import annotations

from common_jax import cli

def run(config, workdir) -> int:
  """Checks the config values and the workdir, then trains; bad input: one error line, exit code 2."""
  from avhash_jax import train, validate
  result = cli.run_training(train.train_and_evaluate, config, workdir, train.TrainingError,
                            'configs/fcvid.py:demo', validate=validate.training)
  best = result['best']
  print(f'finished at step {result["step"]}; best val mAP@all={best["mAP"]:.4f} at step {best.get("step")}; '
        f'outputs in {workdir} (best/, test/, train.jsonl, metrics.jsonl, tensorboard/, ckpt/)', flush=True)
  return 0


if __name__ == '__main__':
  cli.run_config_program(
      run, 'Training config (configs/fcvid.py, configs/activitynet.py, configs/fcvid.py:demo).',
      'Run directory: checkpoints, best/, test/, metrics, events.')
