"""Training and evaluation with the paper's protocol: ``python -m reference_models.train``.

One run trains one method × fusion × backbone × dataset × fold and writes, under ``--out``:

* ``log.jsonl``: one JSON object per line; ``{"kind": "epoch", ...}`` per epoch (losses,
  accuracies and ECE of the fused prediction and of each modality, mean coefficients and
  scores, learning rate, time) and ``{"kind": "step", ...}`` every ``log_every`` steps
  (coefficients, scores, running loss);
* ``results.json``: the configuration, the best epoch, and the validation and test metrics of
  the best-validation checkpoint (``val``, ``test``: fused and per modality), the test metrics
  of the last epoch (``test_last``), final coefficients, timings;
* ``coefficients.png`` (each modality's coefficient and score per step: the appendix's
  Figure 7) and ``learning_curves.png``;
* ``summary.txt``: the one-screen summary printed at the end;
* ``last.pt`` (every epoch, for ``--resume``) and ``best.pt`` (best validation accuracy).

The protocol (PAPER.md, METHODS.md §5): Adam (β 0.9/0.999, ε 1e-7, L2 weight decay), a
constant warm-up then cosine annealing with warm restarts (T_0 = 4, T_mult = 2; the official
step-indexed behaviour or the appendix's epoch reading, :mod:`reference_models.schedule`),
validation every epoch, early stopping on the fused validation accuracy (strictly better
resets the patience), at most ``max_epochs`` epochs, test metrics of the best-validation
checkpoint. Every method also trains a detached linear probe per modality (stop-gradient:
it never reaches the encoders), so each modality's accuracy is measured the same way
whatever the method; methods with unimodal heads (Multi-Loss, MLB) or fused-head slices
(OGM, MSLR) report those too.

Between two logging steps the training step makes no host synchronisation: losses, accuracy
counts and coefficient sums are accumulated on the device and read every ``log_every`` steps
and at the end of each epoch.

Example (a tiny run on the embedded generated set)::

    python -m reference_models.train --dataset synthetic --method mlb --opt alpha=2.0 \\
        --width 4 --epochs 10 --batch-size 64 --out runs/demo_mlb
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import gradbalance as gb
from gradbalance.metrics import BINNINGS, accuracy, expected_calibration_error
from reference_models.schedule import SCHEDULES, WarmupCosineRestarts

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

__all__ = [
    "CONFIG_DIR",
    "DATASETS",
    "FOLD_SEEDS",
    "METHOD_NAMES",
    "UNIMODAL",
    "TrainConfig",
    "UnimodalClassifier",
    "build_balancer",
    "build_datasets",
    "build_model_for",
    "load_config",
    "main",
    "parse_value",
    "train",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The presets shipped with the package (``--config table3/cremad_resnet18_linear_mlb``)."""

FOLD_SEEDS: tuple[int, ...] = (109, 19, 337)
"""Seed of folds 0, 1, 2 when ``seed`` is not given (the official ``--fold k`` mapping)."""

DATASETS: tuple[str, ...] = ("synthetic", "cremad", "ave", "ucf101")
UNIMODAL: dict[str, str] = {"audio_only": "audio", "video_only": "video"}
"""The unimodal baselines of Table 3: one encoder and a linear classifier."""

METHOD_NAMES: tuple[str, ...] = (*gb.METHODS, "mmcosine", *UNIMODAL)
"""Every ``method`` the harness accepts: the library's balancers, ``mmcosine`` (Joint
training with :class:`gradbalance.MMCosineHead` as the fusion) and the unimodal baselines."""

MODALITIES: tuple[str, ...] = ("audio", "video")

# Keys of a resumed run's configuration that may differ from the checkpoint's.
_RESUMABLE_CHANGES = frozenset(
    {
        "max_epochs",
        "patience",
        "device",
        "workers",
        "progress",
        "out",
        "resume",
        "threads",
        "stop_after",
        "log_every",
        "checkpoint_every",
        "description",
        "eval_batch_size",
        "plots",
    }
)


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that defines a run; a TOML preset sets any of these fields.

    Attributes:
        dataset: ``synthetic`` (embedded, generated), ``cremad``, ``ave`` or ``ucf101``.
        root: prepared dataset folder (``python -m reference_models.data.prepare``); not
            needed for ``synthetic``.
        backbone: ``resnet18`` or ``conformer``.
        fusion: ``linear`` (Late-Linear), ``mlp``, ``film``, ``gated`` or ``tf``.
        width: ResNet-18 base width (64 = the paper's encoders; 4 or 8 for CPU demos).
        method: one of :data:`METHOD_NAMES`.
        method_options: keyword options of the method (``alpha``, ``beta_max``, ...; for
            ``mmcosine``: ``scale``). Passed to ``gb.make``.
        data_options: keyword options of the dataset (for ``synthetic``: ``train_size``,
            ``val_size``, ``test_size``, ``seed`` and the generator's knobs).
        fusion_options: keyword options of the fusion head.
        fold: 0, 1 or 2 (CREMA-D and UCF101 folds 1–3; for every dataset the default seed).
        seed: training seed; ``None``: :data:`FOLD_SEEDS` ``[fold]``.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        max_epochs: at most this many epochs (1,500 in the paper).
        patience: stop after this many epochs without a better validation accuracy (300).
        batch_size: training batch size (32 ResNet, 8 Conformer).
        eval_batch_size: batch size of validation and test.
        lr: base learning rate (1e-3 ResNet, 5e-5 Conformer).
        weight_decay: Adam's L2 weight decay (1e-4 ResNet, 1e-5 Conformer).
        betas: Adam's betas.
        eps: Adam's epsilon (1e-7 as the official code).
        schedule: ``step`` (official code), ``epoch`` (appendix) or ``constant``.
        warmup_steps: constant-LR steps of the ``step`` schedule.
        warmup_epochs: constant-LR epochs of the ``epoch`` schedule.
        amp: bf16 autocast of the forward and loss.
        workers: DataLoader worker processes (real datasets).
        log_every: steps between two ``step`` records of the log (and progress-bar updates).
        probes: train a detached linear probe per modality (never reaches the encoders).
        ece_bins: ECE bins (15).
        ece_binning: ``classical`` (eq. 10, ``(lo, hi]``) or ``torchmetrics``.
        checkpoint_every: epochs between two ``last.pt`` checkpoints (0: never).
        stop_after: stop after this many epochs of this invocation, leaving a checkpoint
            (time-boxed jobs; resume later with ``resume``).
        resume: continue from ``out/last.pt`` when it exists.
        out: output folder; ``None``: ``runs/<dataset>_<backbone>_<fusion>_<method>_fold<k>``.
        progress: show a tqdm bar per epoch.
        plots: write the PNG plots at the end (needs matplotlib).
        threads: ``torch.set_num_threads`` (``None``: PyTorch's default).
        description: free text (the presets say which table cell they reproduce).
    """

    dataset: str = "synthetic"
    root: str | None = None
    backbone: str = "resnet18"
    fusion: str = "linear"
    width: int = 64
    method: str = "joint"
    method_options: dict[str, Any] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)
    fusion_options: dict[str, Any] = field(default_factory=dict)
    fold: int = 0
    seed: int | None = None
    device: str = "cpu"
    max_epochs: int = 1500
    patience: int = 300
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7
    schedule: str = "step"
    warmup_steps: int = 780
    warmup_epochs: float = 3.0
    amp: bool = False
    workers: int = 0
    log_every: int = 50
    probes: bool = True
    ece_bins: int = 15
    ece_binning: str = "classical"
    checkpoint_every: int = 1
    stop_after: int | None = None
    resume: bool = False
    out: str | None = None
    progress: bool = True
    plots: bool = True
    threads: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.method = self.method.strip().lower().replace("-", "_")
        aliases = {
            "multi_loss": "multiloss",
            "ogmge": "ogm_ge",
            "audio": "audio_only",
            "video": "video_only",
        }
        self.method = aliases.get(self.method, self.method)
        self.validate()

    def validate(self) -> None:
        """Check every field; raises ``ValueError`` naming the field and the allowed values."""
        choices = {
            "dataset": DATASETS,
            "backbone": ("resnet18", "conformer"),
            "fusion": ("linear", "mlp", "film", "gated", "tf", "mmcosine"),
            "method": METHOD_NAMES,
            "schedule": SCHEDULES,
            "ece_binning": BINNINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        positive = ("width", "max_epochs", "batch_size", "eval_batch_size", "log_every", "ece_bins")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("patience", "workers", "warmup_steps", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.fold not in (0, 1, 2):
            raise ValueError(f"fold must be 0, 1 or 2, got {self.fold!r}")
        if not self.lr > 0 or not self.eps > 0 or not self.weight_decay >= 0:
            raise ValueError("lr and eps must be > 0 and weight_decay >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be None or >= 1, got {self.stop_after}")
        for name in ("method_options", "data_options", "fusion_options"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a table (dict), got {getattr(self, name)!r}")
        if self.dataset != "synthetic" and not self.root:
            raise ValueError(
                f"dataset {self.dataset!r} needs root=DIR, the prepared dataset "
                f"(python -m reference_models.data.prepare {self.dataset} ...)"
            )
        if self.dataset == "synthetic" and self.backbone != "resnet18":
            raise ValueError("the embedded synthetic set is for the resnet18 backbone")

    @property
    def run_seed(self) -> int:
        """The seed actually used: ``seed``, or the fold's official seed."""
        return FOLD_SEEDS[self.fold] if self.seed is None else int(self.seed)

    @property
    def output_dir(self) -> Path:
        """Where the run writes its files."""
        if self.out:
            return Path(self.out)
        name = f"{self.dataset}_{self.backbone}_{self.fusion}_{self.method}_fold{self.fold}"
        return Path("runs") / name

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and TOML-friendly dict of every field."""
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a parsed TOML preset), refusing unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown configuration key(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        values = dict(data)
        for name in ("method_options", "data_options", "fusion_options"):
            if name in values:
                values[name] = dict(values[name])
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        data = self.to_dict()
        for name, value in changes.items():
            if name in ("method_options", "data_options", "fusion_options"):
                value = {**data[name], **dict(value)}
            data[name] = value
        return TrainConfig.from_dict(data)


def _read_toml(path: Path) -> dict[str, Any]:
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise ImportError("reading TOML presets on Python 3.10 needs tomli: pip install tomli")
    with path.open("rb") as handle:
        return tomllib.load(handle)


def resolve_preset(name: str | Path) -> Path:
    """A preset's path: an existing file, or a name under :data:`CONFIG_DIR` (``.toml`` optional).

    Example:
        >>> resolve_preset("table3/cremad_resnet18_linear_mlb").name
        'cremad_resnet18_linear_mlb.toml'
    """
    path = Path(name)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / path
    for option in (candidate, candidate.with_suffix(".toml")):
        if option.is_file():
            return option
    raise FileNotFoundError(
        f"no preset {str(name)!r}: neither a file nor a name under {CONFIG_DIR} "
        "(e.g. table3/cremad_resnet18_linear_mlb)"
    )


def load_config(preset: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a TOML preset (optional) and keyword overrides.

    Example:
        >>> cfg = load_config("table3/cremad_resnet18_linear_mlb", root="data/cremad", fold=1)
        >>> cfg.method, cfg.method_options["alpha"], cfg.run_seed
        ('mlb', 5.0, 19)
    """
    data: dict[str, Any] = {}
    if preset is not None:
        data = _read_toml(resolve_preset(preset))
    for name, value in overrides.items():
        if name in ("method_options", "data_options", "fusion_options"):
            data[name] = {**data.get(name, {}), **dict(value)}
        else:
            data[name] = value
    return TrainConfig.from_dict(data)


def parse_value(text: str) -> Any:
    """Parse a command-line value as a TOML value, else keep it as a string.

    Example:
        >>> parse_value("5.0"), parse_value("[0.7, 1.3]"), parse_value("true"), parse_value("conv")
        (5.0, [0.7, 1.3], True, 'conv')
    """
    if tomllib is not None:
        try:
            return tomllib.loads(f"value = {text}")["value"]
        except Exception:  # noqa: BLE001 - anything that is not a TOML value is a string
            return text
    return text  # pragma: no cover


def _key_values(pairs: Sequence[str] | None, flag: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        result[key.strip()] = parse_value(value.strip())
    return result


# --------------------------------------------------------------------------------------
# Data, model, method
# --------------------------------------------------------------------------------------


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset, Dataset]:
    """The train, validation and test splits of the configured dataset and fold."""
    options = dict(config.data_options)
    if config.dataset == "synthetic":
        from reference_models.data.synthetic import SyntheticAudioVisual, SyntheticConfig

        sizes = {
            "train": options.pop("train_size", 1200),
            "val": options.pop("val_size", 300),
            "test": options.pop("test_size", 600),
        }
        data_seed = options.pop("seed", config.run_seed)
        knobs = SyntheticConfig.from_dict(options)
        return tuple(  # type: ignore[return-value]
            SyntheticAudioVisual(split, sizes[split], data_seed, knobs)
            for split in ("train", "val", "test")
        )
    if config.backbone == "conformer":
        raise NotImplementedError(
            "the conformer backbone needs waveform and face-feature datasets, which "
            "reference_models.data does not provide yet; the resnet18 backbone works on "
            f"{config.dataset}"
        )
    from reference_models import data

    if config.dataset == "cremad":
        return tuple(  # type: ignore[return-value]
            data.CremaD(config.root, split, fold=config.fold + 1, **options)
            for split in ("train", "val", "test")
        )
    if config.dataset == "ave":
        return tuple(  # type: ignore[return-value]
            data.AVE(config.root, split, **options) for split in ("train", "val", "test")
        )
    options.setdefault("seed", config.run_seed)
    return tuple(  # type: ignore[return-value]
        data.UCF101(config.root, split, fold=config.fold + 1, **options)
        for split in ("train", "val", "test")
    )


def _num_classes(dataset: Dataset) -> int:
    count = getattr(dataset, "num_classes", None)
    if not isinstance(count, int):
        raise ValueError(f"the dataset {type(dataset).__name__} does not say its num_classes")
    return count


class UnimodalClassifier(nn.Module):
    """One modality's encoder and a linear classifier: the "Audio only"/"Video only" baselines.

    Called like the audio-visual models, ``model(audio, video)``; only its own modality is
    used. The last pooled feature is kept in :attr:`last_features` for the probe.

    Args:
        encoder: the modality's encoder (pooled ``(B, D)`` output).
        feature_dim: its feature width.
        num_classes: number of classes.
        modality: ``"audio"`` or ``"video"``.

    Example:
        >>> from reference_models.encoders import ResNet18AudioEncoder
        >>> model = UnimodalClassifier(ResNet18AudioEncoder(width=4), 32, 6, "audio")
        >>> model(torch.randn(2, 65, 63), None).shape
        torch.Size([2, 6])
    """

    def __init__(
        self, encoder: nn.Module, feature_dim: int, num_classes: int, modality: str
    ) -> None:
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.modality = modality
        self.encoder = encoder
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.last_features: dict[str, torch.Tensor] = {}

    def forward(self, audio: torch.Tensor | None, video: torch.Tensor | None) -> torch.Tensor:
        features = self.encoder(audio if self.modality == "audio" else video)
        self.last_features = {self.modality: features}
        return self.classifier(features)


def build_model_for(config: TrainConfig, num_classes: int) -> nn.Module:
    """The reference model of the run (``reference_models.models.build_model``)."""
    from reference_models.models import NUM_CLASSES, build_model

    fusion = config.fusion
    fusion_options = dict(config.fusion_options)
    if config.method == "mmcosine":
        fusion = "mmcosine"
        fusion_options.setdefault("scale", float(config.method_options.get("scale", 10.0)))
    if config.method in UNIMODAL:
        fusion = "linear"
    # The generated set is CREMA-D-shaped (spectrogram + frames); num_classes is explicit.
    dataset = config.dataset if config.dataset in NUM_CLASSES else "cremad"
    model = build_model(
        dataset,
        config.backbone,
        fusion,
        num_classes=num_classes,
        width=config.width,
        fusion_options=fusion_options,
    )
    if config.method in UNIMODAL:
        modality = UNIMODAL[config.method]
        encoder = getattr(model, modality)
        return UnimodalClassifier(encoder, encoder.feature_dim, num_classes, modality)
    return model


def build_balancer(config: TrainConfig, model: nn.Module, num_classes: int) -> gb.Balancer | None:
    """The run's balancer on ``model`` via ``gb.make``; ``None`` for the unimodal baselines.

    Wiring done here, from the model (METHODS.md §1.3, §2):

    * ``joint`` and ``mmcosine``: Joint training with detached probes (``probes=True``).
    * ``mlb``: the fused Late-Linear head's per-modality weight blocks are scaled with their
      modality (the official code); ``scale_fused_weights=false`` turns it off.
    * ``ogm``, ``ogm_ge``, ``mslr``: scores from the fused head's per-modality slices when it
      has them (Late-Linear, MMCosine), else from detached probes; ``fused_slices=false``
      forces probes. ``ogm_ge`` seeds its noise with the run seed.
    * ``agm``: masked passes re-run only the fusion head on zeroed encoder outputs.
    * Transformer fusion: the encoders return tokens, pooled by their mean.
    """
    if config.method in UNIMODAL:
        return None
    name = "joint" if config.method == "mmcosine" else config.method
    options = dict(config.method_options)
    if config.method == "mmcosine":
        options.pop("scale", None)
    options.pop("prototype_fraction", None)  # the harness's (PMR explicit prototype pass)
    encoders = {"audio": model.audio, "video": model.video}
    common: dict[str, Any] = {
        "feature_dims": {n: int(m.feature_dim) for n, m in encoders.items()},
        "flush_every": max(config.log_every, 64),
    }
    if getattr(model, "takes_tokens", False):
        common["pool"] = "tokens"
    fusion = model.fusion
    has_slices = callable(getattr(fusion, "modality_logits", None))
    if name == "joint":
        options.setdefault("probes", True)
    elif name == "mlb":
        if options.pop("scale_fused_weights", True) and hasattr(fusion, "modality_parameters"):
            blocks = fusion.modality_parameters()
            options.setdefault("extra_parameters", dict(zip(encoders, blocks)))
    elif name in ("ogm", "ogm_ge", "mslr"):
        if options.pop("fused_slices", True) and has_slices:
            options.setdefault("fusion_head", fusion)
        if name == "ogm_ge":
            options.setdefault("seed", config.run_seed)
    elif name == "agm":
        options.setdefault("masking", "feature")
        if options["masking"] == "feature":
            options.setdefault("fusion", fusion)
            if getattr(model, "takes_tokens", False):
                options.setdefault("fusion_inputs", "outputs")
    for key in ("window",):
        if key in options and isinstance(options[key], list):
            options[key] = tuple(options[key])
    return gb.make(name, model, encoders, num_classes=num_classes, **common, **options)


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


class InMemoryBatches:
    """Shuffled mini-batches straight from a dataset's tensors (no per-item collation).

    For datasets with ``tensors() -> (audio, video, labels)`` (the generated set): each epoch
    draws one permutation from ``generator``, so the order is reproducible and resumable.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.tensors = [t.to(device) if device is not None else t for t in tensors]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.size = self.tensors[0].shape[0]

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=self.generator)
        else:
            order = torch.arange(self.size)
        order = order.to(self.tensors[0].device)
        for start in range(0, self.size, self.batch_size):
            index = order[start : start + self.batch_size]
            yield tuple(t[index] for t in self.tensors)


def _loader(
    dataset: Dataset,
    config: TrainConfig,
    *,
    train: bool,
    generator: torch.Generator | None,
    device: torch.device,
) -> Any:
    batch_size = config.batch_size if train else config.eval_batch_size
    if hasattr(dataset, "tensors") and config.workers == 0:
        return InMemoryBatches(
            dataset.tensors(),
            batch_size,
            shuffle=train,
            generator=generator,
            device=device if device.type == "cuda" else None,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        generator=generator,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=config.workers > 0,
        drop_last=False,
    )


def _to_device(batch: Sequence[Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    audio, video, label = batch[:3]
    label = torch.as_tensor(label)
    return tuple(x.to(device, non_blocking=True) for x in (audio, video, label))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# The run's state and one training step
# --------------------------------------------------------------------------------------


@dataclass
class RunState:
    """What a training step touches: model, balancer, probes, optimizer, schedule, device."""

    config: TrainConfig
    model: nn.Module
    balancer: gb.Balancer | None
    probes: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosineRestarts
    device: torch.device
    names: list[str]
    # Device-side accumulators, read at logging steps and at the end of each epoch.
    loss_sum: torch.Tensor
    correct: torch.Tensor
    coefficient_sum: torch.Tensor
    score_sum: torch.Tensor
    window_loss: torch.Tensor
    window_samples: int = 0

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp)


def _features(state: RunState) -> dict[str, torch.Tensor]:
    if state.balancer is None:
        return state.model.last_features  # type: ignore[union-attr,return-value]
    return state.balancer.features()


def train_step(state: RunState, audio: torch.Tensor, video: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step; no host synchronisation (everything stays on the device)."""
    with state.autocast():
        logits = state.model(audio, video)
        if state.balancer is None:
            loss = F.cross_entropy(logits, y)
        else:
            loss = state.balancer.loss(logits, y)
        total = loss
        if state.probes:
            features = _features(state)
            for name, probe in state.probes.items():
                probe_logits = probe(features[name].detach().float())
                total = total + F.cross_entropy(probe_logits.float(), y)
    state.optimizer.zero_grad(set_to_none=True)
    total.backward()
    after_backward = getattr(state.balancer, "after_backward", None)
    if after_backward is not None:
        after_backward()
    state.optimizer.step()
    state.scheduler.step()
    with torch.no_grad():
        batch_loss = loss.detach().float() * y.shape[0]
        state.loss_sum += batch_loss
        state.window_loss += batch_loss
        state.correct += (logits.detach().argmax(dim=1) == y).sum()
        if state.balancer is not None:
            coefficients = torch.stack(
                [state.balancer.coefficient_buffer(n).detach().float() for n in state.names]
            )
            state.coefficient_sum += coefficients.to(state.coefficient_sum.device)
            state.score_sum += (
                state.balancer.last_scores.detach().float().to(state.score_sum.device)
            )


def _unimodal_logits(state: RunState) -> dict[str, torch.Tensor]:
    """Heads (MLB, Multi-Loss), fused-head slices (OGM, MSLR) or Joint's probes; else {}."""
    bal = state.balancer
    if bal is None:
        return {}
    if len(bal.heads) == 0 and getattr(bal, "fusion_head", None) is None:
        return {}
    return bal.unimodal_logits()


@torch.no_grad()
def evaluate(state: RunState, loader: Any, *, collect: bool = False) -> dict[str, Any]:
    """Metrics of the fused prediction and of each modality on one split.

    With ``collect`` (the per-epoch validation) the balancer's ``loss()`` sees the batches
    under ``torch.no_grad()`` (MSLR takes its validation accuracies from them).
    """
    model, config = state.model, state.config
    was_training = model.training
    model.eval()
    state.probes.eval()
    fused: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    probes: dict[str, list[torch.Tensor]] = {n: [] for n in state.probes}
    heads: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        audio, video, y = _to_device(batch, state.device)
        with state.autocast():
            logits = model(audio, video)
            if collect and state.balancer is not None:
                state.balancer.loss(logits, y)
            features = _features(state)
            for name, probe in state.probes.items():
                probes[name].append(probe(features[name].float()).float())
            for name, head_logits in _unimodal_logits(state).items():
                heads.setdefault(name, []).append(head_logits.float())
        fused.append(logits.float())
        targets.append(y)
    model.train(was_training)
    state.probes.train(was_training)
    target = torch.cat(targets)

    def metrics(chunks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = torch.cat(chunks)
        return {
            "accuracy": accuracy(logits, target),
            "ece": expected_calibration_error(
                logits,
                target,
                config.ece_bins,
                binning=config.ece_binning,  # type: ignore[arg-type]
            ),
            "loss": F.cross_entropy(logits, target),
        }

    result: dict[str, Any] = {"fused": metrics(fused)}
    for name in state.names:
        entry: dict[str, torch.Tensor] = {}
        if name in probes:
            entry.update({f"probe_{k}": v for k, v in metrics(probes[name]).items()})
        if name in heads:
            entry.update({f"head_{k}": v for k, v in metrics(heads[name]).items()})
        if isinstance(model, UnimodalClassifier) and name == model.modality:
            entry.update({f"head_{k}": v for k, v in result["fused"].items()})
        result[name] = entry
    # One host synchronisation for the whole split.
    flat = [(outer, inner) for outer, entry in result.items() for inner in entry]
    values = torch.stack([result[o][i].double().cpu() for o, i in flat]).tolist()
    out: dict[str, Any] = {outer: {} for outer in result}
    for (outer, inner), value in zip(flat, values):
        out[outer][inner] = value
    return out


# --------------------------------------------------------------------------------------
# Checkpoints, logs, plots
# --------------------------------------------------------------------------------------


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _modules_state(state: RunState) -> dict[str, Any]:
    return {
        "model": state.model.state_dict(),
        "balancer": None if state.balancer is None else state.balancer.state_dict(),
        "probes": state.probes.state_dict(),
    }


def _load_modules(state: RunState, saved: Mapping[str, Any]) -> None:
    state.model.load_state_dict(saved["model"])
    if state.balancer is not None and saved.get("balancer") is not None:
        state.balancer.load_state_dict(saved["balancer"])
    state.probes.load_state_dict(saved["probes"])


def _history(state: RunState, prefix: torch.Tensor | None) -> torch.Tensor:
    """Per-step ``(steps, 2, M)`` coefficients and scores, including before a resume."""
    if state.balancer is None:
        return torch.zeros(0, 2, len(state.names))
    table = state.balancer.history
    current = (
        torch.stack(
            [
                torch.stack([table[n]["coefficients"], table[n]["scores"]], dim=1)
                for n in state.names
            ],
            dim=2,
        )
        if table and len(table[state.names[0]]["coefficients"])
        else torch.zeros(0, 2, len(state.names))
    )
    if prefix is None or prefix.numel() == 0:
        return current
    return torch.cat([prefix, current])


def _write_history_csv(history: torch.Tensor, names: Sequence[str], path: Path) -> None:
    """Per-step coefficients and scores: ``step,k_<name>...,score_<name>...``."""
    header = ["step", *(f"k_{n}" for n in names), *(f"score_{n}" for n in names)]
    rows = torch.cat([history[:, 0], history[:, 1]], dim=1).tolist()
    lines = [",".join(header)]
    lines += [",".join([str(i), *(f"{v:.6g}" for v in row)]) for i, row in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _history_dict(
    history: torch.Tensor, names: Sequence[str]
) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {"coefficients": history[:, 0, index], "scores": history[:, 1, index]}
        for index, name in enumerate(names)
    }


def _plot_learning_curves(epochs: list[dict[str, Any]], names: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [record["epoch"] for record in epochs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [r["train"]["loss"] for r in epochs], label="train (method's loss)")
    ax_loss.plot(x, [r["val"]["fused"]["loss"] for r in epochs], label="validation (fused CE)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(x, [r["train"]["accuracy"] for r in epochs], label="train fused", linestyle="--")
    ax_acc.plot(x, [r["val"]["fused"]["accuracy"] for r in epochs], label="val fused")
    for name in names:
        values = [r["val"][name].get("probe_accuracy") for r in epochs]
        if all(v is not None for v in values):
            ax_acc.plot(x, values, label=f"val {name} (probe)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_plots(
    out: Path, history: torch.Tensor, epochs: list[dict[str, Any]], names: Sequence[str], title: str
) -> list[str]:
    written = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: no plots (pip install 'gradbalance[plot]')", stacklevel=2
        )
        return written
    if history.shape[0]:
        gb.plot_history(_history_dict(history, names), out / "coefficients.png", title=title)
        written.append("coefficients.png")
    if epochs:
        _plot_learning_curves(epochs, names, out / "learning_curves.png")
        written.append("learning_curves.png")
    return written


def _progress(total: int, description: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is part of the models extra
        return None
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_text(results: Mapping[str, Any]) -> str:
    """The one-screen text summary of a finished run (from its ``results.json`` dict)."""
    config = results["config"]
    test, val = results["test"], results["val"]
    lines = [
        f"{config['method']} | {config['dataset']} {config['backbone']} {config['fusion']} | "
        f"fold {config['fold']} seed {results['seed']} | {results['device']}",
        f"epochs run {results['epochs_run']} (best {results['best_epoch']}), steps "
        f"{results['steps']}, {results['wall_time_s']:.1f} s"
        + (", stopped early" if results.get("stopped_early") else ""),
        f"{'':<12}{'val acc':>9}{'test acc':>10}{'test ECE':>10}{'test loss':>11}",
        f"{'fused':<12}{_fmt(val['fused']['accuracy']):>9}{_fmt(test['fused']['accuracy']):>10}"
        f"{_fmt(test['fused']['ece']):>10}{_fmt(test['fused']['loss']):>11}",
    ]
    for name in results["modalities"]:
        for kind in ("probe", "head"):
            if f"{kind}_accuracy" in test.get(name, {}):
                lines.append(
                    f"{name + ' ' + kind:<12}"
                    f"{_fmt(val[name].get(f'{kind}_accuracy')):>9}"
                    f"{_fmt(test[name][f'{kind}_accuracy']):>10}"
                    f"{_fmt(test[name][f'{kind}_ece']):>10}{_fmt(test[name][f'{kind}_loss']):>11}"
                )
    coefficients = results.get("final_coefficients") or {}
    if coefficients:
        lines.append(
            "final coefficients (mean of the last epoch): "
            + ", ".join(f"{n} {v:.3f}" for n, v in coefficients.items())
        )
    lines.append(f"outputs: {results['output_dir']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _explicit_prototypes(state: RunState, loader: Any, fraction: float) -> None:
    """PMR with ``prototypes="explicit"``: an eval-mode pass over part of the training set."""
    bal = state.balancer
    batches = max(1, int(len(loader) * fraction))
    state.model.eval()
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if index >= batches:
                break
            audio, video, y = _to_device(batch, state.device)
            with state.autocast():
                state.model(audio, video)
            bal.collect(y)  # type: ignore[union-attr]
    bal.update_prototypes()  # type: ignore[union-attr]
    state.model.train()


def _check_resumable(saved: Mapping[str, Any], config: TrainConfig) -> None:
    current = config.to_dict()
    different = sorted(
        key
        for key in set(saved) | set(current)
        if key not in _RESUMABLE_CHANGES and saved.get(key) != current.get(key)
    )
    if different:
        raise ValueError(
            f"cannot resume {config.output_dir}: its checkpoint was made with other settings "
            f"({', '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in different)}); "
            "use another --out or the same settings"
        )


@dataclass
class Session:
    """A run ready to train: its state, loaders and shuffling generator (see :func:`build_run`)."""

    state: RunState
    train_loader: Any
    val_loader: Any
    test_loader: Any
    generator: torch.Generator
    seed: int

    def close(self) -> None:
        """Remove the balancer's hooks now (rather than whenever it is garbage-collected)."""
        if self.state.balancer is not None:
            self.state.balancer.remove()


def build_run(
    config: TrainConfig, datasets: tuple[Dataset, Dataset, Dataset] | None = None
) -> Session:
    """Seed, then build the data, model, balancer, probes, optimizer and schedule of a run.

    ``datasets`` (train, validation, test) replaces :func:`build_datasets` (e.g. to reuse
    generated data across runs).

    Example:
        >>> cfg = TrainConfig(width=2, batch_size=8, data_options={"train_size": 16,
        ...                   "val_size": 8, "test_size": 8}, method="mlb", out="/tmp/gb_doc")
        >>> session = build_run(cfg)
        >>> type(session.state.balancer).__name__, len(session.train_loader)
        ('MLB', 2)
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but torch.cuda.is_available() is False")
    seed = config.run_seed
    random.seed(seed)
    torch.manual_seed(seed)

    train_set, val_set, test_set = datasets if datasets is not None else build_datasets(config)
    num_classes = _num_classes(train_set)
    model = build_model_for(config, num_classes).to(device)
    balancer = build_balancer(config, model, num_classes)
    if isinstance(model, UnimodalClassifier):
        names = [model.modality]
        feature_dims = {model.modality: model.classifier.in_features}
    else:
        names = list(balancer.names) if balancer is not None else list(MODALITIES)
        feature_dims = {n: int(getattr(model, n).feature_dim) for n in names}
    probes = nn.ModuleDict(
        {n: nn.Linear(feature_dims[n], num_classes) for n in names} if config.probes else {}
    ).to(device)
    parameters = [*model.parameters(), *probes.parameters()]
    if balancer is not None:
        parameters += list(balancer.parameters())
    optimizer = torch.optim.Adam(
        parameters,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    generator = torch.Generator().manual_seed(seed)
    train_loader = _loader(train_set, config, train=True, generator=generator, device=device)
    val_loader = _loader(val_set, config, train=False, generator=None, device=device)
    test_loader = _loader(test_set, config, train=False, generator=None, device=device)
    scheduler = WarmupCosineRestarts(
        optimizer,
        config.schedule,  # type: ignore[arg-type]
        warmup_steps=config.warmup_steps,
        warmup_epochs=config.warmup_epochs,
        steps_per_epoch=len(train_loader),
    )
    m = len(names)
    zeros = partial_zeros(device)
    state = RunState(
        config,
        model,
        balancer,
        probes,
        optimizer,
        scheduler,
        device,
        names,
        loss_sum=zeros(()),
        correct=zeros((), torch.int64),
        coefficient_sum=zeros((m,)),
        score_sum=zeros((m,)),
        window_loss=zeros(()),
    )
    return Session(state, train_loader, val_loader, test_loader, generator, seed)


def train(config: TrainConfig, *, verbose: bool = True) -> dict[str, Any]:
    """Run (or resume) one training run and return its ``results.json`` content.

    Args:
        config: the run's configuration.
        verbose: print the summary at the end.

    Returns:
        The results dict (also written to ``<out>/results.json``).
    """
    start_time = time.perf_counter()
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    session = build_run(config)
    try:
        return _train(session, config, out, start_time, verbose)
    finally:
        session.close()


def _train(
    session: Session, config: TrainConfig, out: Path, start_time: float, verbose: bool
) -> dict[str, Any]:
    state, generator, seed = session.state, session.generator, session.seed
    model, balancer, probes = state.model, state.balancer, state.probes
    optimizer, scheduler, device, names = (
        state.optimizer,
        state.scheduler,
        state.device,
        state.names,
    )
    train_loader, val_loader, test_loader = (
        session.train_loader,
        session.val_loader,
        session.test_loader,
    )

    epochs: list[dict[str, Any]] = []
    epoch, step = 0, 0
    best = {"accuracy": -1.0, "epoch": -1}
    stale = 0
    elapsed_before = 0.0
    history_prefix: torch.Tensor | None = None
    log_offset = 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if config.resume and last_path.is_file():
        saved = torch.load(last_path, map_location=device, weights_only=False)
        _check_resumable(saved["config"], config)
        _load_modules(state, saved)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        _set_rng_state(saved["rng"])
        epoch, step = saved["epoch"], saved["step"]
        best, stale = saved["best"], saved["stale"]
        epochs = saved["epochs"]
        elapsed_before = saved["elapsed"]
        history_prefix = saved["history"]
        log_offset = saved["log_offset"]
    log_path = out / "log.jsonl"
    if epoch > 0 and log_path.is_file():
        # Drop what the interrupted run logged after its checkpoint: those epochs run again.
        with log_path.open("r+b") as handle:
            handle.truncate(log_offset)
        log = log_path.open("a", encoding="utf-8")
    else:
        log = log_path.open("w", encoding="utf-8")
    if epoch == 0:
        log.write(json.dumps({"kind": "config", "config": config.to_dict(), "seed": seed}) + "\n")

    stopped_early = False
    epochs_this_call = 0
    pmr_explicit = getattr(balancer, "prototype_source", None) == "explicit"
    try:
        while epoch < config.max_epochs:
            if stale >= config.patience > 0:  # a resumed run that had stopped already
                stopped_early = True
                break
            epoch_start = time.perf_counter()
            if pmr_explicit:
                _explicit_prototypes(
                    state, train_loader, float(config.method_options.get("prototype_fraction", 0.1))
                )
            model.train()
            probes.train()
            for tensor in (
                state.loss_sum,
                state.correct,
                state.coefficient_sum,
                state.score_sum,
                state.window_loss,
            ):
                tensor.zero_()
            state.window_samples = 0
            seen = 0
            bar = _progress(len(train_loader), f"epoch {epoch}", config.progress)
            for index, batch in enumerate(train_loader):
                audio, video, y = _to_device(batch, device)
                train_step(state, audio, video, y)
                seen += int(y.shape[0])
                state.window_samples += int(y.shape[0])
                step += 1
                if bar is not None:
                    bar.update(1)
                if step % config.log_every == 0:
                    record = _step_record(state, epoch, step, index + 1)
                    log.write(json.dumps(record) + "\n")
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            if bar is not None:
                bar.close()
            steps_in_epoch = len(train_loader)
            train_metrics = torch.stack(
                [state.loss_sum / seen, state.correct.double() / seen]
            ).tolist()
            mean_coefficients = (state.coefficient_sum / steps_in_epoch).tolist()
            mean_scores = (state.score_sum / steps_in_epoch).tolist()
            val = evaluate(state, val_loader, collect=True)
            epoch_end = getattr(balancer, "epoch_end", None)
            if epoch_end is not None:
                epoch_end()
            improved = val["fused"]["accuracy"] > best["accuracy"]
            if improved:
                best = {"accuracy": val["fused"]["accuracy"], "epoch": epoch}
                stale = 0
                _atomic_save({**_modules_state(state), "epoch": epoch, "val": val}, best_path)
            else:
                stale += 1
            record = {
                "kind": "epoch",
                "epoch": epoch,
                "step": step,
                "lr": optimizer.param_groups[0]["lr"],
                "train": {"loss": train_metrics[0], "accuracy": train_metrics[1]},
                "val": val,
                "coefficients": dict(zip(names, mean_coefficients)) if balancer else {},
                "scores": dict(zip(names, mean_scores)) if balancer else {},
                "best": improved,
                "time_s": time.perf_counter() - epoch_start,
            }
            epochs.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            epoch += 1
            epochs_this_call += 1
            stopped_early = config.patience > 0 and stale >= config.patience
            pausing = config.stop_after is not None and epochs_this_call >= config.stop_after
            if config.checkpoint_every and (
                epoch % config.checkpoint_every == 0
                or epoch == config.max_epochs
                or stopped_early
                or pausing
            ):
                _atomic_save(
                    {
                        **_modules_state(state),
                        "config": config.to_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "generator": generator.get_state(),
                        "rng": _rng_state(),
                        "epoch": epoch,
                        "step": step,
                        "best": best,
                        "stale": stale,
                        "epochs": epochs,
                        "elapsed": elapsed_before + time.perf_counter() - start_time,
                        "history": _history(state, history_prefix),
                        "log_offset": log.tell(),
                    },
                    last_path,
                )
            if stopped_early or pausing:
                break
    finally:
        log.close()

    finished = epoch >= config.max_epochs or stopped_early
    history = _history(state, history_prefix)
    results = _finish(state, config, epochs, best, history, best_path, test_loader, val_loader)
    results.update(
        {
            "seed": seed,
            "epochs_run": epoch,
            "steps": step,
            "stopped_early": stopped_early,
            "finished": finished,
            "wall_time_s": elapsed_before + time.perf_counter() - start_time,
            "device": str(device),
            "output_dir": str(out),
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }
    )
    title = f"{config.method} on {config.dataset}: coefficients k and scores per step"
    results["plots"] = _write_plots(out, history, epochs, names, title) if config.plots else []
    if history.shape[0]:
        _write_history_csv(history, names, out / "history.csv")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    text = summary_text(results)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    if verbose:
        print(text)
    return results


def partial_zeros(device: torch.device) -> Any:
    """A ``zeros(shape, dtype=float32)`` factory on ``device``."""

    def zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    return zeros


def _step_record(state: RunState, epoch: int, step: int, batch_index: int) -> dict[str, Any]:
    """The ``step`` log record (one host synchronisation every ``log_every`` steps)."""
    record: dict[str, Any] = {
        "kind": "step",
        "epoch": epoch,
        "step": step,
        "batch": batch_index,
        "lr": state.optimizer.param_groups[0]["lr"],
    }
    values = [state.window_loss / max(state.window_samples, 1)]
    if state.balancer is not None:
        values.append(
            torch.stack([state.balancer.coefficient_buffer(n).float() for n in state.names])
        )
        values.append(state.balancer.last_scores.float())
    flat = torch.cat([v.reshape(-1).cpu() for v in values]).tolist()
    record["loss"] = flat[0]  # mean of the method's loss over the steps since the last record
    if state.balancer is not None:
        m = len(state.names)
        record["coefficients"] = dict(zip(state.names, flat[1 : 1 + m]))
        record["scores"] = dict(zip(state.names, flat[1 + m : 1 + 2 * m]))
    state.window_loss.zero_()
    state.window_samples = 0
    return record


def _finish(
    state: RunState,
    config: TrainConfig,
    epochs: list[dict[str, Any]],
    best: Mapping[str, Any],
    history: torch.Tensor,
    best_path: Path,
    test_loader: Any,
    val_loader: Any,
) -> dict[str, Any]:
    """Evaluate test at the last epoch, then reload the best-validation checkpoint and evaluate
    validation and test (the protocol's numbers)."""
    test_last = evaluate(state, test_loader) if epochs else None
    final_modules = copy.deepcopy(_modules_state(state))
    if best_path.is_file():
        saved = torch.load(best_path, map_location=state.device, weights_only=False)
        _load_modules(state, saved)
    val = evaluate(state, val_loader)
    test = evaluate(state, test_loader)
    last = epochs[-1] if epochs else {}
    results = {
        "config": config.to_dict(),
        "modalities": list(state.names),
        "best_epoch": best["epoch"],
        "val": val,
        "test": test,
        "test_last": test_last,
        "final_coefficients": last.get("coefficients", {}),
        "final_scores": last.get("scores", {}),
        "history_steps": int(history.shape[0]),
    }
    _load_modules(state, final_modules)
    return results


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reference_models.train",
        description="Train one method × fusion × backbone × dataset × fold with the paper's "
        "protocol. A TOML preset (--config) sets any option; flags override it.",
    )
    add = parser.add_argument
    add(
        "--config",
        help="TOML preset: a path or a name under reference_models/configs "
        "(e.g. table3/cremad_resnet18_linear_mlb)",
    )
    add("--dataset", choices=DATASETS)
    add("--root", help="prepared dataset folder (not needed for synthetic)")
    add("--backbone", choices=("resnet18", "conformer"))
    add("--fusion", choices=("linear", "mlp", "film", "gated", "tf"))
    add("--method", help=f"one of {', '.join(METHOD_NAMES)}")
    add(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        help="method option (repeatable), e.g. --opt alpha=5.0 --opt beta_max=2",
    )
    add(
        "--data-opt",
        action="append",
        metavar="KEY=VALUE",
        help="dataset option (repeatable), e.g. --data-opt video_contrast=0.8",
    )
    add("--fusion-opt", action="append", metavar="KEY=VALUE", help="fusion-head option")
    add("--width", type=int, help="ResNet-18 base width (64 = the paper's)")
    add("--fold", type=int, choices=(0, 1, 2))
    add("--seed", type=int)
    add("--device", help="cpu, cuda, cuda:1, ...")
    add("--epochs", dest="max_epochs", type=int, help="at most this many epochs")
    add("--patience", type=int, help="early-stopping patience in epochs (0: off)")
    add("--batch-size", type=int)
    add("--eval-batch-size", type=int)
    add("--lr", type=float)
    add("--weight-decay", type=float)
    add("--schedule", choices=SCHEDULES)
    add("--warmup-steps", type=int)
    add("--warmup-epochs", type=float)
    add("--amp", action="store_true", default=None, help="bf16 autocast")
    add("--workers", type=int)
    add("--log-every", type=int)
    add("--checkpoint-every", type=int)
    add("--stop-after", type=int, help="stop after N epochs of this invocation (resumable)")
    add("--threads", type=int)
    add("--out", help="output folder")
    add("--resume", action="store_true", default=None, help="continue from OUT/last.pt")
    add("--no-progress", dest="progress", action="store_false", default=None)
    add("--set", action="append", metavar="KEY=VALUE", help="any configuration field")
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line into a :class:`TrainConfig`."""
    args = _parser().parse_args(argv)
    values = vars(args)
    overrides: dict[str, Any] = _key_values(values.pop("set"), "--set")
    overrides["method_options"] = _key_values(values.pop("opt"), "--opt")
    overrides["data_options"] = _key_values(values.pop("data_opt"), "--data-opt")
    overrides["fusion_options"] = _key_values(values.pop("fusion_opt"), "--fusion-opt")
    preset = values.pop("config")
    overrides.update({k: v for k, v in values.items() if v is not None})
    return load_config(preset, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``gradbalance-train``)."""
    try:
        config = config_from_args(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
