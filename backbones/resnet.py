"""ResNet-50 L3-iRMAC frame descriptor (+ ViSiL PCA whitening) in Flax, converted from torchvision weights.

The frozen HAP-VR / S2VS / DnS / ViSiL frame feature: torchvision ResNet-50 (v1.5: stride on
the 3x3 conv; eval-mode BatchNorm, eps 1e-5; fc and avgpool unused) with each of the four stage outputs max-pooled
over a 3x3 grid of overlapping windows (kernel s = 28, 14, 6, 3, stride ceil(s/2), no padding: exactly 3x3 at
224x224 input), L2-normalised per region, concatenated over stages (256+512+1024+2048 = 3840 channels), flattened
row-major to 9 regions and L2-normalised again. Optional PCA whitening from ViSiL's `pca_resnet50_vcdb_1M.pth`
(mean, d, V): the `pca_dims` largest eigenvalues, projection P = V[:, idx] / sqrt(d[idx] + 1e-7), then
y = L2((x - mean) @ P). L2 normalisation is x / max(|x|, 1e-12), as torch's F.normalize.

Parameters: ONE params tree (no batch_stats collection; the backbone is frozen), names as torchvision's with '.'
as nesting: conv1/kernel, bn1/{scale, bias, mean, var}, layer1/0/{conv1..3, bn1..3, downsample/0, downsample/1},
..., plus pca/{mean, projection} when `pca_dims` > 0. `convert` maps a torchvision state_dict through TABLE.
`Model(config)(x)` returns float32 [N, 9, pca_dims] ([N, 9, 15 * 4 * width] when pca_dims = 0);
`return_stages=True` also returns the four stage outputs (NHWC). Convolutions run in `dtype` (bf16 option); the
pooling, normalisation and PCA run in float32, the PCA matmul at HIGHEST precision.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from common_jax.config_util import JsonConfig
from common_jax.convert_util import ConversionError, check_keys, layout, load_torch, put, to_numpy

REGION_KERNELS = (28, 14, 6, 3)   # max-pool kernel per stage (layer1..4); stride ceil(s / 2)
GRID = 3                          # regions per side: 9 regions per frame
PCA_EPS = 1e-7
BN_EPS = 1e-5
L2_EPS = 1e-12
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _out(size: int, k: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - k) // stride + 1


def stage_sizes(image_size: int) -> tuple:
  """Spatial side of layer1..4's outputs (stem: 7x7/2 conv pad 3, 3x3/2 max-pool pad 1; layer2-4 stride 2)."""
  s = _out(_out(image_size, 7, 2, 3), 3, 2, 1)
  sizes = [s]
  for _ in range(3):
    sizes.append(_out(sizes[-1], 3, 2, 1))
  return tuple(sizes)


def region_grid(side: int, kernel: int) -> int:
  return _out(side, kernel, -(-kernel // 2), 0) if side >= kernel else 0


@dataclasses.dataclass(frozen=True)
class Config(JsonConfig):
  layers: tuple = (3, 4, 6, 3)   # bottleneck blocks per stage
  width: int = 64                # stem channels = layer1's bottleneck width (stage i: width * 2**i, output x4)
  pca_dims: int = 512            # PCA output dims; 0 = no PCA (output the L2-normalised iRMAC)
  image_size: int = 224          # square input side; must give 3x3 region grids with REGION_KERNELS

  def __post_init__(self):
    object.__setattr__(self, 'layers', tuple(int(n) for n in self.layers))   # JSON lists -> hashable tuple
    if len(self.layers) != 4 or min(self.layers) < 1 or self.width < 1:
      raise ValueError(f'layers must be 4 positive block counts and width positive, got {self.layers}, {self.width}')
    if not 0 <= self.pca_dims <= self.irmac_dims:
      raise ValueError(f'pca_dims={self.pca_dims} must be in [0, {self.irmac_dims}] (the iRMAC dims)')
    grids = [region_grid(s, k) for s, k in zip(stage_sizes(self.image_size), REGION_KERNELS)]
    if grids != [GRID] * 4:
      raise ValueError(f'image_size={self.image_size} gives region grids {grids} with kernels {REGION_KERNELS}; '
                       f'L3-iRMAC needs {GRID}x{GRID} at every stage (use 224)')

  @property
  def stage_channels(self) -> tuple:
    return tuple(4 * self.width * 2 ** i for i in range(4))

  @property
  def irmac_dims(self) -> int:
    return sum(self.stage_channels)

  @property
  def out_dims(self) -> int:
    return self.pca_dims or self.irmac_dims

  @classmethod
  def full(cls) -> 'Config':
    return cls()

  @classmethod
  def tiny(cls) -> 'Config':
    return cls(layers=(1, 1, 1, 1), width=8, pca_dims=32)


# ------------------------------------------------------------------------------------------------ the network
def l2_normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), L2_EPS)


class FrozenBatchNorm(nn.Module):
  """Eval-mode BatchNorm2d; running statistics are ordinary parameters (mean, var)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    mean = self.param('mean', nn.initializers.zeros, (c,))
    var = self.param('var', nn.initializers.ones, (c,))
    mul = scale * jax.lax.rsqrt(var + BN_EPS)
    return x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)


HE_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class PointwiseConv(nn.Module):
  """A 1x1 torch Conv2d(bias=False) written as a matmul over channels (a strided one subsamples first), with
  nn.Conv's parameter ('kernel' [1, 1, in, out]): XLA:CPU runs the dot faster than a 1x1 convolution."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', HE_INIT, (1, 1, x.shape[-1], self.features), jnp.float32)
    x = x[:, ::self.stride, ::self.stride] if self.stride > 1 else x
    return jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))


def _conv(features: int, k: int, stride: int, pad: int, name: str, dtype, pointwise_as_dot: bool = False):
  """torch Conv2d(bias=False) with explicit symmetric padding (Flax 'SAME' pads stride-2 convs asymmetrically);
  1x1 ones as `PointwiseConv` when `pointwise_as_dot`."""
  if k == 1 and pad == 0 and pointwise_as_dot:
    return PointwiseConv(features, stride, dtype, name=name)
  return nn.Conv(features, (k, k), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                 dtype=dtype, param_dtype=jnp.float32, name=name, kernel_init=HE_INIT)


class Downsample(nn.Module):
  """torchvision's `downsample` Sequential: 0 = 1x1 conv (stride), 1 = BatchNorm."""
  features: int
  stride: int
  dtype: Any = jnp.float32
  pointwise_as_dot: bool = True

  @nn.compact
  def __call__(self, x):
    conv = _conv(self.features, 1, self.stride, 0, '0', self.dtype, self.pointwise_as_dot)
    return FrozenBatchNorm(self.dtype, name='1')(conv(x))


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  pointwise_as_dot: bool = True

  @nn.compact
  def __call__(self, x):
    p, dt, pw = self.planes, self.dtype, self.pointwise_as_dot
    y = nn.relu(FrozenBatchNorm(dt, name='bn1')(_conv(p, 1, 1, 0, 'conv1', dt, pw)(x)))
    y = nn.relu(FrozenBatchNorm(dt, name='bn2')(_conv(p, 3, self.stride, 1, 'conv2', dt)(y)))
    y = FrozenBatchNorm(dt, name='bn3')(_conv(4 * p, 1, 1, 0, 'conv3', dt, pw)(y))
    if self.downsample:
      x = Downsample(4 * p, self.stride, dt, pw, name='downsample')(x)
    return nn.relu(y + x)


class Stage(nn.Module):
  """torchvision's layerN Sequential: blocks named '0', '1', ...; the first one downsamples."""
  planes: int
  blocks: int
  stride: int
  dtype: Any = jnp.float32
  pointwise_as_dot: bool = True

  @nn.compact
  def __call__(self, x):
    for b in range(self.blocks):
      x = Bottleneck(self.planes, self.stride if b == 0 else 1, b == 0, self.dtype, self.pointwise_as_dot,
                     name=str(b))(x)
    return x


def irmac(stages, kernels=REGION_KERNELS):
  """L3-iRMAC: NHWC stage maps -> float32 [N, 9, sum of channels], unit-norm per region."""
  regions = []
  for i, (x, s) in enumerate(zip(stages, kernels)):
    stride = -(-s // 2)
    r = nn.max_pool(x.astype(jnp.float32), (s, s), (stride, stride), padding='VALID')
    if r.shape[1:3] != (GRID, GRID):
      raise ValueError(f'layer{i + 1} output {x.shape[1]}x{x.shape[2]} pooled with kernel {s} stride {stride} '
                       f'gives a {r.shape[1]}x{r.shape[2]} grid, not {GRID}x{GRID}; feed 224x224 frames')
    regions.append(l2_normalize(r))
  x = jnp.concatenate(regions, axis=-1)
  return l2_normalize(x.reshape(x.shape[0], GRID * GRID, x.shape[-1]))


class PCA(nn.Module):
  dims: int

  @nn.compact
  def __call__(self, x):
    mean = self.param('mean', nn.initializers.zeros, (x.shape[-1],))
    projection = self.param('projection', nn.initializers.lecun_normal(), (x.shape[-1], self.dims))
    return l2_normalize(jnp.matmul(x - mean, projection, precision=jax.lax.Precision.HIGHEST))


class Model(nn.Module):
  """`pointwise_as_dot`: the 1x1 convolutions as matmuls (the same numbers to float32 rounding; False: as
  convolutions, the former formulation, kept for the benchmarks' before/after)."""
  config: Config
  dtype: Any = jnp.float32
  pointwise_as_dot: bool = True

  @nn.compact
  def __call__(self, x, return_stages: bool = False):
    """x: `preprocess` output [N, S, S, 3] -> [N, 9, out_dims] (and the 4 NHWC stage maps if return_stages)."""
    cfg, dt = self.config, self.dtype
    if x.ndim != 4 or x.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f'expected [N, {cfg.image_size}, {cfg.image_size}, 3] input, got {list(x.shape)}')
    x = nn.relu(FrozenBatchNorm(dt, name='bn1')(_conv(cfg.width, 7, 2, 3, 'conv1', dt)(x.astype(dt))))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))   # pads with -inf, as torch
    stages = []
    for i, blocks in enumerate(cfg.layers):
      x = Stage(cfg.width * 2 ** i, blocks, 1 if i == 0 else 2, dt, self.pointwise_as_dot, name=f'layer{i + 1}')(x)
      stages.append(x)
    out = irmac(stages)
    if cfg.pca_dims:
      out = PCA(cfg.pca_dims, name='pca')(out)
    return (out, stages) if return_stages else out


def preprocess(x, config: Config):
  """Raw pixels [N, S, S, 3] in [0, 255] (uint8, or float) -> float32 (x / 255 - ImageNet mean) / std."""
  x = jnp.asarray(x)
  if x.shape[-3:] != (config.image_size, config.image_size, 3):
    raise ValueError(f'expected [..., {config.image_size}, {config.image_size}, 3] frames, got {list(x.shape)}')
  return (x.astype(jnp.float32) / 255.0 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def init_params(config: Config, seed: int = 0) -> dict:
  """Random float32 NumPy parameters for tests and benches: He-normal (fan_out) conv kernels, identity
  BatchNorm, zero PCA mean, normal / sqrt(D) projection. Drawn with NumPy on the shapes of Model.init
  (jax.eval_shape): compiling jax.random costs seconds per parameter shape on CPU."""
  x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(Model(config).init, jax.random.PRNGKey(0), x)['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':   # HWIO
      return (rng.normal(size=shape) * np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))).astype(np.float32)
    if name == 'projection':
      return (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
    return (np.ones if name in ('scale', 'var') else np.zeros)(shape, np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def flops_per_frame(config: Config) -> float:
  """Analytical FLOPs (2 x multiply-adds) of the convolutions and the PCA for one frame; BN, ReLU and pooling
  (a few % more) are not counted. Full config: ~8.2e9."""
  total, side, c_in = 0, _out(config.image_size, 7, 2, 3), 3
  total += side * side * 49 * 3 * config.width
  side, c_in = _out(side, 3, 2, 1), config.width
  for i, blocks in enumerate(config.layers):
    p = config.width * 2 ** i
    for b in range(blocks):
      stride = 2 if (i and not b) else 1
      out = _out(side, 3, stride, 1)
      total += side * side * c_in * p + out * out * (9 * p * p + p * 4 * p)
      if b == 0:
        total += out * out * c_in * 4 * p
      side, c_in = out, 4 * p
  total += GRID * GRID * config.irmac_dims * config.pca_dims
  return 2.0 * total


# ------------------------------------------------------------------------------------------------ conversion
BN_LEAVES = (('weight', 'scale'), ('bias', 'bias'), ('running_mean', 'mean'), ('running_var', 'var'))
IGNORED = re.compile(r'^fc\.(weight|bias)$|\.num_batches_tracked$|^num_batches_tracked$')


def _conv_row(key, path, shape):
  return [(f'{key}.weight', (*path, 'kernel'), 'conv', shape)]


def _bn_rows(key, path, c):
  return [(f'{key}.{t}', (*path, f), None, (c,)) for t, f in BN_LEAVES]


def table(cfg: Config):
  """Rows (torchvision key, Flax path, transform, torch shape) for this architecture: 'conv' = OIHW -> HWIO."""
  w = cfg.width
  rows = _conv_row('conv1', ('conv1',), (w, 3, 7, 7)) + _bn_rows('bn1', ('bn1',), w)
  c_in = w
  for i, blocks in enumerate(cfg.layers):
    p = w * 2 ** i
    for b in range(blocks):
      key, path = f'layer{i + 1}.{b}', (f'layer{i + 1}', str(b))
      for n, (ci, co, k) in enumerate(((c_in, p, 1), (p, p, 3), (p, 4 * p, 1)), 1):
        rows += _conv_row(f'{key}.conv{n}', (*path, f'conv{n}'), (co, ci, k, k))
        rows += _bn_rows(f'{key}.bn{n}', (*path, f'bn{n}'), co)
      if b == 0:
        rows += _conv_row(f'{key}.downsample.0', (*path, 'downsample', '0'), (4 * p, c_in, 1, 1))
        rows += _bn_rows(f'{key}.downsample.1', (*path, 'downsample', '1'), 4 * p)
      c_in = 4 * p
  return rows


def infer_config(sd: Mapping[str, np.ndarray], pca_dims: int, where: str = 'checkpoint') -> Config:
  """width from conv1.weight, block counts from the layerN.B keys (defaults where absent, so that the key
  check names what is missing)."""
  d = Config()
  width = int(sd['conv1.weight'].shape[0]) if 'conv1.weight' in sd and sd['conv1.weight'].ndim == 4 else d.width
  layers = []
  for i in range(4):
    blocks = {int(m.group(1)) for k in sd for m in [re.match(rf'layer{i + 1}\.(\d+)\.', k)] if m}
    layers.append(max(blocks) + 1 if blocks else d.layers[i])
  try:
    return Config(layers=tuple(layers), width=width, pca_dims=pca_dims)
  except ValueError as e:
    raise ConversionError(f'{where}: unsupported architecture: {e}') from e


class PCAFile(dict):
  """mean / d / V as float64 arrays, remembering the file they came from (for error messages)."""
  where = 'PCA'


def load_pca(path: str) -> PCAFile:
  """ViSiL's PCA file: a torch.save dict (pca_resnet50_vcdb_1M.pth) or an .npz, with mean [D], d [D], V [D, D]."""
  obj = load_torch(path, 'PCA file')
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path}: holds a {type(obj).__name__}, expected a dict with mean, d, V')
  pca = PCAFile(check_pca(obj, where=path))
  pca.where = path
  return pca


def check_pca(pca: Mapping[str, Any], dims: Optional[int] = None, where: str = 'PCA') -> dict:
  """float64 mean/d/V after checking keys and shapes (D = dims, or mean's length); extra keys are ignored."""
  arrays = to_numpy({k: v for k, v in pca.items() if k in ('mean', 'd', 'V') and hasattr(v, 'shape')})
  if dims is None:
    dims = arrays['mean'].shape[0] if 'mean' in arrays and arrays['mean'].ndim == 1 else None
  shapes = {'mean': (dims,), 'd': (dims,), 'V': (dims, dims)}
  check_keys(arrays, shapes, where, f'a PCA file of {dims or "D"}-d vectors (mean [D], d [D], V [D, D])')
  out = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
  bad = [k for k, v in out.items() if not np.all(np.isfinite(v))]
  if bad:
    raise ConversionError(f'{where}: non-finite values in {", ".join(bad)}')
  return out


def pca_params(pca: Mapping[str, Any], cfg: Config, where: str = 'PCA') -> dict:
  """{'mean', 'projection'} (float32): the cfg.pca_dims largest eigenvalues, P = V[:, idx] / sqrt(d[idx] + 1e-7)."""
  p = check_pca(pca, cfg.irmac_dims, where)
  idx = np.argsort(p['d'])[::-1][:cfg.pca_dims]   # descending, as ViSiL's PCALayer
  if np.any(p['d'][idx] + PCA_EPS <= 0):
    raise ConversionError(f'{where}: the {cfg.pca_dims} largest eigenvalues include non-positive ones '
                          f'(min {p["d"][idx].min():.3g}); not a PCA of the iRMAC vectors?')
  projection = p['V'][:, idx] / np.sqrt(p['d'][idx] + PCA_EPS)
  return {'mean': p['mean'].astype(np.float32), 'projection': projection.astype(np.float32)}


def convert(state_dict: Mapping[str, Any], where: str = 'checkpoint', pca: Any = None,
            pca_dims: Optional[int] = None):
  """(params, Config) from a torchvision ResNet state_dict (fc.* and num_batches_tracked ignored) and, optionally,
  a PCA mapping {mean, d, V} (e.g. `load_pca(path)`, or a path). pca_dims defaults to 512 (at most the iRMAC
  dims, for narrow test models); without pca the Config has pca_dims = 0."""
  if isinstance(pca, str):
    pca = load_pca(pca)
  sd = {k: v for k, v in to_numpy(state_dict).items() if not IGNORED.search(k)}
  cfg = infer_config(sd, 0, where)
  if pca is not None:
    cfg = infer_config(sd, min(Config.pca_dims, cfg.irmac_dims) if pca_dims is None else pca_dims, where)
  rows = table(cfg)
  check_keys(sd, {key: shape for key, _, _, shape in rows}, where,
             f'a torchvision ResNet (layers={list(cfg.layers)}, width={cfg.width})')
  params = {}
  for key, path, transform, _ in rows:
    put(params, path, layout(sd[key], transform))
  if pca is not None:
    params['pca'] = pca_params(pca, cfg, getattr(pca, 'where', 'PCA'))
  return params, cfg
