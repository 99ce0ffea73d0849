"""AVHash: the Flax model against the PyTorch reference, through the converter (avhash_jax.convert).

A tiny reference (tests/references/avhash_torch.py: hidden 32, 4 heads, FFN 64, 25 tokens, every tensor
perturbed) is saved in the original training format, converted by the CLI `main`, read back with
common_jax.checkpoint.load_params and run deterministically; (p_A, p_I, h) must equal the float64 torch
reference in eval mode at rtol = atol = 1e-5. Converter errors must name the culprit; BERT initialisation
must copy the right tensors into all three encoders.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from avhash_jax import convert
from avhash_jax.model import AVHash, ModelConfig
from common_jax import checkpoint

from tests.references import avhash_torch as ref


@pytest.fixture(scope='module')
def reference():
  return ref.make_reference(seed=0, bits=16)


def save_original(tmp_path, model, cls_token, state_dict=None):
  ckpt, cls = str(tmp_path / '1_16.pth'), str(tmp_path / 'cls.pt')
  obj = ref.original_checkpoint(model)
  if state_dict is not None:
    obj['berthash'] = state_dict
  torch.save(obj, ckpt)
  torch.save(cls_token, cls)
  return ckpt, cls


def test_forward_matches_torch_reference(tmp_path, reference):
  model, cls_token = reference
  ckpt, cls = save_original(tmp_path, model, cls_token)
  out = str(tmp_path / 'converted')
  assert convert.main([f'--torch_checkpoint={ckpt}', f'--cls_token={cls}', f'--output={out}', '--num_heads=4']) == 0
  params, config = checkpoint.load_params(out)
  cfg = ModelConfig.from_dict(config)
  assert (cfg.bits, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (16, 32, 64, 1)
  np.testing.assert_array_equal(params['cls_token'], cls_token.numpy().astype(np.float32))

  rng = np.random.default_rng(0)
  image = rng.normal(size=(3, 25, 32)).astype(np.float32)
  audio = rng.normal(size=(3, 25, 32)).astype(np.float32)
  net = AVHash(cfg)
  forward = jax.jit(lambda p, i, a: net.apply({'params': p}, i, a, deterministic=True))
  p_a, p_i, h = forward(params, image, audio)
  ref64 = ref.AVHashRef(ref.tiny_bert_config(), cls_token, 16)
  ref64.load_state_dict(model.state_dict())
  ref64 = ref64.double().eval()
  with torch.no_grad():
    want = ref64(torch.from_numpy(image).double(), torch.from_numpy(audio).double())
  for name, got, exp in (('p_A', p_a, want[0]), ('p_I', p_i, want[1]), ('h', h, want[2])):
    np.testing.assert_allclose(np.asarray(got), exp.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
  # Swapping image and audio changes the result (the argument order is part of the contract).
  assert not np.allclose(np.asarray(forward(params, audio, image)[2]), np.asarray(h), atol=1e-3)
  # Dropout is active when not deterministic, and the CLS parameter gets no gradient (one compilation).
  def train_loss(p):
    out = net.apply({'params': p}, image, audio, deterministic=False, rngs={'dropout': jax.random.key(1)})
    return jnp.sum(out[2]), out[0]
  grads, p_drop = jax.jit(jax.grad(train_loss, has_aux=True))(params)
  assert not np.allclose(np.asarray(p_drop), np.asarray(p_a), atol=1e-4)
  assert not np.any(np.asarray(grads['cls_token']))
  assert np.any(np.asarray(grads['VE']['encoder']['pooler']['dense']['kernel']))

def test_bits_inferred_and_position_ids_ignored(reference):
  model, cls_token = ref.make_reference(seed=1, bits=32)
  sd = dict(model.state_dict())
  sd['AE.encoder.embeddings.position_ids'] = torch.arange(32)[None]
  params, cfg = convert.convert_state_dict(sd, cls_token.numpy(), num_heads=4)
  assert cfg.bits == 32 and params['hash']['linear1']['kernel'].shape == (32, 32)
  np.testing.assert_array_equal(params['IqA']['linear_v']['kernel'], sd['IqA.linear_v.weight'].numpy().T)
  assert 'Audio_project' not in params


def expect_error(tmp_path, reference, state_dict, *needles):
  model, cls_token = reference
  ckpt, cls = save_original(tmp_path, model, cls_token, state_dict)
  out = tmp_path / 'out'
  with pytest.raises(convert.ConversionError) as e:
    convert.run_conversion(str(out), torch_checkpoint=ckpt, cls_token=cls, num_heads=4)
  for needle in (ckpt, *needles):
    assert needle in str(e.value), (needle, str(e.value))
  assert not out.exists()


def test_errors_name_the_culprit(tmp_path, reference, capsys):
  sd = dict(reference[0].state_dict())
  missing = {k: v for k, v in sd.items() if k != 'VE.encoder.pooler.dense.bias'}
  expect_error(tmp_path, reference, missing, 'missing key VE.encoder.pooler.dense.bias')
  expect_error(tmp_path, reference, {**sd, 'extra.weight': torch.zeros(3)}, 'unexpected key extra.weight')
  bad = {**sd, 'AqI.linear_k.weight': torch.zeros(32, 31)}
  expect_error(tmp_path, reference, bad, 'AqI.linear_k.weight: shape [32, 31], expected [32, 32]')
  all_three = {**missing, 'extra.weight': torch.zeros(3), 'A_W.bias': torch.zeros(3)}
  expect_error(tmp_path, reference, all_three, 'missing key VE.encoder.pooler.dense.bias',
               'unexpected key extra.weight', 'A_W.bias: shape [3], expected [2]')
  # A CLS vector of the wrong size names the cls file.
  model, _ = reference
  ckpt, cls = save_original(tmp_path, model, torch.zeros(31, dtype=torch.float64))
  with pytest.raises(convert.ConversionError, match='cls.pt: CLS vector of shape'):
    convert.run_conversion(str(tmp_path / 'o2'), torch_checkpoint=ckpt, cls_token=cls, num_heads=4)
  # An existing output is refused by the CLI with one error line and exit code 2.
  existing = tmp_path / 'existing'
  existing.mkdir()
  (existing / 'model_config.json').write_text('{}')
  with pytest.raises(SystemExit) as e:
    convert.main([f'--torch_checkpoint={ckpt}', f'--cls_token={cls}', f'--output={existing}'])
  assert e.value.code == 2 and f'{existing}: already exists' in capsys.readouterr().err


def test_bert_initialisation(tmp_path):
  torch.manual_seed(3)
  bert = ref.BertModel(ref.tiny_bert_config())
  with torch.no_grad():
    for p in bert.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  # The hub's legacy layout: `bert.` prefix, LayerNorm gamma/beta, an extra layer and an MLM head.
  sd = {}
  for k, v in bert.state_dict().items():
    k = k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta')
    sd['bert.' + k] = v
  sd['bert.encoder.layer.1.output.dense.weight'] = torch.zeros(32, 64)
  sd['cls.predictions.bias'] = torch.zeros(128)
  path = str(tmp_path / 'pytorch_model.bin')
  torch.save(sd, path)
  out = str(tmp_path / 'init')
  assert convert.main([f'--bert_checkpoint={path}', '--bits=16', '--num_heads=4', f'--output={out}']) == 0
  params, config = checkpoint.load_params(out)
  assert ModelConfig.from_dict(config).bits == 16
  want = bert.state_dict()
  np.testing.assert_array_equal(params['cls_token'], want['embeddings.word_embeddings.weight'][101].numpy())
  for e in ('AE', 'IE', 'VE'):
    enc = params[e]['encoder']
    layer = enc['encoder']['layer_0']
    np.testing.assert_array_equal(enc['embeddings']['position_embeddings'],
                                  want['embeddings.position_embeddings.weight'].numpy())
    np.testing.assert_array_equal(enc['embeddings']['LayerNorm']['scale'], want['embeddings.LayerNorm.weight'].numpy())
    np.testing.assert_array_equal(layer['attention']['self']['key']['kernel'],
                                  want['encoder.layer.0.attention.self.key.weight'].numpy().T)
    np.testing.assert_array_equal(layer['output']['dense']['kernel'], want['encoder.layer.0.output.dense.weight'].numpy().T)
    np.testing.assert_array_equal(layer['attention']['output']['LayerNorm']['bias'],
                                  want['encoder.layer.0.attention.output.LayerNorm.bias'].numpy())
    np.testing.assert_array_equal(enc['pooler']['dense']['bias'], want['pooler.dense.bias'].numpy())
  # Non-BERT layers: PyTorch's default Linear init range.
  assert np.abs(params['A_W']['kernel']).max() <= 1 / np.sqrt(64) and np.any(params['A_W']['kernel'])
  # A BERT file lacking a required tensor is named.
  del sd['bert.pooler.dense.bias']
  torch.save(sd, path)
  with pytest.raises(convert.ConversionError, match='missing key pooler.dense.bias'):
    convert.run_conversion(str(tmp_path / 'init2'), bert_checkpoint=path, bits=16, num_heads=4)
