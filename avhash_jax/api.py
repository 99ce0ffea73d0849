"""AVHash in your own code: binary codes of video files and a searchable index of them.

  from avhash_jax import api
  m = api.load('ckpt/avhash_64', clip='ckpt/clip_vitl14', ast='ckpt/ast')
  code = m.code('a.mp4')                      # int8 ±1 [bits]
  m.distance('a.mp4', 'b.mp4')                # Hamming distance between the two codes
  ix = api.Index('my_index', m)               # created if new, else opened (same checkpoint only)
  ix.add(['a.mp4', 'b.mp4'])                  # ids are the file names without extension
  ix.search('c.mp4', top_k=5)                 # [{'rank', 'id', 'path', 'distance', 'score'}, ...]
  ix.remove(['a'])

The same index interface as hapvr_jax.api.Index (add, remove, search, ids, len), over the directories of
`python -m avhash_jax.index` / `avhash_jax.search`: an index built by either is usable by the other.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from avhash_jax import index as index_lib
from avhash_jax import search as search_lib
from common_jax import hamming
from common_jax.index_dir import IndexDir, IndexDirError
from extraction import runner as extraction


class Model:
  """An AVHash checkpoint with the CLIP and AST backbones that feed it."""

  def __init__(self, checkpoint: str, clip: str, ast: str, workers: int = 4):
    self.checkpoint, self.clip, self.ast, self.workers = checkpoint, clip, ast, workers
    self.config, self.params, self.fingerprint = index_lib.load_checkpoint(checkpoint)

  @property
  def _model(self):
    return self.config, self.params, self.fingerprint

  def packed_codes(self, paths: Sequence[str]) -> np.ndarray:
    """Packed codes uint8 [len(paths), bits/8]."""
    return search_lib.code_videos(list(paths), self._model, self.clip, self.ast, self.workers)

  def codes(self, paths: Sequence[str]) -> np.ndarray:
    """±1 codes int8 [len(paths), bits]."""
    bits = np.unpackbits(self.packed_codes(paths), axis=1)[:, :self.config.bits]
    return np.where(bits > 0, 1, -1).astype(np.int8)

  def code(self, path: str) -> np.ndarray:
    """The ±1 code int8 [bits] of one video file."""
    return self.codes([path])[0]

  def distance(self, a: str, b: str) -> int:
    """Hamming distance between the codes of two video files."""
    packed = self.packed_codes([a, b])
    return int(hamming.distances(packed[:1], packed[1:])[0, 0])


def load(checkpoint: str, clip: str, ast: str, workers: int = 4) -> Model:
  return Model(checkpoint, clip, ast, workers)


class Index:
  """A searchable AVHash index directory (created if new)."""

  def __init__(self, path: str, model: Model | None = None, backend: str = 'auto'):
    self.model, self.backend = model, backend
    if model is not None:
      self._dir = index_lib.open_or_create(path, index_lib.index_config(model.config, model.fingerprint))
    else:
      self._dir = IndexDir.open(path, index_lib.KIND)
    self.path = self._dir.path

  def _need_model(self, what: str) -> Model:
    if self.model is None:
      raise search_lib.QueryError(f'{what} needs a model: api.Index(path, api.load(...))')
    return self.model

  def add(self, videos: Sequence[str] | Mapping[str, str]) -> int:
    """Adds video files (a list: ids are the file names without extension; or {id: path}); videos already
    in the index are skipped. Returns the number added."""
    m = self._need_model('adding videos')
    items = videos.items() if isinstance(videos, Mapping) else (
        (os.path.splitext(os.path.basename(p))[0], p) for p in videos)
    todo = [extraction.Video(v, p) for v, p in items]
    out = index_lib.add_videos(self._dir, m._model, todo, m.clip, m.ast, m.workers)
    if out.get('failures'):
      raise search_lib.QueryError(f'{self.path}: could not index {"; ".join(out["failures"])}')
    return out['added']

  def remove(self, ids: Sequence[str]) -> int:
    return self._dir.remove(ids)

  def ids(self) -> list:
    return self._dir.ids()

  def __len__(self) -> int:
    return len(self._dir)

  def __contains__(self, video_id: str) -> bool:
    return video_id in self._dir

  def search(self, query, top_k: int = 10, min_score: float = 0.0) -> list:
    """Ranked results for a video file, an id in the index, or a ±1 code: [{'rank', 'id', 'path', 'distance',
    'score'}, ...], nearest first (a query id is left out of its own results)."""
    ids, codes = index_lib.codes_of(self._dir, write=False)
    if not ids:
      raise IndexDirError(f'{self.path}: the index is empty')
    exclude = None
    if isinstance(query, str) and query in self._dir:
      q, exclude = codes[ids.index(query)][None], query
    elif isinstance(query, str):
      m = self._need_model('a query video')
      q = m.packed_codes([query])
    else:
      q = hamming.pack(np.asarray(query).reshape(1, -1))
    searcher = hamming.Searcher(codes, self.backend)
    rows = search_lib.search_codes(searcher, ids, q, ['query'], top_k, [exclude], min_score)
    return [{**{k: r[k] for k in ('rank', 'id', 'distance', 'score')}, 'path': self._dir.meta(r['id']).get('path')}
            for r in rows]
