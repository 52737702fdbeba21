"""CREMA-D Conformer inputs: items, training-fold normalisation and its cache, padding collate."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch
from fixtures_media import cremad_name, write_face_clip, write_json

from reference_models.data import normalisation
from reference_models.data.cremad import emotion_label
from reference_models.data.cremad_faces import CremaDWaveformFaces
from reference_models.data.padding import pad_collate

ACTORS = range(1001, 1008)
SMALL = dict(split_file="generated", val_actors=2, test_actors=2)
DIM = 1408


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """7 actors x 2 emotions; waveforms of 0.1-0.4 s, 2-9 face frames with per-dimension offsets."""
    root = tmp_path_factory.mktemp("cremad_faces")
    rng = np.random.default_rng(0)
    for actor in ACTORS:
        for emotion in ("ANG", "HAP"):
            samples = 0.1 + 0.2 * rng.standard_normal(int(rng.integers(1600, 6400)))
            features = rng.standard_normal((int(rng.integers(2, 10)), DIM)) * 3 + np.arange(DIM)
            write_face_clip(root, cremad_name(actor, emotion), samples, features.astype("f4"))
    return root


def stored(root, name):
    """The clip's waveform and features as stored (16-bit audio), read independently."""
    samples, _ = soundfile.read(root / "wav16k" / f"{name}.wav", dtype="float64")
    return samples, np.load(root / "faces" / f"{name}.npz")["features"].astype(np.float64)


def test_items_are_normalised_with_the_training_split_statistics(root):
    train = CremaDWaveformFaces(root, "train", **SMALL)
    test = CremaDWaveformFaces(root, "test", **SMALL)
    names = [name for name, _ in train.clips]
    waves, faces = zip(*(stored(root, name) for name in names))
    wave_mean, wave_std = np.concatenate(waves).mean(), np.concatenate(waves).std()
    face_mean, face_std = np.concatenate(faces).mean(0), np.concatenate(faces).std(0)
    for dataset in (train, test):  # the test split uses the training statistics
        for index, (name, label) in enumerate(dataset.clips):
            waveform, features, item_label = dataset[index]
            raw_wave, raw_faces = stored(root, name)
            assert item_label == label == emotion_label(name)
            assert waveform.dtype == features.dtype == torch.float32
            expected_wave = (raw_wave - wave_mean) / wave_std
            np.testing.assert_allclose(waveform.numpy(), expected_wave, rtol=1e-4, atol=1e-4)
            expected_faces = (raw_faces - face_mean) / face_std
            np.testing.assert_allclose(features.numpy(), expected_faces, rtol=1e-4, atol=1e-4)
    raw = CremaDWaveformFaces(root, "test", normalise=False, **SMALL)
    assert raw.statistics is None
    np.testing.assert_allclose(raw[0][1].numpy(), stored(root, raw.clips[0][0])[1], rtol=1e-6)


def test_statistics_are_computed_once_and_cached_per_fold(root, monkeypatch):
    CremaDWaveformFaces(root, "val", fold=0, **SMALL)
    cached = sorted((root / "normalisation").glob("*.pt"))
    assert len(cached) >= 1

    def fail(*args, **kwargs):
        raise AssertionError("statistics recomputed although they are cached")

    with monkeypatch.context() as patch:
        patch.setattr(normalisation, "compute_fold_statistics", fail)
        again = CremaDWaveformFaces(root, "train", fold=0, **SMALL)
        with pytest.raises(AssertionError, match="recomputed"):
            CremaDWaveformFaces(root, "train", fold=1, **SMALL)  # another fold: another key
    assert again.statistics.clips == len(again.clips)
    fold2 = CremaDWaveformFaces(root, "train", fold=1, **SMALL)
    assert len(list((root / "normalisation").glob("*.pt"))) == len(cached) + 1
    assert not torch.equal(fold2.statistics.face_mean, again.statistics.face_mean)
    short = CremaDWaveformFaces(root, "train", fold=0, max_frames=2, **SMALL)
    assert all(short[i][1].shape[0] <= 2 for i in range(len(short)))
    assert len(list((root / "normalisation").glob("*.pt"))) == len(cached) + 2


def test_pad_collate_zero_pads_and_masks_the_padding(root):
    dataset = CremaDWaveformFaces(root, "train", **SMALL)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=pad_collate)
    waveform, waveform_mask, faces, faces_mask, labels = next(iter(loader))
    items = [dataset[i] for i in range(4)]
    wave_lengths = [len(item[0]) for item in items]
    face_lengths = [len(item[1]) for item in items]
    assert waveform.shape == waveform_mask.shape == (4, max(wave_lengths))
    assert faces.shape == (4, max(face_lengths), DIM) and faces_mask.shape == faces.shape[:2]
    assert waveform_mask.dtype == faces_mask.dtype == torch.bool
    assert (~waveform_mask).sum(1).tolist() == wave_lengths
    assert (~faces_mask).sum(1).tolist() == face_lengths
    assert labels.tolist() == [item[2] for item in items] and labels.dtype == torch.int64
    for row, (wave, feats, _) in enumerate(items):
        torch.testing.assert_close(waveform[row, : len(wave)], wave)
        torch.testing.assert_close(faces[row, : len(feats)], feats)
    assert not waveform[waveform_mask].any() and not faces[faces_mask].any()


def test_missing_files_and_missing_root(root, tmp_path):
    absent = cremad_name(1099, "SAD")
    listed = [f"{cremad_name(1001, 'ANG')}.wav", f"{absent}.wav"]
    split = write_json(tmp_path / "split.json", {"1": {"train": listed, "val": [], "test": []}})
    with pytest.raises(FileNotFoundError, match=absent):
        CremaDWaveformFaces(root, "train", split_file=split)
    with pytest.warns(UserWarning, match=absent):
        dataset = CremaDWaveformFaces(root, "train", split_file=split, missing="skip")
    assert len(dataset) == 1 and dataset.excluded == {absent: "no face features"}
    with pytest.raises(FileNotFoundError, match="--faces --face-weights"):
        CremaDWaveformFaces(tmp_path / "nowhere")
