"""Write ``benchmarks/results/SUMMARY.md`` from the JSON files the benchmarks wrote."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def ratio(r: dict) -> str:
    return f"{r['median']:.3f} ({r['low']:.3f}-{r['high']:.3f})"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def step_section() -> list[str]:
    lines = [
        "## Training-step time (interleaved, median ratio with min-max over rounds)",
        "",
        "| model | MLB / MultiLoss | MLB / Joint | MultiLoss / Joint | rounds |",
        "|---|---|---|---|---|",
    ]
    for model in ("reference", "two_cnn"):
        data = load(f"step_overhead_{model}")
        if data:
            r = data["ratios"]
            lines.append(
                f"| {model} | {ratio(r['MLB / MultiLoss'])} | {ratio(r['MLB / Joint'])} | "
                f"{ratio(r['MultiLoss / Joint'])} | {data['rounds']} |"
            )
    return lines


def cost_section() -> list[str]:
    lines = [
        "",
        "## Balancing work alone: official approach / gradbalance",
        "",
        "| model | gradbalance (us) | official (us) | official / gradbalance |",
        "|---|---|---|---|",
    ]
    for model in ("reference", "two_cnn"):
        data = load(f"balancing_cost_{model}")
        if data:
            s = data["median_seconds"]
            lines.append(
                f"| {model} | {1e6 * s['gradbalance']:.0f} | {1e6 * s['official']:.0f} | "
                f"{ratio(data['official_over_gradbalance'])} |"
            )
    lines += [
        "",
        "## Balancing work per modality as M grows (microseconds per modality)",
        "",
        "| M | gradbalance | official |",
        "|---|---|---|",
    ]
    for m in (2, 3, 4, 8):
        data = load(f"balancing_cost_m{m}")
        if data:
            us = data["us_per_modality"]
            lines.append(f"| {m} | {us['gradbalance']:.0f} | {us['official']:.0f} |")
    return lines


def memory_section() -> list[str]:
    lines = [
        "",
        "## Peak resident memory of three training steps (fresh process each, MiB)",
        "",
        "| model | no balancer | MultiLoss | MLB | MLB / no balancer |",
        "|---|---|---|---|---|",
    ]
    for model in ("reference", "two_cnn"):
        data = load(f"memory_{model}")
        if data:
            peak = {k: v["peak_rss"] / 2**20 for k, v in data.items()}
            lines.append(
                f"| {model} | {peak['none']:.0f} | {peak['MultiLoss']:.0f} | "
                f"{peak['MLB']:.0f} | {peak['MLB'] / peak['none']:.3f} |"
            )
    return lines


def main() -> None:
    header = [
        f"# Benchmark summary ({platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__})",
        "",
    ]
    text = "\n".join(header + step_section() + cost_section() + memory_section()) + "\n"
    (RESULTS / "SUMMARY.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
