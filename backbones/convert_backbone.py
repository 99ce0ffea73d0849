r"""Converts a PyTorch backbone checkpoint into a Flax checkpoint directory (no download: local files only).

  python -m backbones.convert_backbone --arch=resnet50_irmac --torch_checkpoint=resnet50-0676ba61.pth \
      --pca=pca_resnet50_vcdb_1M.pth --output=ckpt/resnet50_irmac
  python -m backbones.convert_backbone --arch=dino_vits16 --torch_checkpoint=dino_deitsmall16_pretrain.pth \
      --output=ckpt/dino_vits16
  python -m backbones.convert_backbone --arch=clip_vitl14 --torch_checkpoint=ViT-L-14.pt --trusted_torchscript \
      --output=ckpt/clip_vitl14
  python -m backbones.convert_backbone --arch=ast \
      --torch_checkpoint=ast-finetuned-audioset-10-10-0.4593/model.safetensors --output=ckpt/ast

Accepted layouts (each module's TABLE maps them; the layout is recognised from the key names):
  resnet50_irmac  torchvision ResNet-50 (IMAGENET1K_V1: resnet50-0676ba61.pth; fc.* dropped) + ViSiL's PCA file
                  (pca_resnet50_vcdb_1M.pth: mean, d, V; or an .npz with those keys). Without --pca the output
                  is the 3840-d L3-iRMAC descriptor.
  dino_vits16     the official DINO layout (dino_deitsmall16_pretrain.pth, or a training checkpoint's 'teacher')
                  or transformers' ViTModel (facebook/dino-vits16).
  clip_vitl14     OpenAI's CLIP (the ViT-L-14.pt JIT archive's state_dict, or a state_dict; text tower ignored)
                  or transformers' CLIPModel / CLIPVisionModelWithProjection (openai/clip-vit-large-patch14).
  ast             transformers' AST (MIT/ast-finetuned-audioset-10-10-0.4593: ASTForAudioClassification or
                  ASTModel, hub or transformers-5 key names; the classifier is dropped).

Files are read with torch.load(weights_only=True), safetensors or NumPy, none of which runs code from the file.
A TorchScript archive (OpenAI's ViT-L-14.pt) holds code that torch.jit.load runs, so it is opened only with
--trusted_torchscript (a file you trust); transformers' openai/clip-vit-large-patch14 model.safetensors needs
no such trust. The output directory (Orbax params + model_config.json {"arch", "config"}) is read by
`backbones.registry.load` and the extraction CLIs. Missing, unexpected and mis-shaped tensors are listed
together in one error; an existing non-empty --output is refused.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from absl import flags

from common_jax import cli
from common_jax.convert_util import ConversionError, check_new_output, load_torch, state_dict_of, to_numpy
from backbones import registry


def load_state_dict(path: str, trusted_torchscript: bool = False) -> dict:
  """The tensors of a torch.save / safetensors / npz file, or of a TorchScript archive (OpenAI CLIP) when the
  caller says the file is trusted."""
  if os.path.isfile(path) and not path.endswith(('.safetensors', '.npz')):
    import zipfile
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as z:
        scripted = any(n.endswith('/constants.pkl') or n.endswith('code/__torch__.py') for n in z.namelist())
      if scripted:
        if not trusted_torchscript:
          raise ConversionError(
              f'{path}: is a TorchScript archive, whose code torch.jit.load would run; pass --trusted_torchscript '
              'if it is a file you trust (e.g. downloaded from OpenAI), or convert a plain state_dict instead, such '
              "as transformers' openai/clip-vit-large-patch14 model.safetensors")
        import torch
        try:
          return to_numpy(torch.jit.load(path, map_location='cpu').state_dict())
        except Exception as e:  # torch.jit raises several error types
          raise ConversionError(f'{path}: cannot be read as a TorchScript archive: {e}') from e
  return state_dict_of(load_torch(path, 'PyTorch checkpoint'), path)


def run_conversion(arch: str, torch_checkpoint: str, output: str, pca: Optional[str] = None,
                   num_heads: Optional[int] = None, pca_dims: Optional[int] = None,
                   trusted_torchscript: bool = False):
  """Writes the converted backbone; returns (params, Config). Raises ConversionError on bad input."""
  check_new_output(output)
  mod = registry.module(arch)
  extra = {}
  if pca is not None:
    if arch != 'resnet50_irmac':
      raise ConversionError(f'--pca applies to resnet50_irmac only, not {arch}')
    extra['pca'] = mod.load_pca(pca)
    if pca_dims is not None:
      extra['pca_dims'] = pca_dims
  elif pca_dims is not None:
    raise ConversionError('--pca_dims needs --pca')
  if num_heads is not None:
    if arch == 'resnet50_irmac':
      raise ConversionError('--num_heads applies to the transformer backbones only')
    extra['num_heads'] = num_heads
  state_dict = load_state_dict(torch_checkpoint, trusted_torchscript)
  params, config = mod.convert(state_dict, where=torch_checkpoint, **extra)
  registry.save(output, arch, params, config)
  return params, config


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_enum('arch', None, sorted(registry.ARCHS), 'the backbone', flag_values=fv, required=True)
  flags.DEFINE_string('torch_checkpoint', None, 'the local PyTorch weights file', flag_values=fv, required=True)
  flags.DEFINE_string('pca', None, "resnet50_irmac: ViSiL's PCA file (pca_resnet50_vcdb_1M.pth)", flag_values=fv)
  flags.DEFINE_integer('pca_dims', None, 'resnet50_irmac: PCA components kept (default 512, as ViSiL)',
                       flag_values=fv)
  flags.DEFINE_integer('num_heads', None, 'attention heads (not stored in the weights; default width/64)',
                       flag_values=fv)
  flags.DEFINE_string('output', None, 'new directory for the Orbax checkpoint + model_config.json',
                      flag_values=fv, required=True)
  flags.DEFINE_bool('trusted_torchscript', False, 'allow a TorchScript archive (its code runs while loading); '
                    'only for files you trust', flag_values=fv)


def main(argv=None) -> int:
  args = cli.parse_flags(define_flags, argv, __doc__)
  with cli.clear_errors():
    params, config = run_conversion(args.arch, args.torch_checkpoint, args.output, args.pca, args.num_heads,
                                    args.pca_dims, args.trusted_torchscript)
  import jax
  n = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params))
  print(f'wrote {args.output}: {args.arch}, {n:,} parameters, config {config.to_dict()}')
  return 0


if __name__ == '__main__':
  cli.run_main(main)
