"""The flag programs' one convention (common_jax.cli.parse_flags, launch.common.parse): every command that the
README, docs/ and the programs' own docstrings show still parses; --help says what a program does and shows an
example; a parse error is one `error: ...` line and exit code 2; programs that share flag names (--output) run
in one process, as often as a test likes.
"""
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags

from common_jax import cli
from launch import common, gpu, tpu

from tests.conftest import ROOT  # noqa: E402
FLAG_PROGRAMS = ('hapvr_jax.convert', 'avhash_jax.convert', 'backbones.convert_backbone',
                 'input_pipeline.avhash.make_shards', 'input_pipeline.hapvr.make_shards', 'hapvr_jax.extract',
                 'avhash_jax.extract', 'extraction.feature_writer', 'hapvr_jax.eval_matching',
                 'hapvr_jax.make_copies', 'hapvr_jax.copy_demo', 'hapvr_jax.search', 'avhash_jax.search',
                 'bench.accelerator_suite', 'bench.first_results')
POSITIONAL = {'extraction.feature_writer': 'parts'}   # programs that take arguments after the flags
LAUNCHERS = {'launch/tpu.py': tpu, 'launch/gpu.py': gpu}
_COMMAND = re.compile(r'python (?:-m ([\w.]+)|(launch/\w+\.py))([^`\n]*)')


def usage(mod):
  """What --help prints first: the program's docstring (a library module with a main: its own text)."""
  return getattr(mod, 'LINK_USAGE', None) or mod.__doc__


def documented_commands():
  """(where, program, argv) of each command line shown in README.md, docs/*.md and the programs' docstrings."""
  sources = {}
  for path in [os.path.join(ROOT, 'README.md'), *glob.glob(os.path.join(ROOT, 'docs', '*.md'))]:
    with open(path) as f:
      sources[path] = f.read()
  sources.update({name: usage(importlib.import_module(name)) for name in FLAG_PROGRAMS})
  sources.update({name: mod.__doc__ for name, mod in LAUNCHERS.items()})
  for where, text in sources.items():
    for m in _COMMAND.finditer(text.replace('\\\n', ' ')):
      program = m.group(1) or m.group(2)
      argv = [a.strip('[]') for a in shlex.split(m.group(3), comments=True)]
      argv = [a.split('|')[0] if a.startswith('--') else a for a in argv]   # --dtype=float32|float16 -> float32
      if program in FLAG_PROGRAMS + tuple(LAUNCHERS) and argv:              # a bare name is a mention, not a command
        yield where, program, argv


def parse(program, argv):
  if program in LAUNCHERS:
    return common.parse(LAUNCHERS[program].ACTIONS, argv, '', program)[1]
  return cli.parse_flags(importlib.import_module(program).define_flags, argv, positional=POSITIONAL.get(program))


def test_every_documented_command_parses(capsys):
  seen = set()
  for where, program, argv in documented_commands():
    try:
      parse(program, argv)
    except SystemExit:
      pytest.fail(f'{where}: python {program} {shlex.join(argv)}: {capsys.readouterr().err.strip()}')
    seen.add(program)
  assert seen == set(FLAG_PROGRAMS) | set(LAUNCHERS)


@pytest.mark.parametrize('name', FLAG_PROGRAMS)
def test_help_says_what_and_shows_an_example(name, capsys):
  mod = importlib.import_module(name)
  with pytest.raises(SystemExit) as e:
    mod.main(['--help'])
  out = capsys.readouterr().out
  assert e.value.code == 0
  assert out.startswith(usage(mod).strip().splitlines()[0]) and f'\n  python -m {name} --' in out
  assert '\nflags:\n  --' in out and re.search(r'\n  --\w*output: ', out) and '\nrequired: ' in out


def test_launcher_help_lists_actions_and_their_flags(capsys):
  with pytest.raises(SystemExit) as e:
    tpu.main(['--help'])
  out = capsys.readouterr().out
  assert e.value.code == 0 and 'python launch/tpu.py create --' in out
  assert all(f'\n  {action} ' in out for action in tpu.ACTIONS)
  with pytest.raises(SystemExit) as e:
    gpu.main(['run', '--help'])
  out = capsys.readouterr().out
  assert e.value.code == 0 and 'python launch/gpu.py run --' in out and '--[no]local_processes' in out


@pytest.mark.parametrize('name, argv, message', [
    ('hapvr_jax.convert', ['--output=o'], 'error: --torch_checkpoint is required'),
    ('input_pipeline.avhash.make_shards', [], ('error: --image_h5 is required; --audio_h5 is required; '
                                           '--output is required')),
    ('backbones.convert_backbone', ['--arch=vgg', '--torch_checkpoint=m', '--output=o'], 'flag --arch=vgg: '),
    ('avhash_jax.convert', ['--output=o', '--bits', 'many'], 'flag --bits=many: invalid literal for int()'),
    ('input_pipeline.hapvr.make_shards', ['--input=a', '--output=b', '--bogus=1'], "Unknown command line flag 'bogus'"),
    ('input_pipeline.hapvr.make_shards', ['--input=a', '--output=b', 'stray'], "error: unexpected argument 'stray'"),
    ('hapvr_jax.extract', ['--resnet=r', '--output=o', '--fps=nan'], 'error: flag --fps=nan: must be a positive'),
    ('hapvr_jax.extract', ['--resnet=r', '--output=o', '--shard_index=-1'], '-1 is not a non-negative integer'),
    ('avhash_jax.extract', ['--clip=c', '--ast=a'], 'error: --image_output is required; --audio_output is required'),
    ('avhash_jax.extract', ['--clip=c', '--ast=a', '--image_output=i', '--audio_output=o', '--no_audio=none'],
     'flag --no_audio=none: value should be one of <zeros|fail>'),
    ('extraction.feature_writer', ['--output=o'], 'error: give the x-0000k-of-0000n.h5 part files'),
], ids=['required', 'three-required', 'enum', 'int', 'unknown', 'stray', 'nan', 'negative', 'extract-required',
        'no_audio-enum', 'no-parts'])
def test_parse_errors_are_one_line_and_exit_2(name, argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    importlib.import_module(name).main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count('\n') == 1 and err.startswith('error: ') and message in err, err


def test_flag_forms_defaults_and_shared_names():
  """`--flag value` and `--flag=value`, --x/--nox, repeated flags, the defaults of before; the programs that
  all define --output are parsed in one process, each twice."""
  hapvr = importlib.import_module('hapvr_jax.convert')
  avhash = importlib.import_module('avhash_jax.convert')
  backbone = importlib.import_module('backbones.convert_backbone')
  av_shards = importlib.import_module('input_pipeline.avhash.make_shards')
  shards = importlib.import_module('input_pipeline.hapvr.make_shards')
  hapvr_extract = importlib.import_module('hapvr_jax.extract')
  avhash_extract = importlib.import_module('avhash_jax.extract')
  feature_writer = importlib.import_module('extraction.feature_writer')
  for _ in range(2):
    a = cli.parse_flags(hapvr.define_flags, ['--torch_checkpoint', 'm.pth', '--output', 'o', '--trust_pickle'])
    assert (a.torch_checkpoint, a.output, a.trust_pickle, a.min_len) == ('m.pth', 'o', True, None)
    a = cli.parse_flags(hapvr.define_flags, ['--torch_checkpoint=m', '--output=o', '--trust_pickle',
                                             '--notrust_pickle', '--min_len=4'])
    assert (a.trust_pickle, a.min_len) == (False, 4)
    a = cli.parse_flags(avhash.define_flags, ['--bert_checkpoint=b', '--output=o'])
    assert (a.bits, a.num_heads, a.seed, a.torch_checkpoint, a.cls_token) == (64, None, 0, None, None)
    a = cli.parse_flags(backbone.define_flags, ['--arch=ast', '--torch_checkpoint=m', '--output=o',
                                                '--trusted_torchscript=true'])
    assert (a.arch, a.trusted_torchscript, a.pca, a.pca_dims, a.num_heads) == ('ast', True, None, None, None)
    a = cli.parse_flags(av_shards.define_flags, ['--image_h5=i', '--audio_h5=a', '--output=o', '--list', 'x',
                                                 '--list=y', '--dataset=fcvid', '--no_progress'])
    assert (a.list, a.dataset, a.no_progress, a.records_per_shard, a.dtype, a.name) == (
        ['x', 'y'], 'fcvid', True, 4096, 'float32', 'avhash')
    a = cli.parse_flags(shards.define_flags, ['--input=i', '--output=o'])
    assert (a.records_per_shard, a.name) == (1024, 'vcdb')
    a = cli.parse_flags(hapvr_extract.define_flags, ['--resnet', 'r', '--output=o', '--keep_extension'])
    assert (a.mode, a.dino, a.dino_normalize, a.views, a.segments, a.bank_size, a.seed, a.fps, a.dtype,
            a.batch_size, a.fonts_dir, a.shards_output) == (
                'eval', '', 'none', 4, 2, 0, 0, 1.0, 'float32', 128, '', '')
    assert (a.videos, a.video_dir, a.keep_extension, a.workers, a.num_shards, a.shard_index, a.strict) == (
        '', '', True, 4, None, None, False)
    a = cli.parse_flags(avhash_extract.define_flags, ['--clip=c', '--ast=a', '--image_output=i', '--audio_output',
                                                      'o', '--no_audio=fail', '--strict', '--shard_index=0'])
    assert (a.audio_segments, a.audio_window, a.no_audio, a.batch_size, a.audio_batch_size, a.strict,
            a.shard_index) == ('windows', 5.0, 'fail', 100, 50, True, 0)
    a = cli.parse_flags(feature_writer.define_flags, ['a.h5', '--output', 'o', 'b.h5'], positional='parts')
    assert (a.output, a.parts) == ('o', ['a.h5', 'b.h5'])
  _, a, program = common.parse(gpu.ACTIONS, ['run', '--gpus', '2', '--env=A=1', '--env', 'B=2', '--', 'p', '-x'],
                               '', 'launch/gpu.py')
  assert (a.gpus, a.env, a.nodes, a.node_rank, a.log_dir, a.dry_run, program) == (
      2, ['A=1', 'B=2'], 1, None, 'logs', False, ['p', '-x'])


def test_positional_arguments_when_asked_for():
  def define_flags(fv):
    flags.DEFINE_string('output', None, 'the merged file', flag_values=fv, required=True)
  a = cli.parse_flags(define_flags, ['a.h5', '--output=o', 'b.h5'], positional='parts')
  assert (a.output, a.parts) == ('o', ['a.h5', 'b.h5'])


def test_as_programs():
  """Through `python -m` (cli.run_main: absl's app.run), and a config program's absl --help."""
  def run(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
  r = run('-m', 'input_pipeline.avhash.make_shards', '--help')
  assert r.returncode == 0 and '\n  python -m input_pipeline.avhash.make_shards --image_h5=' in r.stdout, r.stderr
  r = run('-m', 'input_pipeline.avhash.make_shards', '--image_h5', 'i', '--audio_h5=a')
  assert r.returncode == 2 and r.stderr == 'error: --output is required\n' and not r.stdout
  r = run('-m', 'extraction.feature_writer', '--output=o')
  assert r.returncode == 2 and r.stderr.startswith('error: give the ') and r.stderr.count('\n') == 1, r.stderr
  r = run('-m', 'hapvr_jax.main', '--help')   # a config program: absl's own help, exit 0 like the others
  assert r.returncode == 0 and '\n  python -m hapvr_jax.main --config=configs/vcdb.py' in r.stdout and (
      '--workdir' in r.stdout), r.stderr
