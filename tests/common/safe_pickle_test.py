"""Pickle-based inputs never run code from the file: the annotation pickles go through common_jax.safe_pickle
(plain data only, anything else refused by name before it is called), torch files through
torch.load(weights_only=True), and a TorchScript archive is opened only with --trusted_torchscript.

Each crafted file carries an object whose unpickling would create a marker file; the marker must not exist
afterwards."""
from __future__ import annotations

import os
import pickle
import shlex
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from backbones import convert_backbone, resnet
from common_jax import convert_util, safe_pickle
from hapvr_jax import convert as hapvr_convert
from hapvr_jax import datasets

from tests.conftest import ROOT  # noqa: E402
class RunsCode:
  """Unpickling this calls `call(*args)`: what a crafted file does with `__reduce__`."""

  def __init__(self, call, *args):
    self.call, self.args = call, args

  def __reduce__(self):
    return self.call, self.args


def payloads(marker):
  """(refused global, object): a shell command, and a builtin outside the plain-data ones."""
  return {'posix.system': RunsCode(os.system, f'touch {shlex.quote(str(marker))}'),
          'builtins.exec': RunsCode(exec, f'open({str(marker)!r}, "w").close()')}


@pytest.mark.parametrize('name', ['posix.system', 'builtins.exec'])
def test_crafted_pickle_is_refused_before_it_runs(tmp_path, name):
  marker = tmp_path / 'ran'
  data = pickle.dumps({'annotation': {'q': [payloads(marker)[name]]}})
  with pytest.raises(safe_pickle.UnsafePickleError) as e:
    safe_pickle.loads(data, 'evve.pickle', 'an annotation pickle')
  assert str(e.value) == (f"evve.pickle: refuses to load '{name}' (only plain data is allowed in an annotation "
                          "pickle)")
  assert not marker.exists()
  pickle.loads(data)           # the payload is real: the plain unpickler runs it
  assert marker.exists()


@pytest.mark.parametrize('protocol', range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_loads_with_every_protocol(protocol):
  data = {'ids': ['a', 'b'], 'set': {'x', 'y'}, 'frozen': frozenset({1, 2}), 'tuple': (None, True, False, 1.5),
          'bytes': b'\x00\xff', 'empty': b'', 'array': bytearray(b'ab'), 'big': 10 ** 30, 'complex': 1 - 2j,
          3: {'nested': [[], {}, set()]}}
  assert safe_pickle.loads(pickle.dumps(data, protocol=protocol), 'x') == data


def test_real_annotation_files_load(annotations_dir):
  for name in ('fivr_audio.pickle', 'evve.pickle', 'cc_web_video.pickle'):
    with open(os.path.join(annotations_dir, name), 'rb') as f:
      raw = f.read()
    assert safe_pickle.loads(raw, name) == pickle.loads(raw)
  assert len(datasets.load_benchmark('fivr_5k', annotations_dir).queries) == 50
  assert datasets.load_benchmark('evve', annotations_dir).queries


def write_crafted_annotations(directory, marker):
  """FIVR and EVVE annotation files whose split entry is a crafted object (FIVR's as in the report: '5k')."""
  directory.mkdir()
  evil = payloads(marker)['posix.system']
  with open(directory / 'fivr_audio.pickle', 'wb') as f:
    pickle.dump({'5k': evil, '200k': {'queries': [], 'database': []}, 'annotation': {}}, f)
  (directory / 'fivr_easy_duplicates.txt').write_text('')
  with open(directory / 'evve.pickle', 'wb') as f:
    pickle.dump({'annotation': {'e': (evil, set(), set())}, 'queries': ['q'], 'database': ['d']}, f)
  return directory


@pytest.mark.parametrize('dataset, file', [('fivr_5k', 'fivr_audio.pickle'), ('evve', 'evve.pickle')])
def test_annotation_loaders_refuse_crafted_files(tmp_path, dataset, file):
  marker = tmp_path / 'ran'
  ann = write_crafted_annotations(tmp_path / 'ann', marker)
  with pytest.raises(datasets.AnnotationError, match=f"{file}: refuses to load 'posix.system'"):
    datasets.load_benchmark(dataset, ann)
  assert not marker.exists()


def test_evaluate_refuses_crafted_annotations_with_one_error_line(tmp_path):
  marker = tmp_path / 'ran'
  ann = write_crafted_annotations(tmp_path / 'ann', marker)
  features, ckpt, workdir = tmp_path / 'f.hdf5', tmp_path / 'ckpt', tmp_path / 'out'
  with h5py.File(features, 'w') as f:
    f['q'] = np.ones((8, 9, 512), np.float32) / np.sqrt(512)
  ckpt.mkdir()
  r = subprocess.run([sys.executable, '-m', 'hapvr_jax.evaluate', '--config=configs/fivr_5k.py',
                      f'--workdir={workdir}', f'--config.annotations={ann}', f'--config.features={features}',
                      f'--config.checkpoint={ckpt}', '--config.progress=False'],
                     cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert lines[-1] == (f"error: {ann / 'fivr_audio.pickle'}: refuses to load 'posix.system' (only plain data is "
                       "allowed in an annotation pickle)"), r.stderr
  assert not any(line.startswith('Traceback') for line in lines), r.stderr
  assert not marker.exists() and not (workdir / 'metrics.json').exists()


def test_torch_files_are_read_weights_only(tmp_path):
  marker = tmp_path / 'ran'
  path = str(tmp_path / 'model.pth')
  torch.save({'model': {'w': torch.zeros(2)}, 'extra': payloads(marker)['posix.system']}, path)
  with pytest.raises(convert_util.ConversionError, match='model.pth: cannot be read'):
    convert_util.load_torch(path, 'PyTorch checkpoint')
  with pytest.raises(convert_util.ConversionError, match='model.pth: cannot be read'):
    resnet.load_pca(path)
  with pytest.raises(hapvr_convert.ConversionError, match='rerun with --trust_pickle'):
    hapvr_convert.load_torch_checkpoint(path)
  assert not marker.exists()


@pytest.mark.filterwarnings('ignore::DeprecationWarning')   # torch.jit's own notice, not this test's concern
def test_torchscript_archive_needs_the_trusted_flag(tmp_path, capsys):
  path = str(tmp_path / 'ViT-L-14.pt')
  torch.jit.script(torch.nn.Linear(2, 2)).save(path)
  args = ['--arch=clip_vitl14', f'--torch_checkpoint={path}', f'--output={tmp_path / "out"}']
  with pytest.raises(SystemExit) as e:
    convert_backbone.main(args)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1, err
  assert err[0].startswith(f'error: {path}: is a TorchScript archive') and '--trusted_torchscript' in err[0]
  assert 'model.safetensors' in err[0]
  assert not (tmp_path / 'out').exists()
  # Trusted, it is opened: a Linear is then reported as not a CLIP state_dict.
  with pytest.raises(SystemExit) as e:
    convert_backbone.main(args + ['--trusted_torchscript'])
  assert e.value.code == 2 and 'does not match' in capsys.readouterr().err
