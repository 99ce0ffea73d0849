"""Numerical proofs for the Flax similarity network (hapvr_jax.similarity, hapvr_jax.model).

Three kinds of ground truth:
  * NumPy float64 written here, for the pure reductions (`reduce_rows`, `frame_to_frame`);
  * the independent PyTorch reference (tests/references/hapvr_torch.py) in float64 and float32, for every stage of
    the network, with the Flax weights produced from the reference's state_dict by `convert_state_dict`;
  * the unpadded result itself, for batched inputs padded to bucket lengths (the exactness claim of the
    batched evaluation engine).

Tolerances: float32 JAX vs a float64 reference: rtol = atol = 1e-5; vs torch float32: rtol = atol = 1e-5;
parameter gradients (float32 backward) vs torch float64: 1e-4 of each parameter's largest gradient entry.
Each comparison prints its max abs error (`pytest -s` shows them).

The binarised frame_level_sim scale and the gradient routing at ties follow the original.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hapvr_jax import similarity as sim_lib
from hapvr_jax.convert import convert_state_dict
from hapvr_jax.model import ModelConfig, SimilarityNetwork, init_params

from tests.references import hapvr_torch as ref

RTOL64 = ATOL64 = 1e-5   # float32 JAX vs float64 reference
RTOL32 = ATOL32 = 1e-5   # float32 JAX vs torch float32

torch.set_num_threads(1)   # the suite runs with -n 2 on 2 cores


def assert_close(name, got, want, rtol=RTOL64, atol=ATOL64):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, f'{name}: shape {got.shape} != {want.shape}'
  err = float(np.max(np.abs(got - want))) if got.size else 0.0
  print(f'[max abs err] {name}: {err:.3g}')
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)
  return err


def unit(x, axis=-1):
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


# ==========================================================================================================
# NumPy float64 reference of the reductions
# ==========================================================================================================
def np_k(n, rate):
  return max(round(n * rate), 1)   # Python's round: half to even


def np_reduce(s, kind, rate=0.1, symmetric=False, k=None):
  """s[..., I, J] -> s[...]; reduce J (target), mean over I (query). `k` forces the top-k size."""
  s = np.asarray(s, np.float64)
  if kind == 'Max':
    return s.max(axis=(-2, -1))
  if kind == 'Average':
    return s.mean(axis=(-2, -1))

  def one(x):
    kk = 1 if kind == 'Chamfer' else (np_k(x.shape[-1], rate) if k is None else k)
    top = -np.sort(-x, axis=-1)[..., :kk]
    return top.mean(-1).mean(-1)

  if not symmetric:
    return one(s)
  return (one(s) + one(np.swapaxes(s, -1, -2))) / 2


def np_f2f(q, t, kind, rate, symmetric):
  s = np.einsum('aiod,bjpd->abijop', np.asarray(q, np.float64), np.asarray(t, np.float64))
  return np_reduce(s, kind, rate, symmetric)


# ==========================================================================================================
# topk_size: Python round-half-to-even semantics
# ==========================================================================================================
@pytest.mark.parametrize('n,rate,k', [
    (50, 0.03, 2),    # 1.5 -> 2 (even)
    (250, 0.01, 2),   # 2.5 -> 2 (even), not 3
    (150, 0.01, 2),   # 1.5 -> 2
    (350, 0.01, 4),   # 3.5 -> 4
    (5, 0.5, 2),      # 2.5 -> 2
    (7, 0.5, 4),      # 3.5 -> 4
    (1, 0.5, 1),      # round(0.5) = 0 -> max(., 1)
    (16, 0.03, 1),    # 0.48 -> 0 -> 1
    (17, 0.03, 1),    # 0.51 -> 1
    (9, 0.1, 1),      # the f2f case of HAP-VR: TopK == Chamfer
    (9, 0.3, 3),      # 2.6999999999999997 -> 3
    (7, 0.03, 1),     # training v2v (7x7 map)
    (512, 0.03, 15),  # a 2048-frame target chunk
])
def test_topk_size_round_half_even(n, rate, k):
  assert sim_lib.topk_size(n, rate) == k == np_k(n, rate)
  table = sim_lib.topk_table(n + 3, rate)
  assert table.dtype == np.int32
  assert [int(v) for v in table] == [np_k(m, rate) for m in range(n + 4)]


# ==========================================================================================================
# reduce_rows vs NumPy float64, unpadded and with prefix lengths
# ==========================================================================================================
# (kind, rate, padded [I, J], (row_len, col_len) per leading element)
REDUCE_CASES = [
    ('Chamfer', 0.1, (9, 16), [(7, 12), (3, 16), (1, 1), (9, 5), (9, 16)]),
    ('TopKChamfer', 0.03, (8, 64), [(7, 50), (5, 49), (1, 51), (8, 17), (8, 64)]),    # 50 * 0.03 = 1.5 -> 2
    ('TopKChamfer', 0.01, (6, 256), [(6, 250), (3, 249), (5, 150), (2, 149), (6, 256)]),  # 2.5 -> 2, 2.56 -> 3
    ('TopKChamfer', 0.5, (8, 8), [(7, 7), (5, 5), (8, 1), (1, 2), (8, 8)]),            # k up to 4 both ways
    ('TopKChamfer', 0.3, (9, 9), [(9, 9), (4, 9), (9, 4), (2, 3), (5, 7)]),
    ('Max', 0.1, (9, 16), [(7, 12), (3, 16), (1, 1), (9, 5), (9, 16)]),
    ('Average', 0.1, (9, 16), [(7, 12), (3, 16), (1, 1), (9, 5), (9, 16)]),
]


@functools.lru_cache(maxsize=None)
def jit_reduce(kind, rate, symmetric):
  return jax.jit(lambda s, rl, cl: sim_lib.reduce_rows(s, rl, cl, kind, rate, symmetric))


@pytest.mark.parametrize('symmetric', [False, True], ids=['directed', 'symmetric'])
@pytest.mark.parametrize('kind,rate,padded,lens', REDUCE_CASES,
                         ids=[f'{c[0]}-{c[1]}-{c[2][1]}' for c in REDUCE_CASES])
def test_reduce_rows(kind, rate, padded, lens, symmetric):
  rng = np.random.default_rng(zlib.crc32(repr((kind, rate, padded)).encode()))
  n_i, n_j = padded
  s = rng.normal(size=(len(lens), n_i, n_j))
  fn = jit_reduce(kind, rate, symmetric)

  # 1) Unpadded (lengths None) == NumPy on the full array.
  got = fn(jnp.asarray(s, jnp.float32), None, None)
  assert_close(f'reduce_rows {kind} {rate} sym={symmetric} unpadded', got, np_reduce(s, kind, rate, symmetric))

  # 2) Padded: junk after the valid prefix (large, so any leak into max/top-k/mean shows); each element must
  #    equal NumPy on its own unpadded slice, i.e. the unpadded result.
  junk = s.copy()
  rl = np.array([r for r, _ in lens], np.int32)
  cl = np.array([c for _, c in lens], np.int32)
  for b, (r, c) in enumerate(lens):
    junk[b, r:, :] = 50.0
    junk[b, :, c:] = 50.0
  got = np.asarray(fn(jnp.asarray(junk, jnp.float32), jnp.asarray(rl), jnp.asarray(cl)))
  want = np.array([np_reduce(s[b, :r, :c], kind, rate, symmetric) for b, (r, c) in enumerate(lens)])
  assert_close(f'reduce_rows {kind} {rate} sym={symmetric} padded', got, want)


@pytest.mark.parametrize('n,rate,k', [(50, 0.03, 2), (250, 0.01, 2), (7, 0.5, 4)])
def test_reduce_rows_uses_the_round_half_even_k(n, rate, k):
  """The top-k result matches the k of Python's round and is clearly different for k-1 and k+1."""
  rng = np.random.default_rng(n)
  s = rng.permutation(n * 4).reshape(4, n).astype(np.float64)[None] / n   # distinct values, 4 rows
  got = float(jit_reduce('TopKChamfer', rate, False)(jnp.asarray(s, jnp.float32), None, None)[0])
  assert_close(f'k check n={n}', got, np_reduce(s, 'TopKChamfer', k=k)[0])
  for other in (k - 1, k + 1):
    if other >= 1:
      assert abs(got - np_reduce(s, 'TopKChamfer', k=other)[0]) > 1e-3


def test_reduce_rows_broadcast_lengths():
  """Lengths [A, 1] x [1, B] broadcast over a [A, B, I, J] map (the layout the model uses)."""
  rng = np.random.default_rng(7)
  s = rng.normal(size=(2, 3, 10, 12))
  ql, tl = np.array([[10], [6]]), np.array([[12, 5, 9]])
  got = np.asarray(jit_reduce('TopKChamfer', 0.3, True)(jnp.asarray(s, jnp.float32), ql, tl))
  want = np.array([[np_reduce(s[a, b, :ql[a, 0], :tl[0, b]], 'TopKChamfer', 0.3, True) for b in range(3)]
                   for a in range(2)])
  assert_close('reduce_rows broadcast lengths', got, want)


# ==========================================================================================================
# frame_to_frame vs NumPy float64 (einsum over D, then the region reduction)
# ==========================================================================================================
F2F_CASES = [(kind, sym, r, rate)
             for r in (9, 1)
             for kind in sim_lib.KINDS
             for sym in ((False, True) if kind in ('Chamfer', 'TopKChamfer') else (False,))
             for rate in ((0.1, 0.3) if kind == 'TopKChamfer' else (0.1,))]


@pytest.mark.parametrize('kind,symmetric,regions,rate', F2F_CASES,
                         ids=[f'{k}-sym{int(s)}-R{r}-{rt}' for k, s, r, rt in F2F_CASES])
def test_frame_to_frame(kind, symmetric, regions, rate):
  rng = np.random.default_rng(regions * 10 + int(symmetric))
  q = unit(rng.normal(size=(2, 5, regions, 16)))
  t = unit(rng.normal(size=(3, 7, regions, 16)))
  fn = jax.jit(lambda a, b: sim_lib.frame_to_frame(a, b, kind, rate, symmetric))
  got = fn(jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32))
  want = np_f2f(q, t, kind, rate, symmetric)
  assert_close(f'f2f {kind} sym={symmetric} R={regions} rate={rate}', got, want)
  if kind == 'TopKChamfer' and np_k(regions, rate) > 1:   # the case really differs from Chamfer
    assert np.max(np.abs(want - np_f2f(q, t, 'Chamfer', rate, symmetric))) > 1e-2


@pytest.mark.parametrize('kind,rate', [('Chamfer', 0.1), ('TopKChamfer', 0.3), ('Max', 0.1)])
def test_frame_to_frame_in_query_slices(kind, rate, monkeypatch):
  """Long queries are scored in slices of query frames (each one matmul over all regions): the slices
  together equal NumPy, ragged last slice included."""
  monkeypatch.setattr(sim_lib, 'ONE_MATMUL_ROWS', 20)
  assert sim_lib.query_slices(2 * 11, 9) == 9 and sim_lib.query_slices(2, 9) == 1
  rng = np.random.default_rng(11)
  q = unit(rng.normal(size=(2, 11, 9, 16)))    # 22 frames x 9 regions > 20 rows: slices of 2, 2, .., 1
  t = unit(rng.normal(size=(3, 5, 9, 16)))
  fn = jax.jit(lambda a, b: sim_lib.frame_to_frame(a, b, kind, rate))
  got = fn(jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32))
  assert_close(f'sliced f2f {kind}', got, np_f2f(q, t, kind, rate, False))


@pytest.mark.parametrize('kind,rate', [('Chamfer', 0.1), ('TopKChamfer', 0.3)])
def test_frame_to_frame_in_target_tiles(kind, rate, monkeypatch):
  """Large products are computed two targets at a time in a loop: 3 targets (the last tile padded with a
  zero target, dropped) equal NumPy."""
  q = unit(np.random.default_rng(12).normal(size=(2, 4, 9, 16)))
  t = unit(np.random.default_rng(13).normal(size=(3, 5, 9, 16)))
  per_target = 4 * 2 * 4 * 9 * 5 * 9
  monkeypatch.setattr(sim_lib, 'TILED_ROWS', 1)
  monkeypatch.setattr(sim_lib, 'TILED_BYTES', 0)
  monkeypatch.setattr(sim_lib, 'TILE_BYTES', 2 * per_target)
  fn = jax.jit(lambda a, b: sim_lib.frame_to_frame(a, b, kind, rate))
  got = fn(jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32))
  assert 'while' in fn.lower(jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32)).as_text()   # the loop ran
  assert_close(f'tiled f2f {kind}', got, np_f2f(q, t, kind, rate, False))


def test_symmetric_topk_uses_configured_rate():
  """Documented deviation (docs/deviations.md): the original's symmetric TopK-Chamfer silently uses 0.3; the port
  uses the configured rate. With R = 9 and rate 0.1 the port takes k = 1, the original k = 3."""
  rng = np.random.default_rng(3)
  q = unit(rng.normal(size=(1, 4, 9, 16)))
  t = unit(rng.normal(size=(1, 6, 9, 16)))
  fn = jax.jit(lambda a, b: sim_lib.frame_to_frame(a, b, 'TopKChamfer', 0.1, True))
  got = np.asarray(fn(jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32)))
  assert_close('symmetric TopK rate 0.1', got, np_f2f(q, t, 'TopKChamfer', 0.1, True))
  assert np.max(np.abs(got - np_f2f(q, t, 'TopKChamfer', 0.3, True))) > 1e-2


# ==========================================================================================================
# The network vs the PyTorch reference, with weights converted by convert_state_dict
# ==========================================================================================================
CONFIGS = {
    # HAP-VR as trained (scripts/train.sh): TopK-Chamfer 0.1 / 0.03, attention.
    'hapvr': dict(ctor=dict(dims=512, attention=True, f2f_sim_module='TopKChamfer',
                            v2v_sim_module='TopKChamfer', f_topk_rate=0.1, v_topk_rate=0.03),
                  hapvr=True, seed=1234),
    # S2VS: Chamfer / Chamfer, comparator named visil_head, S2VS argparse namespace.
    's2vs': dict(ctor=dict(dims=512, attention=True, f2f_sim_module='Chamfer', v2v_sim_module='Chamfer',
                           s2vs_naming=True), hapvr=False, seed=2345),
    # ITQ binarisation instead of attention (bits != dims to exercise the W layout).
    'bin': dict(ctor=dict(dims=512, attention=False, binarization=True, binary_bits=128,
                          f2f_sim_module='TopKChamfer', v2v_sim_module='TopKChamfer',
                          f_topk_rate=0.1, v_topk_rate=0.03), hapvr=True, seed=3456),
}


@dataclasses.dataclass
class Setup:
  name: str
  cfg: ModelConfig
  params: dict
  t64: ref.SimilarityNetworkRef
  t32: ref.SimilarityNetworkRef
  jit: dict
  pool: np.ndarray

  def video(self, length, seed):
    """Features [T, 9, 512], unit-norm regions; windows of a shared pool so videos overlap in content.
    For binarisation, regions whose projections come within 3e-3 of zero are redrawn: their sign would
    depend on float rounding and a single flip moves f2f by 2/bits."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, self.pool.shape[0] - length + 1)
    x = unit(self.pool[start:start + length] + 0.8 * rng.normal(size=(length, 9, self.pool.shape[-1])))
    if self.t64.use_binarization:
      w = self.t64.binarization.W.detach().numpy()
      while True:
        bad = np.min(np.abs(x @ w), axis=-1) < 3e-3
        if not bad.any():
          break
        x[bad] = unit(rng.normal(size=(int(bad.sum()), x.shape[-1])))
    return x


def torch_no_grad(fn, *args):
  with torch.no_grad():
    return fn(*args)


def t64(x):
  return torch.from_numpy(np.asarray(x, np.float64))


def t32(x):
  return torch.from_numpy(np.asarray(x, np.float32))


@functools.lru_cache(maxsize=None)
def build_setup(name: str) -> Setup:
  """Reference model (seeded, calibrated), its state_dict converted by convert_state_dict, and the jitted
  Flax entry points. Cached per process, so every test of a configuration shares params and compilations."""
  spec = CONFIGS[name]
  torch.manual_seed(spec['seed'])
  model = ref.SimilarityNetworkRef(**spec['ctor'])
  pool = np.random.default_rng(99).normal(size=(240, 9, 512))
  setup = Setup(name, None, None, None, None, None, pool)
  with torch.no_grad():
    # Non-zero biases, so the bias layout is checked, and a conv1 gain so the comparator responds to the f2f
    # content (a fresh init is dominated by its biases).
    for key, p in model.named_parameters():
      if key.endswith('bias'):
        p.normal_(0.0, 0.02)
    model.comparator.conv1.weight.mul_(8.0)
    # Calibrate the last 1x1 conv so that about 10% of the outputs lie above +1 and 10% below -1: hardtanh,
    # its ties in the top-k and the regulariser are all exercised.
    setup.t64 = copy.deepcopy(model).double().eval()
    q, t = setup.t64.index_video(t64(setup.video(31, 1))), setup.t64.index_video(t64(setup.video(203, 2)))
    lo, hi = np.quantile(setup.t64.compare(setup.t64.comparator_input(q, t)).numpy(), [0.1, 0.9])
    gain = 2.0 / (hi - lo)
    model.comparator.fconv.weight.mul_(gain)
    model.comparator.fconv.bias.mul_(gain).add_(-0.9 - gain * lo)
  state_dict = ref.original_state_dict(model, hapvr=spec['hapvr'])
  assert any(k.startswith('visil_head.') for k in state_dict) == (not spec['hapvr'])
  args = ref.original_args(model, hapvr=spec['hapvr'])
  params, cfg = convert_state_dict(state_dict, args)

  net = SimilarityNetwork(cfg)
  M = SimilarityNetwork

  def call(p, *a, method=None, **kw):
    return net.apply({'params': p}, *a, method=method, **kw)

  def stages(p, qi, ti, f2f_in, s_in):   # each stage on the reference's output of the previous stage
    f2f = call(p, call(p, qi, ti, method=M.frame_to_frame), method=M.comparator_input)   # /bits if binarised
    return (f2f, call(p, f2f_in, method=M.compare),
            call(p, s_in, method=M.video_to_video))

  setup.jit = dict(
      index=jax.jit(lambda p, x: call(p, x, method=M.index_video)),
      stages=jax.jit(stages),
      # raw (unindexed) features -> score: the whole evaluation path
      pair=jax.jit(lambda p, q, t: call(p, call(p, q, method=M.index_video), call(p, t, method=M.index_video),
                                        method=M.calculate_video_similarity)),
      features_only=jax.jit(lambda p, q, t: call(p, q, t, apply_visil=False,
                                                 method=M.calculate_video_similarity)),
      padded=jax.jit(lambda p, q, t, ql, tl: (
          call(p, q, ql, method=M.index_video),
          call(p, call(p, q, ql, method=M.index_video), call(p, t, tl, method=M.index_video), ql, tl,
               method=M.calculate_video_similarity))),
      forward=jax.jit(lambda p, x: call(p, x)),
  )
  setup.cfg, setup.params = cfg, jax.tree.map(jnp.asarray, params)
  setup.t64, setup.t32 = copy.deepcopy(model).double().eval(), copy.deepcopy(model).float().eval()
  return setup


@pytest.fixture(scope='module', autouse=True)
def _release_caches():
  """Frees the cached models and compilations when the module is done (less work for the final gc)."""
  yield
  build_setup.cache_clear()
  jit_reduce.cache_clear()
  gc.collect()


@pytest.fixture(scope='module', params=list(CONFIGS))
def setup(request):
  return build_setup(request.param)


def test_converted_config(setup):
  """The model config is taken from the original's args namespace."""
  cfg = setup.cfg
  if setup.name == 's2vs':
    assert (cfg.f2f_sim_module, cfg.v2v_sim_module, cfg.min_len, cfg.source) == ('Chamfer', 'Chamfer', 4, 's2vs')
  else:
    assert (cfg.f2f_sim_module, cfg.v2v_sim_module, cfg.f_topk_rate, cfg.v_topk_rate, cfg.min_len,
            cfg.source) == ('TopKChamfer', 'TopKChamfer', 0.1, 0.03, 8, 'hapvr')
  assert (cfg.attention, cfg.binarization, cfg.dims) == (setup.t64.use_attention, setup.t64.use_binarization, 512)
  assert cfg.symmetric is False
  if cfg.binarization:
    assert cfg.binary_bits == 128


def test_param_tree_matches_init(setup):
  """The converted tree has exactly the structure, shapes and dtypes of a freshly initialised model."""
  fresh = jax.eval_shape(functools.partial(init_params, setup.cfg, 0))
  shapes = lambda tree: jax.tree.map(lambda v: (tuple(v.shape), str(v.dtype)), tree)
  assert shapes(fresh) == shapes(setup.params)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(fresh))
  if setup.name in ('hapvr', 's2vs'):
    assert n == 355_969   # the original state_dict's parameter count


def test_index_video(setup):
  x = np.stack([setup.video(16, 1), setup.video(16, 2)])
  got = setup.jit['index'](setup.params, jnp.asarray(x, jnp.float32))
  want = torch_no_grad(setup.t64.index_video, t64(x)).numpy()
  assert_close(f'{setup.name} index_video vs f64', got, want)
  want32 = torch_no_grad(setup.t32.index_video, t32(x)).numpy()
  assert_close(f'{setup.name} index_video vs f32', got, want32, RTOL32, ATOL32)


def test_frame_to_frame_comparator_v2v(setup):
  """Stage by stage (f2f, raw CNN output and pooled lengths, v2v), each stage fed the reference's own output
  of the previous stage, on a 2 x 3 batch with lengths 13 x 22 (not multiples of 4)."""
  q = np.stack([setup.video(13, 3), setup.video(13, 4)])
  t = np.stack([setup.video(22, 5), setup.video(22, 6), setup.video(22, 7)])
  with torch.no_grad():
    m = setup.t64
    qi, ti = m.index_video(t64(q)), m.index_video(t64(t))
    f2f_ref = m.comparator_input(qi, ti)
    c_ref = m.compare(f2f_ref)
    s_ref = m.video_to_video(F.hardtanh(c_ref))
  f32 = lambda x: jnp.asarray(x.numpy(), jnp.float32)
  f2f, (c, rows, cols), s = setup.jit['stages'](setup.params, f32(qi), f32(ti), f32(f2f_ref),
                                                f32(F.hardtanh(c_ref)))
  assert f2f.shape == (2, 3, 13, 22) and c.shape == (2, 3, 3, 5) and s.shape == (2, 3)
  assert np.all(np.asarray(rows) == 3) and np.all(np.asarray(cols) == 5)
  assert_close(f'{setup.name} frame_to_frame', f2f, f2f_ref.numpy())
  assert_close(f'{setup.name} comparator (raw)', c, c_ref.numpy())
  assert_close(f'{setup.name} video_to_video', s, s_ref.numpy())
  assert np.mean(np.abs(c_ref.numpy()) > 1) > 0.02   # hardtanh clips some outputs


# Unpadded single videos. All five for HAP-VR; two each for the others (each pair is one compilation).
LENGTH_CASES = ([('hapvr', a, b) for a, b in [(8, 64), (13, 31), (31, 8), (64, 13), (31, 203)]]
                + [('s2vs', 13, 31), ('s2vs', 8, 64), ('bin', 13, 31), ('bin', 31, 203)])


@pytest.mark.parametrize('name,tq,tt', LENGTH_CASES, ids=[f'{n}-{a}x{b}' for n, a, b in LENGTH_CASES])
def test_calculate_video_similarity(name, tq, tt):
  """End to end (index both, f2f, CNN, hardtanh, v2v) on unpadded single videos."""
  setup = build_setup(name)
  q, t = setup.video(tq, 10 + tq), setup.video(tt, 20 + tt)
  got = setup.jit['pair'](setup.params, jnp.asarray(q[None], jnp.float32), jnp.asarray(t[None], jnp.float32))
  with torch.no_grad():
    m = setup.t64
    qi, ti = m.index_video(t64(q)), m.index_video(t64(t))
    want = m.calculate_video_similarity(qi, ti).numpy()
    want32 = setup.t32.calculate_video_similarity(setup.t32.index_video(t32(q)),
                                                  setup.t32.index_video(t32(t))).numpy()
    c = F.hardtanh(m.compare(m.comparator_input(qi, ti)))
  assert got.shape == (1, 1)
  assert_close(f'{name} similarity {tq}x{tt} vs f64', got, want)
  assert_close(f'{name} similarity {tq}x{tt} vs f32', got, want32, RTOL32, ATOL32)
  if tt == 203 and setup.cfg.v2v_sim_module == 'TopKChamfer':
    # Pooled target length 50: k = round(50 * 0.03) = round(1.5) = 2, and k = 2 is what makes the score.
    assert c.shape[-1] == 50 and sim_lib.topk_size(50, setup.cfg.v_topk_rate) == 2
    k1 = float(ref.reduce_last_two(c, 'Chamfer', 0.0))
    assert abs(float(want[0, 0]) - k1) > 1e-4


def test_features_only_mode(setup):
  """apply_visil=False: v2v directly on the f2f map (the original's features_only evaluation)."""
  q = np.stack([setup.video(9, 30)])
  t = np.stack([setup.video(14, 31), setup.video(14, 32)])
  with torch.no_grad():
    qi, ti = setup.t64.index_video(t64(q)), setup.t64.index_video(t64(t))
    want = setup.t64.calculate_video_similarity(qi, ti, apply_visil=False).numpy()
  got = setup.jit['features_only'](setup.params, jnp.asarray(qi.numpy(), jnp.float32),
                                   jnp.asarray(ti.numpy(), jnp.float32))
  assert_close(f'{setup.name} features_only', got, want)


def test_training_forward(setup):
  """(frame_level_sim, S, reg_loss) of the training forward on 4 clips of 16 frames (train mode: erf
  binarisation; S = v2v(hardtanh(C) / 2 + 0.5); reg_loss = sum of the excess of C beyond +-1)."""
  x = np.stack([setup.video(16, s) for s in (40, 41, 42, 43)])
  fls, s, reg = setup.jit['forward'](setup.params, jnp.asarray(x, jnp.float32))
  setup.t64.train()
  setup.t32.train()
  try:
    with torch.no_grad():
      fls_ref, s_ref, reg_ref = setup.t64(t64(x))
      _, s_ref32, reg_ref32 = setup.t32(t32(x))
  finally:
    setup.t64.eval()
    setup.t32.eval()
  assert fls.shape == (4, 4, 16, 16) and s.shape == (4, 4) and reg.shape == ()
  assert_close(f'{setup.name} forward frame_level_sim', fls, fls_ref.numpy())   # undivided, as the original
  assert_close(f'{setup.name} forward S', s, s_ref.numpy())
  assert_close(f'{setup.name} forward S vs f32', s, s_ref32.numpy(), RTOL32, ATOL32)
  assert_close(f'{setup.name} forward reg_loss', reg, reg_ref.numpy())
  assert_close(f'{setup.name} forward reg_loss vs f32', reg, reg_ref32.numpy(), RTOL32, ATOL32)
  assert float(reg_ref) > 0.0   # the regulariser is exercised (some outputs outside [-1, 1])
  assert np.all((np.asarray(s) >= 0) & (np.asarray(s) <= 1))


def test_binarization_frame_level_sim_scale():
  """With binarization only the comparator input is divided by the number of bits, as in the original."""
  setup = build_setup('bin')
  x = np.stack([setup.video(16, s) for s in (40, 41, 42, 43)])
  fls, _, _ = setup.jit['forward'](setup.params, jnp.asarray(x, jnp.float32))
  setup.t64.train()
  try:
    with torch.no_grad():
      fls_ref, _, _ = setup.t64(t64(x))
  finally:
    setup.t64.eval()
  np.testing.assert_allclose(np.asarray(fls), fls_ref.numpy(), rtol=1e-5, atol=1e-5)


def test_training_gradients():
  """Gradients of a loss-like function of (frame_level_sim, S, reg_loss) w.r.t. every parameter equal
  torch autograd's (float64), mapped to the Flax layout by convert_state_dict itself (HAP-VR config)."""
  setup = build_setup('hapvr')
  x = np.stack([setup.video(12, s) for s in (50, 51, 52)])
  rng = np.random.default_rng(8)
  w_s, w_f = rng.normal(size=(3, 3)), rng.normal(size=(3, 3, 12, 12)) / 12

  def loss_jax(p):
    fls, s, reg = SimilarityNetwork(setup.cfg).apply({'params': p}, jnp.asarray(x, jnp.float32))
    return jnp.sum(s * w_s) + jnp.sum(fls * w_f) + 0.01 * reg

  grads = jax.jit(jax.grad(loss_jax))(setup.params)
  model = copy.deepcopy(setup.t64).train()
  fls, s, reg = model(t64(x))
  (torch.sum(s * t64(w_s)) + torch.sum(fls * t64(w_f)) + 0.01 * reg).backward()
  torch_grads = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
  want, _ = convert_state_dict({k: v.numpy() for k, v in torch_grads.items()},
                               ref.original_args(model))
  # (convert_state_dict rounds the float64 torch gradients to float32: a 6e-8 relative change, negligible.)
  flat_got = {tuple(p.key for p in path): np.asarray(v) for path, v in
              jax.tree_util.tree_flatten_with_path(grads)[0]}
  flat_want = {tuple(p.key for p in path): np.asarray(v) for path, v in
               jax.tree_util.tree_flatten_with_path(want)[0]}
  assert sorted(flat_got) == sorted(flat_want)
  for key in flat_got:
    scale = float(np.max(np.abs(flat_want[key])))
    assert scale > 0, key
    assert_close(f'grad {"/".join(key)} (scale {scale:.2g})', flat_got[key], flat_want[key],
                 rtol=0.0, atol=1e-4 * scale)   # float32 backward: 1e-4 of the largest entry


@pytest.mark.parametrize('where,kind', [
    pytest.param('reduce_rows', 'TopKChamfer', id='reduce_rows-TopK'),
    pytest.param('reduce_rows', 'Chamfer', id='reduce_rows-Chamfer'),
    pytest.param('frame_to_frame', 'TopKChamfer', id='f2f-TopK-k1'),
    pytest.param('frame_to_frame', 'Chamfer', id='f2f-Chamfer'),
])
def test_gradient_at_ties_goes_to_one_index(where, kind):
  """At a tie for the maximum, one entry receives the whole gradient, as in torch, so training matches it."""
  if where == 'reduce_rows':
    s = jnp.array([[[1.0, 1.0, 0.0], [0.0, 2.0, -1.0]]])   # row 0: tie between columns 0 and 1
    g = np.asarray(jax.grad(lambda v: sim_lib.reduce_rows(v, None, None, kind, 0.1).sum())(s))[0]
    tied = g[0, :2]
  else:
    e = np.eye(4, dtype=np.float32)
    q = jnp.asarray(np.stack([e[0], e[1], e[2]])[None, None])            # [1, 1, 3, 4]
    t = jnp.asarray(np.stack([e[0], e[0], e[1] + e[2]])[None, None])     # regions 0 and 1 identical
    g = np.asarray(jax.grad(lambda v: sim_lib.frame_to_frame(q, v, kind, 0.1).sum())(t))[0, 0]
    tied = g[:2, 0]   # d/d t[p, 0] for the two tied target regions; the full share is 1/3
  assert np.count_nonzero(tied) == 1, tied
  assert np.isclose(np.sum(tied), 0.5 if where == 'reduce_rows' else 1 / 3)


# ==========================================================================================================
# Padded batch == unpadded pairs (the batched evaluation engine's exactness claim)
# ==========================================================================================================
Q_LENS = [5, 8, 13, 31]          # odd, multiple of 4, not a multiple of 4
T_LENS = [6, 11, 31, 64, 203]    # 203 -> pooled 50 -> v2v k = 2 while the others have k = 1
Q_BUCKET, T_BUCKET = 35, 208     # an odd query bucket


def test_padded_equals_unpadded(setup):
  """Queries and targets of different lengths padded to one bucket each, with junk (not zeros) after every
  video, scored in one batched call with q_len / t_len: every pair equals its unpadded score."""
  rng = np.random.default_rng(77)
  qs = [setup.video(n, 100 + i) for i, n in enumerate(Q_LENS)]
  ts = [setup.video(n, 200 + i) for i, n in enumerate(T_LENS)]

  def pad(videos, bucket):
    out = unit(rng.normal(size=(len(videos), bucket, 9, 512))) * 3.0
    for i, v in enumerate(videos):
      out[i, :len(v)] = v
    return out

  qp, tp = pad(qs, Q_BUCKET), pad(ts, T_BUCKET)
  ql, tl = np.array(Q_LENS, np.int32), np.array(T_LENS, np.int32)
  p = setup.params
  qi, got = setup.jit['padded'](p, jnp.asarray(qp, jnp.float32), jnp.asarray(tp, jnp.float32), ql, tl)
  qi, got = np.asarray(qi), np.asarray(got)
  assert got.shape == (len(Q_LENS), len(T_LENS))

  want = np.zeros_like(got, np.float64)
  with torch.no_grad():
    m = setup.t64
    tis = [m.index_video(t64(t)) for t in ts]
    for a, q in enumerate(qs):
      qi_ref = m.index_video(t64(q))
      # index_video(x, length): valid frames as unpadded, padded frames exactly zero
      assert_close(f'{setup.name} index_video(length) q{a}', qi[a, :len(q)], qi_ref.numpy())
      assert not np.any(qi[a, len(q):])
      for b in range(len(ts)):
        want[a, b] = float(m.calculate_video_similarity(qi_ref, tis[b]))
  assert_close(f'{setup.name} padded batch vs unpadded f64 pairs', got, want)

  # And against the port's own unpadded evaluation of a pair (its shape is also compiled by
  # test_calculate_video_similarity): padded and unpadded agree to float32 rounding.
  if setup.name == 'hapvr':
    for a, b in ((3, 4),):   # 31x203, where the pair's own v2v k (2) differs from the others' (1)
      single = setup.jit['pair'](p, jnp.asarray(qs[a][None], jnp.float32), jnp.asarray(ts[b][None], jnp.float32))
      assert_close(f'{setup.name} padded vs unpadded port ({Q_LENS[a]}x{T_LENS[b]})', got[a, b],
                   np.asarray(single)[0, 0], 1e-5, 1e-5)


# ==========================================================================================================
# The reference's evaluation helpers (used by the benchmark)
# ==========================================================================================================
def test_reference_helpers():
  x = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
  assert ref.tile_min_len(x, 8).shape == (12, 2, 4)                          # 3 -> 6 -> 12
  np.testing.assert_array_equal(ref.tile_min_len(x, 8)[3:6], x)
  assert ref.tile_min_len(x, 3).shape == (3, 2, 4)
  assert ref.tile_min_len(np.zeros((5, 7)), 8).shape == (10, 1, 7)          # 2-D -> [T, 1, D]
  assert ref.tile_min_len(np.zeros((5, 7)), 4).shape == (5, 1, 7)
  with pytest.raises(ValueError):
    ref.tile_min_len(np.zeros((0, 9, 4)), 8)

  torch.manual_seed(0)
  model = ref.SimilarityNetworkRef(dims=32, v_topk_rate=0.03).double().eval()
  rng = np.random.default_rng(0)
  q, t = t64(unit(rng.normal(size=(9, 9, 32)))), t64(unit(rng.normal(size=(21, 9, 32))))
  with torch.no_grad():
    whole = float(model.calculate_video_similarity(q, t))
    assert float(ref.original_style_similarity(model, q, t, chunk=2048)) == whole
    parts = [float(model.calculate_video_similarity(q, t[i:i + 8])) for i in (0, 8, 16)]
    assert abs(float(ref.original_style_similarity(model, q, t, chunk=8)) - np.mean(parts)) < 1e-12
    with pytest.raises(RuntimeError):   # last chunk of 1 frame: the original's pooling fails too
      ref.original_style_similarity(model, q, t, chunk=10)
