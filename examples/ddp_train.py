"""MLB with DistributedDataParallel: one process per device, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py            # 2 CPU processes
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --accumulate 2 --compile

The order that matters: the balancer on the plain model, then the optimizer (with the
balancer's heads), then ``DDP``, then ``torch.compile``. The coefficients scale each
encoder's gradient inside ``backward()``, before DDP averages the gradients, so the replicas
stay bitwise identical; with ``--sync global`` (the default) every rank also uses the same
coefficients, those of the whole global batch. Gradient accumulation uses ``no_sync()`` as
usual: each micro-batch is scaled by its own coefficients, once. At the end the script checks
that every rank holds the same parameters and (rank 0) saves a checkpoint.

Uses the gloo backend on the CPU and NCCL when every rank has a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from toy_audio_visual import NUM_CLASSES, AudioVisualNet, make_tensors

import gradbalance as gb


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank and micro-batch")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--sync", choices=("global", "local"), default="global")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DDP model")
    parser.add_argument("--checkpoint", default=None, help="where rank 0 saves the checkpoint")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("LOCAL_WORLD_SIZE", "1")
    )
    dist.init_process_group("nccl" if use_cuda else "gloo")
    identical = train(args, use_cuda)
    # The model, DDP wrapper and balancer of train() are freed by now, before the process
    # group goes: no rank tears its connections down while another still uses them.
    dist.barrier()
    dist.destroy_process_group()
    if not identical:
        raise SystemExit("the replicas diverged")


def train(args: argparse.Namespace, use_cuda: bool) -> bool:
    """Train on this rank; returns whether the replicas ended bitwise identical."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    )
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    torch.manual_seed(0)

    # 1. the balancer on the plain model, 2. the optimizer, 3. DDP, 4. torch.compile.
    model = AudioVisualNet().to(device)
    bal = gb.MLB(
        model,
        encoders={"audio": model.audio, "video": model.video},
        num_classes=NUM_CLASSES,
        alpha=2.0,
        beta_max=3.0,
        feature_dims=[32, 32],
        sync=args.sync,
    )
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=3e-3)
    ddp = DDP(model, device_ids=[device.index] if use_cuda else None)
    run = torch.compile(ddp, backend="aot_eager") if args.compile else ddp

    data = TensorDataset(*make_tensors(args.samples, seed=1))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros((), device=device)
        for index, (audio, video, y) in enumerate(loader):
            audio, video, y = audio.to(device), video.to(device), y.to(device)
            last_micro_batch = (index + 1) % args.accumulate == 0
            with nullcontext() if last_micro_batch else ddp.no_sync():
                loss = bal.loss(run(audio, video), y)
                (loss / args.accumulate).backward()
            total += loss.detach()
            if last_micro_batch:
                bal.after_backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        dist.all_reduce(total)
        if rank == 0:
            k = {name: round(float(v), 3) for name, v in bal.coefficients.items()}
            print(f"epoch {epoch}: mean loss {float(total) / world / len(loader):.4f}, k {k}")

    flat = torch.cat([p.detach().reshape(-1) for p in (*model.parameters(), *bal.parameters())])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(gathered[0], other) for other in gathered[1:])
    if rank == 0:
        print(f"replicas identical: {identical}")
        if args.checkpoint:
            torch.save(
                {
                    "model": model.state_dict(),
                    "balancer": bal.state_dict(),
                    "optimizer": opt.state_dict(),
                },
                args.checkpoint,
            )
            print(f"saved {args.checkpoint}")
    return identical


if __name__ == "__main__":
    main()
    # Everything is done and the process group destroyed. Gloo's worker threads can still
    # abort a process while the interpreter finalises ("terminate called without an active
    # exception", an upstream PyTorch/Gloo teardown issue), so leave without finalisation.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
