"""Frozen encoder features over a loader and linear classifiers fitted on them (the machinery
of :mod:`gradbalance.diagnostics`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from gradbalance._attach import module_device, owner_of
from gradbalance._capture import FeatureFn, extract_feature
from gradbalance._checks import module_names
from gradbalance.errors import ConfigurationError, InputError

Solver = Literal["logistic", "ridge"]
Encoders = Sequence[nn.Module | str] | Mapping[str, nn.Module]
Forward = Callable[[nn.Module, Any], Any]
Labels = Callable[[Any], torch.Tensor]


def default_forward(model: nn.Module, batch: Any) -> Any:
    return model(*batch[:-1])


def default_labels(batch: Any) -> torch.Tensor:
    return batch[-1]


def resolve_encoders(model: nn.Module, encoders: Encoders) -> dict[str, nn.Module]:
    """``name -> module``: a dict as given; a list of submodules or their qualified names named
    as a balancer names its encoders (:func:`module_names`)."""
    if isinstance(encoders, Mapping):
        return dict(encoders)
    names = module_names(model)
    resolved: dict[str, nn.Module] = {}
    for encoder in encoders:
        module = model.get_submodule(encoder) if isinstance(encoder, str) else encoder
        if isinstance(module, nn.Module) and id(module) in names:
            resolved[names[id(module)]] = module
        else:
            raise ConfigurationError(
                "encoders must be submodules of the model (or their qualified names), got "
                f"{type(encoder).__name__}"
            )
    if len(resolved) < 1:
        raise ConfigurationError("encoders is empty")
    return resolved


def to_device(batch: Any, device: torch.device) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), batch)


class Taps:
    """Forward hooks that keep each encoder's ``(B, D)`` feature of the latest forward."""

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        pool: str | Mapping[str, str] | None,
        features: FeatureFn | Mapping[str, FeatureFn] | None,
    ) -> None:
        self.latest: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, module in encoders.items():
            pooling = pool.get(name) if isinstance(pool, Mapping) else pool
            function = features.get(name) if isinstance(features, Mapping) else features
            self.handles.append(module.register_forward_hook(self._hook(name, pooling, function)))

    def _hook(self, name: str, pool: str | None, function: FeatureFn | None) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.latest[name] = extract_feature(name, output, pool, function)

        return hook

    def take(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The latest forward's features, in the order of ``names`` (not the calls' order)."""
        names = list(names)
        missing = [name for name in names if name not in self.latest]
        if missing:
            raise InputError(f"the forward did not run the encoder(s) {missing}")
        taken, self.latest = self.latest, {}
        return {name: taken[name] for name in names}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def encoder_features(
    model: nn.Module,
    encoders: Encoders,
    loader: Iterable[Any],
    *,
    forward: Forward | None = None,
    labels: Labels | None = None,
    pool: str | Mapping[str, str] | None = None,
    features: FeatureFn | Mapping[str, FeatureFn] | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Frozen features of each encoder over a loader, and the labels.

    The model runs in eval mode under ``torch.no_grad()`` (each submodule's mode is restored
    after). A balancer attached to these encoders is paused meanwhile (these forwards are
    neither captured nor counted as evaluation passes).

    Args:
        model: the multimodal model.
        encoders: the encoders, as submodules or qualified names (list), or ``name -> module``.
        loader: any iterable of batches.
        forward: ``forward(model, batch)`` runs the model on a batch (default:
            ``model(*batch[:-1])``).
        labels: ``labels(batch)`` gives the ``(B,)`` class labels (default: ``batch[-1]``).
        pool, features: how an encoder output becomes a ``(B, D)`` feature, as the balancers'
            options of the same names (once or per encoder name).
        device: where the batches go (default: the model's device).
        max_batches: read at most this many batches.

    Returns:
        ``({name: (N, D_m) float32 CPU tensor}, (N,) int64 CPU labels)``.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> batches = [(torch.randn(4, 8), torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))]
        >>> feats, y = gb.diagnostics.encoder_features(model, ["audio", "video"], batches)
        >>> feats["audio"].shape, y.tolist()
        (torch.Size([4, 16]), [0, 1, 2, 0])
    """
    modules = resolve_encoders(model, encoders)
    run = forward or default_forward
    read_labels = labels or default_labels
    target_device = torch.device(device) if device is not None else module_device(model)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    label_chunks: list[torch.Tensor] = []
    modes = [(module, module.training) for module in model.modules()]
    taps = Taps(modules, pool, features)
    try:
        with ExitStack() as stack:
            owners = {id(o): o for o in map(owner_of, modules.values()) if o is not None}
            for owner in owners.values():
                stack.enter_context(owner.paused())
            model.eval()
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                batch = to_device(batch, target_device)
                run(model, batch)
                taken = taps.take(modules)
                for name in modules:
                    chunks[name].append(taken[name].detach().float().cpu())
                label_chunks.append(torch.as_tensor(read_labels(batch)).long().cpu())
    finally:
        taps.remove()
        for module, training in modes:
            module.training = training
    if not label_chunks:
        raise InputError("the loader gave no batch")
    return {name: torch.cat(c) for name, c in chunks.items()}, torch.cat(label_chunks)


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    solver: Solver = "logistic",
    weight_decay: float = 1e-4,
    max_iter: int = 100,
) -> nn.Linear:
    """Fit a linear classifier on frozen ``(N, D)`` features; returns an ``nn.Linear(D, K)``.

    The features are standardised with their mean and standard deviation over these N rows
    (a deviation below 1e-6 counts as 1), the classifier is fitted on the standardised
    features, and the standardisation is folded into the returned layer (it takes raw
    features). In float64:

    * ``"logistic"``: multinomial logistic regression, minimising the mean cross-entropy plus
      ``weight_decay / 2 * ||W||^2`` (the bias is not penalised) by full-batch L-BFGS with a
      strong-Wolfe line search (deterministic);
    * ``"ridge"``: least squares on one-hot targets with a ridge penalty
      ``weight_decay * ||W||^2``, in closed form ``(X^T X + λ I') w = X^T Y`` with ``X`` the
      standardised features plus a column of ones and ``I'`` the identity without the bias.

    Args:
        features: ``(N, D)`` features.
        labels: ``(N,)`` class labels in ``[0, num_classes)``.
        num_classes: number of classes K.
        solver: ``"logistic"`` or ``"ridge"``.
        weight_decay: the L2 penalty (>= 0).
        max_iter: L-BFGS iterations (``"logistic"``).

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [4.0], [5.0]])
        >>> probe = fit_linear_probe(x, torch.tensor([0, 0, 1, 1]), 2)
        >>> probe(torch.tensor([[0.5], [4.5]])).argmax(1).tolist()
        [0, 1]
    """
    if features.dim() != 2 or labels.shape != (features.shape[0],) or features.shape[0] < 1:
        raise InputError(
            f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not weight_decay >= 0:
        raise ConfigurationError(f"weight_decay must be >= 0, got {weight_decay!r}")
    x = features.detach().double().cpu()
    y = labels.detach().long().cpu()
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise InputError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    z = (x - mean) / std
    if solver == "ridge":
        weight, bias = _ridge(z, y, num_classes, weight_decay)
    elif solver == "logistic":
        weight, bias = _logistic(z, y, num_classes, weight_decay, max_iter)
    else:
        raise ConfigurationError(f"solver must be 'logistic' or 'ridge', got {solver!r}")
    layer = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        folded = weight / std
        layer.weight.copy_(folded.float())
        layer.bias.copy_((bias - folded @ mean).float())
    return layer


def _ridge(
    z: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    augmented = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)
    penalty = torch.eye(augmented.shape[1], dtype=z.dtype) * weight_decay
    penalty[-1, -1] = 0.0
    targets = F.one_hot(y, num_classes).to(z.dtype)
    gram = augmented.T @ augmented + penalty
    solution = torch.linalg.lstsq(gram, augmented.T @ targets).solution  # (D + 1, K)
    return solution[:-1].T.contiguous(), solution[-1].clone()


def _logistic(
    z: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=z.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + weight_decay / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()
