"""Kaldi-compatible log-mel filterbank features for AST, in NumPy (reference) and JAX (batched, jit).

The numbers are those of transformers' `ASTFeatureExtractor` (the model card's preprocessing), which equal
`torchaudio.compliance.kaldi.fbank(wave, sample_frequency=16000, window_type='hanning', num_mel_bins=128)`;
without torchaudio the extractor runs `transformers.audio_utils.spectrogram` with the same settings:

  frames     25 ms (400 samples) every 10 ms (160), snip_edges: n = 1 + (S - 400) // 160 frames, none if S < 400
  per frame  dither 0; subtract the frame's mean (remove DC offset); pre-emphasis y[0] = 0.03 x[0],
             y[i] = x[i] - 0.97 x[i-1]; symmetric Hann window (np.hanning(400), Kaldi 'hanning')
  spectrum   |rfft(frame, 512)|^2 (257 bins), energy off, no log-energy column
  mel        128 triangular filters on Kaldi's mel scale 1127 ln(1 + f/700), 20 Hz .. 8000 Hz (Nyquist),
             triangles in mel space, no area normalisation; the Nyquist bin has weight 0 (as Kaldi's 256 bins)
  log        ln(max(mel energy, 1.1920929e-07))  (float32 epsilon, as Kaldi)
With 128 bins and a 512-point FFT, mel bin 3 covers no FFT bin, so it is always ln(eps) (transformers warns
"At least one mel filter has all zero values"; torchaudio's kaldi.fbank does the same).

`ast_input` then pads with zero rows or truncates to `max_length` (1024) frames, *before* normalising
(x + 4.2677393) / (2 * 4.5689974) (AudioSet mean/std), so padded rows become 4.2677393 / 9.1379948 = 0.46703.

Short input: with fewer than 400 samples there is no complete frame, so the fbank has zero rows and the
AST input is all padding (0.46703) — torchaudio's behaviour. transformers' NumPy path agrees for 240..399
samples but raises ValueError ("negative dimensions") below 240, because its frame count 1 + floor((S-400)/160)
goes negative; here it is clamped to 0.

Batches of unequal lengths: `ast_input(waves [B, S], lengths=[B])` computes the frames of the zero-padded
[B, S] array and blanks (sets to the pre-normalisation padding value 0) every frame that does not lie
entirely inside the first `lengths[b]` samples; each row then equals the extractor's output for
`waves[b, :lengths[b]]`.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp

SAMPLE_RATE = 16000
FRAME_LENGTH = 400        # 25 ms at 16 kHz
FRAME_SHIFT = 160         # 10 ms
FFT_LENGTH = 512          # next power of two
PREEMPHASIS = 0.97
MEL_FLOOR = float(np.finfo(np.float32).eps)   # 1.1920929e-07
LOW_FREQ = 20.0
MEAN, STD = -4.2677393, 4.5689974             # AudioSet statistics of the AST checkpoint
MAX_LENGTH = 1024


def num_frames(num_samples: int) -> int:
  """Kaldi snip_edges frame count: windows that fit entirely in the signal (0 below one window)."""
  return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def kaldi_mel(freq):
  return 1127.0 * np.log1p(np.asarray(freq, np.float64) / 700.0)


@functools.lru_cache(maxsize=8)
def mel_filters(num_mel_bins: int = 128, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """[257, num_mel_bins] float64 triangular filters, triangles in Kaldi-mel space (see module docstring)."""
  edges = np.linspace(kaldi_mel(LOW_FREQ), kaldi_mel(sample_rate / 2), num_mel_bins + 2)
  left, centre, right = edges[:-2], edges[1:-1], edges[2:]
  bins = kaldi_mel(np.arange(FFT_LENGTH // 2 + 1) * sample_rate / FFT_LENGTH)[:, None]
  rising = (bins - left) / (centre - left)
  falling = (right - bins) / (right - centre)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  weights.setflags(write=False)
  return weights


def hann_window() -> np.ndarray:
  """Symmetric Hann window of 400 samples: 0.5 - 0.5 cos(2 pi n / 399) (Kaldi's 'hanning')."""
  return np.hanning(FRAME_LENGTH)


def fbank_numpy(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 128,
                dtype=np.float64) -> np.ndarray:
  """[frames, num_mel_bins] log-mel fbank of one mono waveform (any scale; AST uses [-1, 1] floats).

  A readable reference: every step is computed in `dtype` (float64 by default)."""
  if sample_rate != SAMPLE_RATE:
    raise ValueError(f'AST features need {SAMPLE_RATE} Hz audio, got sample_rate={sample_rate}')
  wave = np.asarray(wave)
  if wave.ndim != 1:
    raise ValueError(f'fbank_numpy takes one mono waveform [samples], got shape {wave.shape}')
  n = num_frames(wave.shape[0])
  if n == 0:
    return np.zeros((0, num_mel_bins), dtype)
  index = np.arange(n)[:, None] * FRAME_SHIFT + np.arange(FRAME_LENGTH)
  frames = wave.astype(dtype)[index]                                       # [n, 400]
  frames = frames - frames.mean(axis=1, keepdims=True)                     # remove DC offset
  frames = np.concatenate([frames[:, :1] * (1 - PREEMPHASIS),
                           frames[:, 1:] - PREEMPHASIS * frames[:, :-1]], axis=1)
  frames = frames * hann_window().astype(dtype)
  spectrum = np.fft.rfft(frames, n=FFT_LENGTH, axis=1)                     # [n, 257]
  power = (spectrum.real ** 2 + spectrum.imag ** 2).astype(dtype)
  mel = power @ mel_filters(num_mel_bins, sample_rate).astype(dtype)
  return np.log(np.maximum(mel, MEL_FLOOR)).astype(dtype)


def ast_input_numpy(wave: np.ndarray, max_length: int = MAX_LENGTH, num_mel_bins: int = 128) -> np.ndarray:
  """[max_length, num_mel_bins] float32 AST input of one waveform (pad/truncate, then normalise)."""
  fb = fbank_numpy(wave, num_mel_bins=num_mel_bins)[:max_length]
  fb = np.pad(fb, ((0, max_length - fb.shape[0]), (0, 0)))
  return normalise(fb).astype(np.float32)


def normalise(x):
  return (x - MEAN) / (2 * STD)


@functools.lru_cache(maxsize=1)
def frame_operator() -> np.ndarray:
  """[400, 514] float64: frame -> [Re | Im] of rfft_512(hann * preemphasis(frame - mean(frame))).

  Every per-frame step before the power spectrum is linear, so it folds into one matrix (built in float64)."""
  n = FRAME_LENGTH
  centre = np.eye(n) - 1.0 / n
  preemph = np.eye(n) - PREEMPHASIS * np.eye(n, k=-1)
  preemph[0, 0] = 1 - PREEMPHASIS
  dft = np.exp(-2j * np.pi * np.outer(np.arange(n), np.arange(FFT_LENGTH // 2 + 1)) / FFT_LENGTH)
  op = (hann_window()[:, None] * preemph @ centre).T @ dft
  op = np.concatenate([op.real, op.imag], axis=1)
  op.setflags(write=False)
  return op


def fbank_jax(wave: jnp.ndarray, num_mel_bins: int = 128) -> jnp.ndarray:
  """[B, S] float waveforms -> [B, frames, num_mel_bins] float32 log-mel fbank (frames = num_frames(S)).

  jit-able; the frame count is static (from S). float32 with HIGHEST-precision matmuls. The spectrum is
  `frame_operator()` applied to the mean-removed frame rather than an FFT: in float32 an FFT's rounding
  error is spread over all bins at ~eps * (frame energy), which swamps low-energy cells (up to 1.4e-3 in
  log-mel on white noise), while a matmul's error follows each bin's own coefficients (<= 3e-5 on noise).
  Against the float64 reference: <= 5e-4 in log-mel for cells within 15 nats (65 dB) of their frame's
  loudest mel bin; cells 20+ nats below it (tones, chirps) carry float32 rounding of the loud bins, up to
  ~2e-2 (torchaudio's float32 FFT, the original AST pipeline, has the same limit)."""
  wave = jnp.asarray(wave, jnp.float32)
  if wave.ndim != 2:
    raise ValueError(f'fbank_jax takes [batch, samples] waveforms, got shape {wave.shape}')
  n = num_frames(wave.shape[1])
  if n == 0:
    return jnp.zeros((wave.shape[0], 0, num_mel_bins), jnp.float32)
  index = np.arange(n)[:, None] * FRAME_SHIFT + np.arange(FRAME_LENGTH)
  frames = wave[:, index]                                                  # [B, n, 400]
  frames = frames - frames.mean(axis=-1, keepdims=True)                    # the operator centres again
  highest = jax.lax.Precision.HIGHEST
  spectrum = jnp.matmul(frames, jnp.asarray(frame_operator(), jnp.float32), precision=highest)
  bins = FFT_LENGTH // 2 + 1
  power = spectrum[..., :bins] ** 2 + spectrum[..., bins:] ** 2
  mel = jnp.matmul(power, jnp.asarray(mel_filters(num_mel_bins), jnp.float32), precision=highest)
  return jnp.log(jnp.maximum(mel, MEL_FLOOR))


def ast_input(waves: jnp.ndarray, max_length: int = MAX_LENGTH, lengths: Optional[jnp.ndarray] = None,
              num_mel_bins: int = 128) -> jnp.ndarray:
  """[B, S] 16 kHz waveforms -> [B, max_length, num_mel_bins] normalised AST input, as ASTFeatureExtractor.

  Frames past `max_length` are never computed (the waveform is cut to the samples they need). `lengths` [B]
  (optional, may be traced): the valid samples of each row; frames reaching past them become padding."""
  waves = jnp.asarray(waves, jnp.float32)
  if waves.ndim != 2:
    raise ValueError(f'ast_input takes [batch, samples] waveforms, got shape {waves.shape}')
  waves = waves[:, :(max_length - 1) * FRAME_SHIFT + FRAME_LENGTH]
  fb = fbank_jax(waves, num_mel_bins)                                      # [B, n <= max_length, mels]
  if lengths is not None:
    lengths = jnp.asarray(lengths, jnp.int32)
    valid = jnp.where(lengths >= FRAME_LENGTH, 1 + (lengths - FRAME_LENGTH) // FRAME_SHIFT, 0)
    fb = jnp.where(jnp.arange(fb.shape[1])[None, :, None] < valid[:, None, None], fb, 0.0)
  fb = jnp.pad(fb, ((0, 0), (0, max_length - fb.shape[1]), (0, 0)))
  return normalise(fb)
