"""Measure every modality the same way, whatever the method: post-hoc linear probes.

Online per-modality readings differ between methods (MLB's trained heads, detached probes
trained alongside a moving encoder, fused-head slices) and read a few points below what a
linear classifier fitted afterwards on the frozen encoder reaches. The fair per-modality
measure is that afterwards fit: freeze the model, extract each encoder's ``(N, D)`` features
on a training loader, fit a linear classifier per modality, and report its accuracy on an
evaluation loader (:func:`linear_probe`). :func:`imbalance_report` uses it to say whether
joint training starves a modality: each encoder's probe accuracy after joint training
against the same encoder trained alone (its own linear head, no fusion).

Only torch is imported; the plot of :meth:`ImbalanceReport.plot` needs matplotlib
(``pip install 'gradbalance[plot]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance._attach import module_device
from gradbalance._capture import FeatureFn
from gradbalance._plotting import pyplot, save_figure
from gradbalance._probe import (
    Encoders,
    Forward,
    Labels,
    Solver,
    Taps,
    default_forward,
    default_labels,
    encoder_features,
    fit_linear_probe,
    resolve_encoders,
    to_device,
)

__all__ = [
    "ImbalanceReport",
    "encoder_features",
    "fit_linear_probe",
    "imbalance_report",
    "linear_probe",
]


def _accuracy(layer: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer(features.float()).argmax(1) == labels).double().mean())


def linear_probe(
    model: nn.Module,
    encoders: Encoders,
    train_loader: Iterable[Any],
    eval_loader: Iterable[Any],
    num_classes: int,
    *,
    solver: Solver = "logistic",
    weight_decay: float = 1e-4,
    max_iter: int = 100,
    forward: Forward | None = None,
    labels: Labels | None = None,
    pool: str | Mapping[str, str] | None = None,
    features: FeatureFn | Mapping[str, FeatureFn] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Each encoder's post-hoc linear-probe accuracy: the same measure for every method.

    Fits :func:`fit_linear_probe` on the frozen features of ``train_loader``
    (:func:`encoder_features`) and returns its accuracy on those of ``eval_loader``, per
    modality. Arguments as :func:`encoder_features` and :func:`fit_linear_probe`; the fits of
    all modalities share ``solver``, ``weight_decay`` and ``max_iter``.

    Example:
        >>> import torch, gradbalance as gb
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> y = torch.arange(60) % 3
        >>> audio = torch.randn(60, 8) + 2 * torch.nn.functional.one_hot(y, 8)  # informative
        >>> video = torch.randn(60, 6)                                           # noise
        >>> loader = DataLoader(TensorDataset(audio, video, y), batch_size=20)
        >>> model = gb.testing.TwoTowerNet()
        >>> accuracy = gb.diagnostics.linear_probe(model, ["audio", "video"], loader, loader, 3,
        ...                                        solver="ridge")
        >>> accuracy["audio"] > accuracy["video"]
        True
    """
    options: dict[str, Any] = {
        "forward": forward,
        "labels": labels,
        "pool": pool,
        "features": features,
        "device": device,
    }
    train, train_y = encoder_features(model, encoders, train_loader, **options)
    evaluation, eval_y = encoder_features(model, encoders, eval_loader, **options)
    result = {}
    for name in train:
        layer = fit_linear_probe(
            train[name],
            train_y,
            num_classes,
            solver=solver,
            weight_decay=weight_decay,
            max_iter=max_iter,
        )
        result[name] = _accuracy(layer, evaluation[name], eval_y)
    return result


@dataclass
class ImbalanceReport:
    """Each encoder's linear-probe accuracy after joint training and after training alone.

    Attributes:
        joint: ``{name: accuracy}`` of the encoders of the jointly trained model.
        alone: ``{name: accuracy}`` of each encoder trained alone (its own linear head).
        fused_accuracy: the jointly trained model's fused accuracy on the evaluation loader.
        tolerance: a modality is starved when ``alone - joint`` exceeds it.

    Example:
        >>> report = ImbalanceReport({"a": 0.9, "v": 0.4}, {"a": 0.9, "v": 0.7}, 0.9, 0.05)
        >>> report.starved, round(report.gap["v"], 2)
        (['v'], 0.3)
    """

    joint: dict[str, float]
    alone: dict[str, float]
    fused_accuracy: float
    tolerance: float = 0.05

    @property
    def gap(self) -> dict[str, float]:
        """``{name: alone - joint}``: what joint training costs each encoder."""
        return {name: self.alone[name] - self.joint[name] for name in self.joint}

    @property
    def starved(self) -> list[str]:
        """The modalities whose encoder learns less under joint training than alone."""
        return [name for name, gap in self.gap.items() if gap > self.tolerance]

    def summary(self) -> str:
        """A small text table: per modality, joint, alone and the gap; then the verdict."""
        lines = [f"{'modality':<12}{'joint':>8}{'alone':>8}{'gap':>8}"]
        for name, gap in self.gap.items():
            lines.append(f"{name:<12}{self.joint[name]:>8.3f}{self.alone[name]:>8.3f}{gap:>+8.3f}")
        lines.append(f"fused accuracy (joint): {self.fused_accuracy:.3f}")
        starved = ", ".join(self.starved) or "none"
        lines.append(f"starved (gap > {self.tolerance:g}): {starved}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Bar chart of the joint and alone accuracies per modality, to a PNG (needs
        matplotlib: ``pip install 'gradbalance[plot]'``); returns the path."""
        plt = pyplot("ImbalanceReport.plot")
        names = list(self.joint)
        positions = range(len(names))
        fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 3.5))
        ax.bar([p - 0.2 for p in positions], [self.joint[n] for n in names], 0.4, label="joint")
        ax.bar([p + 0.2 for p in positions], [self.alone[n] for n in names], 0.4, label="alone")
        ax.set_xticks(list(positions), names)
        ax.set_ylabel("linear-probe accuracy")
        ax.set_ylim(0, 1)
        ax.legend()
        return save_figure(plt, fig, path)


def _fused_accuracy(
    model: nn.Module, loader: Iterable[Any], forward: Forward, labels: Labels, device: torch.device
) -> float:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for batch in loader:
                batch = to_device(batch, device)
                target = torch.as_tensor(labels(batch)).long()
                correct += int((forward(model, batch).argmax(1) == target).sum())
                total += target.shape[0]
    finally:
        for module, training in modes:
            module.training = training
    return correct / max(total, 1)


def imbalance_report(
    model_fn: Callable[[], nn.Module],
    encoders: Sequence[str],
    train_loader: Iterable[Any],
    eval_loader: Iterable[Any],
    num_classes: int,
    *,
    epochs: int = 2,
    lr: float = 1e-3,
    tolerance: float = 0.05,
    forward: Forward | None = None,
    labels: Labels | None = None,
    pool: str | Mapping[str, str] | None = None,
    features: FeatureFn | Mapping[str, FeatureFn] | None = None,
    solver: Solver = "logistic",
    weight_decay: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> ImbalanceReport:
    """Train briefly jointly and each encoder alone; say which modality joint training starves.

    Two short runs from ``model_fn()`` (same seed, Adam with ``lr``, ``epochs`` passes over
    ``train_loader``): (1) joint, the fused cross-entropy of the model's logits; (2) alone, each
    encoder with its own linear head on its ``(B, D)`` feature and loss
    ``sum_m CE(head_m(z_m), y)`` (the fused logits unused; the encoders share no parameter, so
    this is M independent unimodal trainings in one loop). Each run's encoders are then
    measured by :func:`linear_probe` (fit on ``train_loader``, accuracy on ``eval_loader``).

    Args:
        model_fn: builds a fresh model (called twice).
        encoders: the encoders' qualified names in the model (e.g. ``["audio", "video"]``).
        train_loader, eval_loader: iterables of batches (iterated several times).
        num_classes: number of classes K.
        epochs: training passes per run.
        lr: Adam's learning rate.
        tolerance: the starvation threshold on ``alone - joint``.
        forward, labels, pool, features, device: as :func:`encoder_features`.
        solver, weight_decay, max_iter: as :func:`fit_linear_probe`.
        seed: ``torch.manual_seed`` before building each model.

    Example:
        >>> import torch, gradbalance as gb
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> y = torch.arange(48) % 3
        >>> data = TensorDataset(torch.randn(48, 8) + 2 * torch.nn.functional.one_hot(y, 8),
        ...                      torch.randn(48, 6) + torch.nn.functional.one_hot(y, 6), y)
        >>> loader = DataLoader(data, batch_size=16)
        >>> report = gb.diagnostics.imbalance_report(
        ...     gb.testing.TwoTowerNet, ["audio", "video"], loader, loader, 3, epochs=1,
        ...     solver="ridge")
        >>> sorted(report.joint) == sorted(report.alone) == ["audio", "video"]
        True
        >>> print(report.summary().splitlines()[0])
        modality       joint   alone     gap
    """
    run = forward or default_forward
    read_labels = labels or default_labels
    probe_options: dict[str, Any] = {
        "solver": solver,
        "weight_decay": weight_decay,
        "max_iter": max_iter,
        "forward": forward,
        "labels": labels,
        "pool": pool,
        "features": features,
        "device": device,
    }
    names = list(encoders)

    torch.manual_seed(seed)
    joint_model = model_fn()
    target_device = torch.device(device) if device is not None else module_device(joint_model)
    joint_model.to(target_device)
    optimizer = torch.optim.Adam(joint_model.parameters(), lr=lr)
    joint_model.train()
    for _ in range(epochs):
        for batch in train_loader:
            batch = to_device(batch, target_device)
            loss = F.cross_entropy(run(joint_model, batch), read_labels(batch).long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    joint = linear_probe(
        joint_model, names, train_loader, eval_loader, num_classes, **probe_options
    )
    fused = _fused_accuracy(joint_model, eval_loader, run, read_labels, target_device)

    torch.manual_seed(seed)
    alone_model = model_fn().to(target_device)
    modules = resolve_encoders(alone_model, names)
    first, _ = encoder_features(
        alone_model, modules, train_loader, forward=forward, labels=labels, pool=pool,
        features=features, device=target_device, max_batches=1,
    )  # fmt: skip
    heads = nn.ModuleDict(
        {name: nn.Linear(first[name].shape[1], num_classes) for name in names}
    ).to(target_device)
    optimizer = torch.optim.Adam([*alone_model.parameters(), *heads.parameters()], lr=lr)
    taps = Taps(modules, pool, features)
    alone_model.train()
    try:
        for _ in range(epochs):
            for batch in train_loader:
                batch = to_device(batch, target_device)
                target = read_labels(batch).long()
                run(alone_model, batch)
                taken = taps.take(names)
                losses = [F.cross_entropy(heads[n](taken[n]), target) for n in names]
                optimizer.zero_grad()
                torch.stack(losses).sum().backward()
                optimizer.step()
    finally:
        taps.remove()
    alone = linear_probe(
        alone_model, names, train_loader, eval_loader, num_classes, **probe_options
    )
    return ImbalanceReport(joint, alone, fused, tolerance)
