"""A screenshot of a local HTML page with headless Chromium, to look at a generated page (and to test that it
renders) without a display. Chromium is optional: `find_chromium` returns None where none is installed.

  from common_jax import browser
  browser.screenshot('report/index.html', 'docs/report_example.png')
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

NAMES = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')


def find_chromium() -> str | None:
  return next((p for p in map(shutil.which, NAMES) if p), None)


def screenshot(page: str, png: str, size: tuple[int, int] = (1200, 1600), binary: str | None = None,
               timeout: float = 120.0) -> str:
  """Renders the local file `page` in a `size` = (width, height) window and writes a PNG to `png`.

  The browser runs with a throw-away profile and everything that would reach the network switched off, so
  the picture shows only what the page itself holds. Raises RuntimeError when no browser is found or it
  fails."""
  binary = binary or find_chromium()
  if binary is None:
    raise RuntimeError(f'no Chromium browser found (looked for {", ".join(NAMES)})')
  with tempfile.TemporaryDirectory(prefix='chromium-profile-') as profile:
    shot = os.path.join(profile, 'screenshot.png')   # moved to `png` only once the browser succeeded
    argv = [binary, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
            '--disable-background-networking', '--disable-component-update', '--disable-sync',
            '--hide-scrollbars', f'--user-data-dir={profile}', f'--screenshot={shot}',
            f'--window-size={size[0]},{size[1]}', 'file://' + os.path.abspath(page)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0 or not os.path.isfile(shot):
      raise RuntimeError(f'{binary} could not render {page} (exit {r.returncode}): {r.stderr.strip()[-500:]}')
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    shutil.move(shot, png)
  return png
