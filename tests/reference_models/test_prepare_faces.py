"""prepare cremad --faces end to end: 16 kHz wavs, face features, fallback counts, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from fixtures_media import (
    cremad_name,
    dominant_frequency,
    drawn_face,
    tone,
    write_face_video,
    write_wav,
)

from reference_models.data.cremad import emotion_label
from reference_models.data.cremad_faces import CremaDWaveformFaces
from reference_models.data.faces import (
    FACE_FEATURE_DIM,
    FaceDetector,
    FaceFeatureExtractor,
    build_face_encoder,
    centre_square,
    crop_square,
)
from reference_models.data.media import read_video_frames
from reference_models.data.prepare import main

FACE_FRAMES, BLANK_FRAMES = 5, 2
FACELESS = cremad_name(1004, "SAD")
SIZE = 64  # network input side in these tests (260 in the recipe)


def faces_command(raw, out):
    return ["cremad", "--raw", str(raw), "--out", str(out), "--faces", "--face-size", str(SIZE)]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """3 clips with a face in their first 5 of 7 frames (30 fps), and 1 clip with no face."""
    root = tmp_path_factory.mktemp("raw")
    for actor, frequency in ((1001, 300.0), (1002, 500.0), (1003, 700.0)):
        name = cremad_name(actor, "ANG")
        write_face_video(root / "VideoFlash" / f"{name}.flv", FACE_FRAMES, BLANK_FRAMES)
        write_wav(root / "AudioWAV" / f"{name}.wav", tone(0.5, 16000, frequency), 16000)
    write_face_video(root / "VideoFlash" / f"{FACELESS}.flv", 0, 4)
    write_wav(root / "AudioWAV" / f"{FACELESS}.wav", tone(0.5, 16000), 16000)
    return root


def test_detector_finds_the_drawn_face_and_crops_are_exact_slices():
    frame = drawn_face((160, 120))
    x, y, width, height = FaceDetector()(frame)
    assert x <= 80 <= x + width and y <= 60 <= y + height  # the face's centre is inside
    assert 40 <= width <= 120 and width == height
    assert FaceDetector()(np.full_like(frame, 128)) is None
    assert centre_square(120, 160) == (20, 0, 120, 120)
    np.testing.assert_array_equal(crop_square(frame, (10, 5, 32, 32), 32), frame[5:37, 10:42])


def test_extractor_reads_a_timm_state_dict_and_flags_fallback_frames(tmp_path):
    with pytest.warns(UserWarning, match="RANDOM"):
        reference = build_face_encoder("random")
    state = {f"classifier.0.{k}": v for k, v in torch.nn.Linear(1408, 8).state_dict().items()}
    path = tmp_path / "enet_b2_8_state_dict.pt"
    torch.save({**reference.state_dict(), **state}, path)  # timm's layout + an 8-way head
    extract = FaceFeatureExtractor(path, image_size=SIZE)
    frames = np.stack([drawn_face((160, 120)), np.full((120, 160, 3), 128, np.uint8)])
    features, detected = extract(frames)
    assert features.shape == (2, FACE_FEATURE_DIM) and features.dtype == np.float32
    assert detected.tolist() == [True, False]
    # The fallback frame is a uniform grey crop, whatever its position: an independent input.
    grey = (
        torch.full((1, 3, SIZE, SIZE), 128 / 255)
        - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    ) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.inference_mode():
        expected = reference(grey)[0].numpy()
    np.testing.assert_allclose(features[1], expected, rtol=1e-4, atol=1e-4)
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not timm's efficientnet_b2 layout"):
        build_face_encoder(tmp_path / "other.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_model.pt")
    with pytest.raises(ValueError, match="weights_only=False"):
        build_face_encoder(tmp_path / "pickled_model.pt")
    with pytest.raises(FileNotFoundError, match="'random'"):
        build_face_encoder(tmp_path / "absent.pt")


def test_read_video_frames_keeps_the_native_rate_and_the_cap(tmp_path):
    path = write_face_video(tmp_path / "v.flv", 3, 4)
    assert read_video_frames(path, 150).shape == (7, 120, 160, 3)
    assert read_video_frames(path, 5).shape == (5, 120, 160, 3)


@pytest.mark.slow
def test_prepare_faces_counts_fallbacks_runs_in_parallel_and_resumes(raw, tmp_path, capsys):
    out = tmp_path / "prepared"
    command = faces_command(raw, out) + ["--face-weights", "random"]
    with pytest.warns(UserWarning, match="RANDOM"):
        assert main(command + ["--workers", "2"]) == 0
    assert "4 clips, 25 frames, 10 without a detected face" in capsys.readouterr().out
    report = json.loads((out / "prepare_report.json").read_text())
    faces = report["faces"]
    assert faces["counts"] == {"prepared": 4, "skipped": 0, "failed": 0}
    assert (faces["clips"], faces["frames"], faces["fallback_frames"]) == (4, 25, 10)
    assert faces["clips_without_face"] == [FACELESS]
    assert faces["fallback_by_clip"][FACELESS] == 4
    assert faces["fallback_by_clip"][cremad_name(1001, "ANG")] == BLANK_FRAMES
    assert faces["extractor"] == {"weights_sha256": "random", "image_size": SIZE, "frames": 150}

    name = cremad_name(1002, "ANG")
    with np.load(out / "faces" / f"{name}.npz") as archive:
        features, detected = archive["features"], archive["detected"]
    assert features.shape == (7, FACE_FEATURE_DIM) and features.dtype == np.float32
    assert detected.tolist() == [True] * FACE_FRAMES + [False] * BLANK_FRAMES
    samples, rate = soundfile.read(out / "wav16k" / f"{name}.wav", dtype="float32")
    assert rate == 16000 and len(samples) == 8000
    assert abs(dominant_frequency(samples, rate) - 500.0) < 3
    assert (out / "frames" / name).is_dir()  # the ResNet setting's inputs are there too

    # Resume: nothing is redone; a deleted clip is redone in-process with the same weights.
    stamp = (out / "faces" / f"{cremad_name(1001, 'ANG')}.npz").stat().st_mtime_ns
    (out / "faces" / f"{name}.npz").unlink()
    with pytest.warns(UserWarning, match="RANDOM"):
        assert main(command + ["--workers", "1"]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["faces"]["counts"] == {"prepared": 1, "skipped": 3, "failed": 0}
    assert report["faces"]["fallback_frames"] == 10  # counted over all clips, not just new ones
    assert (out / "faces" / f"{cremad_name(1001, 'ANG')}.npz").stat().st_mtime_ns == stamp
    with np.load(out / "faces" / f"{name}.npz") as archive:
        np.testing.assert_allclose(archive["features"], features, rtol=1e-5, atol=1e-5)

    # The datasets read it: 4 actors, one each for validation and test.
    with pytest.warns(UserWarning, match="RANDOM EfficientNet-B2"):
        train = CremaDWaveformFaces(
            out, "train", split_file="generated", val_actors=1, test_actors=1
        )
    waveform, features, label = train[0]
    assert len(train) == 2 and label == emotion_label(train.clips[0][0])
    assert waveform.shape == (8000,) and features.shape[1] == FACE_FEATURE_DIM

    # Other weights into the same folder are refused instead of mixing two networks' features.
    weights = tmp_path / "weights.pt"
    with pytest.warns(UserWarning, match="RANDOM"):
        torch.save(build_face_encoder("random").state_dict(), weights)  # same network, a file
    assert main(faces_command(raw, out) + ["--face-weights", str(weights)]) == 2
    assert "another extractor" in capsys.readouterr().err


def test_wrong_weights_stop_before_any_clip_and_record_nothing(raw, tmp_path, capsys):
    weights = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, weights)
    out = tmp_path / "prepared"
    assert main(faces_command(raw, out) + ["--face-weights", str(weights)]) == 2
    assert "not timm's efficientnet_b2 layout" in capsys.readouterr().err
    assert not list((out / "faces").glob("*")) and not list((out / "wav16k").glob("*"))
    assert main(faces_command(raw, out) + ["--face-weights", str(tmp_path / "absent.pt")]) == 2
    assert "absent.pt" in capsys.readouterr().err


def test_faces_needs_weights_and_cremad(raw, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(faces_command(raw, tmp_path / "o"))
    assert "--face-weights" in capsys.readouterr().err
    (tmp_path / "ave").mkdir()
    for name in ("trainSet.txt", "valSet.txt", "testSet.txt"):
        (tmp_path / "ave" / name).write_text("")
    args = ["ave", "--raw", str(tmp_path / "ave"), "--out", str(tmp_path / "o"), "--faces"]
    assert main(args + ["--face-weights", "random"]) == 2
    assert "CREMA-D" in capsys.readouterr().err
