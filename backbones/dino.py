"""DINO ViT-S/16 (HAP-VR's pseudo-label teacher) in Flax Linen, and its checkpoint converter.

Forward (facebookresearch/dino `vision_transformer.py`, which is timm's layout): 16x16 stride-16 patch conv (with
bias) -> [CLS ; patches] + pos_embed -> 12 pre-LN blocks (LayerNorm eps 1e-6, exact GELU, fused qkv with bias) ->
final LayerNorm -> the CLS token, 384-d. This is `get_intermediate_layers(x, n=1)[0][:, 0]`, the vector the original
HAP-VR code takes. Position embeddings are used at the stored grid only (224x224 at full size); other input sizes
raise (DINO would interpolate them bicubically; HAP-VR always feeds 224x224 frames).

Input normalisation: `Config.normalize` = 'none' (default) reproduces the original, which feeds the
uint8 pixel values in [0, 255] as floats, without /255 or mean/std; 'imagenet' is the proper normalisation
(/255, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)) for the ablation. `preprocess` applies it.

Parameter tree (mirrors the official state_dict; TABLE maps key by key):
  cls_token [1, 1, D], pos_embed [1, 1 + N, D], patch_embed/proj/{kernel [P, P, 3, D], bias}
  blocks_{n}/{norm1, norm2}/{scale, bias}, blocks_{n}/attn/{qkv [D, 3D], proj}/{kernel, bias}
  blocks_{n}/mlp/{fc1, fc2}/{kernel, bias}, norm/{scale, bias}

`convert` accepts (the layout is recognised from the key names):
  * official: a bare state_dict (dino_deitsmall16_pretrain.pth) or a training checkpoint's teacher, whose keys carry
    a `backbone.` prefix (stripped) beside the projection head `head.*` (ignored); `module.` prefixes are stripped;
  * transformers ViTModel, hub / transformers-4 names (facebook/dino-vits16: embeddings.*, encoder.layer.N.attention.
    attention.{query,key,value} -> concatenated into qkv, attention.output.dense, intermediate.dense, output.dense,
    layernorm_before/after, layernorm);
  * transformers-5 ViTModel names (a ViTModel().state_dict() of transformers 5: layers.N.attention.{q,k,v,o}_proj,
    layers.N.mlp.fc1/fc2, layers.N.layernorm_before/after); for both transformers layouts a `vit.` prefix is stripped
    and `pooler.*` ignored.
The size is read off the shapes (width, patch, grid, depth, MLP); the head count is not in the weights: `num_heads`,
default width / 64 (6 for ViT-S).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from backbones import vit_layers as vl

NORMALIZE = ('none', 'imagenet')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHAT = 'a DINO ViT (official or transformers ViTModel layout)'


@dataclasses.dataclass(frozen=True)
class Config(vl.ImageConfig):
  image_size: int = 224
  patch_size: int = 16
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  layer_norm_eps: float = 1e-6
  normalize: str = 'none'        # 'none': raw [0, 255] pixels, as the original HAP-VR; 'imagenet': /255, mean/std

  def __post_init__(self):
    if self.normalize not in NORMALIZE:
      raise ValueError(f'normalize={self.normalize!r} is not one of {NORMALIZE}')
    vl.check_dims('hidden_size', self.hidden_size, self.num_heads, self.image_size, self.patch_size)

  @classmethod
  def tiny(cls) -> 'Config':
    return cls(image_size=32, patch_size=8, hidden_size=32, depth=2, num_heads=2, mlp_dim=128)


class PatchEmbed(vl.ConfigModule):

  @nn.compact
  def __call__(self, x):
    return vl.PatchProjection(self.config.hidden_size, self.config.patch_size, True, self.dtype, self.precision,
                              self.fast_layout, name='proj')(x)


class Model(vl.ConfigModule):
  """x: preprocessed frames [B, H, W, 3] float (H = W = image_size) -> CLS after the final LayerNorm [B, D] float32."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    vl.check_grid(x.shape[1], x.shape[2], c.patch_size, c.image_size, 'dino_vits16')
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param('cls_token', init, (1, 1, c.hidden_size), jnp.float32)
    pos = self.param('pos_embed', init, (1, 1 + c.grid ** 2, c.hidden_size), jnp.float32)
    t = PatchEmbed(c, self.dtype, self.precision, self.fast_layout, name='patch_embed')(x.astype(self.dtype))
    t = vl.with_class_token(t, cls, pos, self.dtype)
    for n in range(c.depth):
      t = vl.Block(c.num_heads, c.mlp_dim, c.layer_norm_eps, 'gelu', dtype=self.dtype, precision=self.precision,
                   heads_major=self.fast_layout, name=f'blocks_{n}')(t)
    return vl.layer_norm(c.layer_norm_eps, 'norm', self.dtype)(t[:, 0]).astype(jnp.float32)


def preprocess(x, config: Config, normalize: Optional[str] = None):
  """uint8 (or float) frames [..., H, W, 3] in [0, 255] -> float32 model input; `normalize` overrides config's."""
  mode = config.normalize if normalize is None else normalize
  if mode not in NORMALIZE:
    raise ValueError(f'normalize={mode!r} is not one of {NORMALIZE}')
  x = jnp.asarray(x).astype(jnp.float32)
  if mode == 'none':
    return x
  return (x / 255.0 - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def init_params(config: Config, seed: int = 0):
  return vl.init_image_params(Model(config), config.image_size, seed)


def flops_per_image(config: Config) -> int:
  """Analytical FLOPs (2 x multiply-adds) of one image: patch conv + blocks (ViT-S/16 at 224: ~9.2 GFLOPs)."""
  n, d = config.grid ** 2, config.hidden_size
  return 2 * n * d * 3 * config.patch_size ** 2 + vl.encoder_flops(1 + n, d, config.mlp_dim, config.depth)


# ------------------------------------------------------------------------------------------------- conversion

LN, LINEAR = vl.LN_ROWS, vl.LINEAR_ROWS
# Official key -> (Flax path, transform); '{n}' = block index. 'conv' = OIHW -> HWIO, 'T' = Linear -> kernel.
TABLE = (
    ('cls_token', ('cls_token',), None),
    ('pos_embed', ('pos_embed',), None),
    ('patch_embed.proj.weight', ('patch_embed', 'proj', 'kernel'), 'conv'),
    ('patch_embed.proj.bias', ('patch_embed', 'proj', 'bias'), None),
    *((f'blocks.{{n}}.{m}.{w}', ('blocks_{n}', m, f), t) for m in ('norm1', 'norm2') for w, f, t in LN),
    *((f'blocks.{{n}}.{m}.{w}', ('blocks_{n}', *m.split('.'), f), t)
      for m in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2') for w, f, t in LINEAR),
    *((f'norm.{w}', ('norm', f), t) for w, f, t in LN),
)
# Official key -> key in the transformers layouts (the official qkv is the concatenation of query, key, value).
HF4_NAMES = {'cls_token': 'embeddings.cls_token', 'pos_embed': 'embeddings.position_embeddings',
             'patch_embed.proj': 'embeddings.patch_embeddings.projection', 'norm': 'layernorm',
             'norm1': 'encoder.layer.{n}.layernorm_before', 'norm2': 'encoder.layer.{n}.layernorm_after',
             'attn.qkv': tuple(f'encoder.layer.{{n}}.attention.attention.{x}' for x in ('query', 'key', 'value')),
             'attn.proj': 'encoder.layer.{n}.attention.output.dense', 'mlp.fc1': 'encoder.layer.{n}.intermediate.dense',
             'mlp.fc2': 'encoder.layer.{n}.output.dense'}
HF5_NAMES = {**HF4_NAMES, 'norm1': 'layers.{n}.layernorm_before', 'norm2': 'layers.{n}.layernorm_after',
             'attn.qkv': tuple(f'layers.{{n}}.attention.{x}_proj' for x in 'qkv'),
             'attn.proj': 'layers.{n}.attention.o_proj',
             'mlp.fc1': 'layers.{n}.mlp.fc1', 'mlp.fc2': 'layers.{n}.mlp.fc2'}
DEPTH_PATTERN = {'official': r'blocks\.(\d+)\.', 'hf4': r'encoder\.layer\.(\d+)\.', 'hf5': r'layers\.(\d+)\.'}


def table(depth: int):
  """TABLE with the block index filled in."""
  return vl.fill_table(TABLE, depth)


def canonical_shapes(c: Config) -> dict:
  d, m = c.hidden_size, c.mlp_dim
  shapes = {'cls_token': (1, 1, d), 'pos_embed': (1, 1 + c.grid ** 2, d),
            'patch_embed.proj.weight': (d, 3, c.patch_size, c.patch_size), 'patch_embed.proj.bias': (d,)}
  for n in range(c.depth):
    b = f'blocks.{n}.'
    shapes.update({b + 'attn.qkv.weight': (3 * d, d), b + 'attn.qkv.bias': (3 * d,),
                   b + 'attn.proj.weight': (d, d), b + 'attn.proj.bias': (d,),
                   b + 'mlp.fc1.weight': (m, d), b + 'mlp.fc1.bias': (m,),
                   b + 'mlp.fc2.weight': (d, m), b + 'mlp.fc2.bias': (d,)})
    shapes.update({f'{b}{ln}.{w}': (d,) for ln in ('norm1', 'norm2') for w in ('weight', 'bias')})
  shapes.update({'norm.weight': (d,), 'norm.bias': (d,)})
  return shapes


def source_rows(layout: str, depth: int):
  """(official key, source keys, how) for a layout."""
  rows = []
  for key, _, _ in table(depth):
    if layout == 'official':
      rows.append((key, (key,), None))
      continue
    names = HF4_NAMES if layout == 'hf4' else HF5_NAMES
    parts = key.split('.')
    n = parts[1] if parts[0] == 'blocks' else None
    module, leaf = ('.'.join(parts[2:-1]), parts[-1]) if n is not None else ('.'.join(parts[:-1]), parts[-1])
    if key in names:                     # cls_token, pos_embed: parameters without a module
      module, leaf = key, None
    src = names[module]
    srcs = src if isinstance(src, tuple) else (src,)
    srcs = tuple(s.format(n=n) + ('' if leaf is None else f'.{leaf}') for s in srcs)
    rows.append((key, srcs, 'cat' if len(srcs) > 1 else None))
  return rows


def detect(sd: Mapping[str, np.ndarray], where: str):
  """(layout, state_dict with the layout's optional prefix removed, ignore predicate)."""
  if any(k.startswith('backbone.') for k in sd):
    sd = vl.strip_prefix(sd, 'backbone.')
  if 'patch_embed.proj.weight' in sd:
    return 'official', sd, lambda k: k.startswith('head.')
  if any(k.startswith('vit.') for k in sd):
    sd = vl.strip_prefix(sd, 'vit.')
  if 'embeddings.patch_embeddings.projection.weight' in sd:
    layout = 'hf4' if any(k.startswith('encoder.layer.') for k in sd) else 'hf5'
    return layout, sd, lambda k: k.startswith('pooler.')
  raise vl.ConversionError(f'{where} does not match {WHAT}: neither patch_embed.proj.weight (official) nor '
                           f'embeddings.patch_embeddings.projection.weight (transformers) found; first keys: '
                           f'{sorted(sd)[:8]}')


def convert(state_dict: Mapping[str, Any], where: str = 'checkpoint', num_heads: Optional[int] = None,
            normalize: str = 'none'):
  """(params, Config) from a DINO ViT state_dict in any supported layout (see the module docstring)."""
  sd = vl.flat_state_dict(state_dict, where)
  layout, sd, ignore = detect(sd, where)
  what = f'{WHAT}, {layout} layout'
  src = {key: sources[0] for key, sources, _ in source_rows(layout, 1)}     # where the sizes are read from
  width, patch, grid, mlp, depth = vl.sizes_of(sd, src['patch_embed.proj.weight'], src['pos_embed'],
                                               src['blocks.0.mlp.fc1.weight'], DEPTH_PATTERN[layout], where, what)
  cfg = Config(image_size=grid * patch, patch_size=patch, hidden_size=width, depth=depth,
               num_heads=vl.default_heads(width, num_heads), mlp_dim=mlp, normalize=normalize)
  canonical = vl.gather(sd, source_rows(layout, depth), canonical_shapes(cfg), where, what, ignore)
  return vl.tree_from(canonical, table(depth)), cfg
