"""The face stage of ``prepare cremad --faces``: 16 kHz audio and face features per clip.

For each clip it writes, into the prepared root::

    wav16k/<clip>.wav     the clip's audio, mono 16-bit PCM at 16 kHz (the Conformer's waveform)
    faces/<clip>.npz      "features": (T, 1408) float32, "detected": (T,) bool, T <= 150 frames
    faces/extractor.json  the extractor that made them (weights digest, input size, frame cap)

The first ``max_frames`` (150) video frames at the video's own rate (30 fps for CREMA-D) are
used; each is a face crop encoded by :class:`~reference_models.data.faces.FaceFeatureExtractor`.
The ``.npz`` is written last and atomically, so its presence means the clip is complete: a
re-run skips it. A re-run with another extractor (other weights) is refused rather than mixing
features of two networks in one folder. Clips run in worker processes (started with ``spawn``,
each with its own network and an equal share of the CPU threads) with a progress bar.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from reference_models.data.faces import FACE_IMAGE_SIZE, FaceFeatureExtractor, build_face_encoder
from reference_models.data.media import decode_audio, read_video_frames, write_wav
from reference_models.data.workers import DEFAULT_JOB_TIMEOUT, JobFailure, run_jobs

if TYPE_CHECKING:
    from reference_models.data.prepare import Job

__all__ = [
    "FACE_SAMPLE_RATE",
    "MAX_FACE_FRAMES",
    "FaceOptions",
    "face_report",
    "prepare_clip_faces",
    "prepare_faces",
]

FACE_SAMPLE_RATE = 16000
"""Rate of the Conformer setting's waveforms (``wav16k/``)."""

MAX_FACE_FRAMES = 150
"""Frames per clip kept for the face features (the recipe truncates to 150)."""


@dataclass(frozen=True)
class FaceOptions:
    """How the face features are made.

    Attributes:
        weights: local EfficientNet-B2 state dict in timm's layout, or ``"random"``.
        image_size: network input side.
        max_frames: frames kept per clip.
        device: where the network runs (``cpu``, ``cuda``).
        batch_size: frames per forward pass.

    Example:
        >>> FaceOptions("random").identity()
        {'weights_sha256': 'random', 'image_size': 260, 'frames': 150}
    """

    weights: str
    image_size: int = FACE_IMAGE_SIZE
    max_frames: int = MAX_FACE_FRAMES
    device: str = "cpu"
    batch_size: int = 32

    def identity(self) -> dict:
        """What makes two runs' features comparable: the weights' digest, size, frame cap."""
        if self.weights == "random":
            digest = "random"
        else:
            path = Path(self.weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"face weights {path} do not exist; pass a local EfficientNet-B2 state dict "
                    "(HSEmotion's enet_b2_8) or 'random' for a smoke test"
                )
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return {"weights_sha256": digest, "image_size": self.image_size, "frames": self.max_frames}


_extractor: FaceFeatureExtractor | None = None  # one per worker process, built by _start_worker


def _start_worker(options: FaceOptions, threads: int | None) -> None:
    global _extractor
    if threads is not None:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():  # prepare_faces has warned once about random weights
        warnings.filterwarnings("ignore", "face encoder with RANDOM weights")
        _extractor = FaceFeatureExtractor(
            options.weights,
            image_size=options.image_size,
            device=options.device,
            batch_size=options.batch_size,
        )


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(buffer.getvalue())
    os.replace(temporary, path)


def prepare_clip_faces(job: Job, out: Path, max_frames: int) -> tuple[str, str, str]:
    """Write one clip's 16 kHz wav and face features with this process's extractor.

    A clip that cannot be prepared is reported, not raised.

    Returns:
        ``(name, status, detail)``, status ``"prepared"``, ``"skipped"`` or ``"failed"``.
    """
    target = out / "faces" / f"{job.name}.npz"
    if target.is_file():
        return job.name, "skipped", ""
    if job.problem is not None:
        return job.name, "failed", job.problem
    if _extractor is None:
        raise RuntimeError("prepare_clip_faces runs in a process started by prepare_faces")
    wav = out / "wav16k" / f"{job.name}.wav"
    try:
        samples = decode_audio(job.audio, FACE_SAMPLE_RATE)
        if samples is None:
            return job.name, "failed", f"no audio in {job.audio}"
        write_wav(wav, samples, FACE_SAMPLE_RATE)
        features, detected = _extractor(read_video_frames(job.video, max_frames))
        _save_npz(target, features=features, detected=detected)
    except Exception as error:  # reported by name; the clip leaves no features behind
        wav.unlink(missing_ok=True)
        return job.name, "failed", f"faces: {type(error).__name__}: {error}"
    return job.name, "prepared", f"{len(detected)} frames, {int((~detected).sum())} without a face"


def _record_extractor(out: Path, identity: dict) -> None:
    """Write ``faces/extractor.json``; refuse if features of another extractor are there."""
    path = out / "faces" / "extractor.json"
    has_features = next((out / "faces").glob("*.npz"), None) is not None
    if path.is_file() and has_features:
        recorded = json.loads(path.read_text())
        if recorded != identity:
            raise ValueError(
                f"{out / 'faces'} holds features of another extractor ({recorded}, now "
                f"{identity}); remove {out / 'faces'} and {out / 'wav16k'} to re-extract, or "
                "write to another --out"
            )
    path.write_text(json.dumps(identity, indent=1))


def face_report(out: Path, names: Sequence[str]) -> dict:
    """Frame and fallback counts over the clips of ``names`` that have face features.

    Returns:
        ``{"clips", "frames", "fallback_frames", "fallback_by_clip": {name: frames},
        "clips_without_face": [names]}`` where a fallback frame had no detected face and was
        centre-cropped.
    """
    fallback, frames, without = {}, 0, []
    for name in names:
        path = out / "faces" / f"{name}.npz"
        if not path.is_file():
            continue
        with np.load(path) as archive:
            detected = archive["detected"]
        frames += len(detected)
        fallback[name] = int((~detected).sum())
        if not detected.any():
            without.append(name)
    return {
        "clips": len(fallback),
        "frames": frames,
        "fallback_frames": sum(fallback.values()),
        "fallback_by_clip": {name: count for name, count in fallback.items() if count},
        "clips_without_face": without,
    }


def prepare_faces(
    jobs: Sequence[Job],
    out: Path,
    options: FaceOptions,
    *,
    workers: int = 1,
    progress: bool = True,
    clip_timeout: float = DEFAULT_JOB_TIMEOUT,
) -> list[tuple[str, str, str]]:
    """Run the face stage over ``jobs``; returns each clip's ``(name, status, detail)``.

    With ``workers > 1`` a clip whose worker crashes or runs past ``clip_timeout`` seconds is
    reported as failed and the other clips complete.

    Raises:
        FileNotFoundError: the weights file does not exist.
        ValueError: ``out`` holds features of another extractor, or the weights do not load.
    """
    for folder in ("faces", "wav16k"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    identity = options.identity()
    with warnings.catch_warnings():  # fail here, not in every worker, if the weights are wrong
        warnings.filterwarnings("ignore", "face encoder with RANDOM weights")
        build_face_encoder(options.weights)
    _record_extractor(out, identity)
    if options.weights == "random":
        warnings.warn(
            "face features from a RANDOM EfficientNet-B2: they carry no emotion information; "
            "use them only for smoke tests (pass HSEmotion's enet_b2_8 state dict for real runs)",
            stacklevel=2,
        )
    done = {job.name for job in jobs if (out / "faces" / f"{job.name}.npz").is_file()}
    todo = [job for job in jobs if job.name not in done]
    results = [(name, "skipped", "") for name in sorted(done)]
    bar = tqdm(total=len(todo), desc="faces", unit="clip", disable=not progress or not todo)
    if workers <= 1 or len(todo) <= 1:
        if todo:
            _start_worker(options, None)
        for job in todo:
            results.append(prepare_clip_faces(job, out, options.max_frames))
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        outcomes = run_jobs(
            prepare_clip_faces,
            todo,
            workers=workers,
            timeout=clip_timeout,
            arguments=(out, options.max_frames),
            initializer=_start_worker,
            initargs=(options, threads),
        )
        for job, outcome in outcomes:
            failure = isinstance(outcome, JobFailure)
            results.append((job.name, "failed", outcome.reason) if failure else outcome)
            bar.update()
    bar.close()
    return results
