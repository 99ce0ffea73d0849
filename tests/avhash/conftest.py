"""Fixtures shared by the AVHash search tests: tiny CLIP/AST backbones, generated videos, an index of them."""
import dataclasses

import numpy as np
import pytest

def _convert(tmp, arch, state_dict):
  import torch
  from backbones import convert_backbone
  pth = str(tmp / f'{arch}.pth')
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, pth)
  out = str(tmp / arch)
  assert convert_backbone.main([f'--arch={arch}', f'--torch_checkpoint={pth}', f'--output={out}',
                                '--num_heads=2']) == 0
  return out


@pytest.fixture(scope='session')
def av_videos(tmp_path_factory):
  """Tiny CLIP/AST backbones at the real input sizes, an AVHash checkpoint of their width, four generated
  videos (one unreadable) and an index of the three good ones, built through the CLI. Imports inside: the
  other AVHash tests do not pay for torch."""
  from avhash_jax import index as index_lib
  from avhash_jax import model as model_lib
  from backbones import ast as ast_lib, clip as clip_lib
  from common_jax import checkpoint
  from tests import video_fixtures
  from tests.references import ast_torch, clip_torch
  tmp = tmp_path_factory.mktemp('avsearch')
  clip_cfg = dataclasses.replace(clip_lib.Config.tiny(), image_size=224, patch_size=56, projection_dim=32)
  clip = _convert(tmp, 'clip_vitl14', clip_torch.build(clip_cfg, seed=1, layout='openai')[1])
  ast = _convert(tmp, 'ast', ast_torch.build(ast_lib.Config.tiny(), seed=2, layout='hub')[1])
  model = model_lib.ModelConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, bits=16)
  ckpt = checkpoint.save_params(str(tmp / 'avhash'), model_lib.init_params(model, seed=3), model.to_dict())
  paths = {'tone': str(tmp / 'tone.mp4'), 'silent': str(tmp / 'silent.mp4'), 'long': str(tmp / 'long.mp4'),
           'broken': str(tmp / 'broken.mp4')}
  video_fixtures.make_video(paths['tone'], seconds=3.0, fps=10, size=(320, 240), audio_hz=440.0)
  video_fixtures.make_video(paths['silent'], seconds=2.0, fps=10, size=(240, 320), audio_hz=None)
  video_fixtures.make_video(paths['long'], seconds=5.0, fps=8, size=(256, 256), audio_hz=1000.0)
  video_fixtures.make_corrupt(paths['broken'])
  listing = tmp / 'list.txt'
  listing.write_text(''.join(f'{k}\t{p}\n' for k, p in paths.items()))
  index = str(tmp / 'index')
  common = [f'--checkpoint={ckpt}', f'--clip={clip}', f'--ast={ast}']
  assert index_lib.main([f'--index={index}', f'--videos={listing}', '--workers=2', *common]) == 0
  return dict(paths=paths, index=index, common=common, ckpt=ckpt, clip=clip, ast=ast, tmp=tmp)
