"""The HAP-VR training input pipeline on feature shards, with the Grain Dataset API.

  MapDataset.range(len(store)) → shuffle → repeat (reshuffled every epoch)
    → random_map(SampleClips)   per source video: one segment, one weak and one strong view (uniformly), read
                                both, weak crop / strong TT + crop (`temporal`), gather (+ black/noise bank)
    → batch(B)                  one loss group of B sources
    → random_map(MixGroup)      ViV option A on the strong clips, labels Y and M (`viv`)
    → batch(G // process_count) → [process_index::process_count] → to_iter_dataset → [mp_prefetch(workers)]

Each element of the MapDataset is a whole step batch, so `to_iter_dataset` prefetches whole batches:
cfg.read_threads threads (default 4) and cfg.prefetch_batches batches ahead (default 4). Grain's defaults
(16 threads, 500 elements) would hold ~500 step batches (≈ 70 MB each at full size) in memory.

One element (per process):

  regions  float16 [G_local, 2B, window, R, D]   weak clips 0..B-1, then strong clips B..2B-1
  teacher  float16 [G_local, 2B, window, C]
  y        float32 [G_local, 2B, 2B]             Y = 1[M Mᵀ > 0]
  m        float32 [G_local, 2B, B]

Determinism and process-count invariance: every stage is indexed globally (source i, group g) and seeded from
`seed` alone, and the process split happens last, on chunks of G_local consecutive groups: process p of P holds
chunks s·P + p of step s, i.e. the rows p·G_local .. (p+1)·G_local − 1 of the global step batch, which is where
`jax.make_array_from_process_local_data` places them. The global batch of every step is therefore the same
whatever the process count (tested: 2 processes = 1), and only the process's own chunks are ever computed
(MapDataset is lazy). Grain seeds each element's generator from (stage seed, element index), so the stream is a
pure function of (store, cfg, seed) and `get_state()/set_state()` on the iterator resume exactly at the next
batch. Transforms are top-level classes holding only the (picklable) store and plain config values: Grain
workers are spawned processes.

Without a bank in the store, strong clips are built with `synthetic_frames=False` (TSD drops the segments it
would have replaced with black/noise frames; see `temporal`).
"""
from __future__ import annotations

from typing import Any, Dict

from absl import flags
import grain
import numpy as np

from input_pipeline.hapvr import temporal
from input_pipeline.hapvr import viv

DEFAULTS = dict(window=28, sources_per_group=64, groups=2, viv_prob=.3, viv_lambda=(.3, .7),
                tt_probs=dict(temporal.DEFAULT_TT_PROBS), workers=0, read_threads=4, prefetch_batches=4)
_STAGES = dict(shuffle=0, clips=1, viv=2)


def _plain(x):
  """ConfigDict / mapping / attribute object → plain dict (used for tt_probs)."""
  if hasattr(x, 'to_dict'):
    return x.to_dict()
  if isinstance(x, dict):
    return dict(x)
  return dict(vars(x))


def read_config(cfg) -> Dict[str, Any]:
  """The pipeline's config values, with DEFAULTS for keys `cfg` lacks, validated."""
  c = {k: getattr(cfg, k, v) if not isinstance(cfg, dict) else cfg.get(k, v) for k, v in DEFAULTS.items()}
  c['tt_probs'] = _plain(c['tt_probs'])
  temporal.tt_probabilities(c['tt_probs'])
  c['viv_lambda'] = tuple(float(v) for v in c['viv_lambda'])
  for key in ('window', 'sources_per_group', 'groups', 'read_threads', 'prefetch_batches'):
    if int(c[key]) < 1:
      raise ValueError(f'cfg.{key} must be >= 1, got {c[key]}')
    c[key] = int(c[key])
  if not 0. <= float(c['viv_prob']) <= 1.:
    raise ValueError(f'cfg.viv_prob must be in [0, 1], got {c["viv_prob"]}')
  return c


def stage_seed(seed: int, stage: str, process_index: int = 0) -> int:
  """A 32-bit seed for one pipeline stage, derived from `seed` (and the process for per-process stages)."""
  seq = np.random.SeedSequence(int(seed), spawn_key=(_STAGES[stage], int(process_index)))
  return int(seq.generate_state(1, np.uint32)[0])


class SampleClips(grain.transforms.RandomMap):
  """Video index → its weak clip and strong clip, each (regions [T, R, D], teacher [T, C]) in float16."""

  def __init__(self, store, window: int, tt_probs: Dict[str, float]):
    self.store = store
    self.window = window
    self.tt_probs = dict(tt_probs)
    self._bank = None                  # (bank,) once read; per process, dropped on pickling

  def __getstate__(self):
    return dict(self.__dict__, _bank=None)

  def bank(self):
    if self._bank is None:
      self._bank = (self.store.bank(),)
    return self._bank[0]

  def random_map(self, index, rng: np.random.Generator):
    segments = self.store.segments(int(index))
    seg = segments[rng.integers(len(segments))]
    weak_key = seg.weak[rng.integers(len(seg.weak))]
    strong_key = seg.strong[rng.integers(len(seg.strong))]
    weak_r, weak_t = self.store.load(weak_key)
    strong_r, strong_t = self.store.load(strong_key)
    bank = self.bank()
    idx, kind = temporal.weak_clip(rng, len(weak_r), self.window)
    weak_r, weak_t = temporal.gather(weak_r, weak_t, idx, kind, None, rng)
    idx, kind, _ = temporal.strong_clip(rng, len(strong_r), self.window, self.tt_probs,
                                        synthetic_frames=bank is not None)
    strong_r, strong_t = temporal.gather(strong_r, strong_t, idx, kind, bank, rng)
    return dict(weak_regions=weak_r, weak_teacher=weak_t, strong_regions=strong_r, strong_teacher=strong_t)


class MixGroup(grain.transforms.RandomMap):
  """One loss group of B sampled pairs → ViV on the strong clips, stacked clips and labels."""

  def __init__(self, prob: float, lam_range):
    self.prob = float(prob)
    self.lam_range = tuple(float(v) for v in lam_range)

  def random_map(self, group, rng: np.random.Generator):
    sources = group['weak_regions'].shape[0]
    strong_r, strong_t, info = viv.mix(group['strong_regions'], group['strong_teacher'], rng,
                                       prob=self.prob, lam_range=self.lam_range)
    y, m = viv.labels(info['hosts'], info['lams'], sources)
    return dict(regions=np.concatenate([group['weak_regions'], strong_r]),
                teacher=np.concatenate([group['weak_teacher'], strong_t]), y=y, m=m)


def make_dataset(store, cfg, *, seed: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The training dataset of one process (see the module docstring for stages and element format)."""
  c = read_config(cfg)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, process_count={process_count})')
  if c['groups'] % process_count:
    raise ValueError(f'cfg.groups ({c["groups"]}) must be divisible by the process count ({process_count}): '
                     'each process builds cfg.groups // process_count whole loss groups')
  if len(store) < c['sources_per_group']:
    raise ValueError(f'the store has {len(store)} videos: fewer than cfg.sources_per_group '
                     f'({c["sources_per_group"]}) sources of one loss group; use a bigger store or a smaller '
                     'cfg.sources_per_group')
  if not 0 <= int(seed) < 2**32:
    raise ValueError(f'seed must be in [0, 2**32), got {seed}')
  ds = grain.MapDataset.range(len(store)).shuffle(seed=stage_seed(seed, 'shuffle'))
  ds = ds.repeat()
  ds = ds.random_map(SampleClips(store, c['window'], c['tt_probs']), seed=stage_seed(seed, 'clips'))
  ds = ds.batch(c['sources_per_group'], drop_remainder=True)
  ds = ds.random_map(MixGroup(c['viv_prob'], c['viv_lambda']), seed=stage_seed(seed, 'viv'))
  ds = ds.batch(c['groups'] // process_count, drop_remainder=True)
  ds = ds[process_index::process_count]
  out = ds.to_iter_dataset(grain.ReadOptions(num_threads=c['read_threads'],
                                             prefetch_buffer_size=c['prefetch_batches']))
  if int(c['workers']) > 0:
    if not flags.FLAGS.is_parsed():
      raise ValueError('cfg.workers > 0 needs parsed absl flags (Grain workers read them): run under '
                       'absl.app.run, or call absl.flags.FLAGS.mark_as_parsed() first')
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(c['workers'])))
  return out


def make_iterator(store, cfg, *, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
  """A checkpointable iterator (`get_state()` / `set_state()`) over `make_dataset`; `close()` it when done."""
  return iter(make_dataset(store, cfg, seed=seed, process_index=process_index, process_count=process_count))
