"""An independent PyTorch statement of the AVHash forward pass, the reference for the Flax port.

Written independently, not from the original repository: the three encoders are transformers' `BertModel`
(fed with `inputs_embeds`), the rest is written out below. Module names follow the original `MMVH` so that
`state_dict()` has the original key names: AE/IE/VE.encoder.*, AqI/IqA.linear_{q,k,v,output},
Audio_project (unused), A_W/I_W/AI_W, hash.linear1. The CLS vector is a plain attribute, not in the
state_dict, exactly as in the original. Use tiny configs in tests (`tiny_bert_config`).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel


def tiny_bert_config(hidden=32, heads=4, intermediate=64, max_positions=32, vocab=128) -> BertConfig:
  return BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
                    num_hidden_layers=1, max_position_embeddings=max_positions, type_vocab_size=2,
                    vocab_size=vocab, layer_norm_eps=1e-12, hidden_act='gelu', hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, attn_implementation='eager')


class EncoderRef(nn.Module):
  """Prepends the CLS vector and runs a 1-layer BertModel; returns (last_hidden_state, pooler_output)."""

  def __init__(self, config: BertConfig, cls_token: torch.Tensor):
    super().__init__()
    self.encoder = BertModel(config)
    self.cls_token = cls_token            # plain attribute: not a parameter, not a buffer

  def forward(self, x):
    cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
    out = self.encoder(inputs_embeds=torch.cat([cls, x], dim=1))
    return out.last_hidden_state, out.pooler_output


class CrossAttentionRef(nn.Module):
  def __init__(self, hidden: int, heads: int):
    super().__init__()
    self.heads = heads
    self.linear_q = nn.Linear(hidden, hidden, bias=False)
    self.linear_k = nn.Linear(hidden, hidden, bias=False)
    self.linear_v = nn.Linear(hidden, hidden, bias=False)
    self.linear_output = nn.Linear(hidden, hidden)

  def forward(self, x, y):
    b, t, h = x.shape
    d = h // self.heads
    heads = lambda z: z.view(b, -1, self.heads, d).transpose(1, 2)     # [B, heads, T, d]
    q, k, v = heads(self.linear_q(x)), heads(self.linear_k(y)), heads(self.linear_v(y))
    att = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
    return self.linear_output((att @ v).transpose(1, 2).reshape(b, t, h))


class HashRef(nn.Module):
  def __init__(self, hidden: int, bits: int):
    super().__init__()
    self.linear1 = nn.Linear(hidden, bits)

  def forward(self, p):
    return torch.tanh(self.linear1(p))


class AVHashRef(nn.Module):
  """forward(image, audio) -> (p_A, p_I, h), image first as in the original."""

  def __init__(self, config: BertConfig, cls_token: torch.Tensor, bits: int):
    super().__init__()
    hidden = config.hidden_size
    self.AE = EncoderRef(config, cls_token)
    self.IE = EncoderRef(config, cls_token)
    self.VE = EncoderRef(config, cls_token)
    self.AqI = CrossAttentionRef(hidden, config.num_attention_heads)
    self.IqA = CrossAttentionRef(hidden, config.num_attention_heads)
    self.Audio_project = nn.Linear(hidden, hidden)    # unused, kept for the key set
    self.A_W = nn.Linear(2 * hidden, 2)
    self.I_W = nn.Linear(2 * hidden, 2)
    self.AI_W = nn.Linear(2 * hidden, 2)
    self.hash = HashRef(hidden, bits)

  @staticmethod
  def gated(gate, x, y):
    g = torch.softmax(torch.tanh(gate(torch.cat([x, y], dim=-1))), dim=-1)
    return g[..., :1] * x + g[..., 1:] * y

  def forward(self, image, audio):
    h_a, p_a = self.AE(audio)
    h_i, p_i = self.IE(image)
    a = h_a[:, 1:] + audio
    i = h_i[:, 1:] + image
    c_a = self.AqI(a, i)
    c_i = self.IqA(i, a)
    f_a = self.gated(self.A_W, a, c_a)
    f_i = self.gated(self.I_W, i, c_i)
    fused = self.gated(self.AI_W, f_i, f_a)
    _, p_v = self.VE(fused)
    return p_a, p_i, self.hash(p_v)


def make_reference(seed=0, bits=16, **config_kw):
  """A reference model whose every tensor is perturbed (LayerNorm weights != 1, biases != 0, ...) so that any
  layout or naming slip in a conversion shows in the outputs. Returns (model, cls_token float64)."""
  torch.manual_seed(seed)
  config = tiny_bert_config(**config_kw)
  cls_token = torch.randn(config.hidden_size, dtype=torch.float64) * 0.5
  model = AVHashRef(config, cls_token, bits)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model, cls_token


def original_checkpoint(model: AVHashRef, epoch: int = 7) -> dict:
  """The dict train.py saves: {'berthash': state_dict, 'optimizer': ..., 'epoch': ...}."""
  return {'berthash': model.state_dict(), 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': epoch}
