r"""Convert a similarity-network checkpoint of the original HAP-VR or S2VS code to this project's format.

  python -m hapvr_jax.convert --torch_checkpoint=model.pth --output=ckpt/hapvr

Input: the dict the original training code saves with torch.save ({'model': state_dict, 'args': argparse
Namespace, 'optimizer': ..., 'global_step': ...}) or a bare state_dict. S2VS names the comparator
`visil_head` (HAP-VR: `comparator_module`) and always uses Chamfer at both levels with min_len 4.
Output: an Orbax checkpoint of the parameters plus `model_config.json` taken from `args` (common_jax.checkpoint).

The conversion is the table below: torch key -> (Flax path, layout change). Anything missing, unexpected or
mis-shaped is listed in one error.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

import numpy as np
from absl import flags

from common_jax import cli
from common_jax.convert_util import ConversionError, check_keys, layout, put, to_numpy
from hapvr_jax.model import ModelConfig

# torch key suffix -> (flax path, transform). 'T': Linear weight [out, in] -> kernel [in, out];
# 'conv': Conv2d weight OIHW -> HWIO kernel.
TABLE = (
    ('attention.transform.weight', ('attention', 'transform', 'kernel'), 'T'),
    ('attention.transform.bias', ('attention', 'transform', 'bias'), None),
    ('attention.context_vector.weight', ('attention', 'context_vector', 'kernel'), 'T'),
    ('binarization.W', ('binarization', 'W'), None),
    ('comparator_module.conv1.weight', ('comparator_module', 'conv1', 'kernel'), 'conv'),
    ('comparator_module.conv1.bias', ('comparator_module', 'conv1', 'bias'), None),
    ('comparator_module.conv2.weight', ('comparator_module', 'conv2', 'kernel'), 'conv'),
    ('comparator_module.conv2.bias', ('comparator_module', 'conv2', 'bias'), None),
    ('comparator_module.conv3.weight', ('comparator_module', 'conv3', 'kernel'), 'conv'),
    ('comparator_module.conv3.bias', ('comparator_module', 'conv3', 'bias'), None),
    ('comparator_module.fconv.weight', ('comparator_module', 'fconv', 'kernel'), 'conv'),
    ('comparator_module.fconv.bias', ('comparator_module', 'fconv', 'bias'), None),
)


def expected_shapes(cfg: ModelConfig) -> dict:
  """torch key -> shape, for the keys this architecture must have."""
  d = cfg.dims
  shapes = {
      'comparator_module.conv1.weight': (32, 1, 3, 3), 'comparator_module.conv1.bias': (32,),
      'comparator_module.conv2.weight': (64, 32, 3, 3), 'comparator_module.conv2.bias': (64,),
      'comparator_module.conv3.weight': (128, 64, 3, 3), 'comparator_module.conv3.bias': (128,),
      'comparator_module.fconv.weight': (1, 128, 1, 1), 'comparator_module.fconv.bias': (1,),
  }
  if cfg.attention:
    shapes.update({'attention.transform.weight': (d, d), 'attention.transform.bias': (d,),
                   'attention.context_vector.weight': (1, d)})
  if cfg.binarization:
    shapes['binarization.W'] = (d, cfg.binary_bits)
  return shapes


def normalise_keys(state_dict: Mapping[str, Any]) -> tuple[dict, str]:
  """Strips a DDP `module.` prefix and renames S2VS's `visil_head` to `comparator_module`."""
  out, source = {}, 'hapvr'
  for key, value in to_numpy(state_dict).items():   # copies: the params must not share the tensors' memory
    key = key[len('module.'):] if key.startswith('module.') else key
    if key.startswith('visil_head.'):
      key, source = 'comparator_module.' + key[len('visil_head.'):], 's2vs'
    out[key] = value
  return out, source


def config_from_args(args: Any, source: str, state_dict: Mapping[str, np.ndarray]) -> ModelConfig:
  """The architecture from the original's argparse namespace (or a dict, or None for a bare state_dict)."""
  try:
    return _config_from_args(args, source, state_dict)
  except ConversionError:
    raise
  except (ValueError, TypeError) as e:
    raise ConversionError(f'the checkpoint args describe an unsupported network: {e}') from e


def _config_from_args(args: Any, source: str, state_dict: Mapping[str, np.ndarray]) -> ModelConfig:
  a = dict(vars(args)) if args is not None and not isinstance(args, dict) else dict(args or {})
  for flag, why in (('attention_norm', 'normalised attention'), ('batch_norm', 'batch-norm comparator')):
    if a.get(flag):
      raise ConversionError(f'{flag}=True ({why}) is not supported: HAP-VR and S2VS never use it')
  if a.get('similarity_network', 'ViSiL') != 'ViSiL':
    raise ConversionError(f"similarity_network={a['similarity_network']!r} is not the ViSiL network")
  attention = a.get('attention', 'attention.transform.weight' in state_dict)
  binarization = a.get('binarization', 'binarization.W' in state_dict)
  dims = int(a.get('dims', 512))
  bits = int(a.get('binary_bits', state_dict['binarization.W'].shape[1] if 'binarization.W' in state_dict else 512))
  if source == 's2vs':
    return ModelConfig(dims=dims, attention=bool(attention), binarization=bool(binarization), binary_bits=bits,
                       f2f_sim_module='Chamfer', v2v_sim_module='Chamfer', f_topk_rate=0.1, v_topk_rate=0.1,
                       symmetric=bool(a.get('symmetric', False)), min_len=4, source='s2vs')
  # The ViSiL constructor defaults apply where the namespace lacks a field (HAP-VR's argparse has them all).
  return ModelConfig(dims=dims, attention=bool(attention), binarization=bool(binarization), binary_bits=bits,
                     f2f_sim_module=a.get('f2f_sim_module', 'TopKChamfer'),
                     v2v_sim_module=a.get('v2v_sim_module', 'TopKChamfer'),
                     f_topk_rate=float(a.get('f_topk_rate', 0.1)), v_topk_rate=float(a.get('v_topk_rate', 0.1)),
                     symmetric=bool(a.get('symmetric', False)), min_len=8, source='hapvr')


def convert_state_dict(state_dict: Mapping[str, Any], args: Any = None, where: str = 'checkpoint'):
  """(flax params, ModelConfig) from an original state_dict and its args namespace."""
  sd, source = normalise_keys(state_dict)
  cfg = config_from_args(args, source, sd)
  check_keys(sd, expected_shapes(cfg), where, f'the {source} similarity network (dims={cfg.dims}, '
             f'attention={cfg.attention}, binarization={cfg.binarization})')
  params: dict = {}
  for key, path, transform in TABLE:
    if key in sd:   # the attention and binarization rows exist only in the networks that have them
      put(params, path, layout(sd[key], transform))
  return params, cfg


def load_torch_checkpoint(path: str, trust_pickle: bool = False):
  """(state_dict, args) from a torch.save file; the args namespace is allow-listed for the safe loader."""
  import torch
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location='cpu', weights_only=not trust_pickle)
  except FileNotFoundError as e:
    raise ConversionError(f'{path}: file not found') from e
  except Exception as e:  # torch raises pickle/zip errors of several types
    hint = '' if trust_pickle else (' (if the file is trusted and holds other pickled objects, '
                                     'rerun with --trust_pickle)')
    raise ConversionError(f'{path}: cannot be read as a PyTorch checkpoint: {e}{hint}') from e
  if isinstance(obj, dict) and 'model' in obj and isinstance(obj['model'], Mapping):
    return obj['model'], obj.get('args')
  if isinstance(obj, Mapping) and all(hasattr(v, 'shape') for v in obj.values()):
    return obj, None
  raise ConversionError(f'{path}: neither a dict with a "model" state_dict nor a bare state_dict')


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('torch_checkpoint', None, 'model.pth of the original HAP-VR/S2VS code', flag_values=fv,
                      required=True)
  flags.DEFINE_string('output', None, 'directory for the Orbax checkpoint + model_config.json', flag_values=fv,
                      required=True)
  flags.DEFINE_integer('min_len', None, 'override the evaluation min_len (default: 8 for HAP-VR, 4 for S2VS '
                       'weights)', flag_values=fv)
  flags.DEFINE_bool('trust_pickle', False, 'load with torch.load(weights_only=False); only for files you trust',
                    flag_values=fv)


def main(argv=None) -> int:
  args = cli.parse_flags(define_flags, argv, __doc__)
  with cli.clear_errors():   # bad input: one `error: ...` line, exit code 2
    if any(os.path.exists(os.path.join(args.output, name)) for name in ('ckpt', 'model_config.json')):
      raise ConversionError(f'{args.output} already holds a checkpoint; choose another --output or remove it')
    state_dict, ckpt_args = load_torch_checkpoint(args.torch_checkpoint, args.trust_pickle)
    params, cfg = convert_state_dict(state_dict, ckpt_args, where=args.torch_checkpoint)
    if args.min_len is not None:
      cfg = ModelConfig.from_dict({**cfg.to_dict(), 'min_len': args.min_len})
    from common_jax import checkpoint
    checkpoint.save_params(args.output, params, cfg.to_dict())
  n = sum(int(np.prod(v.shape)) for v in __import__('jax').tree.leaves(params))
  print(f'wrote {args.output}: {n:,} parameters, {cfg.source} network, '
        f'f2f={cfg.f2f_sim_module}({cfg.f_topk_rate}) v2v={cfg.v2v_sim_module}({cfg.v_topk_rate}) '
        f'min_len={cfg.min_len}')
  return 0


if __name__ == '__main__':
  cli.run_main(main)
