r"""Copy detection and localisation end to end on your own clips, in one command.

  python -m hapvr_jax.copy_demo --videos=../shared/data/videos --output=/tmp/copy_demo

Builds a copy corpus from the clips (hapvr_jax.make_copies: reference videos, and query videos into which
edited segments of references were inserted, with the ground truth in the VSC CSV format), indexes the
references (hapvr_jax.index), searches every query with `--localize --report` (hapvr_jax.search) and scores the
found segments against the ground truth (hapvr_jax.eval_matching): it ends by printing the matching-track
micro-AP, the descriptor-track micro-AP and VCSL's segment F-score, and the path of the HTML report.

Weights: `--resnet` (a converted resnet50_irmac) and `--checkpoint` (a converted or trained HAP-VR network)
give real scores. Without them the demo says so and uses RANDOM weights: a small random ResNet whose PCA
whitening is fitted on the references' frames (extraction.fit_pca; without the fit, random features all point
one way), and a random network whose comparator CNN is made of averaging filters (a random CNN's output has an
arbitrary sign; averaging filters keep "more similar frames, higher score"). Random features still tell
near-identical frames apart from other footage, so copies are found and localised, but the figures are not
those of a trained model. Each stage resumes where a killed run stopped (the stages' own resumption).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import flags, logging

from common_jax import cli


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('videos', None, 'folder (or list file) of source clips for the corpus', flag_values=fv,
                      required=True)
  flags.DEFINE_string('output', '/tmp/hapvr_copy_demo', 'work folder: corpus/, index/, results/, report/, eval/',
                      flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'corpus seed', flag_values=fv)
  flags.DEFINE_string('resnet', '', 'converted resnet50_irmac directory (default: random weights)', flag_values=fv)
  flags.DEFINE_string('checkpoint', '', 'HAP-VR network checkpoint (default: random weights)', flag_values=fv)
  flags.DEFINE_float('fps', 2.0, 'frames per second indexed (the time resolution of the segments)', flag_values=fv)
  flags.DEFINE_integer('top_k', 3, 'results localised per query', flag_values=fv, lower_bound=1)
  # tn on f2f: within 0.02 µAP of the best method on real copies, and it follows speed changes (docs)
  flags.DEFINE_enum('localize_method', 'tn', ['tn', 'hv', 'dp', 'dtw'], 'temporal alignment', flag_values=fv)
  flags.DEFINE_enum('localize_map', 'f2f', ['f2f', 'comparator'], 'the map aligned', flag_values=fv)
  flags.DEFINE_list('corpus_flags', [], 'extra flags for hapvr_jax.make_copies, e.g. --queries=4', flag_values=fv)
  flags.DEFINE_bool('progress', False, 'show progress bars', flag_values=fv)


def random_backbone(path: str, refs_dir: str, fps: float, seed: int = 0) -> str:
  """A small random resnet50_irmac whose whitening is fitted on the references' frames (written once)."""
  from backbones import registry, resnet as resnet_lib
  from extraction import fit_pca
  from extraction.runner import read_video_list
  if os.path.exists(os.path.join(path, 'manifest.json')) or os.path.isdir(path) and os.listdir(path):
    return path
  cfg = resnet_lib.Config.tiny()
  net = registry.Backbone('resnet50_irmac', cfg, resnet_lib.init_params(cfg, seed))
  videos = read_video_list(video_dir=refs_dir)
  pca = fit_pca.fit_frames(net, fit_pca.video_frames(videos, fps, max_frames=64))
  net = fit_pca.with_pca(net, pca, cfg.pca_dims)
  registry.save(path, 'resnet50_irmac', net.params, net.config)
  return path


def averaging_network(path: str, dims: int, seed: int = 0) -> str:
  """A random HAP-VR network whose comparator CNN is made of averaging filters (written once)."""
  import jax
  from common_jax import checkpoint
  from hapvr_jax import model as model_lib
  if os.path.isdir(path) and os.listdir(path):
    return path
  cfg = model_lib.ModelConfig(dims=dims)
  params = averaging_comparator(jax.tree_util.tree_map(np.asarray, model_lib.init_params(cfg, seed=seed)))
  checkpoint.save_params(path, params, dataclasses.replace(cfg, source='jax').to_dict())
  return path


def averaging_comparator(params: dict) -> dict:
  """`params` (NumPy leaves) with every comparator filter made an average and its bias zero, in place: untrained,
  the comparator's output then still grows with the frame-to-frame similarity."""
  for layer in params['comparator_module'].values():
    h, w, c_in, _ = layer['kernel'].shape
    layer['kernel'] = np.full(layer['kernel'].shape, 1 / (h * w * c_in), np.float32)
    layer['bias'] = np.zeros_like(layer['bias'])
  return params


def _step(name: str, main, argv: list) -> None:
  logging.info('%s %s', name, ' '.join(argv))
  code = main(argv)
  if code:
    raise cli.UsageError(f'{name} failed (exit {code}); its error line is above')


def run(args) -> dict:
  from hapvr_jax import eval_matching, index, make_copies, search
  from backbones import registry
  out = os.path.abspath(args.output)
  cli.check_workdir(out)
  corpus = os.path.join(out, 'corpus')
  if not os.path.exists(os.path.join(corpus, 'ground_truth.csv')):
    _step('make_copies', make_copies.main, [f'--videos={args.videos}', f'--output={corpus}', f'--seed={args.seed}',
                                            *args.corpus_flags])
  resnet, ckpt = args.resnet, args.checkpoint
  if not resnet or not ckpt:
    print('RANDOM WEIGHTS: no ' + ' and no '.join(f for f, v in (('--resnet', resnet), ('--checkpoint', ckpt))
                                                  if not v) + ' given; the scores below are not a trained model\'s')
  resnet = resnet or random_backbone(os.path.join(out, 'random_resnet50_irmac'), os.path.join(corpus, 'refs'),
                                     args.fps, args.seed)
  dims = registry.load(resnet).config.out_dims
  ckpt = ckpt or averaging_network(os.path.join(out, 'random_hapvr'), dims, args.seed)
  progress = '--progress' if args.progress else '--noprogress'
  _step('index', index.main, [f'--index={out}/index', f'--video_dir={corpus}/refs', f'--resnet={resnet}',
                              f'--fps={args.fps}', progress])
  _step('search', search.main, [f'--index={out}/index', f'--checkpoint={ckpt}', f'--resnet={resnet}',
                                f'--queries={corpus}/queries.txt', '--shortlist=all', f'--top_k={args.top_k}',
                                '--localize', f'--localize_method={args.localize_method}',
                                f'--localize_map={args.localize_map}', f'--report={out}/report',
                                f'--output={out}/results', progress])
  metrics = eval_matching.run(cli.parse_flags(eval_matching.define_flags, [
      f'--predictions={out}/results/matches.csv', f'--ground_truth={corpus}/ground_truth.csv',
      f'--output={out}/eval']))
  print(f'matching µAP {metrics["matching_micro_ap"]:.4f}, descriptor µAP {metrics["descriptor_micro_ap"]:.4f}, '
        f'segment F-score {metrics["segment_f_score"]:.4f}; report: {out}/report/index.html')
  return metrics


main = cli.program(define_flags, run, __doc__)


if __name__ == '__main__':
  cli.run_main(main)
