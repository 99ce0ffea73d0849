"""The embedded training demo's data: a SYNTHETIC world of region-feature "videos" (never a benchmark result).

A frame is 9 region vectors in D dims. Two kinds of content live in orthogonal subspaces:

* scene content (the last D - 16 dims): each video is a few shots, a shot is 9 random region vectors, and
  each frame is its shot plus noise;
* a channel overlay (the first 16 dims): one of a few "channel templates" (think logo, frame, banner) covers 3
  fixed regions of every frame of a video. Many unrelated videos share a template.

The overlay is what makes the demo a retrieval problem: a query's same-channel distractors share 3 of its 9
regions exactly, while its real copies were re-uploaded by another channel (a different overlay) and are
noisier. Region-level Chamfer on the raw features is fooled by the overlays; the untrained network is worse
(random attention and comparator). Self-supervised training can fix both: in-batch negatives share
overlays, strong views swap the overlay (like the original's text/emoji overlays), so the losses push the
attention to ignore overlay regions and the comparator to read the temporal structure.

`make_demo(directory, ...)` writes:

* `shards/`: training shards in the real format (input_pipeline.hapvr.shards): per video one segment of
  2 x window frames with 1 weak view (light noise) and 2 strong views (heavier noise, overlay swapped with
  p = 0.5), teacher features (a fixed random projection of each frame's mean region vector, standing in for
  DINO), and a bank of black/noise frames for TSD;
* `eval/`: a FIVR-format query/database split (`fivr_audio.pickle`, `fivr_easy_duplicates.txt`, DnS-format
  `features.hdf5`): per query 2 near-duplicates (temporal crop, other overlay, heavy noise), 1 duplicate
  scene (half the query at 2x slow motion inside other footage), 6 same-channel distractors, plus
  unrelated videos. Its ND and DS copies are the positives of the DSVR task, the demo's mAP.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from common_jax import io_util
from hapvr_jax import synthetic

OVERLAY_DIMS = 16


class World:
  """The generative model above; all randomness from one seed."""

  def __init__(self, seed: int = 0, dims: int = 64, templates: int = 6, overlay_regions: int = 3,
               teacher_dims: int = 32, regions: int = 9):
    if dims <= OVERLAY_DIMS:
      raise ValueError(f'demo dims={dims}: must exceed the {OVERLAY_DIMS} overlay dims')
    self.rng = np.random.default_rng(seed)
    self.dims, self.regions = dims, regions
    self.templates = []
    for _ in range(templates):
      where = np.sort(self.rng.choice(regions, overlay_regions, replace=False))
      vec = np.zeros((overlay_regions, dims))
      vec[:, :OVERLAY_DIMS] = self.rng.normal(size=(overlay_regions, OVERLAY_DIMS))
      self.templates.append((where, synthetic.normalise(vec)))
    self.teacher_proj = self.rng.normal(size=(dims, teacher_dims)) / np.sqrt(dims)

  def other_template(self, t: int) -> int:
    return (t + 1 + int(self.rng.integers(len(self.templates) - 1))) % len(self.templates)

  def video(self, length: int, template=None) -> dict:
    n_shots = int(self.rng.integers(2, 5))
    cuts = np.sort(self.rng.choice(np.arange(1, length), n_shots - 1, replace=False))
    shots = np.zeros((n_shots, self.regions, self.dims))
    shots[..., OVERLAY_DIMS:] = self.rng.normal(size=(n_shots, self.regions, self.dims - OVERLAY_DIMS))
    return {'shots': synthetic.normalise(shots), 'shot_of': np.searchsorted(cuts, np.arange(length), side='right'),
            'template': int(self.rng.integers(len(self.templates))) if template is None else template}

  def render(self, video: dict, noise: float, template=None, frames=None) -> np.ndarray:
    """[T, R, D] unit-norm regions of the given frames, with this overlay and per-dimension noise."""
    frames = np.arange(len(video['shot_of'])) if frames is None else np.asarray(frames)
    x = video['shots'][video['shot_of'][frames]].copy()
    where, vec = self.templates[video['template'] if template is None else template]
    x[:, where] = vec[None]
    return synthetic.normalise(x + noise / np.sqrt(self.dims) * self.rng.normal(size=x.shape))

  def teacher(self, regions: np.ndarray) -> np.ndarray:
    return synthetic.normalise(regions.mean(axis=1) @ self.teacher_proj)


def write_training_shards(world: World, directory: str, videos: int, window: int) -> str:
  from input_pipeline.hapvr import shards
  frames = 2 * window
  ids = synthetic.random_ids(world.rng, videos, 'train_')
  bank = {}
  for kind in ('black', 'noise'):
    if kind == 'black':   # one fixed "black frame" look, seen through per-entry noise
      base = np.repeat(synthetic.normalise(world.rng.normal(size=(1, world.regions, world.dims))), 64, 0)
      regions = synthetic.normalise(base + 0.5 / np.sqrt(world.dims) * world.rng.normal(size=base.shape))
    else:
      regions = synthetic.normalise(world.rng.normal(size=(64, world.regions, world.dims)))
    bank[f'{kind}_regions'], bank[f'{kind}_teacher'] = regions, world.teacher(regions)
  with shards.ShardWriter(directory, name='demo', records_per_shard=256, bank=bank) as writer:
    for vid in ids:
      v = world.video(frames)
      weak = world.render(v, 0.3)
      views = {'weak': [(weak, world.teacher(weak))], 'strong': []}
      for _ in range(2):
        template = v['template'] if world.rng.random() < 0.5 else int(world.rng.integers(len(world.templates)))
        strong = world.render(v, 0.7, template=template)
        views['strong'].append((strong, world.teacher(strong)))
      writer.add_video(vid, [views])
  return directory


def write_eval_corpus(world: World, directory: str, num_queries: int, num_database: int) -> dict:
  rng = world.rng
  per_query = 2 + 1 + 6
  if num_database < per_query * num_queries:
    raise ValueError(f'demo.num_database={num_database} < {per_query} planted videos x {num_queries} queries')
  ids = synthetic.random_ids(rng, num_queries + num_database)
  queries, database = ids[:num_queries], list(rng.permutation(ids[num_queries:]))
  features, annotation, easy = {}, {}, []
  pool = iter(database)
  for q in queries:
    length = int(rng.integers(24, 48))
    v = world.video(length)
    features[q] = world.render(v, 0.5)
    annotation[q] = {'ND': [], 'DS': [], 'CS': [], 'IS': []}
    for c in range(3):
      d = next(pool)
      other = world.other_template(v['template'])
      if c < 2:   # near-duplicate: re-uploaded by another channel, trimmed, heavily re-encoded
        a, b = int(rng.integers(0, 4)), length - int(rng.integers(0, 4))
        features[d] = world.render(v, 1.0, template=other, frames=np.arange(a, b))
        annotation[q]['ND'].append(d)
        if c == 0:
          easy.append(d)
      else:       # duplicate scene: half of it at 2x slow motion, after other footage
        half = length // 2
        s = int(rng.integers(0, length - half))
        part = world.render(v, 1.0, template=other, frames=np.repeat(np.arange(s, s + half), 2))
        host = world.video(int(rng.integers(10, 30)), template=other)
        features[d] = np.concatenate([world.render(host, 0.5), part])
        annotation[q]['DS'].append(d)
    for _ in range(6):   # same channel, unrelated content
      features[next(pool)] = world.render(world.video(int(rng.integers(24, 48)), template=v['template']), 0.5)
  for d in pool:
    features[d] = world.render(world.video(int(rng.integers(24, 48))), 0.5)
  path = synthetic.write_fivr_files(directory, features, queries, database, annotation, easy)
  return {'features': path, 'annotations': directory}


def make_demo(directory: str, *, dims: int, window: int, train_videos: int, num_queries: int,
              num_database: int, seed: int = 0) -> dict:
  """Writes (or reuses, if complete) the demo data; returns {'shards', 'features', 'annotations'}."""
  shard_dir = os.path.join(directory, 'shards')
  eval_dir = os.path.join(directory, 'eval')
  done = os.path.join(directory, 'COMPLETE')
  if not os.path.exists(done):
    for d in (shard_dir, eval_dir):
      shutil.rmtree(d, ignore_errors=True)
    world = World(seed=seed, dims=dims)
    write_training_shards(world, shard_dir, train_videos, window)
    write_eval_corpus(world, eval_dir, num_queries, num_database)
    with io_util.atomic_open(done) as f:
      f.write(f'dims={dims} window={window} train_videos={train_videos} seed={seed}\n')
  return {'shards': shard_dir, 'features': os.path.join(eval_dir, 'features.hdf5'), 'annotations': eval_dir}
