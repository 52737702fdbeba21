"""The prepare CLI end to end on tiny raw datasets written with PyAV and soundfile."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import soundfile
import torch
from fixtures_media import (
    colour_of_second,
    cremad_name,
    dominant_frequency,
    mean_colour,
    tone,
    write_lines,
    write_video,
    write_wav,
)
from PIL import Image

from reference_models.data.ave import AVE
from reference_models.data.cremad import CremaD
from reference_models.data.prepare import main
from reference_models.data.ucf101 import UCF101

CREMAD_ACTORS = range(1001, 1008)
CORRUPT = cremad_name(1001, "SAD")
NO_VIDEO = cremad_name(1002, "SAD")


@pytest.fixture
def cremad_raw(tmp_path):
    raw = tmp_path / "raw"
    for actor in CREMAD_ACTORS:
        name = cremad_name(actor, "ANG")
        write_video(raw / "VideoFlash" / f"{name}.flv", 2.6, codec="flv")
        write_wav(raw / "AudioWAV" / f"{name}.wav", tone(1.5, 16000, 440.0), 16000)
    (raw / "VideoFlash" / f"{CORRUPT}.flv").write_bytes(b"FLV\x01 this is not a video")
    write_wav(raw / "AudioWAV" / f"{CORRUPT}.wav", tone(1.5, 16000), 16000)
    write_wav(raw / "AudioWAV" / f"{NO_VIDEO}.wav", tone(1.5, 16000), 16000)
    return raw


def test_cremad_end_to_end_with_failures_and_resume(cremad_raw, tmp_path, capsys):
    out = tmp_path / "prepared"
    status = main(["cremad", "--raw", str(cremad_raw), "--out", str(out), "--workers", "2"])
    printed = capsys.readouterr().out
    assert status == 1
    assert f"FAILED {CORRUPT}" in printed and f"FAILED {NO_VIDEO}" in printed
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["counts"] == {
        "clips": 9,
        "prepared": 7,
        "skipped": 0,
        "no_audio": 0,
        "failed": 2,
    }
    assert set(report["failed"]) == {CORRUPT, NO_VIDEO}
    assert (
        "missing" in report["failed"][NO_VIDEO] and f"{NO_VIDEO}.flv" in report["failed"][NO_VIDEO]
    )
    assert not (out / "frames" / CORRUPT).exists()
    assert not (out / "audio" / f"{CORRUPT}.wav").exists()  # a failed clip leaves no output
    assert not list((out / "frames").glob(".*.tmp"))  # no half-written clip left behind

    name = cremad_name(1003, "ANG")
    samples, rate = soundfile.read(out / "audio" / f"{name}.wav", dtype="float32")
    assert rate == 22050 and soundfile.info(out / "audio" / f"{name}.wav").subtype == "PCM_16"
    assert abs(len(samples) - 1.5 * 22050) < 0.02 * 22050
    assert abs(dominant_frequency(samples, rate) - 440) < 3
    frames = sorted((out / "frames" / name).glob("*.jpg"))
    assert [path.name for path in frames] == ["0000.jpg", "0001.jpg", "0002.jpg"]
    for second, path in enumerate(frames):
        colour = mean_colour(np.asarray(Image.open(path)))
        assert np.allclose(colour, colour_of_second(second), atol=8)

    # Resume: finished clips are skipped and untouched; only the failures are retried.
    stamp = (out / "audio" / f"{name}.wav").stat().st_mtime_ns
    write_video(cremad_raw / "VideoFlash" / f"{CORRUPT}.flv", 2.6, codec="flv")
    status = main(["cremad", "--raw", str(cremad_raw), "--out", str(out), "--workers", "1"])
    report = json.loads((out / "prepare_report.json").read_text())
    assert status == 1 and set(report["failed"]) == {NO_VIDEO}
    assert report["counts"]["skipped"] == 7 and report["counts"]["prepared"] == 1
    assert (out / "audio" / f"{name}.wav").stat().st_mtime_ns == stamp

    with pytest.warns(UserWarning, match=f"1 clip.* failed to prepare.*{NO_VIDEO}"):
        dataset = CremaD(
            out, "train", split_file="generated", val_actors=2, test_actors=2, image_size=16
        )
    spectrogram, clip, _ = dataset[0]
    assert spectrogram.shape == (257, 188) and clip.shape == (3, 3, 16, 16)


def test_missing_raw_folder_exits_with_a_message(tmp_path, capsys):
    assert main(["cremad", "--raw", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "raw").mkdir()
    assert main(["ucf101", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o")]) == 2
    assert "ucfTrainTestlist" in capsys.readouterr().err


def test_ave_end_to_end(tmp_path):
    raw = tmp_path / "AVE_Dataset"
    lines = {
        "trainSet.txt": ["Dog&vidA&good&1&5", "Church bell&vidB&good&0&6"],
        "valSet.txt": ["Dog&vidC&good&2&4"],
        "testSet.txt": ["Church bell&vidD&good&0&3"],
    }
    for file, rows in lines.items():
        write_lines(raw / file, rows)
    for video in ("vidA", "vidB", "vidC", "vidD"):
        write_video(raw / "AVE" / f"{video}.mp4", 6, audio=tone(6, 16000), audio_codec="aac")
    out = tmp_path / "prepared"
    assert main(["ave", "--raw", str(raw), "--out", str(out), "--workers", "1"]) == 0
    assert (out / "splits" / "trainSet.txt").read_text() == (raw / "trainSet.txt").read_text()
    assert len(list((out / "frames" / "vidA").glob("*.jpg"))) == 6
    spectrogram, frames, label = AVE(out, "train", image_size=16)[0]
    assert spectrogram.shape == (257, 1004) and frames.shape == (3, 4, 16, 16) and label == 1


def test_ucf101_end_to_end_records_silent_videos(tmp_path):
    raw = tmp_path / "raw"
    lists = raw / "ucfTrainTestlist"
    write_lines(lists / "classInd.txt", ["1 Archery", "2 Basketball"])
    train = [f"{c}/v_{c}_g{g:02d}_c01.avi" for c in ("Archery", "Basketball") for g in (8, 9, 10)]
    test = [f"{c}/v_{c}_g01_c01.avi" for c in ("Archery", "Basketball")]
    for fold in (1, 2, 3):
        write_lines(lists / f"trainlist0{fold}.txt", [f"{entry} 1" for entry in train])
        write_lines(lists / f"testlist0{fold}.txt", test)
    for entry in train + test:
        has_audio = entry.startswith("Archery")
        write_video(
            raw / "UCF-101" / entry,
            4.2,
            audio=tone(4.2, 16000) if has_audio else None,
            audio_codec="pcm_s16le",
        )
    out = tmp_path / "prepared"
    assert main(["ucf101", "--raw", str(raw), "--out", str(out), "--workers", "2"]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    silent = [entry for entry in train + test if entry.startswith("Basketball")]
    assert report["no_audio"] == sorted(entry.split("/")[1][:-4] for entry in silent)
    assert report["counts"]["no_audio"] == 4 and report["counts"]["failed"] == 0
    dataset = UCF101(out, "test", image_size=16)
    assert dataset.classes == ["Archery"] and len(dataset) == 1
    spectrogram, frames, label = dataset[0]
    assert spectrogram.shape == (257, 136) and frames.shape == (3, 4, 16, 16) and label == 0
    assert torch.isfinite(spectrogram).all()


def test_parallel_prepare_after_decoding_in_this_process(tmp_path):
    """FFmpeg's slice threads started by an in-process decode must not hang the workers.

    With ``fork`` workers this order hung forever (a child waited in libswscale for threads
    that exist only in the parent); ``spawn`` workers start clean.
    """
    test_ave_end_to_end(tmp_path / "first")  # decodes in this process (--workers 1)
    start = time.monotonic()
    test_ucf101_end_to_end_records_silent_videos(tmp_path / "second")  # --workers 2
    assert time.monotonic() - start < 120
