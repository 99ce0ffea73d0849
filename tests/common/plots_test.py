"""common_jax.plots: the background import and the atomic PNG output."""
import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r'''
import sys
from common_jax import plots
assert 'matplotlib.figure' not in sys.modules
thread = plots.import_in_background()
thread.join(60)
assert not thread.is_alive() and thread.daemon
assert 'matplotlib.figure' in sys.modules and 'matplotlib.backends.backend_agg' in sys.modules
fig = plots.figure((5, 4))
fig.add_subplot().plot([0, 1], [1, 0])
plots.save_png(fig, sys.argv[1], dpi=50)
'''


def test_import_in_background_then_png(tmp_path):
  """In a fresh interpreter matplotlib is absent, the thread imports it, and a figure drawn afterwards is a
  PNG of size inches x dpi (read from its IHDR header), with no temporary file left beside it."""
  path = tmp_path / 'out.png'
  subprocess.run([sys.executable, '-c', SCRIPT, str(path)], cwd=ROOT, check=True, timeout=120)
  head = path.read_bytes()[:24]
  assert head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR'
  assert struct.unpack('>II', head[16:24]) == (250, 200)
  assert os.listdir(tmp_path) == ['out.png']
