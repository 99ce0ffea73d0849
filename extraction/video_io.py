"""Video and audio decoding with PyAV (bundled FFmpeg libraries; no ffmpeg binary needed).

Two consumers, two sampling rules:

* HAP-VR raw-video evaluation decodes like ``ffmpeg -vf fps=1,scale=...`` piped as rgb24:
  `read_frames_fps` pushes every decoded frame through FFmpeg's own filter graph
  ``buffer -> [transpose/flip for a display rotation] -> fps -> scale -> format=rgb24 -> buffersink``, so the
  frame selection is the fps filter's (output slot n at time n/fps takes the last frame whose timestamp,
  rounded to the nearest slot, is <= n; the stream end rounds the same way) and the bicubic resize and YUV->RGB
  conversion (honouring the frames' colour-space tags) are swscale's, in one pass as in the ffmpeg CLI. The shorter side becomes ``short_side`` and the
  other side ``scale=-2`` style: aspect-preserving, rounded to the nearest even number. The ``crop`` x ``crop``
  centre crop is taken in NumPy (offset floor((size - crop) / 2), as ffmpeg's crop filter).
  Timestamps are relative to the container start, as the ffmpeg CLI makes them (no -copyts).
* AVHash: `read_frames_at` returns, for each requested time t, the last
  decoded frame with timestamp <= t (the first frame for t before it), in one sequential decoding pass; only
  the selected frames are converted to RGB. `uniform_times` gives t_k = (k + 0.5) T / K; `clip_frames` applies
  the CLIP geometry of CLIPImageProcessor (shorter side 224 with PIL bicubic, the longer side
  int(224 * long / short), then a floor-offset 224 centre crop). `read_audio` returns the track as float32
  mono at 16 kHz (swresample, then the mean of the channels); `audio_windows` cuts windows centred on the frame
  times, truncated at the track ends; `equal_chunks` is the equal-split alternative.

Display rotation (phone videos) is honoured as ffmpeg's autorotate does (rotations by multiples of 90 degrees;
mirror flips in the display matrix are ignored). Broken inputs raise `VideoError` with a short ``reason``
('not_found', 'empty', 'unreadable', 'no_video_stream', 'no_frames', 'no_audio', 'size_change'); packets that
fail to decode are skipped and a demuxing error ends the stream early, as the ffmpeg CLI does.
Decoding uses FFmpeg's frame/slice threads (``thread_type = 'AUTO'``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fractions
import os
from typing import Iterator, List, Sequence, Tuple

import av
import numpy as np
from PIL import Image


class VideoError(ValueError):
  """A file that cannot be decoded as asked; ``reason`` is a short machine-readable code."""

  def __init__(self, path: str, reason: str, detail: str = ''):
    self.path, self.reason = path, reason
    super().__init__(f'{path}: {reason}' + (f' ({detail})' if detail else ''))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  duration: float      # seconds: the container's duration, else the video stream's
  fps: float           # average frame rate of the video stream
  width: int           # coded size (before any display rotation)
  height: int
  num_frames: int      # the stream's frame count if the container stores it, else round(duration * fps)
  has_audio: bool
  audio_rate: int      # sample rate of the first audio stream (0 without audio)


@contextlib.contextmanager
def _open(path: str) -> Iterator[av.container.InputContainer]:
  if not os.path.isfile(path):
    raise VideoError(path, 'not_found', 'no such file')
  if os.path.getsize(path) == 0:
    raise VideoError(path, 'empty', 'the file has 0 bytes')
  try:
    container = av.open(path, 'r')
  except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise VideoError(path, 'unreadable', f'not a media file FFmpeg can open: {e}') from None
  try:
    yield container
  finally:
    container.close()


def _video_stream(container, path: str):
  if not container.streams.video:
    raise VideoError(path, 'no_video_stream', 'the file has no video stream')
  stream = container.streams.video[0]
  stream.thread_type = 'AUTO'
  return stream


def _start_seconds(container) -> float:
  """The container start time, which the ffmpeg CLI subtracts from every timestamp."""
  return container.start_time / av.time_base if container.start_time is not None else 0.0


def _frame_end(frame, stream) -> float:
  """End of a frame in seconds from the stream start."""
  if isinstance(frame, av.AudioFrame):
    length = frame.samples / frame.sample_rate
  else:
    rate = stream.average_rate or stream.guessed_rate
    length = float(frame.duration * stream.time_base) if frame.duration else (1 / float(rate) if rate else 0.0)
  return float((frame.pts - (stream.start_time or 0)) * stream.time_base) + length


def _decode(container, stream, path: str, allow_truncated: bool) -> Iterator[av.VideoFrame | av.AudioFrame]:
  """Decoded frames of one stream. Undecodable packets are skipped and a demuxing error ends the input, as in
  the ffmpeg CLI; unless ``allow_truncated``, a stream that ends more than max(1 s, 5 %) before the duration
  in its header raises VideoError('truncated') once it is exhausted."""
  packets, last = container.demux(stream), None
  while True:
    try:
      packet = next(packets, None)
    except av.FFmpegError:
      packet = None  # the decoder is still drained
    try:
      frames = stream.decode(packet)
    except av.FFmpegError:
      frames = []
    for frame in frames:
      if frame.pts is not None:
        last = frame
        yield frame
    if packet is None:
      break
  if not allow_truncated and last is not None and stream.duration:
    expected, got = float(stream.duration * stream.time_base), _frame_end(last, stream)
    if got < expected - max(1.0, 0.05 * expected):
      raise VideoError(path, 'truncated', f'the {stream.type} stream ends at {got:.2f} s of {expected:.2f} s')


def probe(path: str) -> VideoInfo:
  """Header information without decoding."""
  with _open(path) as container:
    stream = _video_stream(container, path)
    rate = stream.average_rate or stream.guessed_rate or 0
    fps = float(rate)
    if container.duration is not None:
      duration = container.duration / av.time_base
    elif stream.duration is not None:
      duration = float(stream.duration * stream.time_base)
    else:
      duration = 0.0
    num_frames = stream.frames or int(round(duration * fps))
    audio = container.streams.audio
    return VideoInfo(duration=duration, fps=fps, width=stream.codec_context.width,
                     height=stream.codec_context.height, num_frames=num_frames, has_audio=bool(audio),
                     audio_rate=audio[0].rate if audio else 0)


def _turns(frame) -> int:
  """Quarter turns counter-clockwise that the display matrix asks for (0..3)."""
  return int(round(frame.rotation / 90.0)) % 4 if frame.side_data else 0


def _fps_graph(frame, time_base, fps: fractions.Fraction, short_side: int | None) -> av.filter.Graph:
  graph = av.filter.Graph()
  nodes = [graph.add('buffer', video_size=f'{frame.width}x{frame.height}', pix_fmt=str(frame.format.name),
                     time_base=str(time_base), pixel_aspect='1/1')]
  turns = _turns(frame)  # as ffmpeg's autorotate: a counter-clockwise display rotation = clockwise transpose
  rotate = {1: [('transpose', 'cclock')], 2: [('hflip', None), ('vflip', None)], 3: [('transpose', 'clock')]}
  for name, args in rotate.get(turns, []):
    nodes.append(graph.add(name, args))
  nodes.append(graph.add('fps', f'fps={fps}'))
  if short_side:  # -2: keep the aspect ratio, nearest even size (ffmpeg's scale semantics, both orientations)
    s = int(short_side)
    nodes.append(graph.add('scale', f"w='if(lte(iw,ih),{s},-2)':h='if(lte(iw,ih),-2,{s})':flags=bicubic"))
  nodes.append(graph.add('format', 'pix_fmts=rgb24'))
  nodes.append(graph.add('buffersink'))
  graph.link_nodes(*nodes).configure()
  return graph


def _centre_crop(img: np.ndarray, crop: int) -> np.ndarray:
  h, w = img.shape[-3:-1]
  if h < crop or w < crop:
    raise ValueError(f'cannot centre-crop {crop} from a {w}x{h} frame')
  top, left = (h - crop) // 2, (w - crop) // 2
  return img[..., top:top + crop, left:left + crop, :]


def read_frames_fps(path: str, fps: float = 1.0, short_side: int | None = 256,
                    crop: int | None = 224, allow_truncated: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """Frames at ``fps`` as ``ffmpeg -vf fps=..,scale=..`` gives them (HAP-VR raw-video path).

  Returns (uint8 [T, H, W, 3] RGB, float64 [T] timestamps in seconds from the container start). ``short_side``
  None keeps the size; ``crop`` None skips the centre crop. ``allow_truncated``: return what a truncated file
  holds (as the ffmpeg CLI would) instead of raising VideoError('truncated').
  """
  if crop and short_side and crop > short_side:
    raise ValueError(f'crop {crop} is larger than short_side {short_side}')
  rate = fractions.Fraction(fps).limit_denominator(1_000_000)
  frames, times = [], []
  with _open(path) as container:
    stream = _video_stream(container, path)
    offset = int(round(_start_seconds(container) / stream.time_base))
    graph = None

    def drain():
      while True:
        try:
          out = graph.vpull()
        except (av.BlockingIOError, av.EOFError):
          return
        img = out.to_ndarray()
        frames.append(_centre_crop(img, crop) if crop else img)
        times.append(float(out.pts * out.time_base))

    for frame in _decode(container, stream, path, allow_truncated):
      if graph is None:
        graph = _fps_graph(frame, stream.time_base, rate, short_side)
        size = (frame.width, frame.height)
      elif (frame.width, frame.height) != size:
        raise VideoError(path, 'size_change', f'frame size changes from {size} to {frame.width}x{frame.height}')
      frame.pts -= offset
      graph.vpush(frame)
      drain()
    if graph is None:
      raise VideoError(path, 'no_frames', 'no video frame could be decoded')
    graph.vpush(None)
    drain()
  if not frames:
    raise VideoError(path, 'no_frames', f'the fps={fps} filter produced no frame')
  return np.stack(frames), np.asarray(times, np.float64)


def uniform_times(duration: float, k: int = 25) -> np.ndarray:
  """AVHash frame times t_j = (j + 0.5) * duration / k, j = 0..k-1: the centres of k equal slices, which
  cover the whole video evenly (the original does not publish how it picked its frames)."""
  return (np.arange(k, dtype=np.float64) + 0.5) * (duration / k)


def _resize_short(img: np.ndarray, size: int) -> np.ndarray:
  """CLIPImageProcessor's resize: shorter side -> size, longer side int(size * long / short), PIL bicubic."""
  h, w = img.shape[:2]
  if h <= w:
    new_h, new_w = size, int(size * w / h)
  else:
    new_h, new_w = int(size * h / w), size
  if (new_h, new_w) == (h, w):
    return img
  return np.asarray(Image.fromarray(img).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))


def clip_frames(frames: np.ndarray, size: int = 224, crop: int = 224) -> np.ndarray:
  """CLIP preprocessing geometry (resize shortest side, centre crop) of uint8 [K, H, W, 3] -> [K, crop, crop, 3]."""
  return np.stack([_centre_crop(_resize_short(np.asarray(f), size), crop) for f in frames])


class _SeekFailed(Exception):
  pass


def _pick(container, stream, times: np.ndarray, seek_gap: float | None, path: str, allow_truncated: bool) -> List:
  """The frame for each of the sorted ``times``; seeks forward to the keyframe before t when t lies more than
  ``seek_gap`` seconds past the decoding position (a seek landing after t raises _SeekFailed)."""
  start, tb = _start_seconds(container), stream.time_base

  def timed(frames):
    for f in frames:
      yield float(f.pts * tb) - start, f

  it, prev, ahead, done = timed(_decode(container, stream, path, allow_truncated)), None, None, False
  picked = []
  for t in times:
    position = ahead[0] if ahead else (prev[0] if prev else -np.inf)
    if seek_gap is not None and not done and prev is not None and t - position > seek_gap:
      container.seek(int(np.floor((t + start) / tb)), stream=stream, backward=True)
      it = timed(_decode(container, stream, path, allow_truncated))
      ahead = next((x for x in it if x[1].key_frame), None)  # drop undecodable leading pictures
      if ahead is None or ahead[0] > t:
        raise _SeekFailed
      prev = None
    while not done and (ahead is None or ahead[0] <= t):
      if ahead is not None:
        prev = ahead
      ahead = next(it, None)
      done = ahead is None
    picked.append((prev or ahead or (None, None))[1])
  return picked


def read_frames_at(path: str, times: Sequence[float], size: int | None = None,
                   seek_gap: float | None = 4.0, allow_truncated: bool = False) -> np.ndarray:
  """For each time t (seconds from the container start), the last frame with timestamp <= t (the first frame for
  t before it), as uint8 [K, H, W, 3] RGB with the display rotation applied. ``size``: resize the shorter side
  as `clip_frames` does. One sequential decoding pass, except that the decoder seeks to the keyframe before a
  time more than ``seek_gap`` seconds ahead (None: never seek); the frames are the same either way (a seek that
  lands after t falls back to the sequential pass). ``allow_truncated`` as in `read_frames_fps` (checked only
  when a requested time lies past the last decoded frame)."""
  times = np.asarray(times, np.float64).reshape(-1)
  order = np.argsort(times, kind='stable')
  for gap in ([seek_gap, None] if seek_gap is not None else [None]):
    with _open(path) as container:
      stream = _video_stream(container, path)
      try:
        picked = _pick(container, stream, times[order], gap, path, allow_truncated)
      except _SeekFailed:
        continue
      if any(f is None for f in picked):
        raise VideoError(path, 'no_frames', 'no video frame could be decoded')
      out, cache = [None] * len(times), {}
      for j, frame in zip(order, picked):
        if id(frame) not in cache:  # convert each selected frame once
          img = np.ascontiguousarray(np.rot90(frame.to_ndarray(format='rgb24'), _turns(frame)))
          cache[id(frame)] = _resize_short(img, size) if size else img
        out[j] = cache[id(frame)]
      break
  if len({o.shape for o in out}) > 1:
    raise VideoError(path, 'size_change', f'frame sizes differ: {sorted({o.shape for o in out})}')
  return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def read_audio(path: str, rate: int = 16000, allow_truncated: bool = False) -> np.ndarray:
  """The first audio track as float32 mono [S] at ``rate`` Hz: swresample to ``rate`` (FFmpeg's defaults),
  then the mean of the channels (= ``ffmpeg -ac 1`` to 16-bit PCM for stereo; torchaudio/librosa mono).
  Sample 0 is the first decoded sample. Raises VideoError('no_audio') without an audio stream."""
  with _open(path) as container:
    if not container.streams.audio:
      raise VideoError(path, 'no_audio', 'the file has no audio stream')
    stream = container.streams.audio[0]
    resampler = None
    chunks = []
    for frame in _decode(container, stream, path, allow_truncated):
      if resampler is None:  # keep the input layout: channels are averaged below
        resampler = av.AudioResampler(format='fltp', layout=frame.layout.name, rate=rate)
      chunks += [f.to_ndarray() for f in resampler.resample(frame)]
    if resampler is None:
      raise VideoError(path, 'no_audio', 'the audio stream has no decodable samples')
    chunks += [f.to_ndarray() for f in resampler.resample(None)]
  if not chunks:
    return np.zeros((0,), np.float32)
  return np.concatenate(chunks, axis=1).mean(axis=0, dtype=np.float64).astype(np.float32)


def audio_windows(wave: np.ndarray, times: Sequence[float], rate: int = 16000,
                  window: float = 5.0) -> List[np.ndarray]:
  """Windows of ``window`` seconds centred on each time, so that each audio vector covers the moment of its
  frame; truncated at the ends of the track:
  samples [round((t - window/2) * rate), that + round(window * rate)) clipped to [0, len(wave)]. A window can
  be shorter than ``window`` (near the ends) or empty (a time beyond the end of the track)."""
  n, width = len(wave), int(round(window * rate))
  out = []
  for t in times:
    start = int(round((float(t) - window / 2) * rate))
    lo, hi = min(max(start, 0), n), min(max(start + width, 0), n)
    out.append(wave[lo:hi])
  return out


def equal_chunks(wave: np.ndarray, k: int = 25) -> List[np.ndarray]:
  """The alternative segmentation: k contiguous, non-overlapping chunks, chunk j = [floor(jS/k), floor((j+1)S/k))."""
  bounds = (np.arange(k + 1) * len(wave)) // k
  return [wave[bounds[j]:bounds[j + 1]] for j in range(k)]
