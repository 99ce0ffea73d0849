"""hapvr_jax.coarse: the shortlist descriptor's contract (shape, norm, inputs refused) and that it finds planted
copies among unrelated videos, through the FAISS inner-product index the search keeps it in."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from hapvr_jax import coarse


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _video(rng, shots, frames=12, noise=0.6):
  """Region features [T, 9, 256] of a video: its shots' region vectors re-noised per frame."""
  lengths = rng.multinomial(frames - len(shots), [1 / len(shots)] * len(shots)) + 1
  x = np.concatenate([np.repeat(s[None], n, 0) for s, n in zip(shots, lengths)])
  return _unit(x + noise * rng.normal(size=x.shape))


def test_descriptor_contract():
  x = _unit(np.random.default_rng(0).normal(size=(7, 9, 256)))
  d = coarse.describe(x)
  assert d.shape == (coarse.dim(256),) and d.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(d), 1, rtol=1e-6)
  np.testing.assert_allclose(coarse.describe(x[::-1]), d, atol=1e-6)   # frame order does not matter
  np.testing.assert_allclose(coarse.describe(x.mean(1)), coarse.describe(x.mean(1)[:, None]), atol=1e-7)
  f = coarse.frame_descriptors(x)
  assert f.shape == (7, coarse.dim(256)) and f.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1, rtol=1e-6)
  for bad in (np.zeros((0, 9, 256)), np.zeros(64), np.zeros((2, 3, 4, 5))):
    with pytest.raises(ValueError, match=r'features of shape'):
      coarse.describe(bad)


def test_planted_copies_are_shortlisted():
  # 20 queries, each with a re-noised copy and a partial copy (half of the query inside unrelated
  # footage) among 400 unrelated videos: both are in the top 5% of the exact inner-product index
  rng = np.random.default_rng(1)
  shots = lambda n: rng.normal(size=(n, 9, 256))
  queries, copies = [], []
  for _ in range(20):
    s = shots(4)
    q = _video(rng, s)
    queries.append(q)
    other = _video(rng, shots(4), frames=12)
    copies += [_video(rng, s, noise=0.9), np.concatenate([other[:6], q[:6], other[6:]])]
  database = copies + [_video(rng, shots(int(rng.integers(2, 6))), int(rng.integers(8, 24))) for _ in range(400)]
  index = faiss.IndexFlatIP(coarse.dim(256))
  index.add(np.stack([coarse.describe(v) for v in database]))
  _, top = index.search(np.stack([coarse.describe(q) for q in queries]), len(database) // 20)
  for i, row in enumerate(top):
    assert {2 * i, 2 * i + 1} <= set(row.tolist()), i


@pytest.mark.parametrize('features_only', [False, True])
def test_shortlist_scorer_equals_the_engine(tmp_path, features_only):
  # the bench's per-query shortlist scorer (one matmul over all query regions, padded blocks) must give the
  # engine's scores, network and features-only alike, or its coarse-to-fine mAPs would not be the engine's
  import h5py
  import jax
  from bench import shortlist
  from common_jax import mesh as mesh_lib
  from hapvr_jax import engine as engine_lib, features, model as model_lib
  rng = np.random.default_rng(3)
  cfg = model_lib.ModelConfig(dims=32, attention=not features_only)
  params = model_lib.init_params(cfg, seed=1)
  videos = {f'v{i}': _unit(rng.normal(size=(int(n), 9, 32))) for i, n in enumerate(rng.integers(3, 30, 12))}
  with h5py.File(tmp_path / 'f.h5', 'w') as f:
    for k, v in videos.items():
      f[k] = v.astype(np.float16)   # as the index stores them: the scorer's float16 input is then exact
  ff = features.FeatureFile(str(tmp_path / 'f.h5'), dims=32, min_len=cfg.min_len)
  ids = sorted(videos)
  engine = engine_lib.Engine(cfg, params, mesh_lib.make_mesh(devices=jax.local_devices()[:1]),
                             engine_lib.EngineConfig(features_only=features_only))
  want = engine.score(ff, ids[:2], ids[2:], progress=False)
  scorer = shortlist.Scorer(cfg, params, 32, 32, features_only=features_only, blocks=(4, 8))
  for i, q in enumerate(ids[:2]):
    got = scorer.score(ff.read(q).astype(np.float16), [ff.read(v).astype(np.float16) for v in ids[2:]])
    np.testing.assert_allclose(got, want[i], atol=1e-5)
