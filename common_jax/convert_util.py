"""Helpers shared by every PyTorch -> Flax converter (the AVHash network and the backbones).

A converter is a table of rows (torch key, Flax path, transform). These helpers turn tensors into NumPy copies,
check a state_dict against the expected shapes (every missing, unexpected and mis-shaped key reported in one
error), place arrays into a nested parameter dict, and read torch.save / safetensors files without
unpickling arbitrary objects.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import numpy as np


class ConversionError(ValueError):
  """A checkpoint that does not match the architecture; the CLIs print it as one `error:` line (exit 2)."""


def check_new_output(output: str) -> None:
  """A converter's --output must not exist yet, or be an empty folder (a finished checkpoint is never mixed
  with a new one)."""
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise ConversionError(f'{output}: already exists and is not empty; choose another --output or remove it')


def to_numpy(sd: Mapping[str, Any]) -> dict:
  """torch tensors (any device/dtype) or arrays -> NumPy arrays that own their memory, keys unchanged.

  Always a copy: `Tensor.numpy()` shares the tensor's memory and so does `jax.device_put` on the CPU, so
  without it a torch update in place (an optimizer step) would change the converted parameters."""
  out = {}
  for k, v in sd.items():
    if hasattr(v, 'detach'):
      v = v.detach().cpu()
      v = v.float().numpy() if str(v.dtype) == 'torch.bfloat16' else v.numpy()
    out[k] = np.array(v, copy=True)
  return out


def check_keys(sd: Mapping[str, np.ndarray], shapes: Mapping[str, tuple], where: str, what: str,
               allow_extra: Optional[Callable[[str], bool]] = None) -> None:
  """One ConversionError listing every missing, unexpected and mis-shaped key (None in a shape = any size)."""
  fits = lambda a, b: len(a) == len(b) and all(y is None or x == y for x, y in zip(a, b))
  fmt = lambda s: '[' + ', '.join('*' if x is None else str(x) for x in s) + ']'
  problems = [f'missing key {k} (expected shape {fmt(s)})' for k, s in shapes.items() if k not in sd]
  problems += [f'unexpected key {k} (shape {list(np.shape(v))})' for k, v in sd.items()
               if k not in shapes and not (allow_extra and allow_extra(k))]
  problems += [f'{k}: shape {list(np.shape(sd[k]))}, expected {fmt(s)}'
               for k, s in shapes.items() if k in sd and not fits(tuple(np.shape(sd[k])), s)]
  if problems:
    shown = problems[:40] + ([f'... and {len(problems) - 40} more'] if len(problems) > 40 else [])
    raise ConversionError(f'{where} does not match {what}:\n  ' + '\n  '.join(shown))


def put(params: dict, path, value) -> None:
  """params[path[0]][path[1]]... = value (contiguous), creating the intermediate dicts."""
  node = params
  for name in path[:-1]:
    node = node.setdefault(name, {})
  node[path[-1]] = np.ascontiguousarray(value)


def layout(value: np.ndarray, transform) -> np.ndarray:
  """float32, with transform None (as is), 'T' (Linear [out, in] -> kernel [in, out]), 'conv' (torch OIHW ->
  Flax HWIO) or a callable."""
  value = np.asarray(value, np.float32)
  if transform is None:
    return value
  if transform == 'T':
    return value.T
  if transform == 'conv':
    return value.transpose(2, 3, 1, 0)
  return transform(value)


def load_torch(path: str, what: str):
  """A torch.save file (weights_only) or a .safetensors/.npz file, as loaded objects."""
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: {what} file not found')
  try:
    if path.endswith('.safetensors'):
      from safetensors.numpy import load_file
      return load_file(path)
    if path.endswith('.npz'):
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch/safetensors raise pickle, zip and header errors of several types
    raise ConversionError(f'{path}: cannot be read as a {what}: {e}') from e


def state_dict_of(obj: Any, path: str, wrappers=('state_dict', 'model', 'teacher', 'module')) -> dict:
  """The tensor dict inside a loaded checkpoint: a bare state_dict, or one under a known wrapper key (DINO's
  full checkpoints keep the teacher under 'teacher'); `module.` prefixes (DataParallel) are stripped."""
  if isinstance(obj, Mapping) and obj and all(hasattr(v, 'shape') for v in obj.values()):
    sd = dict(obj)
  else:
    sd = None
    for key in wrappers:
      if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
        sd = dict(obj[key])
        break
    if sd is None:
      keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
      raise ConversionError(f'{path}: no state_dict found (top level: {keys})')
  sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
  return to_numpy({k: v for k, v in sd.items() if hasattr(v, 'shape')})
