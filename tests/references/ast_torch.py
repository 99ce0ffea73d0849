"""PyTorch reference for `backbones.ast` (tests and bench only): transformers' ASTModel with random weights.

`build(config, seed, layout)` returns (fn, state_dict): fn maps the Flax model's input [B, max_length,
num_mel_bins] (NumPy float32) to the pooled output [B, hidden] (NumPy), and state_dict is the model's weights
as NumPy arrays in either layout that `backbones.ast.convert` reads:
  'v5'   what transformers-5 ASTModel.state_dict() gives (layers.N.attention.q_proj, layers.N.mlp.fc1, ...)
  'hub'  the transformers-4 names of the hub checkpoint (encoder.layer.N.attention.attention.query, ...)
Every tensor is randomised (LayerNorm affine, CLS/distillation tokens and position embeddings included, at
scales comparable to the patch embeddings), so a swapped or mis-ordered tensor changes the output.
"""
from __future__ import annotations

import re

import numpy as np

from backbones.ast import Config

# transformers-5 name -> hub name (applied in order).
V5_TO_HUB = (
    (r'^layers\.(\d+)\.attention\.q_proj\.', r'encoder.layer.\1.attention.attention.query.'),
    (r'^layers\.(\d+)\.attention\.k_proj\.', r'encoder.layer.\1.attention.attention.key.'),
    (r'^layers\.(\d+)\.attention\.v_proj\.', r'encoder.layer.\1.attention.attention.value.'),
    (r'^layers\.(\d+)\.attention\.o_proj\.', r'encoder.layer.\1.attention.output.dense.'),
    (r'^layers\.(\d+)\.mlp\.fc1\.', r'encoder.layer.\1.intermediate.dense.'),
    (r'^layers\.(\d+)\.mlp\.fc2\.', r'encoder.layer.\1.output.dense.'),
    (r'^layers\.(\d+)\.', r'encoder.layer.\1.'),
)


def hub_key(v5_key: str) -> str:
  for pattern, repl in V5_TO_HUB:
    new = re.sub(pattern, repl, v5_key)
    if new != v5_key:
      return new
  return v5_key


def torch_config(config: Config):
  from transformers import ASTConfig
  return ASTConfig(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                   num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
                   layer_norm_eps=config.layer_norm_eps, patch_size=config.patch_size,
                   frequency_stride=config.frequency_stride, time_stride=config.time_stride,
                   num_mel_bins=config.num_mel_bins, max_length=config.max_length, qkv_bias=config.qkv_bias,
                   hidden_act='gelu', hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   attn_implementation='eager')


def build(config: Config, seed: int = 0, layout: str = 'hub'):
  """(fn: [B, max_length, mels] float32 -> [B, hidden] NumPy, NumPy state_dict in `layout`)."""
  import torch
  from transformers import ASTModel
  if layout not in ('hub', 'v5'):
    raise ValueError(f"layout must be 'hub' or 'v5', not {layout!r}")
  torch.manual_seed(seed)
  model = ASTModel(torch_config(config)).eval().float()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if 'layernorm' in name and name.endswith('weight'):
        p.copy_(1 + 0.2 * noise)
      elif name.endswith('bias'):
        p.copy_(0.05 * noise)
      elif name.split('.')[-1] in ('cls_token', 'distillation_token', 'position_embeddings'):
        p.copy_(0.3 * noise)
      else:                                   # Linear / conv weights: std ~ 1/sqrt(fan_in)
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))

  def fn(x):
    with torch.no_grad():
      out = model(torch.tensor(np.asarray(x, np.float32)))
    return out.pooler_output.numpy()

  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  if layout == 'hub':
    sd = {hub_key(k): v for k, v in sd.items()}
  return fn, sd
