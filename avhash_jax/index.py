r"""Build, extend and edit an AVHash search index: one binary code per video (for `python -m avhash_jax.search`).

From video files, through the AVHash extractor (25 CLIP frames + 25 AST audio windows) and a converted or
trained AVHash checkpoint:

  python -m avhash_jax.index --index=my_index --video_dir=videos --clip=ckpt/clip_vitl14 --ast=ckpt/ast \
      --checkpoint=ckpt/avhash_64

From existing feature files (the extractor's two HDF5 files, `vectors` [25, 768] per id; no re-extraction):

  python -m avhash_jax.index --index=fcvid_index --image_features=fcvid_clip.h5 \
      --audio_features=fcvid_ast.h5 --checkpoint=ckpt/avhash_64

Rerunning either command adds the videos the index lacks: it extends an index and resumes a killed build
(codes are committed in batches of --batch; a kill loses at most the batch in progress, never the index; the
features of videos extracted but not yet coded wait in INDEX/.work and are not extracted again).
`--remove=ID,ID` hides videos; `--merge=PART,PART` joins indexes built by several hosts with the extractor's
host split (`--num_shards=4 --shard_index=k` builds INDEX-0000k-of-00004). The index holds each video's packed
code (bits/8 bytes), its metadata (path, duration, frames, fps) and a manifest naming the code length, the
feature size and a fingerprint of the checkpoint: codes of another checkpoint are refused with one error line.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import types

import numpy as np
from absl import flags

from common_jax import cli, faults, hamming, io_util
from common_jax.index_dir import IndexDir
from extraction import runner as extraction

KIND = 'avhash'
CODES_CACHE = 'codes.npz'
WORK = '.work'


def load_checkpoint(path: str):
  """(ModelConfig, params, fingerprint) of a converted or trained AVHash checkpoint directory."""
  import jax
  from avhash_jax import model as model_lib
  from common_jax import checkpoint
  if not path:
    raise cli.UsageError('--checkpoint is required: a converted or trained AVHash checkpoint directory')
  if not os.path.isdir(path):
    raise cli.UsageError(f'{path}: checkpoint directory not found')
  params, model_dict = checkpoint.load_params(path)
  config = model_lib.ModelConfig.from_dict(model_dict, where=path)
  digest = hashlib.sha256()
  for key, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0])):
    digest.update(jax.tree_util.keystr(key).encode())
    digest.update(np.ascontiguousarray(leaf, np.float32).tobytes())
  return config, params, digest.hexdigest()[:16]


def index_config(model_config, fingerprint: str) -> dict:
  """The manifest config: what the stored codes mean; an index built otherwise is refused."""
  return {'bits': model_config.bits, 'feature_dim': model_config.hidden_size, 'tokens': model_config.tokens,
          'checkpoint': fingerprint}


def open_or_create(path: str, config: dict) -> IndexDir:
  return IndexDir.create(path, KIND, config)


def codes_of(ix: IndexDir, write: bool = True):
  """(ids, packed codes uint8 [N, bits/8]) of the live videos, from a cache rebuilt when the log moved on
  (`write`: keep the rebuilt cache; a reader of a read-only index goes on without it)."""
  cache = ix.derived_path(CODES_CACHE)
  if os.path.exists(cache):
    try:
      with np.load(cache) as z:
        if int(z['version']) == ix.version:
          return [str(v) for v in z['ids']], z['codes']
    except (OSError, ValueError, KeyError):   # a derived file: never trusted, rebuilt
      pass
  ids = ix.ids()
  nbytes = -(-ix.config['bits'] // 8)
  codes = np.stack([ix.read(v, 'code') for v in ids]) if ids else np.zeros((0, nbytes), np.uint8)
  try:
    with io_util.atomic_open(cache, 'wb') as f:
      np.savez(f, version=ix.version, ids=np.asarray(ids, dtype=str), codes=codes)
  except OSError:
    if write:
      raise
  return ids, codes


def code_features(model_config, params, features, ids, mesh=None) -> np.ndarray:
  """Packed codes [len(ids), bits/8] of videos read from an AVFeatures."""
  from avhash_jax import evaluate
  return hamming.pack(evaluate.extract_codes(model_config, params, features, ids, batch_size=64, mesh=mesh))


def add_feature_files(ix: IndexDir, model, image_h5: str, audio_h5: str, ids=None, meta=None,
                      batch: int = 256) -> int:
  """Codes and adds the videos of two feature files the index lacks (all their ids, or `ids`); `meta`:
  {id: metadata}. Returns the number added."""
  from input_pipeline.avhash.lists import AVFeatures
  model_config, params, _ = model
  feats = AVFeatures(image_h5, audio_h5, frames=model_config.tokens, dim=model_config.hidden_size)
  try:
    if ids is None:
      ids = sorted(feats._file('image').keys())
    todo = [v for v in ids if v not in ix]
    feats.check_ids(todo, image_h5)
    added = 0
    for s in range(0, len(todo), batch):
      part = todo[s:s + batch]
      codes = code_features(model_config, params, feats, part)
      ix.add((v, {'code': c}, (meta or {}).get(v) or {'path': '', 'source': os.path.abspath(image_h5)})
             for v, c in zip(part, codes))
      added += len(part)
      faults.point('avhash_index.batch')
    return added
  finally:
    feats.close()


def video_meta(video) -> dict:
  from extraction import video_io
  info = video_io.probe(video.path)
  return {'path': os.path.abspath(video.path), 'duration': round(float(info.duration), 3),
          'frames': int(info.num_frames), 'fps': round(float(info.fps), 3)}


def extract_features(videos, work: str, clip: str, ast: str, workers: int = 4) -> tuple:
  """Runs the AVHash extractor on `videos` into work/{image,audio}.h5 (resumable); returns the two paths and
  the failures ({'id', 'path', 'reason', 'error'} each)."""
  from avhash_jax import extract
  os.makedirs(work, exist_ok=True)
  listing = os.path.join(work, 'videos.txt')
  with io_util.atomic_open(listing) as f:
    f.writelines(f'{v.video_id}\t{os.path.abspath(v.path)}\n' for v in videos)
  image, audio = os.path.join(work, 'image.h5'), os.path.join(work, 'audio.h5')
  args = types.SimpleNamespace(
      clip=clip, ast=ast, image_output=image, audio_output=audio, audio_segments='windows', audio_window=5.0,
      no_audio='zeros', batch_size=100, audio_batch_size=50, videos=listing, video_dir='', keep_extension=True,
      workers=workers, num_shards=1, shard_index=0, strict=False)
  with contextlib.redirect_stdout(io.StringIO()):   # its summary line: the callers print their own
    extract.extract(args)
  return image, audio, _failures(image)


def add_videos(ix: IndexDir, model, videos, clip: str, ast: str, workers: int = 4, batch: int = 256) -> dict:
  """Extracts, codes and adds the videos the index lacks; the features wait in INDEX/.work until coded."""
  todo = [v for v in videos if v.video_id not in ix]
  if not todo:
    return {'added': 0, 'failed': 0}
  work = os.path.join(ix.path, WORK)
  image, audio, failures = extract_features(todo, work, clip, ast, workers)
  failed = {f['id'] for f in failures}
  ok = [v for v in todo if v.video_id not in failed]
  meta = {v.video_id: video_meta(v) for v in ok}
  added = add_feature_files(ix, model, image, audio, [v.video_id for v in ok], meta, batch)
  shutil.rmtree(work, ignore_errors=True)
  return {'added': added, 'failed': len(failed), 'failures': [f'{f["path"]}: {f["reason"]}' for f in failures]}


def _failures(image_h5: str) -> list:
  path = image_h5 + '.failures.jsonl'
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def feature_ids(args):
  """(this host's ids of the feature files, num_shards, shard_index): the extractor's host split."""
  import h5py
  from input_pipeline.avhash.lists import AVFeatures
  AVFeatures(args.image_features, args.audio_features)   # both files exist
  try:
    with h5py.File(args.image_features, 'r') as f:
      ids = sorted(f.keys())
  except OSError as e:
    raise cli.UsageError(f'{args.image_features}: not a readable HDF5 file ({e})') from None
  num_shards, shard_index = args.num_shards or 1, args.shard_index or 0
  videos = extraction.select_shard([extraction.Video(v, '') for v in ids], num_shards, shard_index)
  return [v.video_id for v in videos], num_shards, shard_index


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('index', None, 'index directory (created if new)', flag_values=fv, required=True)
  flags.DEFINE_string('checkpoint', '', 'converted or trained AVHash checkpoint directory', flag_values=fv)
  flags.DEFINE_string('clip', '', 'converted clip_vitl14 directory (with --videos/--video_dir)', flag_values=fv)
  flags.DEFINE_string('ast', '', 'converted ast directory (with --videos/--video_dir)', flag_values=fv)
  flags.DEFINE_string('image_features', '', 'or: HDF5 file of CLIP features (the extractor\'s)', flag_values=fv)
  flags.DEFINE_string('audio_features', '', 'and its HDF5 file of AST features', flag_values=fv)
  flags.DEFINE_list('remove', [], 'video ids to remove', flag_values=fv)
  flags.DEFINE_list('merge', [], 'index directories (other hosts\' parts) to merge into --index', flag_values=fv)
  flags.DEFINE_integer('batch', 256, 'videos coded and committed at a time', flag_values=fv, lower_bound=1)
  extraction.define_flags(fv)


def run(args) -> dict:
  if args.merge:
    parts = [IndexDir.open(p, KIND) for p in args.merge]
    ix = open_or_create(args.index, parts[0].config)
    merged = sum(ix.merge(p) for p in parts)
    codes_of(ix)
    return {'index': args.index, 'merged': merged, 'videos': len(ix)}
  if args.remove:
    ix = IndexDir.open(args.index, KIND)
    removed = ix.remove(args.remove)
    codes_of(ix)
    return {'index': args.index, 'removed': removed, 'videos': len(ix)}
  from_videos, from_features = bool(args.videos or args.video_dir), bool(args.image_features or args.audio_features)
  if from_videos == from_features:
    raise cli.UsageError('give videos (--videos or --video_dir, with --clip and --ast) or feature files '
                         '(--image_features and --audio_features), or --remove / --merge')
  if from_features and not (args.image_features and args.audio_features):
    raise cli.UsageError('give both --image_features and --audio_features')
  if from_videos and not (args.clip and args.ast):
    raise cli.UsageError('indexing video files needs --clip and --ast (converted backbone directories)')
  model = load_checkpoint(args.checkpoint)
  config = index_config(model[0], model[2])
  if from_features:
    ids, num_shards, shard_index = feature_ids(args)
    ix = open_or_create(extraction.shard_path(args.index, num_shards, shard_index), config)
    out = {'added': add_feature_files(ix, model, args.image_features, args.audio_features, ids, batch=args.batch)}
  else:
    videos, num_shards, shard_index = extraction.this_host(args)
    path = extraction.shard_path(args.index, num_shards, shard_index)
    ix = open_or_create(path, config)
    out = add_videos(ix, model, videos, args.clip, args.ast, args.workers, args.batch)
  codes_of(ix)
  return {'index': ix.path, **out, 'videos': len(ix)}


def main(argv=None) -> int:
  args = cli.parse_flags(define_flags, argv, __doc__)
  with cli.clear_errors():
    summary = run(args)
  print(json.dumps(summary))
  return 1 if args.strict and summary.get('failed') else 0


if __name__ == '__main__':
  cli.run_main(main)
