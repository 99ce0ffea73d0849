"""PyTorch reference for `backbones.clip` (tests and bench only; imports torch and transformers).

`build(config, seed, layout)` makes a transformers CLIPVisionModelWithProjection (quick GELU, LayerNorm eps from the
config) with random weights and returns (fn, state_dict): fn takes the same preprocessed NHWC float input as the Flax
model and returns `image_embeds` as NumPy; the state_dict is in the layout `convert` is asked to read:
  'openai'  OpenAI's names under `visual.` (in_proj_weight = cat(q, k, v), proj = visual_projection.weight.T), the
            re-keying below, written independently of the converter's table;
  'hf'      the module's own transformers names (vision_model.*, visual_projection.weight), as is.
"""
from __future__ import annotations

import numpy as np
import torch

from backbones.clip import Config
from tests.references.dino_torch import randomize_

LAYOUTS = ('openai', 'hf')


def openai_state_dict(sd: dict, layers: int) -> dict:
  """transformers CLIPVisionModelWithProjection names -> OpenAI `visual.*` names (NumPy)."""
  sd = {k: v.detach().numpy().copy() for k, v in sd.items()}
  e, v = 'vision_model.embeddings.', 'visual.'
  out = {v + 'conv1.weight': sd[e + 'patch_embedding.weight'], v + 'class_embedding': sd[e + 'class_embedding'],
         v + 'positional_embedding': sd[e + 'position_embedding.weight'], v + 'proj': sd['visual_projection.weight'].T}
  for w in ('weight', 'bias'):
    out[f'{v}ln_pre.{w}'] = sd[f'vision_model.pre_layrnorm.{w}']
    out[f'{v}ln_post.{w}'] = sd[f'vision_model.post_layernorm.{w}']
  for n in range(layers):
    src, dst = f'vision_model.encoder.layers.{n}.', f'{v}transformer.resblocks.{n}.'
    for w in ('weight', 'bias'):
      out[f'{dst}attn.in_proj_{w}'] = np.concatenate([sd[f'{src}self_attn.{x}_proj.{w}'] for x in 'qkv'], axis=0)
      out[f'{dst}attn.out_proj.{w}'] = sd[f'{src}self_attn.out_proj.{w}']
      out[f'{dst}ln_1.{w}'] = sd[f'{src}layer_norm1.{w}']
      out[f'{dst}ln_2.{w}'] = sd[f'{src}layer_norm2.{w}']
      out[f'{dst}mlp.c_fc.{w}'] = sd[f'{src}mlp.fc1.{w}']
      out[f'{dst}mlp.c_proj.{w}'] = sd[f'{src}mlp.fc2.{w}']
  return out


def build(config: Config, seed: int = 0, layout: str = 'openai'):
  """(fn, state_dict): fn(x NHWC float, preprocessed) -> image_embeds [B, E] NumPy; state_dict in `layout`."""
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  if layout not in LAYOUTS:
    raise ValueError(f'layout={layout!r} is not one of {LAYOUTS}')
  c = config
  model = CLIPVisionModelWithProjection(CLIPVisionConfig(
      hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.layers, num_attention_heads=c.num_heads,
      image_size=c.image_size, patch_size=c.patch_size, num_channels=3, projection_dim=c.projection_dim,
      hidden_act='quick_gelu', layer_norm_eps=c.layer_norm_eps, attention_dropout=0.0))
  randomize_(model, seed)
  model = model.float().eval()
  sd = model.state_dict()
  out = (openai_state_dict(sd, c.layers) if layout == 'openai'
         else {k: t.detach().numpy().copy() for k, t in sd.items()})

  def fn(x):
    with torch.no_grad():
      pixels = torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2).contiguous()
      return model(pixel_values=pixels).image_embeds.numpy()
  fn.module = model
  return fn, out
