"""Converted weights own their memory: training the PyTorch model after a conversion leaves the Flax params, and
their device copies, bitwise unchanged (on the CPU both `Tensor.numpy()` and `jax.device_put` share memory, so
an aliasing converter would hand out weights that move with every torch step). One case per converter family:
AVHash (converted and BERT-initialised), HAP-VR and each backbone."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from avhash_jax import convert as avhash_convert
from backbones import ast, clip, dino, resnet
from tests.references import ast_torch
from tests.references import clip_torch
from tests.references import dino_torch
from tests.references import resnet_torch
from hapvr_jax import convert as hapvr_convert

from tests.references import avhash_torch as avhash_ref
from tests.references import hapvr_torch as hapvr_ref


def train_in_place(tensors) -> None:
  """What a caller may do after converting: an in-place edit and an Adam step on every float tensor."""
  floats = [t for t in tensors if t.is_floating_point()]
  with torch.no_grad():
    for t in floats:
      t.add_(1.0)
  for t in floats:
    t.grad = torch.ones_like(t)
  torch.optim.Adam(floats, lr=0.1).step()


def assert_untouched_by(params, tensors) -> None:
  """Puts `params` on the device, trains `tensors` in place, and checks every array, host and device, by bytes."""
  on_device = jax.device_put(params)
  want = jax.tree.map(lambda x: np.array(x, copy=True), params)
  train_in_place(tensors)
  flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
  for tree in (params, on_device):
    got = jax.tree.leaves(tree)
    moved = [jax.tree_util.keystr(path) for (path, w), g in zip(flat_want, got)
             if np.asarray(g).tobytes() != w.tobytes()]
    assert not moved, f'{len(moved)} of {len(got)} arrays changed with the torch tensors: {moved[:5]}'


def as_tensors(state_dict) -> dict:
  return {k: v if torch.is_tensor(v) else torch.tensor(np.asarray(v)) for k, v in state_dict.items()}


def test_avhash_converted_weights_do_not_follow_the_torch_model():
  model, cls_token = avhash_ref.make_reference(seed=0, bits=16)
  params, _ = avhash_convert.convert_state_dict(model.state_dict(), cls_token.numpy(), num_heads=4)
  assert_untouched_by(params, [*model.parameters(), cls_token])


def test_avhash_bert_initialisation_does_not_follow_the_torch_model():
  model, cls_token = avhash_ref.make_reference(seed=1, bits=16)
  bert = {k[len('AE.encoder.'):]: v for k, v in model.state_dict().items() if k.startswith('AE.encoder.')}
  params, _ = avhash_convert.from_bert(bert, bits=16, cls_token=cls_token, num_heads=4)
  assert_untouched_by(params, [*model.parameters(), cls_token])


def test_hapvr_converted_weights_do_not_follow_the_torch_model():
  torch.manual_seed(0)
  model = hapvr_ref.SimilarityNetworkRef(dims=64)
  params, _ = hapvr_convert.convert_state_dict(model.state_dict(), {'dims': 64})
  assert_untouched_by(params, list(model.parameters()))


def _backbone(family):
  """(params, the torch tensors they were converted from) of a tiny backbone in its original layout."""
  if family == 'resnet':
    ref, sd = resnet_torch.build(resnet.Config.tiny(), seed=0)
    pca = as_tensors(ref.pca)
    params = resnet.convert(sd, pca=pca, pca_dims=resnet.Config.tiny().pca_dims)[0]
    return params, [*sd.values(), *pca.values()]
  mod, ref, layout = {'dino': (dino, dino_torch, 'official'), 'clip': (clip, clip_torch, 'openai'),
                      'ast': (ast, ast_torch, 'hub')}[family]
  sd = as_tensors(ref.build(mod.Config.tiny(), 0, layout)[1])
  return mod.convert(sd, num_heads=2)[0], list(sd.values())


@pytest.mark.parametrize('family', ['dino', 'clip', 'ast', 'resnet'])
def test_backbone_weights_do_not_follow_the_torch_tensors(family):
  params, tensors = _backbone(family)
  assert_untouched_by(params, tensors)
