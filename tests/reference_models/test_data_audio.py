"""Audio front ends against independent numpy references (librosa/scipy formulas)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_media import dominant_frequency, tone, write_wav
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_models.data.audio import (
    load_waveform,
    log_power_spectrogram,
    log_spectrogram,
    tile_to_length,
    tukey_window,
)


def reference_log_stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """librosa.stft(center=True, pad_mode="constant", window="hann") magnitude, then log."""
    padded = np.pad(x, n_fft // 2)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = [padded[i : i + n_fft] * window for i in range(0, len(padded) - n_fft + 1, hop)]
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    dft = np.exp(-2j * np.pi * k * n / n_fft)
    spectrum = np.stack([dft @ frame for frame in frames], axis=1)
    return np.log(np.abs(spectrum) + 1e-7)


def reference_tukey(length: int, alpha: float) -> np.ndarray:
    """scipy.signal.windows.tukey(length + 1, alpha)[:-1] (periodic), written from its formula."""
    m = length + 1
    n = np.arange(m)
    width = int(np.floor(alpha * (m - 1) / 2.0))
    w = np.ones(m)
    head, tail = n[: width + 1], n[m - width - 1 :]
    w[: width + 1] = 0.5 * (1 + np.cos(np.pi * (-1 + 2.0 * head / alpha / (m - 1))))
    w[m - width - 1 :] = 0.5 * (
        1 + np.cos(np.pi * (-2.0 / alpha + 1 + 2.0 * tail / alpha / (m - 1)))
    )
    return w[:-1]


def reference_psd(x: np.ndarray, fs: int, nperseg: int, noverlap: int) -> np.ndarray:
    """scipy.signal.spectrogram defaults: tukey(.25), detrend="constant", density, one-sided."""
    window = reference_tukey(nperseg, 0.25)
    step = nperseg - noverlap
    columns = []
    for start in range(0, len(x) - nperseg + 1, step):
        segment = x[start : start + nperseg]
        segment = (segment - segment.mean()) * window
        power = np.abs(np.fft.rfft(segment)) ** 2 / (fs * (window**2).sum())
        power[1:-1] *= 2  # even nperseg: every bin but DC and Nyquist stands for two
        columns.append(power)
    return np.log(np.stack(columns, axis=1) + 1e-7)


def test_log_spectrogram_matches_the_librosa_formula():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 4000)
    expected = reference_log_stft(x, 512, 353)
    got = log_spectrogram(torch.from_numpy(x), 512, 353).numpy()
    assert got.shape == expected.shape == (257, 1 + 4000 // 353)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("rate", "frames"), [(22050, 188), (16000, 136)])
def test_log_spectrogram_paper_shapes(rate, frames):
    assert log_spectrogram(torch.zeros(3 * rate)).shape == (257, frames)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("length", [8, 33, 512])
def test_tukey_window_matches_scipy_formula(alpha, length):
    expected = np.ones(length) if alpha == 0 else reference_tukey(length, alpha)
    np.testing.assert_allclose(tukey_window(length, alpha).numpy(), expected, atol=1e-12)


def test_log_power_spectrogram_matches_scipy_formula():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, 5000) + 0.3  # a DC offset, which the per-frame detrend removes
    expected = reference_psd(x, 16000, 512, 353)
    got = log_power_spectrogram(torch.from_numpy(x), 16000).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)


def test_log_power_spectrogram_ave_shape_and_short_input():
    assert log_power_spectrogram(torch.zeros(160000), 16000).shape == (257, 1004)
    with pytest.raises(ValueError, match="at least n_fft"):
        log_power_spectrogram(torch.zeros(100), 16000)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 200))
def test_tile_to_length_repeats_in_order(samples, length):
    waveform = torch.arange(samples, dtype=torch.float32)
    tiled = tile_to_length(waveform, length)
    assert tiled.shape == (length,)
    assert torch.equal(tiled, waveform[torch.arange(length) % samples])


def test_tile_to_length_rejects_empty_audio():
    with pytest.raises(ValueError, match="no audio samples"):
        tile_to_length(torch.zeros(0), 10)


def test_load_waveform_downmixes_and_resamples(tmp_path):
    left, right = tone(0.5, 16000, 440, 0.6), tone(0.5, 16000, 440, 0.2)
    path = write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000)
    same_rate = load_waveform(path, 16000)
    np.testing.assert_allclose(same_rate.numpy(), (left + right) / 2, atol=1e-4)
    resampled = load_waveform(path, 22050)
    assert resampled.dtype == torch.float32 and resampled.shape == (11025,)
    assert abs(dominant_frequency(resampled.numpy(), 22050) - 440) < 5


def test_load_waveform_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.wav"):
        load_waveform(tmp_path / "absent.wav", 16000)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00not really a wav file")
    with pytest.raises(RuntimeError, match="corrupt.wav"):
        load_waveform(corrupt, 16000)
