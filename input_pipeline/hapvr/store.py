"""Where the training views live: the `ViewStore` interface the input pipeline reads, and an in-memory store.

A training video contributes one or more fixed-length *segments* (56 frames by default: twice the 28-frame
clip, so the temporal transforms have frames to spare and storage does not depend on video length); each
segment has several stored *views* of the same frames: `weak` views (mild spatial augmentation) and `strong`
views (strong spatial/pixel augmentation). A view holds

  regions  [T, R, D]  float16   region features (ResNet-50 iRMAC + PCA, unit norm per region; R = 9, D = 512)
  teacher  [T, C]     float16   teacher frame features (DINO ViT-S/16 CLS, C = 384), for the pseudo-labels

and the store may also carry a *bank* of replacement frames for the TSD black/noise frames (the train step
never sees pixels, so their features are computed once at extraction):
{'black_regions' [Kb, R, D], 'black_teacher' [Kb, C], 'noise_regions' [Kn, R, D], 'noise_teacher' [Kn, C]}.

Stores are random access and picklable (Grain workers are spawned processes): file handles open lazily and
are dropped on pickling.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np

WEAK, STRONG = 'weak', 'strong'
BANK_KEYS = ('black_regions', 'black_teacher', 'noise_regions', 'noise_teacher')


@dataclasses.dataclass(frozen=True)
class Segment:
  """The stored views of one segment of one video: keys the store's `load` understands."""
  weak: tuple
  strong: tuple


@dataclasses.dataclass(frozen=True)
class StoreInfo:
  frames: int        # frames per segment (56)
  regions: int       # R (9)
  dims: int          # D (512)
  teacher_dims: int  # C (384)


class ViewStore:
  """Interface: `info`, `video_ids`, `segments(i)`, `load(key) -> (regions, teacher)`, `bank()`."""
  info: StoreInfo

  @property
  def video_ids(self) -> Sequence[str]:
    raise NotImplementedError

  def __len__(self) -> int:
    return len(self.video_ids)

  def segments(self, index: int) -> List[Segment]:
    raise NotImplementedError

  def load(self, key):
    """(regions [T, R, D], teacher [T, C]) of one stored view, as stored (float16)."""
    raise NotImplementedError

  def bank(self) -> Optional[Dict[str, np.ndarray]]:
    return None


class IndexedStore(ViewStore):
  """A store whose index is built at construction: subclasses set `_ids` (sorted video ids), `_segments`
  (one list of Segment per video) and `_bank` (or None)."""
  _ids: List[str]
  _segments: List[List[Segment]]
  _bank: Optional[Dict[str, np.ndarray]] = None

  @property
  def video_ids(self):
    return self._ids

  def segments(self, index):
    return self._segments[index]

  def bank(self):
    return self._bank


class MemoryStore(IndexedStore):
  """Views held in memory: {video_id: [segment: {'weak': [(regions, teacher), ...], 'strong': [...]}]}."""

  def __init__(self, videos: Dict[str, list], bank: Optional[Dict[str, np.ndarray]] = None):
    if not videos:
      raise ValueError('MemoryStore: no videos')
    self._ids = sorted(videos)
    self._views, self._segments = [], []
    first = None
    for vid in self._ids:
      segs = []
      for s, seg in enumerate(videos[vid]):
        keys = {WEAK: [], STRONG: []}
        for kind in (WEAK, STRONG):
          for regions, teacher in seg.get(kind, ()):
            first = first or (regions.shape, teacher.shape)
            if regions.shape != first[0] or teacher.shape != first[1]:
              raise ValueError(f'MemoryStore: video {vid!r} segment {s} {kind} view has shapes '
                               f'{regions.shape}/{teacher.shape}; expected {first[0]}/{first[1]}')
            keys[kind].append(len(self._views))
            self._views.append((np.asarray(regions, np.float16), np.asarray(teacher, np.float16)))
        if not keys[WEAK] or not keys[STRONG]:
          raise ValueError(f'MemoryStore: video {vid!r} segment {s} needs at least one weak and one strong view')
        segs.append(Segment(tuple(keys[WEAK]), tuple(keys[STRONG])))
      if not segs:
        raise ValueError(f'MemoryStore: video {vid!r} has no segments')
      self._segments.append(segs)
    (t, r, d), (_, c) = first
    self.info = StoreInfo(frames=t, regions=r, dims=d, teacher_dims=c)
    self._bank = None if bank is None else {k: np.asarray(bank[k], np.float16) for k in BANK_KEYS}

  def load(self, key):
    return self._views[key]
