"""avhash_jax.evaluate end to end on a tiny model: metrics.json equals a brute-force NumPy evaluation of the
codes in codes.h5, those codes equal an independent forward pass, the all-vs-all protocol, and the CLI's
one-line errors (exit code 2)."""
import json
import os
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import FAST_COMPILE

from avhash_jax import evaluate as ev
from avhash_jax import model as model_lib
from common_jax import checkpoint
from configs import fcvid as fcvid_config

from tests.conftest import ROOT  # noqa: E402
MODEL = model_lib.ModelConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, bits=16)
KS = (1, 3, 5, 10, 20, 50)       # 50 > N_db: P@50 = R/50, mAP ÷ over the whole list
N_DB, N_Q = 40, 12


def _hash_outputs(params, feats, ids):
  image = np.stack([feats[v][0] for v in ids])
  audio = np.stack([feats[v][1] for v in ids])
  apply = jax.jit(lambda p, i, a: model_lib.AVHash(MODEL).apply({'params': p}, i, a, deterministic=True)[2])
  return np.asarray(apply(params, jnp.asarray(image), jnp.asarray(audio)), np.float64)


def _spread_hash_layer(params, feats):
  """A fresh 1-layer model maps every video to nearly the same code; re-centre and rescale the hash layer
  (per bit: median 0, spread ~1 before tanh) so that the codes differ and the ranking is not trivial."""
  pre = np.arctanh(_hash_outputs(params, feats, list(feats)))
  med, scale = np.median(pre, axis=0), 1.0 / (pre.std(axis=0) + 1e-12)
  lin = params['hash']['linear1']
  lin = {'kernel': np.asarray(lin['kernel'] * scale, np.float32),
         'bias': np.asarray((lin['bias'] - med) * scale, np.float32)}
  return {**params, 'hash': {'linear1': lin}}


def _write_list(path, ids, labels):
  with open(path, 'w') as f:
    f.writelines(f'{v},{c}\n' for v, c in zip(ids, labels))   # FCVID format, 1-based labels
  return str(path)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('avhash_eval')
  rng = np.random.default_rng(0)
  classes = np.array([1, 2, 3, 239])
  centres = {c: rng.normal(size=(2, MODEL.tokens, MODEL.hidden_size)) for c in classes}
  db_ids = [f'-db{i:02d}_x' for i in range(N_DB)]
  q_ids = [f'q{i:02d}' for i in range(N_Q)]
  db_labels = rng.choice(classes, N_DB)
  q_labels = rng.choice(classes, N_Q)
  feats = {}
  for vid, c in zip(db_ids + q_ids, np.concatenate([db_labels, q_labels])):
    feats[vid] = (centres[c] + rng.normal(size=centres[c].shape)).astype(np.float32)
  image_h5, audio_h5 = str(root / 'image.h5'), str(root / 'audio.h5')
  for path, m in ((image_h5, 0), (audio_h5, 1)):
    with h5py.File(path, 'w') as f:
      for vid, x in feats.items():
        f.create_group(vid).create_dataset('vectors', data=x[m])
  params = _spread_hash_layer(model_lib.init_params(MODEL, seed=1), feats)
  ckpt = checkpoint.save_params(str(root / 'ckpt'), params, MODEL.to_dict())
  return dict(root=root, ckpt=ckpt, params=params, feats=feats, image_h5=image_h5, audio_h5=audio_h5,
              db_ids=db_ids, q_ids=q_ids, db_labels=db_labels, q_labels=q_labels,
              test_list=_write_list(root / 'test.txt', q_ids, q_labels),
              retrieval_list=_write_list(root / 'train.txt', db_ids, db_labels))


def _config(d, **overrides):
  c = fcvid_config.get_config('bits=16')
  c.update(dict(image_h5=d['image_h5'], audio_h5=d['audio_h5'], test_list=d['test_list'],
                retrieval_list=d['retrieval_list'], checkpoint=d['ckpt'], ks=KS, eval_batch_size=16,
                metric_chunk=5, progress=False, compilation_cache=''))
  c.update(overrides)
  return c


def _reference_codes(d, ids):
  """sign(h) from one unpadded, unsharded jitted apply over all videos; also |h| to spot near-zero outputs."""
  h = _hash_outputs(d['params'], d['feats'], ids)
  return np.where(h >= 0, 1, -1).astype(np.int8), np.abs(h)


def _brute_force(q_codes, q_labels, db_codes, db_labels, ks):
  """The original's definitions by explicit loops; ranking = stable argsort of the Hamming distances."""
  n_db, bits = len(db_codes), q_codes.shape[1]
  dist = (bits - q_codes.astype(np.int64) @ db_codes.astype(np.int64).T) // 2
  out = {}
  per_query = []
  for qi in range(len(q_codes)):
    order = np.argsort(dist[qi], kind='stable')
    rel = [db_labels[j] == q_labels[qi] for j in order]
    per_query.append((rel, sum(db_labels == q_labels[qi])))
  for k in list(ks) + ['all']:
    ap, ap_ssvh, p, r = [], [], [], []
    kk = n_db if k == 'all' else min(k, n_db)
    for rel, n_rel in per_query:
      hits, s = 0, 0.0
      for pos in range(1, kk + 1):
        if rel[pos - 1]:
          hits += 1
          s += hits / pos
      ap.append(s / hits if hits else 0.0)
      if k != 'all':
        ap_ssvh.append(s / k)
        p.append(hits / k)
        r.append(hits / n_rel if n_rel else 0.0)
    out[f'mAP@{k}'] = np.mean(ap)
    if k != 'all':
      out[f'mAP@{k}_ssvh'] = np.mean(ap_ssvh)
      out[f'P@{k}'] = np.mean(p)
      out[f'R@{k}'] = np.mean(r)
  return out


def _read_codes(workdir):
  with h5py.File(os.path.join(workdir, 'codes.h5'), 'r') as f:
    assert sorted(f) == ['database', 'query']
    out = {}
    for g in ('query', 'database'):
      assert sorted(f[g]) == ['codes', 'ids']
      assert f[g]['codes'].dtype == np.int8
      assert h5py.check_string_dtype(f[g]['ids'].dtype).encoding == 'utf-8'
      out[g] = ([s.decode('utf-8') for s in f[g]['ids'][()]], f[g]['codes'][()])
  return out


def _check_codes(d, ids, codes):
  want, mag = _reference_codes(d, ids)
  assert codes.shape == (len(ids), MODEL.bits)
  assert set(np.unique(codes)) <= {-1, 1}
  clear = mag > 1e-5   # an output within rounding of 0 may flip between batchings
  np.testing.assert_array_equal(codes[clear], want[clear])


def test_metrics_match_brute_force(data):
  workdir = str(data['root'] / 'out')
  metrics = ev.evaluate(_config(data), workdir)
  with open(os.path.join(workdir, 'metrics.json')) as f:
    saved = json.load(f)
  assert saved['mAP@all'] == pytest.approx(metrics['mAP@all'])
  codes = _read_codes(workdir)
  q_ids, q_codes = codes['query']
  db_ids, db_codes = codes['database']
  assert q_ids == data['q_ids'] and db_ids == data['db_ids']
  _check_codes(data, q_ids, q_codes)
  _check_codes(data, db_ids, db_codes)

  assert len({tuple(c) for c in db_codes}) > N_DB // 2      # distinct codes: the ranking is not trivial
  want = _brute_force(q_codes, data['q_labels'], db_codes, data['db_labels'], KS)
  for key, value in want.items():
    assert saved[key] == pytest.approx(value, abs=1e-12), key
  assert saved['num_queries'] == N_Q and saved['num_database'] == N_DB and saved['bits'] == 16
  assert saved['dataset'] == 'fcvid' and saved['all_vs_all'] is False
  assert saved['checkpoint'] == os.path.abspath(data['ckpt'])
  assert saved['pr_curve']['k'] == [1, 21]
  assert saved['pr_curve']['precision'][0] == pytest.approx(want['P@1'])
  assert os.path.getsize(os.path.join(workdir, 'pr_curve.png')) > 0
  assert not [n for n in os.listdir(workdir) if n.endswith('.tmp')]


def test_all_vs_all_and_stale_outputs_removed(data):
  workdir = str(data['root'] / 'out_ava')
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'pr_curve.png'), 'w') as f:
    f.write('stale')
  ev.evaluate(_config(data, all_vs_all=True, plots=False, test_list=''), workdir)
  assert not os.path.exists(os.path.join(workdir, 'pr_curve.png'))   # an earlier run's output is gone
  codes = _read_codes(workdir)
  assert codes['query'][0] == codes['database'][0] == data['db_ids']
  np.testing.assert_array_equal(codes['query'][1], codes['database'][1])
  with open(os.path.join(workdir, 'metrics.json')) as f:
    saved = json.load(f)
  assert saved['all_vs_all'] is True and saved['num_queries'] == saved['num_database'] == N_DB
  want = _brute_force(codes['query'][1], data['db_labels'], codes['database'][1], data['db_labels'], KS)
  for key, value in want.items():
    assert saved[key] == pytest.approx(value, abs=1e-12), key


def test_bits_mismatch_is_a_usage_error(data, tmp_path):
  c = _config(data)
  c.bits = 64
  with pytest.raises(ValueError, match='16-bit'):
    ev.evaluate(c, str(tmp_path))


def _run_cli(workdir, *args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', XLA_FLAGS=FAST_COMPILE)   # one device
  return subprocess.run([sys.executable, '-m', 'avhash_jax.evaluate', '--config=configs/fcvid.py:bits=16',
                         f'--workdir={workdir}', '--config.progress=False', '--config.compilation_cache=',
                         *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _data_flags(d, **over):
  flags = dict(image_h5=d['image_h5'], audio_h5=d['audio_h5'], test_list=d['test_list'],
               retrieval_list=d['retrieval_list'], checkpoint=d['ckpt'])
  flags.update(over)
  return [f'--config.{k}={v}' for k, v in flags.items()]


def _assert_error(r, *needles):
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error:'), r.stderr
  assert 'Traceback' not in r.stderr, r.stderr
  for n in needles:
    assert n in last, r.stderr


def test_cli_unknown_config_key(tmp_path):
  _assert_error(_run_cli(tmp_path, '--config.no_such_key=1'), 'no_such_key')
  assert not os.path.exists(tmp_path / 'metrics.json')


def test_cli_missing_id_names_it(data, tmp_path):
  bad = _write_list(tmp_path / 'test.txt', data['q_ids'][:3] + ['not_in_h5'], [1, 2, 3, 4])
  with open(tmp_path / 'metrics.json', 'w') as f:
    f.write('{}')                       # an earlier run's result must not survive a failed run
  _assert_error(_run_cli(tmp_path, *_data_flags(data, test_list=bad)), "'not_in_h5'")
  assert not os.path.exists(tmp_path / 'metrics.json')


def test_cli_malformed_list_line(data, tmp_path):
  bad = tmp_path / 'test.txt'
  bad.write_text(f'{data["q_ids"][0]},1\n{data["q_ids"][1]},2\n{data["q_ids"][2]}\n')
  _assert_error(_run_cli(tmp_path, *_data_flags(data, test_list=str(bad))), f'{bad}:3')
