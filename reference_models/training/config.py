"""A training run's configuration: the :class:`TrainConfig` fields, TOML presets and overrides.

A run is one method × fusion × backbone × dataset × fold. Its configuration is flat (a TOML
preset sets any field); each component reads only its own slice of it
(:attr:`TrainConfig.data`, :attr:`TrainConfig.model`, :attr:`TrainConfig.method_slice`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradbalance.metrics import BINNINGS
from reference_models.data.missing import MISSING_MODES, check_rates
from reference_models.missing_fill import MISSING_FILLS
from reference_models.recipes import (
    BACKBONES,
    DATASETS,
    FUSIONS,
    METHOD_ALIASES,
    METHODS,
    MODALITIES,
)
from reference_models.schedule import SCHEDULES
from reference_models.training.tensorboard import LOGGERS

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

__all__ = [
    "CONFIG_DIR",
    "FOLD_SEEDS",
    "RESUMABLE_CHANGES",
    "DataSlice",
    "MethodSlice",
    "ModelSlice",
    "TrainConfig",
    "load_config",
    "resolve_preset",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
"""The presets shipped with the package (``--config table3/cremad_resnet18_linear_mlb``)."""

FOLD_SEEDS: tuple[int, ...] = (109, 19, 337)
"""Seed of folds 0, 1, 2 when ``seed`` is not given (the official ``--fold k`` mapping)."""

TABLE_FIELDS = (
    "method_options",
    "data_options",
    "fusion_options",
    "audio_options",
    "video_options",
    "missing",
)
"""The fields that are tables (dicts); overrides of them are merged, not replaced."""

RESUMABLE_CHANGES = frozenset(
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
        "logger",
        "checkpoint_every",
        "description",
        "eval_batch_size",
        "plots",
        "wav2vec2_checkpoint",
    }
)
"""Fields of a resumed run's configuration that may differ from its checkpoint's."""


@dataclass(frozen=True)
class DataSlice:
    """What the datasets are built from (:attr:`TrainConfig.data`).

    Example:
        >>> TrainConfig(dataset="cremad", root="data/cremad", fold=1).data.seed
        19
    """

    dataset: str
    root: str | None
    backbone: str
    fold: int
    seed: int
    options: dict[str, Any]
    missing: dict[str, float] = field(default_factory=dict)
    missing_mode: str = "both"


@dataclass(frozen=True)
class ModelSlice:
    """What the model is built from (:attr:`TrainConfig.model`), before a method forces its
    fusion head.

    Example:
        >>> TrainConfig(fusion="film", width=8).model.fusion
        'film'
    """

    backbone: str
    fusion: str
    width: int
    fusion_options: dict[str, Any]
    wav2vec2_checkpoint: str | None = None
    audio_options: dict[str, Any] = field(default_factory=dict)
    video_options: dict[str, Any] = field(default_factory=dict)
    missing_fill: str = "input"


@dataclass(frozen=True)
class MethodSlice:
    """What the balancer is built from (:attr:`TrainConfig.method_slice`).

    Example:
        >>> TrainConfig(method="mlb", method_options={"alpha": 2.0}).method_slice.options
        {'alpha': 2.0}
    """

    method: str
    options: dict[str, Any]
    seed: int
    log_every: int


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
        method: one of :data:`reference_models.recipes.METHODS`.
        method_options: keyword options of the method (``alpha``, ``beta_max``, ...; for
            ``mmcosine``: ``scale``). Passed to ``gb.make``.
        data_options: keyword options of the dataset (for ``synthetic``: ``train_size``,
            ``val_size``, ``test_size``, ``seed`` and the generator's knobs).
        fusion_options: keyword options of the fusion head.
        audio_options: keyword options of the audio encoder (e.g. a smaller wav2vec2 front end
            for CPU smoke runs of the Conformer backbone).
        video_options: keyword options of the video encoder.
        wav2vec2_checkpoint: the Conformer backbone's wav2vec2-large-robust weights, a local
            torchaudio state dict (converted once from the Hugging Face model, see the README),
            or ``"random"`` for smoke tests (warns). Needed by the Conformer backbone only.
        missing: ``{modality: rate}`` (``--set missing.video=0.5``): that share of the samples
            of the splits ``missing_mode`` names (``both``, ``train``, ``test``) loses the
            modality (:func:`reference_models.data.missing.with_missing`); batches carry the
            presence mask and results.json the accuracies by presence.
        missing_mode: see ``missing``.
        missing_fill: ``input``, ``zero`` or ``learned`` (:mod:`reference_models.missing_fill`).
        missing_mask: pass the mask to the model and ``bal.loss(present=)``; ``false``: the
            zero-fill baseline (fill ``input``). Probes and metrics always use it.
        fold: 0-based fold: 0, 1 or 2 (the paper's three; CREMA-D also 3 and 4, the other
            two folds of its split file, whose key is ``fold + 1``). For every dataset it
            also picks the default seed.
        seed: training seed; ``None``: :data:`FOLD_SEEDS` ``[fold]`` (folds 0-2).
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
        logger: ``none`` or ``tensorboard``: also write the step and epoch records' scalars
            and the balancer's values to TensorBoard under ``out/tensorboard`` (needs
            tensorboard).
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
    audio_options: dict[str, Any] = field(default_factory=dict)
    video_options: dict[str, Any] = field(default_factory=dict)
    wav2vec2_checkpoint: str | None = None
    missing: dict[str, float] = field(default_factory=dict)
    missing_mode: str = "both"
    missing_fill: str = "input"
    missing_mask: bool = True
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
    logger: str = "none"
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
        self.method = METHOD_ALIASES.get(self.method, self.method)
        self.validate()

    def validate(self) -> None:
        """Check every field; raises ``ValueError`` naming the field and the allowed values."""
        choices = {
            "dataset": tuple(DATASETS),
            "backbone": BACKBONES,
            "fusion": FUSIONS,
            "method": tuple(METHODS),
            "schedule": SCHEDULES,
            "ece_binning": BINNINGS,
            "logger": LOGGERS,
            "missing_mode": MISSING_MODES,
            "missing_fill": MISSING_FILLS,
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
        folds = DATASETS[self.dataset].folds
        if isinstance(self.fold, bool) or self.fold not in range(folds):
            raise ValueError(f"fold must be 0-based in 0..{folds - 1}, got {self.fold!r}")
        if self.seed is None and self.fold >= len(FOLD_SEEDS):
            raise ValueError(
                f"fold {self.fold} has no official seed (only folds 0-{len(FOLD_SEEDS) - 1} "
                "have); set seed=N"
            )
        if not self.lr > 0 or not self.eps > 0 or not self.weight_decay >= 0:
            raise ValueError("lr and eps must be > 0 and weight_decay >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be None or >= 1, got {self.stop_after}")
        for name in TABLE_FIELDS:
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a table (dict), got {getattr(self, name)!r}")
        check_rates(self.missing, MODALITIES)
        if not self.missing_mask and self.missing_fill != "input":
            raise ValueError(
                f"missing_fill={self.missing_fill!r} needs the mask (missing_mask=true): a model "
                "not told which inputs are missing can only see the zero input"
            )
        if self.dataset != "synthetic" and not self.root:
            raise ValueError(
                f"dataset {self.dataset!r} needs root=DIR, the prepared dataset "
                f"(python -m reference_models.data.prepare {self.dataset} ...)"
            )
        if self.backbone == "conformer" and not self.wav2vec2_checkpoint:
            raise ValueError(
                "the conformer backbone needs wav2vec2_checkpoint: a local torchaudio state dict "
                "of wav2vec2-large-robust (see the README for the one-time conversion), or "
                "'random' for a smoke test"
            )
        if self.backbone not in DATASETS[self.dataset].backbones:
            raise ValueError(
                f"the {self.dataset} dataset feeds the backbones "
                f"{list(DATASETS[self.dataset].backbones)}, not {self.backbone!r}"
            )

    @property
    def run_seed(self) -> int:
        """The seed actually used: ``seed``, or the fold's official seed."""
        return FOLD_SEEDS[self.fold] if self.seed is None else int(self.seed)

    @property
    def data(self) -> DataSlice:
        """The datasets' slice of the configuration."""
        return DataSlice(
            self.dataset,
            self.root,
            self.backbone,
            self.fold,
            self.run_seed,
            dict(self.data_options),
            dict(self.missing),
            self.missing_mode,
        )

    @property
    def model(self) -> ModelSlice:
        """The model's slice of the configuration."""
        return ModelSlice(
            self.backbone,
            self.fusion,
            self.width,
            dict(self.fusion_options),
            self.wav2vec2_checkpoint,
            dict(self.audio_options),
            dict(self.video_options),
            self.missing_fill,
        )

    @property
    def method_slice(self) -> MethodSlice:
        """The method's slice of the configuration."""
        return MethodSlice(self.method, dict(self.method_options), self.run_seed, self.log_every)

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
        for name in TABLE_FIELDS:
            if name in values:
                values[name] = dict(values[name])
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        data = self.to_dict()
        for name, value in changes.items():
            if name in TABLE_FIELDS:
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
        if name in TABLE_FIELDS:
            data[name] = {**data.get(name, {}), **dict(value)}
        else:
            data[name] = value
    return TrainConfig.from_dict(data)
