"""CLIP ViT-L/14 vision tower + projection (AVHash's frame features) in Flax Linen, and its converter.

Forward (OpenAI `VisionTransformer`, = transformers `CLIPVisionModelWithProjection`): 14x14 stride-14 patch conv
without bias -> [class_embedding ; patches] + positional_embedding -> ln_pre -> 24 pre-LN residual blocks (LayerNorm
eps 1e-5, quick GELU x * sigmoid(1.702 x), fused in_proj) -> ln_post on the CLS token -> @ proj [1024, 768].
Output: `image_embeds` [B, 768], *not* L2-normalised: AVHash feeds its input features to the model as they
are (they are added back in a residual), so the stored vector is the raw projection. The position table is
used at the stored
grid only (224x224 at full size); other input sizes raise.

`preprocess`: uint8 frames [..., 224, 224, 3] (already resized / centre-cropped) -> [0, 1] -> CLIP mean/std.

Parameter tree (mirrors the OpenAI `visual.*` state_dict; TABLE maps key by key):
  conv1/kernel [P, P, 3, W], class_embedding [W], positional_embedding [1 + N, W], ln_pre/{scale, bias}
  transformer/resblocks_{n}/{ln_1, ln_2}/{scale, bias}, transformer/resblocks_{n}/attn/{in_proj [W, 3W], out_proj}
  transformer/resblocks_{n}/mlp/{c_fc, c_proj}/{kernel, bias}, ln_post/{scale, bias}, proj [W, E]

`convert` accepts (the layout is recognised from the key names):
  * OpenAI: the full CLIP state_dict (also what the ViT-L-14.pt TorchScript archive's state_dict() gives) with the
    tower under `visual.` (the text tower: transformer.*, token_embedding, positional_embedding, ln_final,
    text_projection, logit_scale, and the archive's input_resolution / context_length / vocab_size are ignored),
    or a bare `visual` state_dict without the prefix;
  * transformers: CLIPVisionModelWithProjection or the full CLIPModel (vision_model.*, visual_projection.weight;
    text_model.*, text_projection.weight, logit_scale, vision_model.embeddings.position_ids ignored). q/k/v are
    concatenated into in_proj and visual_projection.weight is transposed into proj.
The size is read off the shapes; the head count is not in the weights: `num_heads`, default width / 64 (16 for L/14).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from backbones import vit_layers as vl

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHAT = 'a CLIP vision tower (OpenAI or transformers layout)'
BLOCK_NAMES = ('ln_1', 'attn', 'in_proj', 'out_proj', 'ln_2', 'mlp', 'c_fc', 'c_proj')


@dataclasses.dataclass(frozen=True)
class Config(vl.ImageConfig):
  image_size: int = 224
  patch_size: int = 14
  width: int = 1024
  layers: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  projection_dim: int = 768
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    vl.check_dims('width', self.width, self.num_heads, self.image_size, self.patch_size)

  @classmethod
  def tiny(cls) -> 'Config':
    return cls(image_size=28, patch_size=14, width=32, layers=2, num_heads=2, mlp_dim=128, projection_dim=16)


class Transformer(vl.ConfigModule):

  @nn.compact
  def __call__(self, x):
    c = self.config
    for n in range(c.layers):
      x = vl.Block(c.num_heads, c.mlp_dim, c.layer_norm_eps, 'quick_gelu', BLOCK_NAMES, self.dtype, self.precision,
                   self.fast_layout, name=f'resblocks_{n}')(x)
    return x


class Model(vl.ConfigModule):
  """x: preprocessed frames [B, H, W, 3] float (H = W = image_size) -> image_embeds [B, E] float32 (unnormalised)."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    vl.check_grid(x.shape[1], x.shape[2], c.patch_size, c.image_size, 'clip_vitl14')
    init = nn.initializers.normal(c.width ** -0.5)
    cls = self.param('class_embedding', init, (c.width,), jnp.float32)
    pos = self.param('positional_embedding', init, (1 + c.grid ** 2, c.width), jnp.float32)
    t = vl.PatchProjection(c.width, c.patch_size, False, self.dtype, self.precision, self.fast_layout,
                           name='conv1')(x.astype(self.dtype))
    t = vl.with_class_token(t, cls, pos, self.dtype)
    t = vl.layer_norm(c.layer_norm_eps, 'ln_pre', self.dtype)(t)
    t = Transformer(c, self.dtype, self.precision, self.fast_layout, name='transformer')(t)
    h = vl.layer_norm(c.layer_norm_eps, 'ln_post', self.dtype)(t[:, 0])
    proj = self.param('proj', init, (c.width, c.projection_dim), jnp.float32)
    return jnp.matmul(h, proj.astype(self.dtype), precision=self.precision).astype(jnp.float32)


def preprocess(x, config: Config):
  """uint8 (or float in [0, 255]) frames [..., H, W, 3] -> float32, /255, CLIP mean/std."""
  del config
  x = jnp.asarray(x).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def init_params(config: Config, seed: int = 0):
  return vl.init_image_params(Model(config), config.image_size, seed)


def flops_per_image(config: Config) -> int:
  """Analytical FLOPs (2 x multiply-adds) of one image: patch conv + blocks + projection (L/14 at 224: ~162 GFLOPs)."""
  n, w = config.grid ** 2, config.width
  return (2 * n * w * 3 * config.patch_size ** 2 + vl.encoder_flops(1 + n, w, config.mlp_dim, config.layers)
          + 2 * w * config.projection_dim)


# ------------------------------------------------------------------------------------------------- conversion

LN, LINEAR = vl.LN_ROWS, vl.LINEAR_ROWS
RB = 'transformer.resblocks.{n}.'
# OpenAI key (without `visual.`) -> (Flax path, transform); '{n}' = block index.
TABLE = (
    ('conv1.weight', ('conv1', 'kernel'), 'conv'),
    ('class_embedding', ('class_embedding',), None),
    ('positional_embedding', ('positional_embedding',), None),
    *((f'ln_pre.{w}', ('ln_pre', f), t) for w, f, t in LN),
    *((f'{RB}{m}.{w}', ('transformer', 'resblocks_{n}', m, f), t) for m in ('ln_1', 'ln_2') for w, f, t in LN),
    (RB + 'attn.in_proj_weight', ('transformer', 'resblocks_{n}', 'attn', 'in_proj', 'kernel'), 'T'),
    (RB + 'attn.in_proj_bias', ('transformer', 'resblocks_{n}', 'attn', 'in_proj', 'bias'), None),
    *((f'{RB}{m}.{w}', ('transformer', 'resblocks_{n}', *m.split('.'), f), t)
      for m in ('attn.out_proj', 'mlp.c_fc', 'mlp.c_proj') for w, f, t in LINEAR),
    *((f'ln_post.{w}', ('ln_post', f), t) for w, f, t in LN),
    ('proj', ('proj',), None),
)
# OpenAI key -> transformers key (several = concatenated on axis 0; 'T' = transposed), '{n}' = block index.
HF = 'vision_model.'
HF_NAMES = {
    'conv1.weight': ((HF + 'embeddings.patch_embedding.weight',), None),
    'class_embedding': ((HF + 'embeddings.class_embedding',), None),
    'positional_embedding': ((HF + 'embeddings.position_embedding.weight',), None),
    **{f'ln_pre.{w}': ((f'{HF}pre_layrnorm.{w}',), None) for w in ('weight', 'bias')},
    **{f'ln_post.{w}': ((f'{HF}post_layernorm.{w}',), None) for w in ('weight', 'bias')},
    **{f'{RB}{a}.{w}': ((f'{HF}encoder.layers.{{n}}.{b}.{w}',), None) for w in ('weight', 'bias')
       for a, b in (('ln_1', 'layer_norm1'), ('ln_2', 'layer_norm2'), ('attn.out_proj', 'self_attn.out_proj'),
                    ('mlp.c_fc', 'mlp.fc1'), ('mlp.c_proj', 'mlp.fc2'))},
    **{f'{RB}attn.in_proj_{w}': (tuple(f'{HF}encoder.layers.{{n}}.self_attn.{x}_proj.{w}' for x in 'qkv'), 'cat')
       for w in ('weight', 'bias')},
    'proj': (('visual_projection.weight',), 'T'),
}
OPENAI_TEXT = re.compile(r'^(transformer\.|token_embedding\.|positional_embedding$|ln_final\.|text_projection$|'
                         r'logit_scale$|input_resolution$|context_length$|vocab_size$)')
HF_IGNORED = re.compile(r'^(text_model\.|text_projection\.|logit_scale$|vision_model\.embeddings\.position_ids$)')


def table(layers: int):
  """TABLE with the block index filled in."""
  return vl.fill_table(TABLE, layers)


def canonical_shapes(c: Config) -> dict:
  w, m = c.width, c.mlp_dim
  shapes = {'conv1.weight': (w, 3, c.patch_size, c.patch_size), 'class_embedding': (w,),
            'positional_embedding': (1 + c.grid ** 2, w), 'proj': (w, c.projection_dim)}
  for key, _, _ in table(c.layers):
    if key in shapes:
      continue
    if key.endswith('in_proj_weight'):
      shapes[key] = (3 * w, w)
    elif key.endswith('in_proj_bias'):
      shapes[key] = (3 * w,)
    elif 'c_fc' in key:
      shapes[key] = (m, w) if key.endswith('weight') else (m,)
    elif 'c_proj' in key:
      shapes[key] = (w, m) if key.endswith('weight') else (w,)
    elif key.endswith('out_proj.weight'):
      shapes[key] = (w, w)
    else:
      shapes[key] = (w,)
  return shapes


def source_rows(layout: str, layers: int):
  """(OpenAI key, source keys, how) for 'openai' (prefix 'visual.' or '') or 'hf'."""
  rows = []
  for key, _, _ in table(layers):
    if layout == 'hf':
      generic = re.sub(r'resblocks\.\d+\.', 'resblocks.{n}.', key)
      n = re.search(r'resblocks\.(\d+)\.', key)
      sources, how = HF_NAMES[generic]
      rows.append((key, tuple(s.format(n=n.group(1) if n else None) for s in sources), how))
    else:
      rows.append((key, (layout + key,), None))
  return rows


def detect(sd: Mapping[str, np.ndarray], where: str):
  """(layout, ignore predicate, depth pattern); layout 'visual.' / '' (OpenAI, with / without prefix) or 'hf'."""
  if 'visual.conv1.weight' in sd:
    return 'visual.', lambda k: bool(OPENAI_TEXT.match(k)), r'visual\.transformer\.resblocks\.(\d+)\.'
  if 'conv1.weight' in sd:
    return '', None, r'transformer\.resblocks\.(\d+)\.'
  if HF + 'embeddings.patch_embedding.weight' in sd:
    return 'hf', lambda k: bool(HF_IGNORED.match(k)), r'vision_model\.encoder\.layers\.(\d+)\.'
  raise vl.ConversionError(f'{where} does not match {WHAT}: neither visual.conv1.weight (OpenAI) nor '
                           f'vision_model.embeddings.patch_embedding.weight (transformers) found; first keys: '
                           f'{sorted(sd)[:8]}')


def convert(state_dict: Mapping[str, Any], where: str = 'checkpoint', num_heads: Optional[int] = None):
  """(params, Config) from a CLIP state_dict in either layout (see the module docstring)."""
  sd = vl.flat_state_dict(state_dict, where)
  layout, ignore, depth_pattern = detect(sd, where)
  what = f'{WHAT}, {"transformers" if layout == "hf" else "OpenAI"} layout'
  src = {key: sources[0] for key, sources, _ in source_rows(layout, 1)}     # where the sizes are read from
  vl.need(sd, [src['proj']], where, what)
  width, patch, grid, mlp, layers = vl.sizes_of(sd, src['conv1.weight'], src['positional_embedding'],
                                                src[RB.format(n=0) + 'mlp.c_fc.weight'], depth_pattern, where, what)
  proj = np.shape(sd[src['proj']])
  proj_dim = int(proj[0] if layout == 'hf' else proj[-1])
  cfg = Config(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
               num_heads=vl.default_heads(width, num_heads), mlp_dim=mlp, projection_dim=proj_dim)
  canonical = vl.gather(sd, source_rows(layout, layers), canonical_shapes(cfg), where, what, ignore)
  return vl.tree_from(canonical, table(layers)), cfg
