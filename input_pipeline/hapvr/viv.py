"""Video-in-video at feature level, and the batch labels M, Y.

The backbones never run in the train step, so a guest clip cannot be pasted into its host's pixels there;
the guest's stored region grid and teacher vector are mixed into the host's instead, with partners drawn
afresh at every step (pixel composites made at extraction would fix each video's partner for the run).

Per loss group of B source videos, on the strong clips after temporal augmentation and cropping:

* each strong clip i is, with probability p (0.3), shrunk into a host h != i drawn uniformly from the same
  group, with λ ~ U(0.3, 0.7); hosts always come from the *pre-mix* clips, never from an already mixed one;
* the guest (clip i) lands in one of the four 2×2 blocks of the 3×3 region grid, uniformly. Regions are in
  row-major grid order (region r = 3·row + col). Block b has its top-left cell at (row, col) = divmod(b, 2);
* frame t of the mixed clip = host frame t with the 5 cells outside the block unchanged, and block cell
  (row + a, col + c), a, c ∈ {0, 1}, set to the L2-normalised mean of the guest's cells
  {(a + u, c + v): u, v ∈ {0, 1}} (the guest's 3×3 grid resampled to 2×2: "the whole guest frame shrunk into
  the box");
* teacher (DINO CLS) per frame: normalise(λ·ĝ_host + (1 − λ)·ĝ_guest), ĝ the L2-normalised vectors; λ weights
  the host by its remaining area as in the original.

Clip i's row of the strong block is replaced by the mixture, so the strong clip of source i now *contains*
source h: labels as the original collate, M[s_i] = e_i + λ·e_h, Y = 1[M Mᵀ > 0]. Mixing is computed in
float32 and cast back to the input dtype; clips that are not mixed are returned bit-exact.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np

GRID = 3
BLOCKS = 4          # top-left corners (0,0), (0,1), (1,0), (1,1) of the 2×2 blocks
EPS = 1e-12


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


def shrink_grid(regions: np.ndarray) -> np.ndarray:
  """[..., 9, D] row-major 3×3 grid → [..., 2, 2, D]: stride-1 2×2 means, L2-normalised."""
  g = regions.reshape(regions.shape[:-2] + (GRID, GRID, regions.shape[-1]))
  mean = .25 * (g[..., :-1, :-1, :] + g[..., 1:, :-1, :] + g[..., :-1, 1:, :] + g[..., 1:, 1:, :])
  return _normalise(mean)


def mix_clip(host_regions, host_teacher, guest_regions, guest_teacher, lam: float, block: int):
  """One mixed clip in float32: regions [T, 9, D], teacher [T, C] (see the module docstring)."""
  out = np.array(host_regions, np.float32).reshape(-1, GRID, GRID, host_regions.shape[-1])
  row, col = divmod(int(block), 2)
  out[:, row:row + 2, col:col + 2] = shrink_grid(np.asarray(guest_regions, np.float32))
  gh = _normalise(np.asarray(host_teacher, np.float32))
  gg = _normalise(np.asarray(guest_teacher, np.float32))
  teacher = _normalise(np.float32(lam) * gh + np.float32(1. - lam) * gg)
  return out.reshape(host_regions.shape), teacher


def draw(rng: np.random.Generator, sources: int, prob: float = .3,
         lam_range: Sequence[float] = (.3, .7)) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Which clips are mixed: hosts int32 [B] (-1 = not mixed), lams float32 [B] (0 when not mixed), blocks
  int32 [B] (-1 when not mixed). A fixed number of draws per group, so the stream does not depend on outcomes."""
  u = rng.random(sources)
  host = rng.integers(max(sources - 1, 1), size=sources)
  host = host + (host >= np.arange(sources))            # uniform over h != i
  lam = rng.uniform(lam_range[0], lam_range[1], size=sources)
  block = rng.integers(BLOCKS, size=sources)
  mixed = (u < prob) & (sources > 1)
  return (np.where(mixed, host, -1).astype(np.int32), np.where(mixed, lam, 0.).astype(np.float32),
          np.where(mixed, block, -1).astype(np.int32))


def mix(regions: np.ndarray, teacher: np.ndarray, rng: np.random.Generator, *, prob: float = .3,
        lam_range: Sequence[float] = (.3, .7)) -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
  """ViV on one group of strong clips: regions [B, T, 9, D], teacher [B, T, C].

  Returns (regions, teacher, info) with info = dict(hosts, lams, blocks (see `draw`), mixed = number mixed).
  """
  sources = regions.shape[0]
  if regions.ndim != 4 or regions.shape[2] != GRID * GRID:
    raise ValueError(f'ViV needs regions [B, T, {GRID * GRID}, D] (a 3x3 grid), got {regions.shape}')
  if teacher.shape[:2] != regions.shape[:2]:
    raise ValueError(f'teacher {teacher.shape} does not match regions {regions.shape}')
  hosts, lams, blocks = draw(rng, sources, prob, lam_range)
  out_r, out_t = regions.copy(), teacher.copy()
  for i in np.flatnonzero(hosts >= 0):
    h = hosts[i]
    r, t = mix_clip(regions[h], teacher[h], regions[i], teacher[i], float(lams[i]), int(blocks[i]))
    out_r[i], out_t[i] = r.astype(regions.dtype), t.astype(teacher.dtype)
  info = dict(hosts=hosts, lams=lams, blocks=blocks, mixed=int((hosts >= 0).sum()))
  return out_r, out_t, info


def labels(mix_hosts, mix_lams, sources: int) -> Tuple[np.ndarray, np.ndarray]:
  """(Y float32 [2B, 2B], M float32 [2B, B]): rows 0..B-1 weak clips, B..2B-1 strong clips.

  M[w_i] = e_i; M[s_i] = e_i (+ λ_i·e_{h_i} when mix_hosts[i] >= 0); Y = 1[M Mᵀ > 0].
  """
  hosts = np.asarray(mix_hosts)
  if hosts.shape != (sources,):
    raise ValueError(f'mix_hosts must have shape ({sources},), got {hosts.shape}')
  m = np.concatenate([np.eye(sources), np.eye(sources)]).astype(np.float32)
  for i in np.flatnonzero(hosts >= 0):
    if hosts[i] == i or hosts[i] >= sources:
      raise ValueError(f'clip {i} has an invalid host {hosts[i]}')
    m[sources + i, hosts[i]] = mix_lams[i]
  y = (m @ m.T > 0).astype(np.float32)
  return y, m
