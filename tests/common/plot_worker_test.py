"""common_jax.plot_worker: the child draws the same PNG as this process would, reports its failures, and
goes away quietly when nothing is asked of it."""
import os
import time

import numpy as np
import pytest
from PIL import Image

from common_jax import plot_worker
from hapvr_jax import datasets

CURVES = {'DSVR': (np.linspace(1, 0.2, 50), np.linspace(0, 1, 50)), 'ISVR': (np.full(20, 0.5), np.linspace(0, 1, 20))}


def _pixels(path):
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'), np.int16)


def test_the_child_draws_what_this_process_draws(tmp_path):
  worker = plot_worker.start()
  try:
    worker.draw('hapvr_jax.datasets:plot_pr_curves', CURVES, str(tmp_path / 'child.png'))
  finally:
    worker.close()
  datasets.plot_pr_curves(CURVES, str(tmp_path / 'here.png'))
  child, here = _pixels(tmp_path / 'child.png'), _pixels(tmp_path / 'here.png')
  assert child.shape == here.shape and np.array_equal(child, here)
  assert (here.std(axis=(0, 1)) > 10).all()   # a drawn figure, not a blank canvas
  assert sorted(os.listdir(tmp_path)) == ['child.png', 'here.png']   # no temporary file left


def test_a_failure_in_the_child_is_raised_with_its_traceback(tmp_path):
  worker = plot_worker.start()
  try:
    with pytest.raises(RuntimeError, match=r'(?s)drawing hapvr_jax.datasets:plot_pr_curves failed.*Error'):
      worker.draw('hapvr_jax.datasets:plot_pr_curves', {'bad': (np.ones(3), np.ones(4))},
                  str(tmp_path / 'x.png'))
  finally:
    worker.close()
  assert not os.listdir(tmp_path)   # nothing half-written


def test_an_idle_worker_exits_at_close_without_drawing(tmp_path):
  worker = plot_worker.start()
  t0 = time.perf_counter()
  worker.close()
  assert worker._proc.returncode == 0 and time.perf_counter() - t0 < 30


def test_a_dead_child_is_replaced_by_drawing_here(tmp_path):
  worker = plot_worker.start()
  worker._proc.kill()
  worker._proc.wait()
  try:
    worker.draw('hapvr_jax.datasets:plot_pr_curves', CURVES, str(tmp_path / 'here.png'))
  finally:
    worker.close()
  assert _pixels(tmp_path / 'here.png').std() > 10
