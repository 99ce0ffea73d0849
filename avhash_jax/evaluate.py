r"""Evaluate an AVHash checkpoint: sign codes for queries and database, Hamming ranking, mAP/P/R.

  python -m avhash_jax.evaluate --config=configs/fcvid.py --workdir=OUT --config.checkpoint=DIR \
      --config.image_h5=IMG.h5 --config.audio_h5=AUD.h5 --config.test_list=T --config.retrieval_list=R

Features come from the two HDF5 files, or from ArrayRecord shards of both (`--config.shards=DIR`, written by
`python -m input_pipeline.avhash.make_shards`).

Queries = test list, database = retrieval list (the original's test.py); with `config.all_vs_all` the
retrieval list is both (FCVID's SSVH protocol; each query is then its own first hit and counts, as there).

Codes: a jitted deterministic forward (dropout off) in fixed batches of `eval_batch_size` videos (the last
batch is zero-padded, so every call has the same static shape and compiles once), batches sharded over the
mesh's 'data' axis; code = +1 where h >= 0 else -1 (int8; torch.sign's 0 for an exactly zero output is mapped
to +1, see avhash_jax.ranking). Ranking: Hamming distance, ties in database (list) order — a stable sort on
(distance, database index), reproducible where the original's unstable argsort is not.
Metrics: avhash_jax.metrics (mAP@K AVHash-style ÷R_K and the SSVH
variant ÷K as `mAP@K_ssvh`, mAP@all, P@K, R@K, PR curve).

Outputs (each written to a temporary name and renamed; an earlier run's outputs are removed first, so a
failed run never leaves results that look like its own):
  OUT/metrics.json  metrics, counts, the PR curve points, dataset, checkpoint and list paths
  OUT/codes.h5      query/ids, query/codes, database/ids, database/codes (codes int8 ±1 [N, L], ids utf-8)
  OUT/pr_curve.png  (config.plots)
Bad input ends with one `error: ...` line and exit code 2.
"""
from __future__ import annotations

import functools
import os
import tempfile
import time
from typing import Sequence

import numpy as np
from absl import logging

from avhash_jax import validate
from common_jax import cli
from common_jax import io_util

OUTPUTS = ('metrics.json', 'codes.h5', 'pr_curve.png')
LIST_FORMAT = {'fcvid': 'fcvid', 'actnet': 'activitynet', 'activitynet': 'activitynet'}


@functools.lru_cache(maxsize=8)
def _code_fn(model_config):
  """jit(params, image, audio) -> int8 ±1 codes [B, bits]; one compiled function per architecture."""
  import jax
  import jax.numpy as jnp
  from avhash_jax import model as model_lib
  net = model_lib.AVHash(model_config)

  def codes(params, image, audio):
    _, _, h = net.apply({'params': params}, image, audio, deterministic=True)
    return jnp.where(h >= 0, 1, -1).astype(jnp.int8)
  return jax.jit(codes)


def extract_codes(model_config, params, features, ids: Sequence[str], batch_size: int = 256, mesh=None,
                  progress: bool = False, desc: str = 'codes') -> np.ndarray:
  """int8 ±1 codes ``[len(ids), bits]`` of the videos `ids` read from `features` (an ``AVFeatures``).

  Fixed batches of ``batch_size`` (rounded up to a multiple of the mesh's data shards), the last one padded
  with zeros; the padded rows are dropped. `params` may be host arrays or already placed on the mesh.
  """
  import jax
  from common_jax import mesh as mesh_lib
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be >= 1')
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  shards = mesh_lib.batch_size_multiple(mesh)
  batch = -(-batch_size // shards) * shards
  params = jax.device_put(params, mesh_lib.replicated(mesh))
  sharding = mesh_lib.batch_sharding(mesh, axis=0, ndim=3)
  fn = _code_fn(model_config)
  shape = (model_config.tokens, model_config.hidden_size)
  out = np.empty((len(ids), model_config.bits), np.int8)
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(ids), desc=desc, unit='video', smoothing=0.05)
  pending = None   # (start, n, device codes): host reading of the next batch overlaps the device forward
  try:
    for start in range(0, len(ids), batch):
      chunk = ids[start:start + batch]
      image = np.zeros((batch, *shape), np.float32)
      audio = np.zeros((batch, *shape), np.float32)
      for j, vid in enumerate(chunk):
        image[j], audio[j] = features.read(vid)
      result = fn(params, jax.device_put(image, sharding), jax.device_put(audio, sharding))
      if pending is not None:
        s, n, r = pending
        out[s:s + n] = np.asarray(r)[:n]
      pending = (start, len(chunk), result)
      if bar is not None:
        bar.update(len(chunk))
    if pending is not None:
      s, n, r = pending
      out[s:s + n] = np.asarray(r)[:n]
  finally:
    if bar is not None:
      bar.close()
  return out


def load_model(config):
  """(ModelConfig, params) from config.checkpoint; the code length must match config.bits."""
  from avhash_jax import model as model_lib
  from common_jax import checkpoint
  if not config.checkpoint:
    raise cli.UsageError('config.checkpoint is empty: give a converted or trained checkpoint directory')
  if not os.path.isdir(config.checkpoint):
    raise cli.UsageError(f'{config.checkpoint}: checkpoint directory not found')
  params, model_dict = checkpoint.load_params(config.checkpoint)
  model_config = model_lib.ModelConfig.from_dict(model_dict, where=config.checkpoint)
  if model_config.bits != config.bits:
    raise cli.UsageError(f'{config.checkpoint}: the checkpoint has {model_config.bits}-bit codes but '
                         f'config.bits={config.bits}; use --config.bits={model_config.bits}')
  return model_config, params


def _write_codes(path: str, sets) -> None:
  """codes.h5 with one group per set ({name: (ids, codes)}), written to a temporary name and renamed."""
  import h5py
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix='.codes.', suffix='.h5.tmp', dir=directory)
  os.close(fd)
  try:
    with h5py.File(tmp, 'w') as f:
      for name, (ids, codes) in sets.items():
        g = f.create_group(name)
        g.create_dataset('ids', data=np.asarray(list(ids), dtype=object), dtype=h5py.string_dtype('utf-8'))
        g.create_dataset('codes', data=np.asarray(codes, np.int8))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _check_config(config) -> str:
  validate.evaluation(config)
  if config.dataset not in LIST_FORMAT:
    raise cli.UsageError(f'config.dataset={config.dataset!r}; expected one of {sorted(LIST_FORMAT)}')
  needed = (['retrieval_list'] + ([] if config.get('shards') else ['image_h5', 'audio_h5'])
            + ([] if config.all_vs_all else ['test_list']))
  for key in needed:
    if not config[key]:
      raise cli.UsageError(f'config.{key} is empty')
  return LIST_FORMAT[config.dataset]


def evaluate(config, workdir: str, mesh=None) -> dict:
  """Runs the whole evaluation and writes OUT/{metrics.json, codes.h5, pr_curve.png}; returns the metrics."""
  import jax
  from avhash_jax import metrics as metrics_lib
  from input_pipeline.avhash import lists as data_lists
  from common_jax import mesh as mesh_lib

  fmt = _check_config(config)
  writes = jax.process_index() == 0   # several processes: each computes everything, process 0 writes
  if writes:
    os.makedirs(workdir, exist_ok=True)
    io_util.remove_if_exists(*(os.path.join(workdir, name) for name in OUTPUTS))
  db_ids, db_labels = data_lists.read_list(config.retrieval_list, fmt)
  if config.all_vs_all:
    q_ids, q_labels, q_list = db_ids, db_labels, config.retrieval_list
  else:
    q_ids, q_labels = data_lists.read_list(config.test_list, fmt)
    q_list = config.test_list
  for path, labels in ((q_list, q_labels), (config.retrieval_list, db_labels)):
    if labels.max() >= config.num_classes:
      raise data_lists.ListError(f'{path}: label {int(labels.max()) + 1 - (fmt == "activitynet")} exceeds '
                                 f'config.num_classes={config.num_classes}')
  model_config, params = load_model(config)
  from input_pipeline.avhash import shards as av_shards
  features = av_shards.open_features(config.image_h5, config.audio_h5, config.get('shards', ''),
                                     frames=model_config.tokens, dim=model_config.hidden_size)
  try:
    features.check_ids(q_ids, q_list)
    if not config.all_vs_all:
      features.check_ids(db_ids, config.retrieval_list)
    cli.enable_compilation_cache(config.compilation_cache)
    if mesh is None:   # with several processes, codes are computed on this process's devices (no gather)
      mesh = mesh_lib.make_mesh(config.mesh, None if jax.process_count() == 1 else jax.local_devices())
    t0 = time.time()
    db_codes = extract_codes(model_config, params, features, db_ids, config.eval_batch_size, mesh,
                             progress=config.progress, desc='database codes')
    if config.all_vs_all:
      q_codes = db_codes
    else:
      q_codes = extract_codes(model_config, params, features, q_ids, config.eval_batch_size, mesh,
                              progress=config.progress, desc='query codes')
    code_seconds = time.time() - t0
  finally:
    features.close()

  t1 = time.time()
  res = metrics_lib.evaluate(q_codes, q_labels, db_codes, db_labels, ks=tuple(int(k) for k in config.ks),
                             with_all=True, with_pr=True, chunk=config.metric_chunk)
  pr = res.pop('pr')
  out = dict(res)
  out.update({
      'dataset': config.dataset, 'bits': model_config.bits,
      'checkpoint': os.path.abspath(config.checkpoint),
      'query_list': os.path.abspath(q_list), 'database_list': os.path.abspath(config.retrieval_list),
      'all_vs_all': bool(config.all_vs_all), 'num_queries': len(q_ids), 'num_database': len(db_ids),
      'tie_order': 'stable: equal Hamming distances in database (list) order',
      'pr_curve': {'k': [int(k) for k in pr['k']], 'precision': [float(x) for x in pr['precision']],
                   'recall': [float(x) for x in pr['recall']]},
      'code_seconds': code_seconds, 'metric_seconds': time.time() - t1, 'devices': jax.device_count()})
  if not writes:
    return out
  _write_codes(os.path.join(workdir, 'codes.h5'),
               {'query': (q_ids, q_codes), 'database': (db_ids, db_codes)})
  if config.plots:
    metrics_lib.plot_pr({f'AVHash {model_config.bits} bits': pr}, os.path.join(workdir, 'pr_curve.png'),
                        title=f'{config.dataset}: {len(q_ids)} queries vs {len(db_ids)} videos')
  io_util.write_json(os.path.join(workdir, 'metrics.json'), out)
  logging.info('wrote %s', os.path.join(workdir, 'metrics.json'))
  return out


def run(config, workdir) -> int:
  """Checks the config values and the workdir, then evaluates; bad input: one error line, exit code 2."""
  with cli.evaluation(config, workdir, 'configs/fcvid.py', OUTPUTS, _check_config):
    m = evaluate(config, workdir)
  ks = [int(k) for k in config.ks]
  print(f'{m["dataset"]} {m["bits"]} bits: {m["num_queries"]} queries vs {m["num_database"]} database videos')
  print('  mAP@all={:.4f}  '.format(m['mAP@all']) + '  '.join(f'mAP@{k}={m[f"mAP@{k}"]:.4f}' for k in ks))
  print('  ' + '  '.join(f'mAP@{k}_ssvh={m[f"mAP@{k}_ssvh"]:.4f}' for k in ks))
  print('  ' + '  '.join(f'P@{k}={m[f"P@{k}"]:.4f}' for k in ks))
  print('  ' + '  '.join(f'R@{k}={m[f"R@{k}"]:.4f}' for k in ks))
  print(f'wrote {os.path.join(workdir, "metrics.json")}, codes.h5'
        + (', pr_curve.png' if config.plots else ''))
  return 0


if __name__ == '__main__':
  cli.run_config_program(run, 'Config file (configs/fcvid.py, configs/activitynet.py).',
                         'Output folder for metrics.json, codes.h5 and pr_curve.png.')
