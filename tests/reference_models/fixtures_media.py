"""Tiny media fixtures in the real on-disk formats, for the data and prepare tests.

Videos are written with PyAV, wav files with soundfile, frames as JPEG with Pillow. Every video
shows one solid colour per second (:data:`COLOURS`), so a test can tell which second a frame was
taken from; audio is a sine tone, so a test can tell which signal it got.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import av
import cv2
import numpy as np
import soundfile
from PIL import Image

COLOURS = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230)]
"""Colour of second i of every fixture video and frame folder: ``COLOURS[i % 5]``."""


def colour_of_second(second: int) -> tuple[int, int, int]:
    return COLOURS[second % len(COLOURS)]


def tone(seconds: float, sample_rate: int, frequency: float = 440.0, amplitude: float = 0.5):
    """A float32 sine tone."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, sample_rate, subtype="PCM_16")
    return path


def write_video(
    path: Path,
    seconds: float,
    *,
    fps: int = 5,
    size: tuple[int, int] = (32, 24),
    codec: str = "mpeg4",
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    audio_codec: str = "aac",
) -> Path:
    """A video whose second i is the solid colour ``colour_of_second(i)``, with optional audio."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    with av.open(str(path), "w") as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = None
        if audio is not None:
            sound = container.add_stream(audio_codec, rate=audio_rate, layout="mono")
        for index in range(round(seconds * fps)):
            image = np.full((height, width, 3), colour_of_second(index // fps), dtype=np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode(None))
        if sound is not None:
            audio_format = sound.codec_context.format.name
            chunk = sound.codec_context.frame_size or 1024
            for start in range(0, len(audio), chunk):
                piece = audio[start : start + chunk]
                if audio_format.startswith("s16"):
                    piece = (piece * 32767).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(
                    piece[None, :], format=audio_format, layout="mono"
                )
                frame.sample_rate = audio_rate
                frame.pts = start
                container.mux(sound.encode(frame))
            container.mux(sound.encode(None))
    return path


def drawn_face(size: tuple[int, int] = (160, 120)) -> np.ndarray:
    """An RGB frame with a drawn frontal face (skin oval, brows, eyes, nose, mouth) in the centre.

    OpenCV's frontal-face Haar cascade detects it, also after video compression.
    """
    width, height = size
    frame = np.full((height, width, 3), 200, dtype=np.uint8)
    cx, cy, s = width // 2, height // 2, min(width, height) / 160
    cv2.ellipse(frame, (cx, cy), (round(40 * s), round(52 * s)), 0, 0, 360, (190, 150, 120), -1)
    thick = max(1, round(3 * s))
    for dx in (-17, 17):
        eye = (cx + round(dx * s), cy - round(12 * s))
        cv2.ellipse(frame, eye, (round(9 * s), round(4 * s)), 0, 0, 360, (30, 30, 30), -1)
        brow_y = cy - round(24 * s)
        brow = (cx + round((dx - 10) * s), brow_y), (cx + round((dx + 10) * s), brow_y)
        cv2.line(frame, *brow, (40, 40, 40), thick)
    cv2.line(frame, (cx, cy - round(5 * s)), (cx, cy + round(12 * s)), (140, 100, 80), thick)
    mouth = (cx, cy + round(26 * s))
    cv2.ellipse(frame, mouth, (round(16 * s), round(5 * s)), 0, 0, 360, (110, 40, 40), -1)
    return frame


def write_face_video(
    path: Path, face_frames: int, blank_frames: int, *, fps: int = 30, size=(160, 120)
) -> Path:
    """A video of ``face_frames`` frames showing :func:`drawn_face`, then ``blank_frames`` grey."""
    path.parent.mkdir(parents=True, exist_ok=True)
    face = drawn_face(size)
    blank = np.full_like(face, 128)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("flv" if path.suffix == ".flv" else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for image in [face] * face_frames + [blank] * blank_frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def write_frames(folder: Path, seconds: Iterable[int], size: tuple[int, int] = (32, 24)) -> None:
    """Prepared frames ``<second:04d>.jpg`` of the colours of those seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    for second in seconds:
        image = Image.new("RGB", size, colour_of_second(second))
        image.save(folder / f"{second:04d}.jpg", quality=95)


def write_prepared_clip(
    root: Path,
    name: str,
    *,
    seconds: float,
    sample_rate: int,
    num_frames: int | None = None,
    frequency: float = 440.0,
    audio: np.ndarray | None = None,
) -> None:
    """One clip in the prepared layout: ``audio/<name>.wav`` and ``frames/<name>/*.jpg``."""
    samples = tone(seconds, sample_rate, frequency) if audio is None else audio
    write_wav(root / "audio" / f"{name}.wav", samples, sample_rate)
    count = int(np.ceil(seconds)) if num_frames is None else num_frames
    write_frames(root / "frames" / name, range(count))


def write_face_clip(
    root: Path, name: str, samples: np.ndarray, features: np.ndarray, sample_rate: int = 16000
) -> None:
    """One clip of the Conformer layout: ``wav16k/<name>.wav`` and ``faces/<name>.npz``."""
    write_wav(root / "wav16k" / f"{name}.wav", samples, sample_rate)
    (root / "faces").mkdir(parents=True, exist_ok=True)
    detected = np.ones(len(features), dtype=bool)
    np.savez(root / "faces" / f"{name}.npz", features=features, detected=detected)
    extractor = root / "faces" / "extractor.json"
    if not extractor.is_file():
        extractor.write_text(json.dumps({"weights_sha256": "fixture", "frames": 150}))


def cremad_name(actor: int, emotion: str, sentence: str = "DFA") -> str:
    return f"{actor}_{sentence}_{emotion}_XX"


def write_json(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def dominant_frequency(samples: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * sample_rate / len(samples))


def mean_colour(frames: np.ndarray) -> np.ndarray:
    """Mean RGB of an (H, W, 3) or (3, H, W) uint8 image."""
    axis = (0, 1) if frames.shape[-1] == 3 else (1, 2)
    return frames.astype(np.float64).mean(axis=axis)
