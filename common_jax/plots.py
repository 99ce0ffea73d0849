"""PNG output shared by both systems: figures on matplotlib's Agg canvas (no display, no pyplot global state)
written atomically (a temporary file beside the target, renamed at the end, removed on failure)."""
from __future__ import annotations

import threading

from common_jax import io_util


def import_in_background() -> threading.Thread:
  """Starts importing matplotlib's figure and Agg modules on a daemon thread (a few tenths of a second of
  Python work), so that a program can overlap it with work that releases the GIL, such as a jitted
  computation, before it draws; a later `figure` waits for the import to finish if it has not."""
  def load():
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
  thread = threading.Thread(target=load, name='import-matplotlib', daemon=True)
  thread.start()
  return thread


def figure(size, **kwargs):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=size, **kwargs)
  FigureCanvasAgg(fig)
  return fig


def save_png(fig, path: str, dpi: int = 120, **kwargs) -> None:
  with io_util.atomic_open(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=dpi, **kwargs)
