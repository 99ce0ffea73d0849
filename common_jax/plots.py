"""PNG output shared by both systems: figures on matplotlib's Agg canvas (no display, no pyplot global state)
written atomically (a temporary file beside the target, renamed at the end, removed on failure)."""
from __future__ import annotations

from common_jax import io_util


def figure(size, **kwargs):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=size, **kwargs)
  FigureCanvasAgg(fig)
  return fig


def save_png(fig, path: str, dpi: int = 120, **kwargs) -> None:
  with io_util.atomic_open(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=dpi, **kwargs)
