"""Training steps of each method on the benchmark models, built the same way for every method."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import gradbalance as gb
from benchmarks.models import TwoCNN, two_cnn_batch

METHODS: dict[str, Callable[..., gb.Balancer]] = {
    "Joint": gb.Joint,
    "MultiLoss": gb.MultiLoss,
    "MLB": gb.MLB,
}
"""The methods of the step-overhead comparison; :func:`make_step` takes any ``gb.METHODS`` name."""


def method_options(name: str, model: nn.Module) -> dict:
    """What a method needs beyond the encoders: the fused head (OGM, MSLR) or the fusion (AGM)."""
    key = gb.registry.canonical_name(name)
    if key in ("ogm", "ogm_ge", "mslr"):
        return {"fusion_head": model.fusion}
    if key == "agm":
        if isinstance(model.fusion, nn.Linear):
            return {"fusion": lambda *features: model.fusion(torch.cat(features, dim=1))}
        return {"fusion": model.fusion}
    return {}


def reference_model_and_batch(batch: int = 4, device: str = "cpu", seed: int = 0):
    """The CREMA-D ResNet-18 Late-Linear model at the paper's shapes (257x188, 3x224x224)."""
    from reference_models.models import build_model

    torch.manual_seed(seed)
    model = build_model("cremad", "resnet18", "linear").to(device)
    g = torch.Generator().manual_seed(seed)
    inputs = (
        torch.randn(batch, 257, 188, generator=g),
        torch.randn(batch, 3, 3, 224, 224, generator=g),
    )
    target = torch.randint(0, 6, (batch,), generator=g)
    return model, tuple(x.to(device) for x in inputs), target.to(device)


def two_cnn_model_and_batch(batch: int = 16, device: str = "cpu", seed: int = 0):
    """The mid-size two-CNN model (64x64 inputs)."""
    torch.manual_seed(seed)
    audio, video, target = two_cnn_batch(batch=batch, seed=seed)
    return TwoCNN().to(device), (audio.to(device), video.to(device)), target.to(device)


MODELS = {"reference": reference_model_and_batch, "two_cnn": two_cnn_model_and_batch}


def presence_mask(batch: int, device: torch.device | str, seed: int = 0) -> torch.Tensor:
    """A ``(batch, 2)`` mask of ``loss(..., present=)``: audio always present, video absent in
    about 30% of the samples."""
    g = torch.Generator().manual_seed(seed)
    present = torch.ones(batch, 2, dtype=torch.bool)
    present[:, 1] = torch.rand(batch, generator=g) >= 0.3
    return present.to(device)


def make_step(
    method: str, model: nn.Module, inputs, target, present: torch.Tensor | None = None
) -> Callable[[], None]:
    """One full training step (forward, loss, backward, after_backward, Adam step), with the
    presence mask ``present`` when given."""
    build = METHODS.get(method) or (lambda *a, **k: gb.make(method, *a, **k))
    bal = build(model, [model.audio, model.video], num_classes=6, **method_options(method, model))
    bal.loss(model(*inputs), target, present)  # materialise lazy heads before the optimizer
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=1e-3)

    def step() -> None:
        loss = bal.loss(model(*inputs), target, present)
        opt.zero_grad()
        loss.backward()
        bal.after_backward()
        opt.step()

    return step


def method_steps(
    model_name: str,
    methods=tuple(METHODS),
    device: str = "cpu",
    masked: bool = False,
    **batch_options,
):
    """A step per method, each on its own copy of the same initial model and batch (with
    ``masked``, every step passes the same :func:`presence_mask`)."""
    steps = {}
    for method in methods:
        model, inputs, target = MODELS[model_name](device=device, **batch_options)
        present = presence_mask(len(target), target.device) if masked else None
        steps[method] = make_step(method, model, inputs, target, present)
    return steps
