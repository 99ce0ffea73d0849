"""PNG views of a training run, where a picture says more than numbers (written at every evaluation).

* `WORKDIR/plots/map.png`: the evaluation mAP against the step, with the step-0 baselines as lines;
* `WORKDIR/plots/similarity_<step>.png`: what the network sees for one training pair (a weak clip and its
  strong view, the batch's first): the frame-to-frame similarity map that enters the comparator and the
  comparator's output (before the hardtanh), the original's TensorBoard heat-maps as an image.

Files are drawn on an Agg canvas (no display needed) and written to a temporary name, then renamed.
"""
from __future__ import annotations

import json

import numpy as np

from common_jax import plots


def _figure(size):
  return plots.figure(size, layout='constrained')


def _save(fig, path):
  plots.save_png(fig, path, dpi=110)


def plot_map_curve(metrics_jsonl: str, path: str) -> None:
  """mAP of every 'trained'/'untrained' evaluation line against the step; other models as horizontal lines."""
  curve, flat = {}, {}
  with open(metrics_jsonl) as f:
    for line in f:
      r = json.loads(line)
      if not isinstance(r.get('mAP'), (int, float)):
        continue
      if r.get('model') in ('trained', 'untrained'):
        curve[r['step']] = r['mAP']
      else:
        flat[r.get('model', '?')] = r['mAP']
  if not curve:
    return
  fig = _figure((5.5, 3.8))
  ax = fig.add_subplot()
  steps = sorted(curve)
  ax.plot(steps, [curve[s] for s in steps], marker='o', label='similarity network')
  for k, (name, value) in enumerate(sorted(flat.items())):
    ax.axhline(value, color=f'C{k + 1}', linestyle='--', label=name)
  ax.set(xlabel='step', ylabel='mAP (DSVR)', ylim=(0, 1.02), title='evaluation during training')
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right', fontsize=8)
  _save(fig, path)


def plot_similarity(f2f: np.ndarray, comparator: np.ndarray, path: str, title: str = '') -> None:
  """f2f [T, T] and comparator output [T/4, T/4] side by side."""
  fig = _figure((8, 3.8))
  for k, (data, name, lim) in enumerate(((f2f, 'frame-to-frame similarity (CNN input)', None),
                                         (comparator, 'comparator output', (-1, 1)))):
    ax = fig.add_subplot(1, 2, k + 1)
    im = ax.imshow(np.asarray(data, np.float32), cmap='viridis', interpolation='nearest',
                   vmin=None if lim is None else lim[0], vmax=None if lim is None else lim[1])
    ax.set(title=name, xlabel='strong view frame' + ('' if k == 0 else ' / 4'),
           ylabel='weak view frame' + ('' if k == 0 else ' / 4'))
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax, shrink=0.8)
  fig.suptitle(title)
  _save(fig, path)
