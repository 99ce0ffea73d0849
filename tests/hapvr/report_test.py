"""Tests of the search report page (hapvr_jax.report): its HTML, its images and the positions of the drawn
segments, recomputed by hand from the times; and a rendering in headless Chromium where one is installed."""
from __future__ import annotations

import base64
import html.parser
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from common_jax import browser
from extraction import video_io
from hapvr_jax import report
from tests import video_fixtures as vf
from tests.conftest import SHARED

CLIPS = os.path.join(SHARED, 'data', 'videos')
NASTY = 'clips/a<b>&"c\'.mp4'


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
  """The real clips (video1 14 s, bikes 10 s, bigbuckbunny 5.3 s) when ../shared is present, else synthetic
  videos of the same lengths."""
  names = ('video1', 'bikes', 'bigbuckbunny')
  if all(os.path.isfile(os.path.join(CLIPS, n + '.mp4')) for n in names):
    return {n: os.path.join(CLIPS, n + '.mp4') for n in names}
  d = tmp_path_factory.mktemp('clips')
  return {n: vf.make_video(str(d / f'{n}.mp4'), seconds=s, size=(160, 90), fps=10, audio_hz=None)
          for n, s in zip(names, (14.0, 10.0, 5.3))}


def planted_map(tq: int, tr: int, fps: float, segments, seed: int = 0) -> np.ndarray:
  """A plausible frame-similarity map: weak noise, and a bright ridge along each segment's diagonal."""
  rng = np.random.default_rng(seed)
  m = rng.normal(0.05, 0.07, (tq, tr))
  qt, rt = (np.arange(tq) + 0.5) / fps, (np.arange(tr) + 0.5) / fps
  for q0, q1, r0, r1, s in segments:
    for i in np.nonzero((qt >= q0) & (qt < q1))[0]:
      r = r0 + (qt[i] - q0) * (r1 - r0) / (q1 - q0)
      m[i] += s * np.exp(-0.5 * ((rt - r) * fps / max(0.7, (r1 - r0) / (q1 - q0))) ** 2)
  return np.clip(m, -1, 1)


def example_queries(clips) -> list[dict]:
  """Two queries: video1 with three results (two segments, one at double speed, a missing file) and
  bigbuckbunny with none. Maps at 2 cells per second."""
  fps, d = 2.0, {'video1': 14.2, 'bikes': 10.0, 'bigbuckbunny': 5.3}
  bikes = [(1.5, 5.0, 2.0, 5.5, 0.83), (8.0, 12.5, 4.5, 9.0, 0.71)]
  bunny = [(3.0, 5.5, 0.0, 5.0, 0.64)]
  pairs = [('bikes', clips['bikes'], bikes, 0.78, 0.61), ('bigbuckbunny', clips['bigbuckbunny'], bunny, 0.52, 0.47)]
  results = [{'rank': k + 1, 'id': rid, 'path': path, 'duration': None, 'score': score, 'coarse_score': coarse,
              'segments': segs, 'sim_map': planted_map(int(d['video1'] * fps), int(d[rid] * fps), fps, segs, k),
              'map_fps': fps} for k, (rid, path, segs, score, coarse) in enumerate(pairs)]
  results.append({'rank': 3, 'id': 'gone <&> clip', 'path': NASTY, 'duration': 8.0, 'score': 0.12,
                  'coarse_score': 0.3, 'segments': [], 'sim_map': planted_map(28, 16, fps, [], 3), 'map_fps': fps})
  return [{'id': 'video1', 'path': clips['video1'], 'duration': None, 'results': results},
          {'id': 'bunny & co', 'path': clips['bigbuckbunny'], 'duration': None, 'results': []}]


class Page(html.parser.HTMLParser):
  """The parsed page: visible text, and the start tags with their attributes."""

  def __init__(self, text: str):
    super().__init__(convert_charrefs=True)
    self.text, self.tags = [], []
    self.feed(text)
    self.close()

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))

  handle_startendtag = handle_starttag

  def handle_data(self, data):
    self.text.append(data)

  def find(self, tag, **attrs):
    return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def decode(uri: str) -> np.ndarray:
  head, data = uri.split(',', 1)
  assert head in ('data:image/jpeg;base64', 'data:image/png;base64'), head
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert('RGB'))


@pytest.fixture(scope='module')
def example_page(clips, tmp_path_factory):
  """(queries, path of their page), written once for the tests that read or render it."""
  queries, out = example_queries(clips), tmp_path_factory.mktemp('example') / 'out'
  path = report.write_report(str(out), queries, title='Search <&> results')
  assert path == str(out / 'index.html') and os.listdir(out) == ['index.html']
  return queries, path


def test_page_names_everything_escapes_text_and_inlines_valid_images(example_page):
  queries, path = example_page
  raw = open(path, encoding='utf-8').read()
  page = Page(raw)
  text = ''.join(page.text)
  for q in queries:
    assert q['id'] in text
    for r in q['results']:
      assert r['id'] in text
  assert NASTY in text and 'Search <&> results' in text and 'No results for this query.' in text
  assert NASTY not in raw and '<&>' not in raw and 'a&lt;b&gt;&amp;&quot;c&#x27;.mp4' in raw
  # self-contained: every image is inline, nothing is fetched
  assert not re.search(r'(src|href)="(?!data:|#)', raw) and 'http://' not in raw.replace(
      'xmlns="http://www.w3.org/2000/svg"', '')
  strips = page.find('img', **{'class': 'strip'})
  assert len(strips) == 4   # query video1, bikes, bigbuckbunny; the missing file has a placeholder
  for a in strips:
    img = decode(a['src'])
    assert img.shape == (report.THUMB_H, report.AXIS_W, 3) and img.std() > 10
  maps = page.find('image', **{'class': 'map'})
  assert len(maps) == 3 and all(decode(a['href']).shape[2] == 3 for a in maps)
  assert raw.count('video not available') == 1 and 'No copied segment localised' in raw


def test_strip_shows_the_frames_at_evenly_spaced_times(clips, tmp_path):
  """Each cell of the strip is the frame at (k + 0.5) * duration / 6 (decoded again here), fitted into the
  cell, and its time is written under it."""
  duration = video_io.probe(clips['bikes']).duration
  q = {'id': 'q', 'path': clips['bikes'], 'duration': None, 'results': []}
  page = Page(open(report.write_report(str(tmp_path), [q])).read())
  strip = decode(page.find('img', **{'class': 'strip'})[0]['src']).astype(np.float64)
  times = (np.arange(6) + 0.5) * duration / 6
  frames = video_io.read_frames_at(clips['bikes'], times)
  h, w = frames.shape[1:3]
  scale = min((116 - 4) / w, 66 / h)
  tw, th = round(w * scale), round(h * scale)
  for k, frame in enumerate(frames):
    want = np.asarray(Image.fromarray(frame).resize((tw, th), Image.Resampling.LANCZOS), np.float64)
    top, left = (66 - th) // 2, k * 116 + (116 - tw) // 2
    got = strip[top:top + th, left:left + tw]
    assert np.abs(got - want).mean() < 8, k   # JPEG at quality 75 on small, detailed pictures
    others = [np.abs(got - np.asarray(Image.fromarray(f).resize((tw, th)), np.float64)).mean()
              for j, f in enumerate(frames) if j != k]
    assert min(others) > np.abs(got - want).mean()   # it is this frame, not a neighbour
  labels = re.findall(r'<span>([\d.]+) s</span>', open(tmp_path / 'index.html').read())
  assert labels == [f'{t:.1f}' for t in times]


def test_segments_are_drawn_at_their_times():
  """Hand-computed: query axis 0-10 s and reference axis 0-20 s over 696 px from x = 78; the map 10 x 20 at
  1 cell/s is enlarged 216 // 20 = 10 px per cell, from (46, 10)."""
  assert (report.LABEL_W, report.AXIS_W, report.HEAT_MARGIN[:2], report.HEAT_SIDE) == (78, 696, (46, 10), 216)
  segs = [(2.0, 4.0, 5.0, 9.0, 0.9), (6.0, 8.5, 12.0, 13.0, 0.5)]
  svg = report.axes_svg(segs, 10.0, 20.0)
  rects = re.findall(r'<rect class="seg" data-seg="(\d)" data-axis="(\w)" fill="([^"]+)" x="([\d.]+)" y="([\d.]+)" '
                     r'width="([\d.]+)"', svg)
  got = {(int(i), a): (c, float(x), float(y), float(w)) for i, a, c, x, y, w in rects}
  assert got == {(0, 'q'): ('#e6194b', 217.2, 20.0, 139.2), (0, 'r'): ('#e6194b', 252.0, 68.0, 139.2),
                 (1, 'q'): ('#f58231', 495.6, 20.0, 174.0), (1, 'r'): ('#f58231', 495.6, 68.0, 34.8)}
  # ticks every 2 s on the query axis (10 s / 8 -> 1.25 -> 2), every 5 s on the reference axis, labelled in s
  ticks = re.findall(r'<text x="([\d.]+)" y="([\d.]+)" text-anchor="middle" class="tl">([^<]+)</text>', svg)
  want = [(78 + 139.2 * k, 13.0, f'{2 * k} s') for k in range(6)] + [(78 + 174 * k, 94.0, f'{5 * k} s')
                                                                    for k in range(5)]
  assert [t for *_, t in ticks] == [t for *_, t in want]
  np.testing.assert_allclose([(float(x), float(y)) for x, y, _ in ticks], [w[:2] for w in want], atol=0.006)
  bands = re.findall(r'<polygon class="band" fill="([^"]+)" points="([^"]+)"', svg)
  assert bands[0] == ('#e6194b', '217.20,32.0 356.40,32.0 391.20,68.0 252.00,68.0')
  heat = report.heatmap_svg(np.zeros((10, 20)), 1.0, segs)
  boxes = re.findall(r'<rect class="box" data-seg="(\d)" stroke="([^"]+)" x="([\d.]+)" y="([\d.]+)" '
                     r'width="([\d.]+)" height="([\d.]+)"', heat)
  assert [(int(i), c, *map(float, v)) for i, c, *v in boxes] == [
      (0, '#e6194b', 96.0, 30.0, 40.0, 20.0), (1, '#f58231', 166.0, 70.0, 10.0, 25.0)]
  assert re.search(r'<image class="map" x="46" y="10" width="200.00" height="100.00"', heat)


def test_heatmap_pixels_are_the_map_on_viridis():
  """The PNG is the map enlarged 216 // 5 = 43 px per cell, coloured as matplotlib's viridis of
  (value - lo) / (hi - lo) rounded to the nearest of 64 levels, [lo, hi] = [0, 1] widened to the map's range;
  a large map is max-pooled, keeping a one-cell diagonal."""
  from matplotlib import colormaps
  m = np.array([[0.0, 0.2, 0.4, 0.6, 0.8], [1.0, -0.5, 0.1, 0.3, 0.9], [0.5, 0.5, 0.5, 0.5, 0.5]])
  uri = re.search(r'class="map"[^>]* href="([^"]+)"', report.heatmap_svg(m, 1.0, [])).group(1)
  img = decode(uri).astype(np.int64)
  assert img.shape == (3 * 43, 5 * 43, 3)
  want = (colormaps['viridis'](np.round((m + 0.5) / 1.5 * 63) / 63)[..., :3] * 255).round().astype(np.int64)
  np.testing.assert_allclose(img[21::43, 21::43], want, atol=1)   # cell centres; 8-bit rounding
  assert np.array_equal(img[::43, ::43], img[42::43, 42::43])     # flat cells
  weak = np.array([[0.1, 0.3], [0.2, 0.25]])   # inside [0, 1]: coloured on 0..1, not stretched to its range
  svg = report.heatmap_svg(weak, 1.0, [])
  img = decode(re.search(r'class="map"[^>]* href="([^"]+)"', svg).group(1)).astype(np.int64)
  want = (colormaps['viridis'](np.round(weak * 63) / 63)[..., :3] * 255).round().astype(np.int64)
  np.testing.assert_allclose(img[54::108, 54::108], want, atol=1)
  assert '>1.00</text>' in svg and '>0.00</text>' in svg   # the colour bar's ends
  big = np.zeros((500, 400))
  big[np.arange(400), np.arange(400)] = 1.0
  uri = re.search(r'class="map"[^>]* href="([^"]+)"', report.heatmap_svg(big, 1.0, [])).group(1)
  pooled = decode(uri)
  assert pooled.shape == (167, 134, 3)   # blocks of ceil(500 / 216) = 3 cells
  top = colormaps['viridis'](1.0)[:3]
  on_diag = pooled[np.arange(134), np.arange(134)].astype(np.float64)
  np.testing.assert_allclose(on_diag, np.tile(np.array(top) * 255, (134, 1)), atol=3)


def test_missing_and_broken_videos_give_placeholders(tmp_path):
  broken = vf.make_corrupt(str(tmp_path / 'broken.mp4'), 'garbage')
  segs = [(0.0, 2.0, 1.0, 3.0, 0.7)]
  q = {'id': 'q<1>', 'path': str(tmp_path / 'nowhere.mp4'), 'duration': None, 'results': [
      {'rank': 1, 'id': 'r&1', 'path': broken, 'duration': None, 'score': 0.5, 'coarse_score': 0.4,
       'segments': segs, 'sim_map': None, 'map_fps': 1.0},
      {'rank': 2, 'id': 'r2', 'path': None, 'duration': None, 'score': 0.3, 'coarse_score': 0.2,
       'segments': [], 'sim_map': np.ones((4, 6)), 'map_fps': 2.0}]}
  raw = open(report.write_report(str(tmp_path / 'out'), [q])).read()
  page = Page(raw)
  assert not page.find('img', **{'class': 'strip'})
  assert raw.count('video not available') == 2 and 'nowhere.mp4: not_found' in raw and 'broken.mp4: unreadable' in raw
  assert 'no video file given' in raw and 'no similarity map' in raw and 'q&lt;1&gt;' in raw and 'r&amp;1' in raw
  # the query's axis spans its segments (2 s) when nothing else says how long it is; r2's the map's 3 s
  assert re.search(r'<rect class="seg" data-seg="0" data-axis="q" fill="#e6194b" x="78.00" y="20.0" '
                   r'width="696.00"', raw)


@pytest.mark.parametrize('bad, message', [
    ({'segments': [(3.0, 2.0, 0.0, 1.0, 0.5)]}, "query 'q', result 'r': segment 0 (3.0, 2.0, 0.0, 1.0): times"),
    ({'segments': [(0.0, 1.0, -1.0, 1.0, 0.5)]}, 'segment 0 (0.0, 1.0, -1.0, 1.0): times must be >= 0'),
    ({'segments': [(0.0, 1.0, 2.0)]}, 'segment 0 must be 5 finite numbers'),
    ({'sim_map': np.zeros(4)}, 'sim_map must be a non-empty [Tq, Tr] array, got shape (4,)'),
    ({'map_fps': 0}, 'map_fps must be positive'),
])
def test_bad_input_is_one_clear_error_and_nothing_written(tmp_path, bad, message):
  (tmp_path / 'index.html').write_text('before')
  r = {'rank': 1, 'id': 'r', 'path': None, 'duration': 4.0, 'score': 0.5, 'coarse_score': 0.5,
       'segments': [], 'sim_map': np.zeros((4, 4)), 'map_fps': 1.0, **bad}
  with pytest.raises(ValueError) as e:
    report.write_report(str(tmp_path), [{'id': 'q', 'path': None, 'results': [r]}])
  assert message in str(e.value) and str(e.value).startswith('report: ')
  assert os.listdir(tmp_path) == ['index.html'] and (tmp_path / 'index.html').read_text() == 'before'


def test_ten_by_ten_page_stays_small(clips, tmp_path):
  queries = example_queries(clips)[:1] * 10
  for q in queries:
    q['results'] = [dict(q['results'][k % 2], rank=k + 1, id=f'r{k}') for k in range(10)]
  size = os.path.getsize(report.write_report(str(tmp_path), queries))
  assert size < 4e6, size


def test_chromium_renders_the_page(example_page, tmp_path):
  if browser.find_chromium() is None:
    pytest.skip('no Chromium browser installed')
  page = example_page[1]
  shot = np.asarray(Image.open(browser.screenshot(page, str(tmp_path / 'shot.png'))).convert('RGB'), np.int64)
  assert shot.shape == (1600, 1200, 3) and shot.std() > 20   # not a blank page
  red = np.abs(shot - [0xe6, 0x19, 0x4b]).sum(-1) < 40          # the first segment's colour
  viridis = (shot[..., 2] - shot[..., 0] > 40) & (shot[..., 1] > 40)   # blue-green heatmap cells
  assert red.sum() > 200 and viridis[:, 800:].sum() > 5000 and viridis[:, :780].sum() < viridis[:, 800:].sum()


def test_a_page_colours_every_map_on_one_scale_up_to_its_highest_value(tmp_path):
  weak, strong = np.full((3, 3), 0.1), np.array([[0.2, 0.4], [-0.1, 0.3]])
  queries = [{'id': 'q', 'results': [{'rank': 1, 'id': 'a', 'score': 0, 'coarse_score': 0, 'sim_map': weak,
                                      'map_fps': 1.0},
                                     {'rank': 2, 'id': 'b', 'score': 0, 'coarse_score': 0, 'sim_map': strong,
                                      'map_fps': 1.0}]}]
  assert report.page_range(queries) == (-0.1, 0.4)
  page = open(report.write_report(str(tmp_path), queries)).read()
  assert page.count('>0.40</text>') == 2 and page.count('>-0.10</text>') == 2 and '>1.00</text>' not in page
  assert report.page_range([{'id': 'q', 'results': []}]) == report.COLOUR_RANGE
  assert report.page_range([{'id': 'q', 'results': [dict(queries[0]['results'][0], sim_map=-weak)]}]) == \
      report.COLOUR_RANGE   # nothing above 0: the default scale
