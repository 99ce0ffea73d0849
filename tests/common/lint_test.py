"""Static checks of the whole tree: the import layering (.importlinter) and pyflakes (ruff.toml)."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _tool(name):
  path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
  if not os.path.exists(path):
    pytest.fail(f'{name} is not installed (it is in requirements-test.txt)')
  return path


def test_layers_point_down():
  """Lower layers never import a system package, the systems never import each other, configs import none."""
  r = subprocess.run([_tool('lint-imports'), '--config', os.path.join(ROOT, '.importlinter'), '--no-cache'],
                     cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0 and 'broken' in r.stdout and '0 broken' in r.stdout, r.stdout + r.stderr


def test_pyflakes_clean():
  r = subprocess.run([_tool('ruff'), 'check', '--no-cache', '--output-format', 'concise', ROOT], cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr
