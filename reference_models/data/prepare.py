"""Prepare a raw dataset for training: 1 fps JPEG frames and 16-bit wav per clip.

Usage::

    python -m reference_models.data.prepare {cremad,ave,ucf101} --raw RAW_DIR --out OUT_DIR \\
        [--workers N] [--fps 1] [--sample-rate HZ]
    python -m reference_models.data.prepare cremad --raw RAW_DIR --out OUT_DIR \\
        --faces --face-weights enet_b2_8_state_dict.pt [--face-device cuda]

Raw layouts (as downloaded and unpacked):

* ``cremad``: ``RAW/VideoFlash/<clip>.flv`` (frames) and ``RAW/AudioWAV/<clip>.wav`` (audio,
  resampled to 22,050 Hz).
* ``ave``: ``RAW/AVE/<video id>.mp4`` and ``RAW/{trainSet,valSet,testSet}.txt`` (audio at
  16 kHz from the video).
* ``ucf101``: ``RAW/UCF-101/<Class>/<clip>.avi`` and ``RAW/ucfTrainTestlist/`` (``classInd.txt``,
  ``trainlist0{1,2,3}.txt``, ``testlist0{1,2,3}.txt``); audio at 16 kHz from the video, none for
  silent videos.

The output is the layout the datasets read (``reference_models.data.clips``). Clips run in
parallel worker processes (started with ``spawn``: safe whatever this process decoded before)
with a progress bar. The run is resumable: a clip whose frame folder exists is complete
(frames are renamed into place last) and is skipped. Every clip that cannot be prepared
(missing input, corrupt file, a worker that crashed on it or ran past ``--clip-timeout``
seconds) is reported by name with the reason, counted, and written to
``OUT/prepare_report.json``, while the other clips complete; the exit status is 1 when any
clip failed.

``--faces`` (CREMA-D) adds the inputs of the Conformer setting: 16 kHz wav files and per-frame
face features (``reference_models.data.prepare_faces``), resumable in the same way; the report's
``"faces"`` entry counts the frames without a detected face (centre-cropped instead).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from reference_models.data.ave import SPLIT_FILES, parse_split_line
from reference_models.data.faces import FACE_IMAGE_SIZE
from reference_models.data.media import decode_audio, extract_frames, write_wav
from reference_models.data.prepare_faces import FaceOptions, face_report, prepare_faces
from reference_models.data.workers import DEFAULT_JOB_TIMEOUT, JobFailure, run_jobs

__all__ = ["DATASETS", "Job", "RawLayout", "main", "prepare", "prepare_clip"]


@dataclass(frozen=True)
class Job:
    """One clip to prepare.

    Attributes:
        name: the clip's name in the output.
        video: the file its frames come from.
        audio: the file its audio comes from (the video itself, or a separate wav).
        problem: why it cannot be prepared (a missing input), if known before decoding.
    """

    name: str
    video: Path
    audio: Path
    problem: str | None = None


@dataclass(frozen=True)
class RawLayout:
    """What ``prepare`` does for one dataset: the clips, the files copied to ``OUT/splits``."""

    sample_rate: int
    jobs: list[Job]
    metadata: list[Path] = field(default_factory=list)
    audio_optional: bool = False


def _require(path: Path, dataset: str, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{dataset}: {path} does not exist; --raw must contain {what} "
            "(see `python -m reference_models.data.prepare --help`)"
        )
    return path


def _job(name: str, video: Path, audio: Path) -> Job:
    absent = [str(path) for path in dict.fromkeys((video, audio)) if not path.is_file()]
    return Job(name, video, audio, f"missing {', '.join(absent)}" if absent else None)


def cremad_layout(raw: Path) -> RawLayout:
    """CREMA-D: ``VideoFlash/*.flv`` and ``AudioWAV/*.wav``, paired by clip name."""
    videos = _require(raw / "VideoFlash", "cremad", "VideoFlash/ with the .flv videos")
    wavs = _require(raw / "AudioWAV", "cremad", "AudioWAV/ with the .wav files")
    names = sorted(
        {path.stem for path in videos.glob("*.flv")} | {p.stem for p in wavs.glob("*.wav")}
    )
    jobs = [_job(name, videos / f"{name}.flv", wavs / f"{name}.wav") for name in names]
    return RawLayout(22050, jobs)


def ave_layout(raw: Path) -> RawLayout:
    """AVE: the video ids of the three split files, ``AVE/<id>.mp4``."""
    splits = [_require(raw / file, "ave", file) for file in SPLIT_FILES.values()]
    ids = dict.fromkeys(
        parse_split_line(line.strip())[1]
        for path in splits
        for line in path.read_text().splitlines()
        if line.strip()
    )
    jobs = [
        _job(video, raw / "AVE" / f"{video}.mp4", raw / "AVE" / f"{video}.mp4") for video in ids
    ]
    annotations = [path for path in [raw / "Annotations.txt"] if path.is_file()]
    return RawLayout(16000, jobs, splits + annotations)


def ucf101_layout(raw: Path) -> RawLayout:
    """UCF101: every video of the official lists, ``UCF-101/<Class>/<clip>.avi``."""
    lists = _require(raw / "ucfTrainTestlist", "ucf101", "ucfTrainTestlist/ (the split files)")
    files = [_require(lists / "classInd.txt", "ucf101", "ucfTrainTestlist/classInd.txt")]
    files += [
        _require(
            lists / f"{kind}list0{fold}.txt", "ucf101", f"ucfTrainTestlist/{kind}list0{fold}.txt"
        )
        for kind in ("train", "test")
        for fold in (1, 2, 3)
    ]
    entries = dict.fromkeys(
        line.split()[0]
        for path in files[1:]
        for line in path.read_text().splitlines()
        if line.strip()
    )
    jobs = []
    for entry in entries:
        video = raw / "UCF-101" / entry
        jobs.append(_job(video.stem, video, video))
    return RawLayout(16000, jobs, files, audio_optional=True)


DATASETS: dict[str, Callable[[Path], RawLayout]] = {
    "cremad": cremad_layout,
    "ave": ave_layout,
    "ucf101": ucf101_layout,
}
"""The raw layout reader of each dataset."""


def prepare_clip(
    job: Job, out: Path, sample_rate: int, fps: float, audio_optional: bool
) -> tuple[str, str, str]:
    """Prepare one clip; never raises.

    Returns:
        ``(name, status, detail)`` with status ``"prepared"``, ``"skipped"`` (already done),
        ``"no_audio"`` (prepared without a wav) or ``"failed"`` (detail says why).
    """
    frames_dir = out / "frames" / job.name
    if frames_dir.is_dir():
        return job.name, "skipped", ""
    if job.problem is not None:
        return job.name, "failed", job.problem
    wav = out / "audio" / f"{job.name}.wav"
    try:
        samples = decode_audio(job.audio, sample_rate)
        if samples is None and not audio_optional:
            return job.name, "failed", f"no audio in {job.audio}"
        if samples is not None:
            write_wav(wav, samples, sample_rate)
        count = extract_frames(job.video, frames_dir, fps)
    except Exception as error:  # any failure is reported by name; the clip leaves no output
        wav.unlink(missing_ok=True)
        return job.name, "failed", f"{type(error).__name__}: {error}"
    return job.name, "prepared" if samples is not None else "no_audio", f"{count} frames"


def prepare(
    dataset: str,
    raw: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    fps: float = 1.0,
    sample_rate: int | None = None,
    faces: FaceOptions | None = None,
    progress: bool = True,
    clip_timeout: float = DEFAULT_JOB_TIMEOUT,
) -> dict:
    """Prepare a whole dataset; returns the report that is also written to the output folder.

    Args:
        dataset: ``cremad``, ``ave`` or ``ucf101``.
        raw: the unpacked raw dataset.
        out: the output folder (created; reused when resuming).
        workers: parallel worker processes (1 runs in this process).
        fps: frames per second extracted.
        sample_rate: output audio rate; ``None`` is the dataset's (22,050 or 16,000 Hz).
        faces: also write 16 kHz wavs and face features with these options (CREMA-D only).
        progress: show a progress bar.
        clip_timeout: with ``workers > 1``, seconds a worker may spend on one clip (each
            stage) before it is killed and the clip reported as failed.

    Returns:
        ``{"dataset", "counts", "failed": {name: reason}, "no_audio": [names]}``, plus
        ``"faces"`` (counts and :func:`~reference_models.data.prepare_faces.face_report`) when
        ``faces`` is given.

    Raises:
        FileNotFoundError: ``raw`` lacks the dataset's files, or the face weights are missing.
        ValueError: unknown dataset, faces asked for another dataset than CREMA-D, or the
            output holds features of another face extractor.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    if faces is not None and dataset != "cremad":
        raise ValueError(f"face features are for CREMA-D's Conformer setting, not {dataset}")
    raw, out = Path(raw), Path(out)
    layout = DATASETS[dataset](_require(raw, dataset, "the unpacked raw dataset"))
    rate = layout.sample_rate if sample_rate is None else sample_rate
    for folder in ("audio", "frames", "splits"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for path in layout.metadata:
        shutil.copy2(path, out / "splits" / path.name)
    arguments = (out, rate, fps, layout.audio_optional)
    bar = tqdm(total=len(layout.jobs), desc=f"prepare {dataset}", unit="clip", disable=not progress)
    results = []
    if workers <= 1:
        for job in layout.jobs:
            results.append(prepare_clip(job, *arguments))
            bar.update()
    else:
        outcomes = run_jobs(
            prepare_clip, layout.jobs, workers=workers, timeout=clip_timeout, arguments=arguments
        )
        for job, outcome in outcomes:
            failure = isinstance(outcome, JobFailure)
            results.append((job.name, "failed", outcome.reason) if failure else outcome)
            bar.update()
    bar.close()
    face_results = None
    if faces is not None:
        failed = {name for name, status, _ in results if status == "failed"}
        face_jobs = [job for job in layout.jobs if job.name not in failed]
        face_results = prepare_faces(
            face_jobs, out, faces, workers=workers, progress=progress, clip_timeout=clip_timeout
        )
    counts = Counter(status for _, status, _ in results)
    no_audio = sorted(
        job.name
        for job in layout.jobs
        if (out / "frames" / job.name).is_dir()
        and not (out / "audio" / f"{job.name}.wav").is_file()
    )
    report = {
        "dataset": dataset,
        "counts": {
            "clips": len(layout.jobs),
            "prepared": counts["prepared"] + counts["no_audio"],
            "skipped": counts["skipped"],
            "no_audio": len(no_audio),
            "failed": counts["failed"],
        },
        "failed": {name: detail for name, status, detail in sorted(results) if status == "failed"},
        "no_audio": no_audio,
    }
    if face_results is not None:
        _add_face_report(report, face_results, out, [job.name for job in layout.jobs])
    temporary = out / ".prepare_report.json.tmp"
    temporary.write_text(json.dumps(report, indent=1))
    os.replace(temporary, out / "prepare_report.json")
    return report


def _add_face_report(
    report: dict, results: list[tuple[str, str, str]], out: Path, names: list[str]
) -> None:
    counts = Counter(status for _, status, _ in results)
    failed = {name: detail for name, status, detail in sorted(results) if status == "failed"}
    report["faces"] = {
        "counts": {key: counts[key] for key in ("prepared", "skipped", "failed")},
        **face_report(out, names),
        "extractor": json.loads((out / "faces" / "extractor.json").read_text()),
    }
    report["failed"] = dict(sorted({**failed, **report["failed"]}.items()))
    report["counts"]["failed"] = len(report["failed"])


def _print_report(report: dict, out: Path) -> None:
    counts = report["counts"]
    print(
        f"{report['dataset']}: {counts['clips']} clips: {counts['prepared']} prepared now, "
        f"{counts['skipped']} already done, {counts['no_audio']} without audio, "
        f"{counts['failed']} failed"
    )
    if "faces" in report:
        faces = report["faces"]
        print(
            f"faces: {faces['clips']} clips, {faces['frames']} frames, "
            f"{faces['fallback_frames']} without a detected face (centre crop), "
            f"{len(faces['clips_without_face'])} clips without any"
        )
    for name, reason in report["failed"].items():
        print(f"  FAILED {name}: {reason}")
    print(f"report: {out / 'prepare_report.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 some clips failed, 2 bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m reference_models.data.prepare",
        description=__doc__.split("\n\n")[0],
        epilog="Raw layouts: cremad RAW/{VideoFlash,AudioWAV}; ave RAW/AVE/*.mp4 + "
        "RAW/{trainSet,valSet,testSet}.txt; ucf101 RAW/UCF-101/<Class>/*.avi + "
        "RAW/ucfTrainTestlist/",
    )
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--raw", type=Path, required=True, help="the unpacked raw dataset")
    parser.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="parallel processes"
    )
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second to extract")
    parser.add_argument(
        "--clip-timeout",
        type=float,
        default=DEFAULT_JOB_TIMEOUT,
        help="seconds a worker may spend on one clip before the clip is reported as failed",
    )
    parser.add_argument(
        "--sample-rate", type=int, default=None, help="audio rate (default: the dataset's)"
    )
    faces = parser.add_argument_group("face features (cremad, the Conformer setting)")
    faces.add_argument(
        "--faces", action="store_true", help="also write 16 kHz wavs and face features"
    )
    faces.add_argument(
        "--face-weights",
        help="EfficientNet-B2 state dict in timm's layout (HSEmotion's enet_b2_8), or 'random'",
    )
    faces.add_argument("--face-device", default="cpu", help="device of the face network")
    faces.add_argument(
        "--face-size", type=int, default=FACE_IMAGE_SIZE, help="face crop side in pixels"
    )
    args = parser.parse_args(argv)
    if args.faces and not args.face_weights:
        parser.error("--faces needs --face-weights PATH (or 'random' for a smoke test)")
    face_options = None
    if args.faces:
        face_options = FaceOptions(
            args.face_weights, image_size=args.face_size, device=args.face_device
        )
    try:
        report = prepare(
            args.dataset,
            args.raw,
            args.out,
            workers=args.workers,
            fps=args.fps,
            sample_rate=args.sample_rate,
            faces=face_options,
            clip_timeout=args.clip_timeout,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print_report(report, args.out)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
