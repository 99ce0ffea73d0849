"""A SYNTHETIC, class-structured audio-visual corpus in the FCVID formats, for the AVHash training demo.

Nothing here is real data. The corpus is built so that the task needs what AVHash learns:

* classes = (visual group) x (audio group): the image features carry only the visual group of the class and
  the audio features only its audio group, so neither modality alone separates the classes — the fused
  code must combine both (as a "concert" and a "rally" can look alike and sound different);
* every video also carries a strong *recording style* (one of `styles`, shared by all classes, different in
  each modality) that dominates the raw features: nearest neighbours in raw feature space, and the codes of
  the untrained network, mostly retrieve videos of the same style rather than the same class;
* each of the 25 tokens is the video's vector plus independent per-token noise.

Written files (FCVID conventions): `image.h5`, `audio.h5` (a group per video id holding float32
`vectors [25, dim]`), and `train.txt`, `val.txt`, `test.txt` (`video_id,label` lines, 1-based labels).
"""
from __future__ import annotations

import os
from typing import Dict

import h5py
import numpy as np

from common_jax import io_util


def _unit(rng, n, dim):
  x = rng.standard_normal((n, dim))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_demo(directory: str, *, dim: int = 64, tokens: int = 25, visual_groups: int = 4, audio_groups: int = 4,
              styles: int = 6, train_per_class: int = 24, val_per_class: int = 6, test_per_class: int = 6,
              class_scale: float = 1.0, style_scale: float = 2.0, noise: float = 1.0,
              seed: int = 0) -> Dict[str, str]:
  """Writes the corpus into `directory` (reused if an identical one is there) and returns its paths."""
  directory = os.path.abspath(directory)
  paths = {k: os.path.join(directory, f) for k, f in (
      ('image_h5', 'image.h5'), ('audio_h5', 'audio.h5'), ('train_list', 'train.txt'),
      ('val_list', 'val.txt'), ('test_list', 'test.txt'))}
  stamp = dict(dim=dim, tokens=tokens, visual_groups=visual_groups, audio_groups=audio_groups, styles=styles,
               train_per_class=train_per_class, val_per_class=val_per_class, test_per_class=test_per_class,
               class_scale=class_scale, style_scale=style_scale, noise=noise, seed=seed)
  stamp_path = os.path.join(directory, 'demo.json')
  if os.path.exists(stamp_path) and all(os.path.exists(p) for p in paths.values()):
    import json
    with open(stamp_path) as f:
      if json.load(f) == stamp:
        return paths
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  classes = visual_groups * audio_groups
  proto = {'image': _unit(rng, visual_groups, dim) * class_scale * np.sqrt(dim),
           'audio': _unit(rng, audio_groups, dim) * class_scale * np.sqrt(dim)}
  style = {'image': _unit(rng, styles, dim) * style_scale * np.sqrt(dim),
           'audio': _unit(rng, styles, dim) * style_scale * np.sqrt(dim)}
  splits = {'train_list': train_per_class, 'val_list': val_per_class, 'test_list': test_per_class}
  features = {'image': {}, 'audio': {}}
  lines = {k: [] for k in splits}
  for key, per_class in splits.items():
    split = key.split('_')[0]
    for c in range(classes):
      for v in range(per_class):
        vid = f'demo_{split}_c{c:02d}_v{v:03d}'
        s = int(rng.integers(styles))
        group = {'image': c // audio_groups, 'audio': c % audio_groups}
        for kind in ('image', 'audio'):
          base = proto[kind][group[kind]] + style[kind][s]
          features[kind][vid] = (base[None] + noise * rng.standard_normal((tokens, dim))).astype(np.float32)
        lines[key].append(f'{vid},{c + 1}')
  for kind in ('image', 'audio'):
    tmp = paths[f'{kind}_h5'] + '.tmp'
    with h5py.File(tmp, 'w') as f:
      for vid, x in features[kind].items():
        f.create_group(vid).create_dataset('vectors', data=x)
    os.replace(tmp, paths[f'{kind}_h5'])
  for key in splits:
    with io_util.atomic_open(paths[key], 'w') as f:
      f.write('\n'.join(lines[key]) + '\n')
  io_util.write_json(stamp_path, stamp)
  return paths
