"""The checkpoint converter (hapvr_jax.convert) end to end, through its CLI `main`.

Checkpoints are written in the original training code's format by tests/references/hapvr_torch.py
(`make_original_checkpoint`), converted with `main([...])`, read back with `common_jax.checkpoint.load_params`
and checked against the PyTorch tensors (exactly, after the layout change from PyTorch to Flax) and against the
reference's similarity (rtol = atol = 1e-5, float32 JAX vs float64 torch). Bad inputs must give a non-zero
exit status, an error naming the culprit, and no checkpoint.
"""
from __future__ import annotations

import copy
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from common_jax import checkpoint
from hapvr_jax import convert
from hapvr_jax.model import ModelConfig, SimilarityNetwork

from tests.references import hapvr_torch as ref


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_model(seed=0, **kw):
  """A reference model with non-zero biases (so every tensor's layout is visible in the comparison)."""
  torch.manual_seed(seed)
  model = ref.SimilarityNetworkRef(**kw)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias'):
        p.normal_(0.0, 0.05)
  return model


HAPVR = dict(dims=512, attention=True, f2f_sim_module='TopKChamfer', v2v_sim_module='TopKChamfer',
             f_topk_rate=0.1, v_topk_rate=0.03)
S2VS = dict(dims=512, attention=True, f2f_sim_module='Chamfer', v2v_sim_module='Chamfer', s2vs_naming=True)


@pytest.fixture(scope='module')
def hapvr_model():
  return make_model(0, **HAPVR)


@pytest.fixture(scope='module')
def s2vs_model():
  return make_model(1, **S2VS)


def run_cli(tmp_path, obj_or_path, *extra):
  """torch.saves obj (unless a path is given), runs the CLI; returns (rc, output dir)."""
  if isinstance(obj_or_path, str):
    src = obj_or_path
  else:
    src = str(tmp_path / 'model.pth')
    torch.save(obj_or_path, src)
  out = str(tmp_path / 'converted')
  try:
    rc = convert.main([f'--torch_checkpoint={src}', f'--output={out}', *extra])
  except SystemExit as e:   # bad input ends through cli.clear_errors: one `error:` line, exit code 2
    rc = e.code
  return rc, out


def expected_flax(state_dict):
  """Independent statement of the layout change: Linear weight -> kernel = W^T; Conv2d weight OIHW
  -> HWIO kernel; biases and the ITQ matrix unchanged; `module.` stripped; visil_head -> comparator_module."""
  out = {}
  for key, value in state_dict.items():
    v = value.detach().cpu().numpy()
    key = key.removeprefix('module.')
    parts = key.split('.')
    if parts[0] == 'visil_head':
      parts[0] = 'comparator_module'
    if parts[-1] == 'weight':
      parts[-1] = 'kernel'
      v = v.T if v.ndim == 2 else v.transpose(2, 3, 1, 0)
    out[tuple(parts)] = v
  return out


def assert_params_exact(params, state_dict):
  want = expected_flax(state_dict)
  got = {tuple(p.key for p in path): np.asarray(v)
         for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert sorted(got) == sorted(want)
  for key, v in want.items():
    assert got[key].dtype == np.float32, key
    assert got[key].shape == v.shape, key
    assert np.array_equal(got[key], v), key   # bit-exact


@functools.lru_cache(maxsize=None)
def similarity_fn(cfg: ModelConfig):
  net = SimilarityNetwork(cfg)
  M = SimilarityNetwork

  def f(p, q, t):
    return net.apply({'params': p}, net.apply({'params': p}, q, method=M.index_video),
                     net.apply({'params': p}, t, method=M.index_video), method=M.calculate_video_similarity)
  return jax.jit(f)


def assert_same_similarity(params, cfg, model, name):
  """The converted model scores a 2 x 2 batch (13 vs 31 frames) like the float64 reference, to 1e-5."""
  rng = np.random.default_rng(5)
  q = unit(rng.normal(size=(2, 13, 9, cfg.dims)))
  t = unit(rng.normal(size=(2, 31, 9, cfg.dims)))
  t[0, 5:18] = unit(q[1] + 0.5 * rng.normal(size=q[1].shape))   # one related pair
  got = np.asarray(similarity_fn(cfg)(jax.tree.map(jnp.asarray, params), jnp.asarray(q, jnp.float32),
                                      jnp.asarray(t, jnp.float32)))
  m = copy.deepcopy(model).double().eval()
  with torch.no_grad():
    want = m.calculate_video_similarity(m.index_video(torch.from_numpy(q)), m.index_video(torch.from_numpy(t)))
  err = float(np.max(np.abs(got - want.numpy())))
  print(f'[max abs err] converted {name} similarity: {err:.3g}')
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


# ==========================================================================================================
# Good inputs
# ==========================================================================================================
def test_hapvr_checkpoint(tmp_path, hapvr_model, capsys):
  path = str(tmp_path / 'model.pth')
  args = ref.make_original_checkpoint(path, hapvr_model, hapvr=True)
  assert args.v_topk_rate == 0.03 and args.similarity_network == 'ViSiL'
  rc, out = run_cli(tmp_path, path)
  assert rc == 0, capsys.readouterr().err
  params, mc = checkpoint.load_params(out)
  cfg = ModelConfig.from_dict(mc)
  assert cfg == ModelConfig(dims=512, attention=True, binarization=False, binary_bits=512,
                            f2f_sim_module='TopKChamfer', v2v_sim_module='TopKChamfer', f_topk_rate=0.1,
                            v_topk_rate=0.03, symmetric=False, min_len=8, source='hapvr')
  assert_params_exact(params, hapvr_model.state_dict())
  assert_same_similarity(params, cfg, hapvr_model, 'hapvr')


def test_hapvr_checkpoint_other_rates(tmp_path, hapvr_model, capsys):
  """The top-k rates and modules come from args, not from defaults."""
  path = str(tmp_path / 'model.pth')
  ref.make_original_checkpoint(path, hapvr_model, hapvr=True, args_overrides=dict(
      f2f_sim_module='Chamfer', v2v_sim_module='TopKChamfer', f_topk_rate=0.3, v_topk_rate=0.1))
  rc, out = run_cli(tmp_path, path)
  assert rc == 0, capsys.readouterr().err
  cfg = ModelConfig.from_dict(checkpoint.load_params(out)[1])
  assert (cfg.f2f_sim_module, cfg.v2v_sim_module, cfg.f_topk_rate, cfg.v_topk_rate, cfg.min_len) == (
      'Chamfer', 'TopKChamfer', 0.3, 0.1, 8)


def test_s2vs_checkpoint(tmp_path, s2vs_model, capsys):
  path = str(tmp_path / 'model.pth')
  args = ref.make_original_checkpoint(path, s2vs_model, hapvr=False)
  assert not hasattr(args, 'f2f_sim_module') and not hasattr(args, 'v_topk_rate')
  assert any(k.startswith('visil_head.') for k in torch.load(path, weights_only=False)['model'])
  rc, out = run_cli(tmp_path, path)
  assert rc == 0, capsys.readouterr().err
  params, mc = checkpoint.load_params(out)
  cfg = ModelConfig.from_dict(mc)
  assert (cfg.f2f_sim_module, cfg.v2v_sim_module, cfg.min_len, cfg.source) == ('Chamfer', 'Chamfer', 4, 's2vs')
  assert (cfg.dims, cfg.attention, cfg.binarization) == (512, True, False)
  assert_params_exact(params, s2vs_model.state_dict())
  assert_same_similarity(params, cfg, s2vs_model, 's2vs')


def test_bare_state_dict(tmp_path, hapvr_model, capsys):
  """No args: the architecture comes from the keys and the ViSiL constructor defaults (TopK-Chamfer with
  0.1 / 0.1 -- not train.sh's 0.03, which only a checkpoint's args can carry)."""
  rc, out = run_cli(tmp_path, ref.original_state_dict(hapvr_model))
  assert rc == 0, capsys.readouterr().err
  params, mc = checkpoint.load_params(out)
  cfg = ModelConfig.from_dict(mc)
  assert (cfg.dims, cfg.attention, cfg.binarization, cfg.source, cfg.min_len) == (512, True, False, 'hapvr', 8)
  assert (cfg.f2f_sim_module, cfg.v2v_sim_module, cfg.f_topk_rate, cfg.v_topk_rate) == (
      'TopKChamfer', 'TopKChamfer', 0.1, 0.1)
  assert_params_exact(params, hapvr_model.state_dict())


def test_ddp_prefixed_checkpoint_and_min_len_flag(tmp_path, hapvr_model, capsys):
  """A state_dict saved from the DDP wrapper (`module.` prefix); --min_len overrides the default."""
  path = str(tmp_path / 'model.pth')
  args = ref.make_original_checkpoint(path, hapvr_model, hapvr=True)
  sd = {'module.' + k: v for k, v in ref.original_state_dict(hapvr_model).items()}
  torch.save({'args': args, 'model': sd, 'optimizer': {}, 'global_step': 10}, path)
  rc, out = run_cli(tmp_path, path, '--min_len=4')
  assert rc == 0, capsys.readouterr().err
  params, mc = checkpoint.load_params(out)
  cfg = ModelConfig.from_dict(mc)
  assert (cfg.v_topk_rate, cfg.min_len, cfg.source) == (0.03, 4, 'hapvr')
  assert_params_exact(params, sd)


def test_binarization_checkpoint(tmp_path, capsys):
  """ITQ matrix W [dims, bits] is carried unchanged; no attention parameters."""
  model = make_model(2, dims=512, attention=False, binarization=True, binary_bits=128)
  path = str(tmp_path / 'model.pth')
  ref.make_original_checkpoint(path, model, hapvr=True)
  rc, out = run_cli(tmp_path, path)
  assert rc == 0, capsys.readouterr().err
  params, mc = checkpoint.load_params(out)
  cfg = ModelConfig.from_dict(mc)
  assert (cfg.attention, cfg.binarization, cfg.binary_bits) == (False, True, 128)
  assert 'attention' not in params
  assert_params_exact(params, model.state_dict())


# ==========================================================================================================
# Bad inputs: non-zero status, the culprit named on stderr, no checkpoint written
# ==========================================================================================================
def assert_failed(rc, out, capsys, *culprits):
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith('error: '), err
  for c in culprits:
    assert c in err, f'{c!r} not in stderr:\n{err}'
  assert not os.path.exists(os.path.join(out, checkpoint.MODEL_CONFIG))
  assert not os.path.isdir(os.path.join(out, checkpoint.CKPT_SUBDIR))
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.load_params(out)
  return err


def test_missing_keys(tmp_path, hapvr_model, capsys):
  sd = ref.original_state_dict(hapvr_model)
  del sd['comparator_module.conv2.bias']
  del sd['attention.context_vector.weight']
  args = ref.make_original_checkpoint(str(tmp_path / 'unused.pth'), hapvr_model)
  rc, out = run_cli(tmp_path, {'args': args, 'model': sd, 'optimizer': {}, 'global_step': 10})
  assert_failed(rc, out, capsys, 'comparator_module.conv2.bias', 'attention.context_vector.weight', 'missing')


def test_unexpected_key(tmp_path, hapvr_model, capsys):
  """An MLP layer (the original's unused `mlp` option) is not silently dropped."""
  sd = ref.original_state_dict(hapvr_model)
  sd['mlp.linear1.weight'] = torch.zeros(2048, 512)
  args = ref.make_original_checkpoint(str(tmp_path / 'unused.pth'), hapvr_model)
  rc, out = run_cli(tmp_path, {'args': args, 'model': sd, 'optimizer': {}, 'global_step': 10})
  assert_failed(rc, out, capsys, 'mlp.linear1.weight', 'unexpected')


def test_all_problems_in_one_error(tmp_path, hapvr_model, capsys):
  sd = ref.original_state_dict(hapvr_model)
  del sd['comparator_module.fconv.weight']
  sd['mlp.linear3.bias'] = torch.zeros(512)
  sd['comparator_module.conv1.bias'] = torch.zeros(16)
  rc, out = run_cli(tmp_path, sd)
  assert_failed(rc, out, capsys, 'comparator_module.fconv.weight', 'mlp.linear3.bias',
                'comparator_module.conv1.bias')


def test_wrong_shape(tmp_path, capsys):
  """dims-256 weights with an args namespace that says dims=512."""
  model = make_model(3, dims=256, **{k: v for k, v in HAPVR.items() if k != 'dims'})
  path = str(tmp_path / 'model.pth')
  ref.make_original_checkpoint(path, model, args_overrides=dict(dims=512))
  rc, out = run_cli(tmp_path, path)
  err = assert_failed(rc, out, capsys, 'attention.transform.weight', 'attention.transform.bias',
                      'attention.context_vector.weight')
  assert '256' in err and '512' in err


def test_existing_checkpoint_is_not_overwritten(tmp_path, hapvr_model, capsys):
  """Refused through the shared policy (cli.clear_errors): SystemExit(2) and one line, the old files intact."""
  path = str(tmp_path / 'model.pth')
  ref.make_original_checkpoint(path, hapvr_model, hapvr=True)
  out = tmp_path / 'converted'
  out.mkdir()
  (out / checkpoint.MODEL_CONFIG).write_text('{"dims": 256}')
  with pytest.raises(SystemExit) as e:
    convert.main([f'--torch_checkpoint={path}', f'--output={out}'])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count('\n') == 1 and err.startswith(f'error: {out} already holds a checkpoint')
  assert os.listdir(out) == [checkpoint.MODEL_CONFIG]
  assert (out / checkpoint.MODEL_CONFIG).read_text() == '{"dims": 256}'


def test_nonexistent_file(tmp_path, capsys):
  missing = str(tmp_path / 'no_such_model.pth')
  rc, out = run_cli(tmp_path, missing)
  assert_failed(rc, out, capsys, missing)


def test_not_a_checkpoint(tmp_path, capsys):
  path = str(tmp_path / 'notes.pth')
  with open(path, 'w') as f:
    f.write('this is not a torch checkpoint\n')
  rc, out = run_cli(tmp_path, path)
  assert_failed(rc, out, capsys, path)


def test_pickle_of_something_else(tmp_path, capsys):
  """A valid torch file that holds neither a checkpoint dict nor a state_dict."""
  path = str(tmp_path / 'list.pth')
  torch.save([1, 2, 3], path)
  rc, out = run_cli(tmp_path, path)
  assert_failed(rc, out, capsys, path)


@pytest.mark.parametrize('overrides,culprit', [(dict(f2f_sim_module='NetVLAD'), 'NetVLAD'),
                                               (dict(binarization=True), 'binarization')],
                         ids=['unknown-module', 'attention-and-binarization'])
def test_invalid_args_are_reported(tmp_path, hapvr_model, capsys, overrides, culprit):
  path = str(tmp_path / 'model.pth')
  ref.make_original_checkpoint(path, hapvr_model, args_overrides=overrides)
  rc, out = run_cli(tmp_path, path)
  assert_failed(rc, out, capsys, culprit)
