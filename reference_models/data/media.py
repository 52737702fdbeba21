"""Decoding raw videos and audio with PyAV for the prepare step: frames, 16-bit wav.

``prepare`` runs them in worker processes started with ``spawn`` (see ``workers``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import av
import numpy as np
import soundfile

__all__ = ["MediaError", "decode_audio", "extract_frames", "read_video_frames", "write_wav"]


class MediaError(RuntimeError):
    """A media file is corrupt, unreadable, or lacks the stream that was asked for."""


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return av.open(str(path))
    except av.error.FFmpegError as error:
        raise MediaError(f"cannot open {path}: {error}") from error


def decode_audio(path: str | Path, sample_rate: int) -> np.ndarray | None:
    """Decode the first audio stream of a media file to mono float32 at ``sample_rate`` Hz.

    Channels are down-mixed and the audio resampled by FFmpeg (libswresample).

    Returns:
        The samples, or ``None`` if the file has no audio stream or fewer than 2 samples
        (a silent video, as some UCF101 videos are).

    Raises:
        FileNotFoundError: the file does not exist.
        MediaError: the file cannot be decoded.
    """
    path = Path(path)
    with _open(path) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        try:
            for frame in container.decode(container.streams.audio[0]):
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
        except av.error.FFmpegError as error:
            raise MediaError(f"cannot decode the audio of {path}: {error}") from error
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return samples if samples.size >= 2 else None


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono samples as 16-bit PCM wav, clipped to [-1, 1]; atomically (temp + rename)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    soundfile.write(
        temporary, np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV"
    )
    os.replace(temporary, path)


def extract_frames(
    path: str | Path, out_dir: str | Path, fps: float = 1.0, quality: int = 90
) -> int:
    """Write the frames of a video at ``fps`` frames per second as ``<index:04d>.jpg``.

    Frame ``i`` is the first decoded frame whose timestamp, counted from the first frame, is at
    or after ``i / fps`` seconds (at 1 fps: the frames at 0 s, 1 s, 2 s, ...). The frames go to
    a temporary folder that is renamed to ``out_dir`` only when the video was decoded
    completely, so ``out_dir`` existing means the clip is done.

    Returns:
        The number of frames written.

    Raises:
        FileNotFoundError: the video does not exist.
        MediaError: the video cannot be decoded or has no frames.
    """
    path, out_dir = Path(path), Path(out_dir)
    temporary = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    written = 0
    try:
        with _open(path) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            stream = container.streams.video[0]
            first_time = None
            for index, frame in enumerate(container.decode(stream)):
                time = frame.time if frame.time is not None else index / float(stream.average_rate)
                first_time = time if first_time is None else first_time
                # Fill every second up to this frame's time (a gap repeats the next frame).
                while time - first_time + 1e-6 >= written / fps:
                    frame.to_image().save(temporary / f"{written:04d}.jpg", quality=quality)
                    written += 1
        if written == 0:
            raise MediaError(f"{path} has no decodable video frames")
        os.replace(temporary, out_dir)
    except av.error.FFmpegError as error:
        raise MediaError(f"cannot decode the video of {path}: {error}") from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return written


def read_video_frames(path: str | Path, max_frames: int) -> np.ndarray:
    """The first ``max_frames`` frames of a video at its native rate, as RGB ``(T, H, W, 3)``.

    Raises:
        FileNotFoundError: the video does not exist.
        MediaError: the video cannot be decoded or has no frames.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    path = Path(path)
    frames = []
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path} has no video stream")
        try:
            for frame in container.decode(container.streams.video[0]):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == max_frames:
                    break
        except av.error.FFmpegError as error:
            raise MediaError(f"cannot decode the video of {path}: {error}") from error
    if not frames:
        raise MediaError(f"{path} has no decodable video frames")
    return np.stack(frames)
