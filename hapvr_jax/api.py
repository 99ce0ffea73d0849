"""HAP-VR from Python: features of a video, the similarity of two videos, and a searchable index.

  from hapvr_jax import api
  model = api.load('ckpt/hapvr', backbone='ckpt/resnet50_irmac')
  x = model.features('a.mp4')                      # float32 [T, 9, 512], 1 frame/s
  sim = model.similarity('a.mp4', 'b.mp4')         # sim.score, sim.f2f [Ta, Tb], sim.comparator [Ta/4, Tb/4]
  index = api.Index('my_index', model)             # created if missing (python -m hapvr_jax.index's format)
  index.add('videos/')                             # a folder, a file, a list of files or {id: path or features}
  for hit in index.search('query.mp4', top_k=5):   # [{'rank', 'id', 'path', 'score', 'coarse_score'}]
    print(hit['rank'], hit['id'], round(hit['score'], 3))

Videos are given as file paths or as feature arrays [T, R, D] (e.g. read from a DnS feature file).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from common_jax.index_dir import IndexDir
from extraction import runner as extraction
from hapvr_jax import coarse
from hapvr_jax import index as index_lib
from hapvr_jax import search as search_lib


@dataclasses.dataclass
class Similarity:
  score: float              # the video-to-video similarity, in [-1, 1]
  f2f: np.ndarray           # frame-to-frame similarity map [Ta, Tb] (after min_len tiling)
  comparator: np.ndarray    # the comparator network's output [Ta // 4, Tb // 4], clipped to [-1, 1]


class Model:
  """A similarity network and, for video files, the backbone that extracts their features."""

  def __init__(self, model_config, params, backbone=None, fps: float = 1.0):
    self.config, self.params, self.backbone, self.fps = model_config, params, backbone, fps
    self._runner, self._engine, self._fns, self._maps, self._indexed = None, None, None, None, None

  def features(self, video) -> np.ndarray:
    """float32 [T, R, D] of a video file (decoded as the index extractor does) or of an array."""
    if not isinstance(video, (str, os.PathLike)):
      x = np.asarray(video, np.float32)
      return x[:, None] if x.ndim == 2 else x
    return self.features_and_meta(video)[0]

  def features_and_meta(self, path) -> tuple:
    """(features, metadata: path, duration, fps) of a video file, as python -m hapvr_jax.index stores them."""
    if self.backbone is None:
      raise ValueError(f'{path}: features of a video file need a backbone: api.load(checkpoint, backbone=DIR)')
    frames, meta = index_lib.decode_video(os.fspath(path), self.fps)
    if self._runner is None:
      self._runner = index_lib.features_fn(self.backbone)
    (_, x), = self._runner.add('video', frames) + self._runner.flush()
    return np.asarray(x, np.float32), meta

  def _stages(self):
    if self._fns is None:
      import jax
      from hapvr_jax import similarity as sim_lib
      from hapvr_jax.model import SimilarityNetwork
      net = SimilarityNetwork(self.config)

      def fn(p, q, t):
        call = lambda *a, method: net.apply({'params': p}, *a, method=method)
        q, t = call(q[None], method=net.index_video), call(t[None], method=net.index_video)
        f2f = call(q, t, method=net.frame_to_frame)
        c, rows, cols = call(call(f2f, method=net.comparator_input), method=net.compare)
        c = sim_lib.hardtanh(c)
        return call(c, rows, cols, method=net.video_to_video)[0, 0], f2f[0, 0], c[0, 0]
      self._fns = jax.jit(fn)
    return self._fns

  def similarity(self, a, b) -> Similarity:
    """Score, frame-to-frame map and comparator output of two videos (files or feature arrays). Videos
    longer than the engine's chunk (2048 frames) are scored whole here, chunked in a search."""
    from hapvr_jax.features import tile_min_len
    q, t = (tile_min_len(self.features(v), self.config.min_len) for v in (a, b))
    score, f2f, c = self._stages()(self.params, q, t)
    return Similarity(float(score), np.asarray(f2f), np.asarray(c))

  def localize(self, a, b, method: str = 'tn', which: str = 'f2f', **options) -> list:
    """Where `a` copies part of `b`: [(a_start, a_end, b_start, b_end, score)] in seconds (at this model's fps),
    found by hapvr_jax.localize on the pair's f2f or comparator map (hapvr_jax.matches)."""
    from hapvr_jax import matches
    return matches.segments(self._pair_maps()(self.features(a), self.features(b)), which, method, self.fps,
                            **options)

  def _pair_maps(self):
    from hapvr_jax import matches
    if self._maps is None:
      self._maps = matches.PairMaps(self.config, self.params)
    return self._maps

  @property
  def indexed_engine(self):
    """The engine for targets already weighed by their cached attention (an index search)."""
    if self._indexed is None:
      import jax
      from common_jax import mesh as mesh_lib
      from hapvr_jax import engine as engine_lib
      self._indexed = engine_lib.Engine(self.config, self.params, mesh_lib.make_mesh(devices=jax.local_devices()),
                                        engine_lib.EngineConfig(indexed_targets=True))
    return self._indexed

  @property
  def engine(self):
    if self._engine is None:
      import jax
      from common_jax import mesh as mesh_lib
      from hapvr_jax import engine as engine_lib
      self._engine = engine_lib.Engine(self.config, self.params, mesh_lib.make_mesh(devices=jax.local_devices()))
    return self._engine


def load(checkpoint: str, backbone: str | None = None, fps: float = 1.0) -> Model:
  """The network of a converted or trained checkpoint; `backbone`: a converted resnet50_irmac directory."""
  from common_jax import checkpoint as checkpoint_lib
  from hapvr_jax import model as model_lib
  params, model_dict = checkpoint_lib.load_params(checkpoint)
  config = model_lib.ModelConfig.from_dict(model_dict, where=checkpoint)
  return Model(config, params, index_lib.load_backbone(backbone) if backbone else None, fps)


def _videos(videos) -> list:
  """[(id, path or features)] from a folder, a file, a list of files or a mapping id -> path/features."""
  if isinstance(videos, Mapping):
    return list(videos.items())
  if isinstance(videos, (str, os.PathLike)):
    path = os.fspath(videos)
    if os.path.isdir(path):
      return [(v.video_id, v.path) for v in extraction.read_video_list(video_dir=path)]
    videos = [path]
  return [(os.path.splitext(os.path.basename(os.fspath(p)))[0], os.fspath(p)) for p in videos]


class Index:
  """A HAP-VR index directory (the format of python -m hapvr_jax.index) driven from Python."""

  def __init__(self, path: str, model: Model, feature_dtype: str = 'float16', coarse_index: str = 'flat'):
    self.model = model
    if os.path.exists(os.path.join(path, 'manifest.json')):
      self.ix = IndexDir.open(path, index_lib.KIND)
      search_lib.check_model(self.ix, model.config, 'model')
      if model.backbone is not None:
        search_lib.check_backbone(self.ix, model.backbone, 'backbone')
    else:
      backbone = (extraction.backbone_identity(model.backbone) if model.backbone is not None
                  else index_lib.FEATURE_FILE_BACKBONE)
      self.ix = IndexDir.create(path, index_lib.KIND, index_lib.index_config(
          backbone, model.config.dims, 9, model.fps, feature_dtype, coarse_index))

  def __len__(self) -> int:
    return len(self.ix)

  def ids(self) -> list:
    return self.ix.ids()

  def add(self, videos, batch: int = 64) -> list:
    """Adds the videos whose ids the index lacks (committed every `batch` videos); returns their ids."""
    todo = [(vid, v) for vid, v in _videos(videos) if vid not in self.ix]
    for s in range(0, len(todo), batch):
      entries = []
      for vid, v in todo[s:s + batch]:
        if isinstance(v, (str, os.PathLike)):
          x, meta = self.model.features_and_meta(v)
        else:
          x = self.model.features(v)
          meta = {'path': '', 'duration': len(x) / self.model.fps, 'fps': self.model.fps}
        entries.append(index_lib.video_entry(self.ix, vid, x, meta))
      self.ix.add(entries)
    if todo:
      index_lib.refresh_coarse(self.ix)
    return [vid for vid, _ in todo]

  def remove(self, ids: Sequence[str]) -> None:
    self.ix.remove([ids] if isinstance(ids, str) else ids)
    if len(self.ix):
      index_lib.refresh_coarse(self.ix)

  def search(self, query, top_k: int = 10, shortlist='all', min_score: float = -np.inf,
             localize: str | None = None) -> list:
    """Ranked hits for one query: an id in the index, a video file or features [T, R, D]. `localize`: an
    alignment method ('tn', ...) that adds each hit's copied segments (seconds) under 'segments'."""
    if isinstance(query, str) and query in self.ix and not os.path.isfile(query):
      item = (query, self.ix.read(query, 'features'), self.ix.read(query, 'coarse'))
    else:
      x = self.model.features(query).astype(self.ix.config['feature_dtype'])
      item = ('query' if not isinstance(query, str) else os.path.basename(query), x, coarse.describe(x))
    k = search_lib.parse_shortlist(str(shortlist), len(self.ix)) if len(self.ix) else 0
    if not k:
      raise ValueError(f'{self.ix.path}: the index is empty; add videos first')
    from hapvr_jax import index_attention
    weights = index_attention.refresh(self.ix, self.model.config, self.model.params)   # cached as the command does
    engine = self.model.engine if weights is None else self.model.indexed_engine
    rows = search_lib.search(self.ix, engine, [item], k, top_k, min_score, weights=weights)[0]
    if localize:
      from hapvr_jax import matches
      matches.localize_results([rows], {item[0]: item[1]}, lambda v: self.ix.read(v, 'features'),
                               self.model._pair_maps(), self.ix.config['fps'], method=localize)
    return rows
