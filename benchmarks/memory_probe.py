"""Peak memory of training steps with one method, measured in a fresh process.

``python -m benchmarks.memory_probe --model two_cnn --method MLB`` prints one JSON line:
the process's peak resident set size (CPU) after model construction and after three training
steps, and on CUDA the maximum allocated bytes of the steps. ``--method none`` trains with a
plain fused cross-entropy and no balancer.
"""

from __future__ import annotations

import argparse
import json
import resource

import torch
import torch.nn.functional as F

from benchmarks.steps import METHODS, MODELS, make_step


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=list(MODELS), default="two_cnn")
    parser.add_argument("--method", choices=["none", *METHODS], default="MLB")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    model, inputs, target = MODELS[args.model](device=args.device)
    if args.method == "none":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step() -> None:
            loss = F.cross_entropy(model(*inputs), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        step = make_step(args.method, model, inputs, target)
    before = peak_rss_bytes()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        step()
    record = {
        "model": args.model,
        "method": args.method,
        "device": args.device,
        "peak_rss_before_steps": before,
        "peak_rss": peak_rss_bytes(),
    }
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        record["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    print(json.dumps(record))


if __name__ == "__main__":
    main()
