"""PyTorch reference for backbones.resnet (tests and benches only; product code never imports it).

torchvision cannot be installed here, so the trunk is transformers' `ResNetModel` configured as a torchvision
ResNet: bottleneck blocks, stride on the 3x3 conv (`downsample_in_bottleneck=False`), stride-1 first stage,
stem = 7x7/2 conv (padding 3, no bias) + BN + ReLU + 3x3/2 max-pool (padding 1), 1x1 conv + BN projection
shortcut on each stage's first block, BatchNorm eps 1e-5 -- the same computation as torchvision's ResNet-50
(checked by reading transformers/models/resnet/modeling_resnet.py). Its state_dict is re-keyed into torchvision
names through RENAMES, so the converter is tested on the layout of resnet50-0676ba61.pth.

The L3-iRMAC pooling and the PCA whitening are written here again in torch, independently of the Flax code,
following the original (F.max_pool2d kernel s stride ceil(s/2), F.normalize, row-major flattening, PCA from
argsort-descending eigenvalues).
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

from backbones.resnet import REGION_KERNELS, Config

# transformers ResNetModel key prefix -> torchvision key prefix (s = stage, b = block, i = conv in the block).
RENAMES = (
    (r'embedder\.embedder\.convolution\.', lambda m: 'conv1.'),
    (r'embedder\.embedder\.normalization\.', lambda m: 'bn1.'),
    (r'encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.',
     lambda m: f'layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.'),
    (r'encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.',
     lambda m: f'layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.'),
    (r'encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.',
     lambda m: f'layer{int(m[1]) + 1}.{m[2]}.downsample.0.'),
    (r'encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.',
     lambda m: f'layer{int(m[1]) + 1}.{m[2]}.downsample.1.'),
)


def torchvision_key(key: str) -> str:
  for pattern, new in RENAMES:
    m = re.match(pattern, key)
    if m:
      return new(m) + key[m.end():]
  raise KeyError(f'no torchvision name for transformers key {key}')


def random_pca(dims: int, seed: int = 0) -> dict:
  """A ViSiL-style PCA dict (float32 NumPy): mean [D], eigenvalues d [D] in SHUFFLED order, V [D, D] orthogonal
  with the eigenvectors as columns."""
  rng = np.random.default_rng(seed)
  q, r = np.linalg.qr(rng.normal(size=(dims, dims)))
  v = q * np.sign(np.diag(r))
  d = rng.permutation(np.exp(rng.normal(-6.0, 1.5, size=dims)))
  mean = rng.normal(0.0, 0.02, size=dims)
  return {'mean': mean.astype(np.float32), 'd': d.astype(np.float32), 'V': v.astype(np.float32)}


def pca_projection(pca: dict, dims: int, dtype=torch.float64):
  """(mean, P) tensors: the `dims` largest eigenvalues (descending), P = V[:, idx] * (d[idx] + 1e-7)^-1/2."""
  d = torch.as_tensor(np.asarray(pca['d']), dtype=torch.float64)
  v = torch.as_tensor(np.asarray(pca['V']), dtype=torch.float64)
  idx = torch.argsort(d, descending=True)[:dims]
  proj = v[:, idx] * torch.rsqrt(d[idx] + 1e-7)
  return torch.as_tensor(np.asarray(pca['mean']), dtype=torch.float64).to(dtype), proj.to(dtype)


def irmac_torch(stages):
  """NCHW stage maps -> [N, 9, C]."""
  pooled = []
  for x, s in zip(stages, REGION_KERNELS):
    pooled.append(F.normalize(F.max_pool2d(x, s, math.ceil(s / 2)), p=2, dim=1))
  x = torch.cat(pooled, dim=1)
  return F.normalize(x.flatten(2).transpose(1, 2), p=2, dim=-1)


class Reference(torch.nn.Module):
  """Same input and output as backbones.resnet.Model: forward(x NHWC preprocessed, return_stages=False) ->
  [N, 9, out_dims] (and the NCHW stage outputs)."""

  def __init__(self, resnet, pca=None, pca_dims=0):
    super().__init__()
    self.resnet = resnet
    self.pca = pca
    self.pca_dims = pca_dims
    mean, proj = pca_projection(pca, pca_dims) if pca is not None else (None, None)
    self.register_buffer('pca_mean', mean)
    self.register_buffer('pca_proj', proj)

  def forward(self, x, return_stages: bool = False):
    dtype = next(self.resnet.parameters()).dtype
    x = (x if torch.is_tensor(x) else torch.from_numpy(np.array(x))).to(dtype).permute(0, 3, 1, 2)
    h = self.resnet.embedder(x)
    stages = []
    for stage in self.resnet.encoder.stages:
      h = stage(h)
      stages.append(h)
    out = irmac_torch(stages)
    if self.pca_proj is not None:
      out = F.normalize((out - self.pca_mean.to(out.dtype)) @ self.pca_proj.to(out.dtype), p=2, dim=-1)
    return (out, stages) if return_stages else out


def randomise_(model, seed: int):
  """Every conv weight (He, fan_out) and every BatchNorm affine and running statistic, from `seed`."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):
        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_out))
      elif isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(100)


def build(config: Config, seed: int = 0, layout: str = 'torchvision', dtype=torch.float32, pca=None,
          with_fc: bool = True):
  """(Reference module in eval mode, torchvision-named float32 state_dict). The state_dict has fc.* (random,
  unused) and num_batches_tracked like a real torchvision file. With config.pca_dims > 0 the module whitens with
  `pca` (default: random_pca(irmac_dims, seed)), kept as `module.pca` for the converter."""
  if layout != 'torchvision':
    raise ValueError(f'unsupported layout {layout!r}; only torchvision')
  from transformers import ResNetConfig, ResNetModel
  w = config.width
  hf_config = ResNetConfig(num_channels=3, embedding_size=w, hidden_sizes=[4 * w, 8 * w, 16 * w, 32 * w],
                           depths=list(config.layers), layer_type='bottleneck', hidden_act='relu',
                           downsample_in_first_stage=False, downsample_in_bottleneck=False)
  torch.manual_seed(seed)
  resnet = ResNetModel(hf_config).eval()
  randomise_(resnet, seed)
  state_dict = {torchvision_key(k): v.detach().clone() for k, v in resnet.state_dict().items()}
  if with_fc:
    g = torch.Generator().manual_seed(seed + 1)
    state_dict['fc.weight'] = 0.01 * torch.randn(1000, 32 * w, generator=g)
    state_dict['fc.bias'] = torch.zeros(1000)
  if config.pca_dims and pca is None:
    pca = random_pca(config.irmac_dims, seed)
  ref = Reference(resnet.to(dtype), pca if config.pca_dims else None, config.pca_dims).eval()
  return ref, state_dict
