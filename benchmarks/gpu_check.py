"""One prepared GPU check: step overhead, balancing cost, host syncs and memory, in one table.

Run on a machine with one CUDA GPU (under 5 minutes)::

    python -m benchmarks.gpu_check [--out DIR]

1. Step time of Joint, Multi-Loss and MLB (forward, loss, backward, Adam step), interleaved,
   timed with CUDA events, on the CREMA-D ResNet-18 reference model at the paper's shapes and
   on the mid-size two-CNN model: median ratio (min-max) over rounds.
2. The balancing work alone, gradbalance's vs the official approach's, on the reference model.
3. Host synchronisations: every method's training step (``gb.METHODS``) under
   ``torch.cuda.set_sync_debug_mode("error")`` (after a warm-up step).
4. Peak CUDA memory (``max_memory_allocated``) of the steps with each method.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import gradbalance as gb
from benchmarks.balancing_cost import compare
from benchmarks.interleave import ratios
from benchmarks.steps import METHODS, MODELS, make_step, method_steps

BATCH = {"reference": 32, "two_cnn": 64}


def event_times(steps: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each step, variants interleaved in rotating order, CUDA events."""
    names = list(steps)
    for name in names:
        for _ in range(3):
            steps[name]()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                steps[name]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1000 / calls)
    return times


def step_overhead(model_name: str, rounds: int) -> dict:
    steps = method_steps(model_name, device="cuda", batch=BATCH[model_name])
    times = event_times(steps, rounds=rounds, calls=5)
    table = {
        "MLB / MultiLoss": ratios(times, "MultiLoss")["MLB"],
        "MLB / Joint": ratios(times, "Joint")["MLB"],
        "MultiLoss / Joint": ratios(times, "Joint")["MultiLoss"],
    }
    median_ms = {k: 1000 * sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"median_ms": median_ms, "ratios": {k: vars(v) for k, v in table.items()}}


def balancing_cost(rounds: int) -> dict:
    model, inputs, target = MODELS["reference"](device="cuda", batch=BATCH["reference"])
    times = compare(
        model,
        [model.audio, model.video],
        [["audio."], ["video."]],
        inputs,
        target,
        6,
        rounds,
        sync=torch.cuda.synchronize,
    )
    median_us = {k: 1e6 * sorted(v)[len(v) // 2] for k, v in times.items()}
    return {
        "median_us": median_us,
        "official_over_gradbalance": vars(ratios(times, "gradbalance")["official"]),
    }


def sync_audit() -> dict[str, str]:
    audit = {}
    for method in gb.METHODS:
        model, inputs, target = MODELS["two_cnn"](device="cuda", batch=8)
        step = make_step(method, model, inputs, target)
        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            audit[method] = "sync-free"
        except RuntimeError as error:
            audit[method] = f"SYNC: {str(error).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return audit


def peak_memory() -> dict[str, float]:
    peaks = {}
    for method in METHODS:
        model, inputs, target = MODELS["reference"](device="cuda", batch=BATCH["reference"])
        step = make_step(method, model, inputs, target)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        peaks[method] = torch.cuda.max_memory_allocated() / 2**20
        del model, step
        torch.cuda.empty_cache()
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["step_overhead"] = {name: step_overhead(name, args.rounds) for name in BATCH}
    report["balancing_cost_reference"] = balancing_cost(args.rounds)
    report["sync_audit"] = sync_audit()
    report["peak_memory_mib"] = peak_memory()
    report["wall_s"] = time.perf_counter() - start
    print(f"device: {report['device']}, torch {report['torch']}")
    print("| model | batch | Joint ms | MultiLoss ms | MLB ms | MLB/MultiLoss | MLB/Joint |")
    print("|---|---|---|---|---|---|---|")
    for name, result in report["step_overhead"].items():
        ms, r = result["median_ms"], result["ratios"]
        print(
            f"| {name} | {BATCH[name]} | {ms['Joint']:.2f} | {ms['MultiLoss']:.2f} | "
            f"{ms['MLB']:.2f} | {r['MLB / MultiLoss']['median']:.3f} "
            f"({r['MLB / MultiLoss']['low']:.3f}-{r['MLB / MultiLoss']['high']:.3f}) | "
            f"{r['MLB / Joint']['median']:.3f} |"
        )
    cost = report["balancing_cost_reference"]
    us = cost["median_us"]
    print(
        f"balancing work alone (reference model): gradbalance {us['gradbalance']:.0f} us, "
        f"official {us['official']:.0f} us, "
        f"official/gradbalance {cost['official_over_gradbalance']['median']:.1f}x"
    )
    print("sync audit:", report["sync_audit"])
    print("peak CUDA memory MiB:", {k: round(v) for k, v in report["peak_memory_mib"].items()})
    print(f"wall time {report['wall_s']:.0f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
