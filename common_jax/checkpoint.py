"""The project's one checkpoint module (both systems), over Orbax's CheckpointManager.

Layout of a checkpoint directory (a training workdir or a converter's output):

  DIR/model_config.json        the architecture (written atomically)
  DIR/ckpt/<step>/state/...    Orbax item 'state': a pytree whose 'params' entry holds the model parameters
  DIR/ckpt/<step>/data/...     Orbax item 'data': the Grain iterator state (training only)

Orbax writes each step to a temporary directory and renames it on commit, so a killed save never leaves a
step that looks complete. Restores go into abstract trees carrying the *current* shardings, which is how a
checkpoint written on one device count is restored onto another.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from common_jax import io_util

CKPT_SUBDIR = 'ckpt'
MODEL_CONFIG = 'model_config.json'


class CheckpointError(ValueError):
  pass


def manager(directory: str, max_to_keep: Optional[int] = 3, save_interval_steps: int = 1,
            item_names=('state',), async_save: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(directory), CKPT_SUBDIR),
                               item_names=item_names, options=options)


def write_model_config(directory: str, config: dict) -> None:
  if jax.process_index() == 0:
    io_util.write_json(os.path.join(directory, MODEL_CONFIG), config)


def read_model_config(directory: str) -> dict:
  path = os.path.join(directory, MODEL_CONFIG)
  if not os.path.exists(path):
    raise CheckpointError(f'{directory}: not a checkpoint directory ({MODEL_CONFIG} is missing)')
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path}: not valid JSON ({e})') from e


def save_params(directory: str, params: Any, model_config: dict, step: int = 0) -> str:
  """Writes a parameters-only checkpoint (the converters' output). Returns the directory."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  mngr = manager(directory, max_to_keep=None)
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({'params': params})), force=True)
  mngr.wait_until_finished()
  mngr.close()
  write_model_config(directory, model_config)
  return directory


def latest_step(directory: str) -> Optional[int]:
  ckpt = os.path.join(os.path.abspath(directory), CKPT_SUBDIR)
  if not os.path.isdir(ckpt):
    return None
  mngr = manager(directory)
  step = mngr.latest_step()
  mngr.close()
  return step


def load_params(directory: str, step: Optional[int] = None):
  """(params as numpy arrays, model config dict) from a converted or trained checkpoint directory."""
  model_config = read_model_config(directory)
  if not os.path.isdir(os.path.join(directory, CKPT_SUBDIR)):
    raise CheckpointError(f'{directory}: no {CKPT_SUBDIR}/ folder with Orbax steps')
  mngr = manager(directory)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'{directory}: {CKPT_SUBDIR}/ holds no completed checkpoint step')
  # Restored without a target: the arrays land on the default device and are moved to the host here;
  # evaluation places the (small) parameter tree on its own mesh afterwards.
  # A checkpoint written by several processes names devices this process does not have: such arrays land on
  # this process's first device instead (the fallback), whatever topology wrote them.
  fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(fallback_sharding=fallback)))['state']
  state = jax.tree.map(np.asarray, state)
  mngr.close()
  if 'params' not in state:
    raise CheckpointError(f'{directory}: checkpoint step {step} has no params entry')
  return state['params'], model_config


def save_train(mngr: ocp.CheckpointManager, step: int, state: Any, data_iterator=None, force: bool = False):
  """Saves the train state (and the Grain iterator position) at `step`; True if a save was started."""
  args = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    import grain
    args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def restore_train(mngr: ocp.CheckpointManager, abstract_state: Any, data_iterator=None, step=None):
  """(step, state) restored into `abstract_state` (ShapeDtypeStructs carrying the current shardings, so the
  checkpoint lands on this run's mesh whatever the device count it was written on); the data iterator, if
  given, is moved to the saved position in place. (None, None) when there is no checkpoint."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None, None
  args = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    import grain
    args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = mngr.restore(step, args=ocp.args.Composite(**args))
  return step, restored['state']
