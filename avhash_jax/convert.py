r"""AVHash checkpoints for the Flax model: convert the original's, or initialise from bert-base-uncased.

  python -m avhash_jax.convert --torch_checkpoint=CKPT/1_64.pth --cls_token=cls.pt --output=ckpt/avhash64
  python -m avhash_jax.convert --bert_checkpoint=bert-base-uncased/model.safetensors --bits=64 --output=init64

Conversion: the original train.py saves {'berthash': state_dict, 'optimizer': ..., 'epoch': ...}; the
state_dict is mapped through TABLE (torch key -> Flax path, Linear weights transposed to kernels), the code
length is read off `hash.linear1.weight`, the encoder sizes off the embedding/FFN shapes (the head count is
not in the weights: --num_heads, default hidden/64). The unused `*.word_embeddings.weight` and
`Audio_project.*` must be present but are dropped; `*.embeddings.position_ids` (older transformers) is
ignored. Missing, unexpected and mis-shaped keys are listed together in one error.

BERT initialisation (the original loads encoder weights that it does not ship; bert-base-uncased is the
likely source): AE, IE and VE each get bert-base-uncased's
embeddings (position, token type, LayerNorm), layer 0 and pooler; a `bert.` prefix and the legacy
LayerNorm names gamma/beta are accepted; later layers and the MLM head are ignored. The other layers get
PyTorch's default Linear init (seeded by --seed).

The CLS vector (cls.pt, a float64 [hidden] tensor outside the state_dict) is stored as the parameter
`cls_token` (float32) that the model reads through stop_gradient (see avhash_jax.model), so the output
directory is self-contained. In BERT mode it defaults to the [CLS] word-embedding row (token id 101),
which is what cls.pt holds (to ~5 digits); --cls_token overrides it.

Output: common_jax.checkpoint.save_params (Orbax params + model_config.json). An existing non-empty
--output is refused. Files are read with torch.load(weights_only=True) or safetensors. Bad input ends with
one `error: ...` line and exit code 2 (common_jax.cli.clear_errors).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np
from absl import flags

from common_jax import cli
from common_jax.convert_util import ConversionError, check_keys, check_new_output, load_torch, put as _put, to_numpy as _numpy
from common_jax.convert_util import layout as _layout
from avhash_jax.model import ModelConfig, init_params

ENCODERS = ('AE', 'IE', 'VE')
# BertModel key (relative to `<E>.encoder.`) -> (Flax path relative to `<E>/encoder`, transform).
# '{n}' is the layer index; 'T' = Linear weight [out, in] -> kernel [in, out].
BERT_TABLE = (
    ('embeddings.position_embeddings.weight', ('embeddings', 'position_embeddings'), None),
    ('embeddings.token_type_embeddings.weight', ('embeddings', 'token_type_embeddings'), None),
    ('embeddings.LayerNorm.weight', ('embeddings', 'LayerNorm', 'scale'), None),
    ('embeddings.LayerNorm.bias', ('embeddings', 'LayerNorm', 'bias'), None),
    *((f'encoder.layer.{{n}}.attention.self.{m}.{w}', ('encoder', 'layer_{n}', 'attention', 'self', m, f), t)
      for m in ('query', 'key', 'value') for w, f, t in (('weight', 'kernel', 'T'), ('bias', 'bias', None))),
    *((f'encoder.layer.{{n}}.{block}.dense.{w}', ('encoder', 'layer_{n}', *block.split('.'), 'dense', f), t)
      for block in ('attention.output', 'intermediate', 'output')
      for w, f, t in (('weight', 'kernel', 'T'), ('bias', 'bias', None))),
    *((f'encoder.layer.{{n}}.{block}.LayerNorm.{w}', ('encoder', 'layer_{n}', *block.split('.'), 'LayerNorm', f), None)
      for block in ('attention.output', 'output') for w, f in (('weight', 'scale'), ('bias', 'bias'))),
    ('pooler.dense.weight', ('pooler', 'dense', 'kernel'), 'T'),
    ('pooler.dense.bias', ('pooler', 'dense', 'bias'), None),
)
TOP_TABLE = (
    *((f'{ca}.linear_{x}.weight', (ca, f'linear_{x}', 'kernel'), 'T') for ca in ('AqI', 'IqA')
      for x in ('q', 'k', 'v', 'output')),
    *((f'{ca}.linear_output.bias', (ca, 'linear_output', 'bias'), None) for ca in ('AqI', 'IqA')),
    *((f'{g}.{w}', (g, f), t) for g in ('A_W', 'I_W', 'AI_W')
      for w, f, t in (('weight', 'kernel', 'T'), ('bias', 'bias', None))),
    ('hash.linear1.weight', ('hash', 'linear1', 'kernel'), 'T'),
    ('hash.linear1.bias', ('hash', 'linear1', 'bias'), None),
)
# Present in every original checkpoint, unused by the model: required, checked, dropped.
DROPPED = tuple(f'{e}.encoder.embeddings.word_embeddings.weight' for e in ENCODERS) + (
    'Audio_project.weight', 'Audio_project.bias')
IGNORED = re.compile(r'^(AE|IE|VE)\.encoder\.embeddings\.position_ids$')
CLS_TOKEN_ID = 101


def bert_table(num_layers: int):
  """(BertModel key, path, transform) rows with the layer index filled in."""
  rows = []
  for key, path, t in BERT_TABLE:
    for n in (range(num_layers) if '{n}' in key else (None,)):
      rows.append((key.format(n=n), tuple(p.format(n=n) for p in path), t))
  return rows


def table(cfg: ModelConfig):
  """The full TABLE: original key -> (Flax path, transform), for this architecture."""
  rows = [(f'{e}.encoder.{k}', (e, 'encoder', *p), t) for e in ENCODERS for k, p, t in bert_table(cfg.num_hidden_layers)]
  return rows + list(TOP_TABLE)


def bert_shapes(cfg: ModelConfig) -> dict:
  h, i = cfg.hidden_size, cfg.intermediate_size
  shapes = {'embeddings.position_embeddings.weight': (cfg.max_position_embeddings, h),
            'embeddings.token_type_embeddings.weight': (cfg.type_vocab_size, h),
            'pooler.dense.weight': (h, h)}
  for key, _, _ in bert_table(cfg.num_hidden_layers):
    if key in shapes:
      continue
    if key.endswith('intermediate.dense.weight'):
      shapes[key] = (i, h)
    elif key.endswith('intermediate.dense.bias'):
      shapes[key] = (i,)
    elif re.search(r'layer\.\d+\.output\.dense\.weight$', key):
      shapes[key] = (h, i)
    else:
      shapes[key] = (h, h) if key.endswith('.weight') and 'LayerNorm' not in key else (h,)
  return shapes


def expected_shapes(cfg: ModelConfig) -> dict:
  """Original key -> shape (None = any size on that axis), dropped keys included."""
  h = cfg.hidden_size
  shapes = {f'{e}.encoder.{k}': s for e in ENCODERS for k, s in bert_shapes(cfg).items()}
  for ca in ('AqI', 'IqA'):
    shapes.update({f'{ca}.linear_{x}.weight': (h, h) for x in ('q', 'k', 'v', 'output')})
    shapes[f'{ca}.linear_output.bias'] = (h,)
  for g in ('A_W', 'I_W', 'AI_W'):
    shapes.update({f'{g}.weight': (2, 2 * h), f'{g}.bias': (2,)})
  shapes.update({'hash.linear1.weight': (cfg.bits, h), 'hash.linear1.bias': (cfg.bits,),
                 'Audio_project.weight': (h, h), 'Audio_project.bias': (h,)})
  shapes.update({k: (None, h) for k in DROPPED if 'word_embeddings' in k})
  return shapes


def _heads(hidden: int, num_heads: Optional[int], where: str) -> int:
  if num_heads:
    return num_heads
  if hidden % 64:
    raise ConversionError(f'{where}: hidden size {hidden} is not a multiple of 64; give --num_heads')
  return hidden // 64


def infer_config(sd: Mapping[str, np.ndarray], num_heads: Optional[int] = None, where: str = 'checkpoint'):
  """The architecture read off the AE encoder's and the hash layer's shapes (defaults where keys are absent,
  so that the key check reports them)."""
  d = ModelConfig()
  get = lambda k, axis, default: int(sd[k].shape[axis]) if k in sd and sd[k].ndim > axis else default
  pre = 'AE.encoder.'
  hidden = get(pre + 'embeddings.position_embeddings.weight', 1, d.hidden_size)
  layers = {int(m.group(1)) for k in sd for m in [re.match(r'AE\.encoder\.encoder\.layer\.(\d+)\.', k)] if m}
  bits = get('hash.linear1.weight', 0, d.bits)
  try:
    return ModelConfig(
        hidden_size=hidden, num_attention_heads=_heads(hidden, num_heads, where),
        intermediate_size=get(pre + 'encoder.layer.0.intermediate.dense.weight', 0, d.intermediate_size),
        num_hidden_layers=max(layers) + 1 if layers else 1,
        max_position_embeddings=get(pre + 'embeddings.position_embeddings.weight', 0, d.max_position_embeddings),
        type_vocab_size=get(pre + 'embeddings.token_type_embeddings.weight', 0, d.type_vocab_size), bits=bits)
  except ConversionError:
    raise
  except ValueError as e:
    raise ConversionError(f'{where}: unsupported architecture: {e}') from e


def check_cls(cls_token: np.ndarray, hidden: int, where: str) -> np.ndarray:
  cls_token = np.asarray(cls_token)
  if cls_token.shape != (hidden,):
    raise ConversionError(f'{where}: CLS vector of shape {list(cls_token.shape)}, expected [{hidden}]')
  return cls_token.astype(np.float32)


def convert_state_dict(state_dict: Mapping[str, Any], cls_token, num_heads: Optional[int] = None,
                       where: str = 'checkpoint', cls_where: str = 'cls_token'):
  """(Flax params, ModelConfig) from an original `berthash` state_dict and the cls.pt vector."""
  sd = {k: v for k, v in _numpy(state_dict).items() if not IGNORED.match(k)}
  cfg = infer_config(sd, num_heads, where)
  check_keys(sd, expected_shapes(cfg), where,
             f'the AVHash network (hidden={cfg.hidden_size}, layers={cfg.num_hidden_layers}, bits={cfg.bits})')
  params = {'cls_token': check_cls(cls_token, cfg.hidden_size, cls_where)}
  for key, path, transform in table(cfg):
    _put(params, path, _layout(sd[key], transform))
  return params, cfg


def normalise_bert_keys(state_dict: Mapping[str, Any]) -> dict:
  """Strips `bert.`, renames legacy LayerNorm gamma/beta to weight/bias."""
  out = {}
  for key, value in _numpy(state_dict).items():
    key = key[len('bert.'):] if key.startswith('bert.') else key
    key = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', key))
    out[key] = value
  return out


def from_bert(bert_state_dict: Mapping[str, Any], bits: int = 64, cls_token=None, num_heads: Optional[int] = None,
              seed: int = 0, where: str = 'bert checkpoint', cls_where: str = 'cls_token'):
  """(params, ModelConfig): AE/IE/VE from BERT's embeddings + layer 0 + pooler, the rest freshly initialised."""
  sd = normalise_bert_keys(bert_state_dict)
  d = ModelConfig()
  get = lambda k, axis, default: int(sd[k].shape[axis]) if k in sd and sd[k].ndim > axis else default
  hidden = get('embeddings.position_embeddings.weight', 1, d.hidden_size)
  try:
    cfg = ModelConfig(hidden_size=hidden, num_attention_heads=_heads(hidden, num_heads, where),
                      intermediate_size=get('encoder.layer.0.intermediate.dense.weight', 0, d.intermediate_size),
                      max_position_embeddings=get('embeddings.position_embeddings.weight', 0,
                                                  d.max_position_embeddings),
                      type_vocab_size=get('embeddings.token_type_embeddings.weight', 0, d.type_vocab_size),
                      bits=bits)
  except ValueError as e:
    raise ConversionError(f'{where}: unsupported architecture: {e}') from e
  shapes = bert_shapes(cfg)
  check_keys({k: v for k, v in sd.items() if k in shapes}, shapes, where, 'a BertModel state_dict')
  if cls_token is None:
    words = sd.get('embeddings.word_embeddings.weight')
    if words is None or words.ndim != 2 or words.shape[0] <= CLS_TOKEN_ID:
      raise ConversionError(f'{where}: no embeddings.word_embeddings.weight row {CLS_TOKEN_ID} to take the CLS '
                            'vector from; give --cls_token')
    cls_token, cls_where = words[CLS_TOKEN_ID], f'{where}: word_embeddings[{CLS_TOKEN_ID}]'
  params = jax_tree_to_numpy(init_params(cfg, seed))
  params['cls_token'] = check_cls(cls_token, cfg.hidden_size, cls_where)
  for encoder in ENCODERS:
    for key, path, transform in bert_table(cfg.num_hidden_layers):
      _put(params, (encoder, 'encoder', *path), _layout(sd[key], transform))
  return params, cfg


def jax_tree_to_numpy(tree):
  import jax
  return jax.tree.map(np.asarray, jax.device_get(tree))


def load_original(path: str) -> Mapping[str, Any]:
  obj = load_torch(path, 'PyTorch checkpoint')
  if isinstance(obj, Mapping) and isinstance(obj.get('berthash'), Mapping):
    return obj['berthash']
  if isinstance(obj, Mapping) and obj and all(hasattr(v, 'shape') for v in obj.values()):
    return obj
  raise ConversionError(f'{path}: neither a dict with a "berthash" state_dict nor a bare state_dict')


def load_cls(path: str) -> np.ndarray:
  obj = load_torch(path, 'CLS vector')
  if isinstance(obj, Mapping) and len(obj) == 1:
    obj = next(iter(obj.values()))
  if not hasattr(obj, 'shape'):
    raise ConversionError(f'{path}: holds a {type(obj).__name__}, not a tensor')
  return _numpy({'cls': obj})['cls']


def run_conversion(output: str, torch_checkpoint: Optional[str] = None, cls_token: Optional[str] = None,
                   bert_checkpoint: Optional[str] = None, bits: int = 64, num_heads: Optional[int] = None,
                   seed: int = 0):
  """Writes the checkpoint; returns (params, ModelConfig). Raises ConversionError on bad input."""
  check_new_output(output)
  if bool(torch_checkpoint) == bool(bert_checkpoint):
    raise ConversionError('give exactly one of --torch_checkpoint (with --cls_token) and --bert_checkpoint')
  cls_vec = load_cls(cls_token) if cls_token else None
  if torch_checkpoint:
    if cls_vec is None:
      raise ConversionError('--cls_token (cls.pt) is required with --torch_checkpoint')
    params, cfg = convert_state_dict(load_original(torch_checkpoint), cls_vec, num_heads, torch_checkpoint,
                                     cls_token)
  else:
    params, cfg = from_bert(load_torch(bert_checkpoint, 'BERT state_dict'), bits, cls_vec, num_heads, seed,
                            bert_checkpoint, cls_token or 'cls_token')
  from common_jax import checkpoint
  checkpoint.save_params(output, params, cfg.to_dict())
  return params, cfg


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('torch_checkpoint', None, "the original's .pth ({'berthash': state_dict, ...})",
                      flag_values=fv)
  flags.DEFINE_string('cls_token', None, 'cls.pt of the original repository (required with --torch_checkpoint)',
                      flag_values=fv)
  flags.DEFINE_string('bert_checkpoint', None, 'bert-base-uncased pytorch_model.bin / model.safetensors',
                      flag_values=fv)
  flags.DEFINE_string('output', None, 'new directory for the Orbax checkpoint + model_config.json',
                      flag_values=fv, required=True)
  flags.DEFINE_integer('bits', 64, 'code length (BERT initialisation only)', flag_values=fv)
  flags.DEFINE_integer('num_heads', None, 'attention heads (default hidden/64)', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'init seed of the non-BERT layers (BERT mode)', flag_values=fv)


def main(argv=None) -> int:
  args = cli.parse_flags(define_flags, argv, __doc__)
  with cli.clear_errors():
    params, cfg = run_conversion(args.output, args.torch_checkpoint, args.cls_token, args.bert_checkpoint,
                                 args.bits, args.num_heads, args.seed)
  import jax
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  print(f'wrote {args.output}: {n:,} parameters, hidden={cfg.hidden_size}, bits={cfg.bits}, '
        f'{"converted" if args.torch_checkpoint else "BERT-initialised"}')
  return 0


if __name__ == '__main__':
  cli.run_main(main)
