"""The embedded generated audio-visual set: deterministic, real front end, designed structure."""

from __future__ import annotations

import pytest
import torch

from reference_models.data.audio import log_spectrogram
from reference_models.data.synthetic import SyntheticAudioVisual, SyntheticConfig, generate

SMALL = dict(size=24)


def test_same_seed_same_data():
    first = SyntheticAudioVisual("train", seed=3, **SMALL)
    second = SyntheticAudioVisual("train", seed=3, **SMALL)
    for a, b in zip(first.tensors(), second.tensors()):
        assert torch.equal(a, b)
    assert torch.equal(first.waveforms, second.waveforms)


def test_other_seed_or_split_other_data():
    base = SyntheticAudioVisual("train", seed=3, **SMALL)
    assert not torch.equal(base.waveforms, SyntheticAudioVisual("train", seed=4, **SMALL).waveforms)
    assert not torch.equal(base.frames, SyntheticAudioVisual("val", seed=3, **SMALL).frames)


def test_generation_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(8, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_items_have_the_real_pipeline_shapes_and_front_end():
    data = SyntheticAudioVisual("test", seed=0, **SMALL)
    spectrogram, frames, label = data[5]
    config = data.config
    assert spectrogram.shape == (config.n_fft // 2 + 1, 1 + config.samples // config.hop_length)
    assert frames.shape == (3, config.num_frames, config.image_size, config.image_size)
    assert isinstance(label, int) and 0 <= label < data.num_classes
    # The spectrogram is the datasets' own log-STFT of the clipped waveform.
    expected = log_spectrogram(data.waveforms[5].clamp(-1, 1), config.n_fft, config.hop_length)
    assert torch.equal(spectrogram, expected)


def test_labels_are_balanced():
    data = SyntheticAudioVisual("train", size=60, seed=1)
    assert torch.bincount(data.labels, minlength=6).tolist() == [10] * 6


def test_knobs_reach_the_data():
    quiet = SyntheticAudioVisual("train", seed=0, video_contrast=0.0, **SMALL)
    loud = SyntheticAudioVisual("train", seed=0, video_contrast=3.0, **SMALL)
    # Contrast 0: frames are pure unit-variance noise; contrast 3 adds a grating of that amplitude.
    assert quiet.frames.std().item() == pytest.approx(1.0, abs=0.02)
    assert loud.frames.std().item() > 1.5
    assert SyntheticAudioVisual("train", seed=0, audio_snr=0.0, **SMALL).waveforms.std().item() == (
        pytest.approx(0.05, rel=0.05)
    )


def _chirp_direction(spectrogram: torch.Tensor) -> float:
    """Sign of the sweep: correlation of the loudest frequency bin with time."""
    inner = spectrogram[4:-4]  # ignore the bins near DC and Nyquist
    loudest, peak = inner.max(dim=0)
    present = loudest > inner.median() + 3.0  # frames where the chirp sounds
    time = torch.arange(peak.shape[0], dtype=torch.float32)[present]
    return torch.corrcoef(torch.stack([time, peak[present].float()]))[0, 1].item()


def test_audio_class_is_the_sweep_direction_and_rate():
    # Without jitter and with one chirp, classes 0-2 sweep down and classes 3-5 sweep up.
    data = SyntheticAudioVisual(
        "train", size=60, seed=2, audio_jitter=0.0, audio_chirps=1, audio_snr=20.0
    )
    signs = [_chirp_direction(s) for s in data.spectrograms]
    downward = [s for s, y in zip(signs, data.labels.tolist()) if y <= 1]
    upward = [s for s, y in zip(signs, data.labels.tolist()) if y >= 4]
    assert sum(s < 0 for s in downward) >= 0.9 * len(downward)
    assert sum(s > 0 for s in upward) >= 0.9 * len(upward)


def _orientation_energy(frames: torch.Tensor, angle: float, cycles: float) -> float:
    """Energy of the frames at one grating orientation and frequency (phase-invariant)."""
    side = frames.shape[-1]
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    direction = xx * torch.cos(torch.tensor(angle)) + yy * torch.sin(torch.tensor(angle))
    waves = [
        torch.cos(2 * torch.pi * cycles * direction),
        torch.sin(2 * torch.pi * cycles * direction),
    ]
    return sum((frames * w).sum(dim=(-1, -2)).pow(2).sum().item() for w in waves)


def test_video_class_is_the_grating_orientation_and_frequency():
    data = SyntheticAudioVisual("train", size=12, seed=0, video_jitter=0.0, video_contrast=2.0)
    hits = 0
    for frames, label in zip(data.frames, data.labels.tolist()):
        candidates = [(k % 3 * torch.pi / 3, 3.0 if k < 3 else 5.0) for k in range(6)]
        energies = [_orientation_energy(frames, a, c) for a, c in candidates]
        hits += int(max(range(6), key=energies.__getitem__) == label)
    assert hits >= 10  # the matched filter finds the class: the signal is there


def test_video_has_no_linear_template():
    # Random phase and colour per clip: the class-mean frame is (close to) zero everywhere.
    data = SyntheticAudioVisual("train", size=600, seed=0, video_contrast=1.0)
    class_mean = data.frames[data.labels == 0].mean(dim=0)
    assert class_mean.abs().mean().item() < 0.15


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"image_size": 4}, "image_size"),
        ({"audio_jitter": -0.1}, "audio_jitter"),
        ({"duration": 0.001}, "n_fft"),
        ({"colour": 1}, "unknown"),
    ],
)
def test_bad_knobs_are_refused(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SyntheticAudioVisual("train", seed=0, size=4, **options)


def test_bad_split_and_size():
    with pytest.raises(ValueError, match="split"):
        SyntheticAudioVisual("dev", size=4)
    with pytest.raises(ValueError, match="size"):
        generate(0, seed=0)


def test_config_round_trips_through_a_dict():
    config = SyntheticConfig(video_contrast=0.7)
    assert SyntheticConfig.from_dict(config.to_dict()) == config
