"""GPU smoke test: one short epoch of the CREMA-D-shaped model on generated data, with step times.

    python -m benchmarks.gpu_smoke              # cuda, full-width ResNet-18, CREMA-D shapes
    python -m benchmarks.gpu_smoke --amp        # with bf16 autocast
    python -m benchmarks.gpu_smoke --device cpu --quick   # tiny shapes: checks the script

It (1) generates a CREMA-D-shaped set with the embedded generator (22,050 Hz, 3 s, n_fft 512,
hop 353 → 257×188 spectrograms; 3 frames of 224×224; 6 classes), (2) runs one epoch of the
training harness (``reference_models.train``) with MLB on it, on the device, end to end
(validation, checkpoint, results), (3) times the training step of Joint and MLB alone (full
width, batch 32, fp32 and bf16 autocast, CUDA-synchronised, after warm-up) and prints
milliseconds per step and samples per second, and (4) with ``--check-sync`` runs every
method's training step under ``torch.cuda.set_sync_debug_mode("error")``. It is sized to
finish well under 3 minutes on one recent GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from reference_models.train import TrainConfig, build_datasets, build_run, train, train_step

CREMAD_SHAPE: dict[str, Any] = {
    "sample_rate": 22050,
    "duration": 3.0,
    "n_fft": 512,
    "hop_length": 353,
    "num_frames": 3,
    "image_size": 224,
}
QUICK_SHAPE: dict[str, Any] = {
    "sample_rate": 4000,
    "duration": 0.25,
    "n_fft": 64,
    "hop_length": 32,
    "num_frames": 2,
    "image_size": 32,
}
"""A small shape whose maps stay at least 2 pixels wide before every strided 1x1 convolution
(33x32 spectrograms, 32x32 frames): oneDNN's CPU bf16 kernel misreads 1-pixel-wide inputs."""


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    config: TrainConfig, steps: int, datasets: Any = None, warmup: int = 3
) -> dict[str, float]:
    """Milliseconds per training step (mean over ``steps`` after ``warmup``), and samples/s."""
    session = build_run(config, datasets)
    state = session.state
    batches = []
    for batch in session.train_loader:
        batches.append(tuple(x.to(state.device) for x in batch))
        if len(batches) == 4:
            break
    for index in range(warmup):
        train_step(state, *batches[index % len(batches)])
    _synchronise(state.device)
    start = time.perf_counter()
    for index in range(steps):
        train_step(state, *batches[index % len(batches)])
    _synchronise(state.device)
    seconds = (time.perf_counter() - start) / steps
    session.close()
    return {"ms_per_step": 1000 * seconds, "samples_per_s": config.batch_size / seconds}


SYNC_METHODS = ("joint", "multiloss", "mlb", "ogm", "ogm_ge", "agm", "pmr", "mslr", "video_only")


def check_no_sync(device: str) -> dict[str, str]:
    """Run training steps of every method under ``torch.cuda.set_sync_debug_mode("error")``.

    Returns ``{method: "ok" or the error}``: a step that synchronises with the host raises.
    """
    outcome = {}
    base = {
        "dataset": "synthetic",
        "width": 4,
        "batch_size": 16,
        "device": device,
        "data_options": {**QUICK_SHAPE, "train_size": 64, "val_size": 16, "test_size": 16},
        "seed": 0,
        "plots": False,
    }
    datasets = build_datasets(TrainConfig.from_dict(base))
    for method in SYNC_METHODS:
        with tempfile.TemporaryDirectory() as tmp:
            config = TrainConfig.from_dict({**base, "method": method, "out": tmp})
            session = build_run(config, datasets)
            batches = [tuple(x.to(config.device) for x in b) for b in session.train_loader]
            train_step(session.state, *batches[0])  # first-step checks
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for batch in batches[1:]:
                    train_step(session.state, *batch)
                outcome[method] = "ok"
            except RuntimeError as error:
                outcome[method] = f"synchronises: {str(error).splitlines()[0]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
                session.close()
    return outcome


def run(
    device: str,
    *,
    quick: bool = False,
    amp: bool = False,
    steps: int = 20,
    check_sync: bool = False,
) -> dict[str, Any]:
    """The smoke test; returns the timings it prints."""
    shape = QUICK_SHAPE if quick else CREMAD_SHAPE
    sizes = {
        "train_size": 32 if quick else 320,
        "val_size": 16 if quick else 64,
        "test_size": 16 if quick else 64,
    }
    base = {
        "dataset": "synthetic",
        "width": 2 if quick else 64,
        "batch_size": 8 if quick else 32,
        "eval_batch_size": 16 if quick else 64,
        "device": device,
        "amp": amp,
        "max_epochs": 1,
        "patience": 0,
        "log_every": 5,
        "progress": not quick,
        "plots": False,
        "data_options": {**shape, **sizes},
        "seed": 0,
    }
    report: dict[str, Any] = {"device": device, "amp": amp, "shape": shape}
    if device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(torch.device(device))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        target = str(Path(tmp) / "mlb")
        results = train(
            TrainConfig.from_dict({**base, "method": "mlb", "out": target}), verbose=False
        )
    report["epoch_run_s"] = time.perf_counter() - start
    report["epoch_test_accuracy"] = results["test"]["fused"]["accuracy"]
    datasets = build_datasets(TrainConfig.from_dict(base))
    precisions = (False, True) if device.startswith("cuda") else (amp,)
    for bf16 in precisions:
        for method in ("joint", "mlb"):
            with tempfile.TemporaryDirectory() as tmp:
                config = TrainConfig.from_dict({**base, "method": method, "out": tmp, "amp": bf16})
                key = f"{method}_{'bf16' if bf16 else 'fp32'}"
                report[key] = time_steps(config, 3 if quick else steps, datasets)
    if check_sync and device.startswith("cuda"):
        report["sync_check"] = check_no_sync(device)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_smoke",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU check)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument(
        "--check-sync",
        action="store_true",
        help="also run every method's training step under CUDA sync-debug mode 'error'",
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "error: CUDA is not available (use --device cpu --quick to check the script)",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    report = run(
        args.device, quick=args.quick, amp=args.amp, steps=args.steps, check_sync=args.check_sync
    )
    report["total_s"] = time.perf_counter() - started
    print(f"device {report.get('gpu', report['device'])}, bf16 autocast {report['amp']}")
    print(
        f"one epoch of MLB through the harness (generate, train, validate, test): "
        f"{report['epoch_run_s']:.1f} s"
    )
    for key, timing in report.items():
        if key.startswith(("joint_", "mlb_")) and isinstance(timing, dict):
            print(
                f"{key:>10} step: {timing['ms_per_step']:.1f} ms "
                f"({timing['samples_per_s']:.0f} samples/s)"
            )
    for precision in ("fp32", "bf16"):
        if f"mlb_{precision}" in report:
            overhead = (
                report[f"mlb_{precision}"]["ms_per_step"]
                / report[f"joint_{precision}"]["ms_per_step"]
                - 1.0
            )
            print(f"MLB overhead over Joint ({precision}): {100 * overhead:+.1f} %")
    for method, outcome in report.get("sync_check", {}).items():
        print(f"host syncs in the {method} training step: {outcome}")
    print(f"total {report['total_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
