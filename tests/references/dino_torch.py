"""PyTorch reference for `backbones.dino` (tests and bench only; imports torch and transformers).

`build(config, seed, layout)` makes a transformers ViTModel with DINO's settings (pre-LN, LayerNorm eps 1e-6, exact
GELU, qkv bias, no pooler) and random weights, and returns (fn, state_dict): fn takes the same preprocessed NHWC float
input as the Flax model and returns the CLS token after the final LayerNorm as NumPy; the state_dict is re-keyed into
the layout `convert` is asked to read:
  'official'  facebookresearch/dino names (blocks.N.attn.qkv = cat(query, key, value), ...), the re-keying below;
  'hf'        the module's own transformers-5 names (layers.N.attention.q_proj, ...), as is;
  'hf4'       the hub / transformers-4 names (encoder.layer.N.attention.attention.query, ...).
The re-keying tables here are written independently of the converter's, so a wrong row in either shows up as a
mismatch against the torch output.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from backbones.dino import Config

LAYOUTS = ('official', 'hf', 'hf4')
TABLES = ('position_embedding.weight', 'token_embedding.weight')      # embedding tables, not Linear/conv weights


def randomize_(module: torch.nn.Module, seed: int) -> None:
  """Seeded weights with non-trivial scale everywhere: LayerNorm scales 1 + 0.2 N(0, 1), biases 0.1 N(0, 1),
  embedding tables / tokens 0.5 N(0, 1), weight matrices and convs N(0, 1 / fan_in)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      leaf = name.rsplit('.', 1)[-1]
      is_norm = any(s in name for s in ('norm', 'layrnorm', 'ln_'))
      if is_norm and leaf == 'weight':
        p.copy_(1.0 + 0.2 * noise)
      elif leaf == 'bias':
        p.copy_(0.1 * noise)
      elif p.ndim >= 2 and leaf == 'weight' and not name.endswith(TABLES):
        p.copy_(noise / math.sqrt(float(np.prod(p.shape[1:]))))
      else:                                        # cls / class tokens, position tables, logit scale
        p.copy_(0.5 * noise)


def official_state_dict(sd: dict, depth: int) -> dict:
  """transformers-5 ViTModel names -> facebookresearch/dino names (NumPy)."""
  sd = {k: v.detach().numpy().copy() for k, v in sd.items()}
  out = {'cls_token': sd['embeddings.cls_token'], 'pos_embed': sd['embeddings.position_embeddings'],
         'patch_embed.proj.weight': sd['embeddings.patch_embeddings.projection.weight'],
         'patch_embed.proj.bias': sd['embeddings.patch_embeddings.projection.bias'],
         'norm.weight': sd['layernorm.weight'], 'norm.bias': sd['layernorm.bias']}
  for n in range(depth):
    src, dst = f'layers.{n}.', f'blocks.{n}.'
    for w in ('weight', 'bias'):
      out[f'{dst}attn.qkv.{w}'] = np.concatenate([sd[f'{src}attention.{x}_proj.{w}'] for x in 'qkv'], axis=0)
      out[f'{dst}attn.proj.{w}'] = sd[f'{src}attention.o_proj.{w}']
      out[f'{dst}norm1.{w}'] = sd[f'{src}layernorm_before.{w}']
      out[f'{dst}norm2.{w}'] = sd[f'{src}layernorm_after.{w}']
      out[f'{dst}mlp.fc1.{w}'] = sd[f'{src}mlp.fc1.{w}']
      out[f'{dst}mlp.fc2.{w}'] = sd[f'{src}mlp.fc2.{w}']
  return out


def hf4_state_dict(sd: dict) -> dict:
  """transformers-5 names -> the hub / transformers-4 names (what facebook/dino-vits16 holds)."""
  renames = (('.attention.q_proj.', '.attention.attention.query.'), ('.attention.k_proj.', '.attention.attention.key.'),
             ('.attention.v_proj.', '.attention.attention.value.'), ('.attention.o_proj.', '.attention.output.dense.'),
             ('.mlp.fc1.', '.intermediate.dense.'), ('.mlp.fc2.', '.output.dense.'))
  out = {}
  for k, v in sd.items():
    if k.startswith('layers.'):
      k = 'encoder.layer.' + k[len('layers.'):]
      for a, b in renames:
        k = k.replace(a, b)
    out[k] = v.detach().numpy().copy()
  return out


def build(config: Config, seed: int = 0, layout: str = 'official'):
  """(fn, state_dict): fn(x NHWC float, preprocessed) -> CLS [B, D] NumPy; state_dict in `layout` (LAYOUTS)."""
  from transformers import ViTConfig, ViTModel
  if layout not in LAYOUTS:
    raise ValueError(f'layout={layout!r} is not one of {LAYOUTS}')
  c = config
  model = ViTModel(ViTConfig(hidden_size=c.hidden_size, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                             intermediate_size=c.mlp_dim, image_size=c.image_size, patch_size=c.patch_size,
                             num_channels=3, layer_norm_eps=c.layer_norm_eps, hidden_act='gelu', qkv_bias=True,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                   add_pooling_layer=False)
  randomize_(model, seed)
  model = model.float().eval()
  sd = model.state_dict()
  if layout == 'official':
    out = official_state_dict(sd, c.depth)
  elif layout == 'hf4':
    out = hf4_state_dict(sd)
  else:
    out = {k: v.detach().numpy().copy() for k, v in sd.items()}

  def fn(x):
    with torch.no_grad():
      pixels = torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2).contiguous()
      return model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
  fn.module = model
  return fn, out
