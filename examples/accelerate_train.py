"""MLB with Hugging Face Accelerate: ``Accelerator.prepare`` wraps the model after the balancer.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py        # 2 GPUs
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --cpu  # 2 CPUs
    python examples/accelerate_train.py --cpu                                           # 1 CPU

(``accelerate launch --cpu --num_processes 2`` starts one process unless run under mpirun:
on CPUs, launch with ``--multi_gpu`` and let the script ask for the CPU.)

The order that matters is the one of plain DDP: the balancer on the plain model (already on
``accelerator.device``), then the optimizer with the model's and the balancer's parameters,
then ``accelerator.prepare(model, optimizer, loader)`` (it wraps the model in DDP and gives
each process its share of every batch). The balancer is not passed to ``prepare``: it keeps
its heads in sync across the processes itself and all-reduces its statistics
(``sync="global"``), so every process uses the coefficients of the whole global batch.
``accelerator.backward(loss)`` is an ordinary backward: the coefficients scale each
encoder's gradient before DDP averages the gradients, and the replicas stay bitwise equal.

With ``--out DIR`` every process saves ``DIR/rank{r}.pt``: its batches, its coefficients at
every step and its final parameters (the test compares the processes and one process).
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from toy_audio_visual import NUM_CLASSES, AudioVisualNet, make_tensors

import gradbalance as gb


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (gloo)")
    parser.add_argument("--out", default=None, help="folder for each process's results")
    return parser.parse_args(argv)


def build(device: torch.device) -> tuple[nn.Module, gb.Balancer, torch.optim.Optimizer]:
    """The model, its balancer and the optimizer, in this order (same values everywhere)."""
    torch.manual_seed(0)
    model = AudioVisualNet().to(device)
    bal = gb.MLB(
        model,
        encoders={"audio": model.audio, "video": model.video},
        num_classes=NUM_CLASSES,
        alpha=2.0,
        beta_max=3.0,
        feature_dims=[32, 32],  # DDP refuses lazy parameters
    )
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1, momentum=0.9)
    return model, bal, opt


def train_step(model, bal, opt, batch, backward=torch.Tensor.backward) -> None:
    """One step of the ordinary loop (``backward``: ``accelerator.backward`` here)."""
    audio, video, y = batch
    opt.zero_grad()
    backward(bal.loss(model(audio, video), y))
    bal.after_backward()  # a no-op for MLB; OGM-GE's noise, AGM's clipping
    opt.step()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(1)
    model, bal, opt = build(accelerator.device)
    samples = args.steps * args.batch_size * accelerator.num_processes
    loader = DataLoader(TensorDataset(*make_tensors(samples, seed=1)), batch_size=args.batch_size)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    batches, coefficients = [], []
    for batch in loader:
        train_step(model, bal, opt, batch, accelerator.backward)
        batches.append([t.cpu() for t in batch])
        coefficients.append(torch.stack(list(bal.coefficients.values())).cpu())
    plain = accelerator.unwrap_model(model)
    parameters = [p.detach().cpu() for m in (plain, bal) for p in m.parameters()]
    k = ", ".join(f"{name}={float(v):.3f}" for name, v in bal.coefficients.items())
    accelerator.print(f"{accelerator.num_processes} processes, {len(batches)} steps, k: {k}")
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        result = {"batches": batches, "coefficients": torch.stack(coefficients)}
        result["parameters"] = torch.cat([p.reshape(-1) for p in parameters])
        torch.save(result, os.path.join(args.out, f"rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
