"""The project's one checkpoint module (both systems), over Orbax's CheckpointManager.

Layout of a checkpoint directory (a training workdir or a converter's output):

  DIR/model_config.json        the architecture (written atomically)
  DIR/ckpt/<step>/state/...    Orbax item 'state': a pytree whose 'params' entry holds the model parameters
  DIR/ckpt/<step>/data/...     Orbax item 'data': the Grain iterator state (training only)

Orbax writes each step to a temporary directory and renames it on commit, so a killed save never leaves a
step that looks complete. Restores go into abstract trees carrying the *current* shardings, which is how a
checkpoint written on one device count is restored onto another.

A step that does not read back (its files damaged after the commit) is a CheckpointError naming the
directory, the step and what is wrong; training falls back to the newest step that does read back, with a
warning, and moves the damaged one aside to `ckpt/<step>.corrupt` (a name Orbax does not take for a step).
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional

import jax
import numpy as np
from absl import logging

from common_jax import io_util

if TYPE_CHECKING:
  import orbax.checkpoint as ocp

CKPT_SUBDIR = 'ckpt'
MODEL_CONFIG = 'model_config.json'


class CheckpointError(ValueError):
  pass


def manager(directory: str, max_to_keep: Optional[int] = 3, save_interval_steps: int = 1,
            item_names=('state',), async_save: bool = False, writer: bool = False) -> ocp.CheckpointManager:
  """The Orbax manager of DIR/ckpt; the folder appears with the first save. `writer` (the one training run
  that owns the directory) also removes the temporary folders of saves that a kill interrupted."""
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=False,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=writer)
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
  import orbax.checkpoint as ocp
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
  if step is None and (params := read_single_step(directory)) is not None:
    return params, model_config
  import orbax.checkpoint as ocp
  mngr = manager(directory)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{directory}: {CKPT_SUBDIR}/ holds no completed checkpoint step')
    if step not in mngr.all_steps():
      raise CheckpointError(f'{directory}: {CKPT_SUBDIR}/ has no step {step} (steps: {mngr.all_steps()})')
    # Restored without a target: the arrays land on the default device and are moved to the host here;
    # evaluation places the (small) parameter tree on its own mesh afterwards.
    # A checkpoint written by several processes names devices this process does not have: such arrays land
    # on this process's first device instead (the fallback), whatever topology wrote them.
    fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
      state = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(fallback_sharding=fallback)))['state']
      state = jax.tree.map(np.asarray, state)
    except Exception as e:   # Orbax and TensorStore raise many kinds; all mean the same to the user
      raise CheckpointError(f'{directory}: checkpoint step {step} cannot be read ({_reason(e)})') from e
  finally:
    mngr.close()
  if not isinstance(state, dict) or 'params' not in state:
    raise CheckpointError(f'{directory}: checkpoint step {step} has no params entry')
  return state['params'], model_config


def read_single_step(directory: str):
  """The params of a checkpoint holding one committed step of arrays in Orbax's OCDBT layout, read through
  TensorStore without Orbax (whose import alone takes longer than reading a small network: a search waits
  for it); None for any other checkpoint, which Orbax reads."""
  ckpt = os.path.join(os.path.abspath(directory), CKPT_SUBDIR)
  steps = os.listdir(ckpt)
  if len(steps) != 1 or not steps[0].isdigit():
    return None
  state = os.path.join(ckpt, steps[0], 'state')
  if not all(os.path.exists(os.path.join(d, 'commit_success.txt')) for d in (os.path.dirname(state), state)):
    return None
  try:
    with open(os.path.join(state, '_METADATA')) as f:
      meta = json.load(f)
    entries = list(meta['tree_metadata'].values()) if meta.get('use_ocdbt') else []
    paths = [[k['key'] for k in e['key_metadata'] if k['key_type'] == 2] for e in entries]
    if not entries or any(len(p) != len(e['key_metadata']) or p[0] != 'params' or any('.' in k for k in p) or
                          e['value_metadata'].get('value_type') not in ('np.ndarray', 'jax.Array')
                          for p, e in zip(paths, entries)):
      return None
    import tensorstore as ts
    driver = 'zarr3' if meta.get('use_zarr3') else 'zarr'
    out = {}
    for path in paths:
      spec = {'driver': driver, 'kvstore': {'driver': 'ocdbt', 'base': f'file://{state}/', 'path': '.'.join(path)}}
      node = out
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = np.asarray(ts.open(spec, open=True, read=True).result().read().result())
  except Exception:   # an unexpected layout or a damaged file: Orbax reads it, or names what is wrong
    return None
  return out['params']


def save_train(mngr: ocp.CheckpointManager, step: int, state: Any, data_iterator=None, force: bool = False):
  """Saves the train state (and the Grain iterator position) at `step`; True if a save was started."""
  import orbax.checkpoint as ocp
  args = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    import grain
    args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def _reason(error: BaseException) -> str:
  """What is wrong, in one line: the first line of the error, without TensorStore's spec dump."""
  text = str(error).strip().split('\n', 1)[0].split(' [tensorstore_spec', 1)[0]
  text = f'{type(error).__name__}: {text}' if text else type(error).__name__
  return text if len(text) <= 400 else text[:400] + '...'


def _any_process(flag: bool) -> bool:
  """`flag` agreed on by every process (True if it is True on any): all then take the same branch."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Renames a damaged step to `<step>.corrupt` (numbered if taken), so a later save of that step number
  does not collide with it; returns the new path."""
  from common_jax import distributed
  root = str(mngr.directory)
  target = os.path.join(root, f'{step}.corrupt')
  k = 1
  while os.path.exists(target):
    target, k = os.path.join(root, f'{step}.corrupt.{k}'), k + 1
  distributed.barrier(f'checkpoint: before moving step {step} aside')
  if jax.process_index() == 0:
    os.replace(os.path.join(root, str(step)), target)
  distributed.barrier(f'checkpoint: step {step} moved aside')
  return target


def restore_train(mngr: ocp.CheckpointManager, abstract_state: Any, data_iterator=None):
  """(step, state) of the newest checkpoint that reads back, restored into `abstract_state` (ShapeDtypeStructs
  carrying the current shardings, so the checkpoint lands on this run's mesh whatever the device count it was
  written on); the data iterator, if given, is moved to that step's position in place. (None, None) when
  there is no checkpoint.

  Newer steps that fail to read back are damaged: each is named in a warning and moved aside. When no step
  reads back, nothing is moved (the cause is more likely this run than the files: another model config, say)
  and a CheckpointError names the newest step and what is wrong."""
  import orbax.checkpoint as ocp
  failed = []
  for step in sorted(mngr.all_steps(), reverse=True):
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      import grain
      args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    error, restored = None, None
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:   # Orbax, TensorStore and Grain raise many kinds for damaged files
      error = e
    if not _any_process(error is not None):
      for bad, reason in failed:
        moved = _move_aside(mngr, bad)
        logging.warning('checkpoint step %d in %s cannot be read (%s); moved to %s, resuming from step %d',
                        bad, mngr.directory, reason, moved, step)
      if failed:
        mngr.reload()
      return step, restored['state']
    failed.append((step, _reason(error) if error is not None else 'unreadable on another process'))
  if failed:
    step, reason = failed[0]
    older = f'; the older steps {[s for s, _ in failed[1:]]} fail too' if len(failed) > 1 else ''
    raise CheckpointError(f'{mngr.directory}: checkpoint step {step} cannot be restored ({reason}){older}')
  return None, None
