"""Audio front ends shared by the datasets: wav loading, tiling, log spectrograms (no librosa).

* :func:`log_spectrogram` is the librosa-style ``log(|STFT| + 1e-7)`` of the CREMA-D and UCF101
  pipelines, built on ``torch.stft`` (Hann window, centred frames): n_fft 512 and hop 353 give
  257×188 for 3 s at 22,050 Hz and 257×136 for 3 s at 16 kHz.
* :func:`log_power_spectrogram` is ``log(S + 1e-7)`` of ``scipy.signal.spectrogram``'s power
  spectral density, as the AVE pipeline uses (Tukey(0.25) window, per-segment mean removed,
  uncentred frames): 10 s at 16 kHz with n_fft 512 and 353 overlap give 257×1004.
"""

from __future__ import annotations

import math
from pathlib import Path

import soundfile
import torch
import torchaudio.functional

__all__ = [
    "load_waveform",
    "log_power_spectrogram",
    "log_spectrogram",
    "tile_to_length",
    "tukey_window",
]


def load_waveform(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Read an audio file as a mono float32 waveform at ``sample_rate`` Hz.

    Channels are averaged; a file at another rate is resampled (band-limited sinc).

    Args:
        path: the audio file (any format libsndfile reads: wav, flac, ogg).
        sample_rate: the rate of the returned waveform.

    Returns:
        A 1-D float32 tensor in [-1, 1] for PCM files.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: the file cannot be decoded (corrupt or not audio).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        samples, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise RuntimeError(
            f"cannot decode audio file {path} ({error}); it is corrupt or not audio: "
            "re-run `python -m reference_models.data.prepare` for this dataset"
        ) from error
    waveform = torch.from_numpy(samples).mean(dim=1)
    if file_rate != sample_rate:
        waveform = torchaudio.functional.resample(waveform, file_rate, sample_rate)
    return waveform


def tile_to_length(waveform: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a waveform end to end and cut it to exactly ``length`` samples (last dim).

    This is the paper's "tile, then cut to the fixed duration" (CREMA-D tiles 3 times, which
    is the same for every clip of at least one second).

    Example:
        >>> tile_to_length(torch.tensor([1.0, 2.0, 3.0]), 7)
        tensor([1., 2., 3., 1., 2., 3., 1.])
    """
    samples = waveform.shape[-1]
    if samples == 0:
        raise ValueError("cannot tile an empty waveform: the clip has no audio samples")
    repeats = math.ceil(length / samples)
    return waveform.repeat(*([1] * (waveform.dim() - 1)), repeats)[..., :length]


def log_spectrogram(
    waveform: torch.Tensor,
    n_fft: int = 512,
    hop_length: int = 353,
    *,
    eps: float = 1e-7,
    pad_mode: str = "constant",
) -> torch.Tensor:
    """``log(|STFT(waveform)| + eps)`` with a periodic Hann window and centred frames.

    Matches ``np.log(np.abs(librosa.stft(x, n_fft=n_fft, hop_length=hop_length)) + 1e-7)``
    (librosa >= 0.10 pads centred frames with zeros: ``pad_mode="constant"``).

    Args:
        waveform: ``(samples,)`` or ``(batch, samples)``.
        n_fft: FFT size; gives ``n_fft // 2 + 1`` frequency bins.
        hop_length: samples between frames; gives ``1 + samples // hop_length`` frames.
        eps: added to the magnitude before the log.
        pad_mode: how the signal is padded for centred frames (``"constant"`` or
            ``"reflect"``).

    Returns:
        ``(..., n_fft // 2 + 1, frames)`` float tensor.

    Example:
        >>> log_spectrogram(torch.zeros(66150)).shape  # CREMA-D: 3 s at 22,050 Hz
        torch.Size([257, 188])
    """
    window = torch.hann_window(n_fft, dtype=waveform.dtype, device=waveform.device)
    spectrum = torch.stft(
        waveform,
        n_fft,
        hop_length,
        window=window,
        center=True,
        pad_mode=pad_mode,
        return_complex=True,
    )
    return torch.log(spectrum.abs() + eps)


def tukey_window(length: int, alpha: float = 0.25, *, periodic: bool = True) -> torch.Tensor:
    """Tukey (tapered cosine) window, as ``scipy.signal.get_window(("tukey", alpha), length)``.

    ``alpha`` is the tapered fraction: 0 is rectangular, 1 is Hann. ``periodic=True`` (scipy's
    default for spectral analysis) is the symmetric window of ``length + 1`` without its last
    sample.

    Example:
        >>> torch.allclose(tukey_window(8, 1.0), torch.hann_window(8, dtype=torch.float64))
        True
    """
    size = length + 1 if periodic else length
    n = torch.arange(size, dtype=torch.float64)
    if alpha <= 0 or size < 2:
        window = torch.ones(size, dtype=torch.float64)
    else:
        alpha = min(alpha, 1.0)
        taper = alpha * (size - 1) / 2
        rising = 0.5 * (1 + torch.cos(math.pi * (n / taper - 1)))
        falling = 0.5 * (1 + torch.cos(math.pi * ((n - (size - 1)) / taper + 1)))
        window = torch.where(n < taper, rising, torch.where(n > size - 1 - taper, falling, 1.0))
    return window[:length]


def log_power_spectrogram(
    waveform: torch.Tensor,
    sample_rate: int,
    n_fft: int = 512,
    noverlap: int = 353,
    *,
    alpha: float = 0.25,
    eps: float = 1e-7,
) -> torch.Tensor:
    """``log(S + eps)`` of the one-sided power spectral density, as ``scipy.signal.spectrogram``.

    Uncentred frames of ``n_fft`` samples every ``n_fft - noverlap``; each frame has its mean
    removed, is multiplied by a Tukey(``alpha``) window and Fourier transformed;
    ``S = |X|^2 / (sample_rate * sum(window^2))``, doubled for the bins that stand for two
    frequencies (all but 0 and Nyquist). Frames are gathered with ``unfold`` because the mean
    removal is per frame, which ``torch.stft`` cannot do.

    Args:
        waveform: ``(..., samples)``.
        sample_rate: sampling rate (scales the density).
        n_fft: samples per frame (``nperseg``).
        noverlap: overlap between frames.
        alpha: Tukey window shape.
        eps: added before the log.

    Returns:
        ``(..., n_fft // 2 + 1, frames)`` with ``frames = 1 + (samples - n_fft) // (n_fft -
        noverlap)``.

    Example:
        >>> log_power_spectrogram(torch.zeros(160000), 16000).shape  # AVE: 10 s at 16 kHz
        torch.Size([257, 1004])
    """
    if waveform.shape[-1] < n_fft:
        raise ValueError(f"need at least n_fft={n_fft} samples, got {waveform.shape[-1]}")
    window = tukey_window(n_fft, alpha).to(dtype=waveform.dtype, device=waveform.device)
    frames = waveform.unfold(-1, n_fft, n_fft - noverlap)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    power = torch.fft.rfft(frames * window, dim=-1).abs().square()
    power = power / (sample_rate * window.square().sum())
    doubled = torch.ones(power.shape[-1], dtype=power.dtype, device=power.device)
    doubled[1 : (n_fft + 1) // 2] = 2.0
    return torch.log(power * doubled + eps).transpose(-1, -2)
