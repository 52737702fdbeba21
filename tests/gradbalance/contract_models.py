"""Models and probes for the contract suite (an importable module: pickled models refer to it).

:class:`TowerNet` has the towers of ``conftest.MultiTowerNet`` (so every entry of
``balancer_factories.FACTORIES`` builds on it) plus the switches a user's model may have:
skipping a tower, changing a tower's output in place, a custom autograd op after a tower
whose gradient is NaN.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PoisonGradient(torch.autograd.Function):
    """Identity in the forward pass; the backward returns a NaN gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


class TowerNet(nn.Module):
    """M MLP towers and a linear fusion of their concatenated outputs.

    Switches (plain attributes, off by default): ``skip`` (index of a tower replaced by zeros,
    so that encoder does not run), ``inplace_relu`` (``F.relu(z, inplace=True)`` on every
    tower output after the tower), ``poison`` (index of a tower whose output goes through
    :class:`PoisonGradient`), ``repeat`` (index of a tower called twice in one forward).
    """

    def __init__(self, input_dims: tuple[int, ...] = (5, 7), hidden: int = 12, num_classes=4):
        super().__init__()
        self.hidden = hidden
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
            for d in input_dims
        )
        self.fusion = nn.Linear(hidden * len(input_dims), num_classes)
        self.skip: int | None = None
        self.inplace_relu = False
        self.poison: int | None = None
        self.repeat: int | None = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        features = []
        for index, (tower, x) in enumerate(zip(self.towers, inputs)):
            if index == self.skip:
                features.append(x.new_zeros(x.shape[0], self.hidden))
                continue
            z = tower(x)
            if index == self.repeat:
                z = z + tower(x)
            if self.inplace_relu:
                z = F.relu(z, inplace=True)
            if index == self.poison:
                z = PoisonGradient.apply(z)
            features.append(z)
        return self.fusion(torch.cat(features, dim=-1))


class ConvTowerNet(nn.Module):
    """Two small convolutional towers (4-D kernels, for OGM's ``parameters="conv"``)."""

    def __init__(self, channels: int = 4, num_classes: int = 4):
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(1, channels, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            )
            for _ in range(2)
        )
        self.fusion = nn.Linear(2 * channels, num_classes)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fusion(torch.cat([t(x) for t, x in zip(self.towers, inputs)], dim=-1))


def conv_batch(batch: int = 6, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, 1, 6, 6, generator=g) for _ in range(2)]
    return inputs, torch.randint(0, 4, (batch,), generator=g)


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def footprint(model: nn.Module) -> dict[str, Any]:
    """Everything a balancer could leave on a model: per module its attribute names and hooks,
    per parameter its gradient hooks, and the DDP marker."""
    modules = {
        name: {
            "vars": sorted(vars(module)),
            "hooks": {key: list(getattr(module, key, {})) for key in HOOK_DICTS},
        }
        for name, module in model.named_modules()
    }
    parameters = {
        name: sorted(vars(p)) + [str(bool(p._backward_hooks)), str(p._post_accumulate_grad_hooks)]
        for name, p in model.named_parameters()
    }
    return {
        "modules": modules,
        "parameters": parameters,
        "ddp_marker": hasattr(model, "_ddp_params_and_buffers_to_ignore"),
    }


def plain_copy(model: nn.Module) -> nn.Module:
    """A fresh default instance of the model's class holding the model's weights."""
    fresh = type(model)()
    fresh.load_state_dict(model.state_dict())
    return fresh


def cross_entropy_gradients(model: nn.Module, inputs, target) -> list[torch.Tensor]:
    """The plain ``CE(model(inputs), target)`` gradient of every parameter (model left clean)."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(*inputs), target).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads
