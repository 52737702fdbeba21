"""The training harness's components as one table: datasets, backbones, fusions and methods.

Every name the harness accepts is listed here once; the configuration's validation, the
command line, the presets and the reproduction tables read their choices from these tables.
Each entry says how its component is built from its own slice of a run's configuration:

* :data:`DATASETS`: ``name -> DatasetRecipe`` (the dataset classes and the backbones they feed);
* :data:`BACKBONES`, :data:`FUSIONS`: the model choices of
  :func:`reference_models.models.build_model`;
* :data:`METHODS`: ``name -> MethodRecipe``: the library method it makes, the fusion it forces,
  the options it takes from the model (fused-head slices, weight blocks, masked forward) and
  the per-epoch work it needs from the harness. Every method of ``gb.registry.METHODS`` is
  listed (a method registered with ``gb.register_method`` too, unwired), and
  :data:`METHOD_ALIASES` holds ``gb.registry.ALIASES``.

Example:
    >>> METHODS["mmcosine"].balancer, METHODS["mmcosine"].fusion
    ('joint', 'mmcosine')
    >>> METHODS["video_only"].modality, METHODS["mlb"].label
    ('video', 'MLB')
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gradbalance as gb
from reference_models.fusion import FUSIONS as _FUSION_CLASSES
from reference_models.models import BACKBONES

__all__ = [
    "BACKBONES",
    "DATASETS",
    "FUSIONS",
    "METHODS",
    "MODALITIES",
    "DatasetRecipe",
    "MethodRecipe",
]

MODALITIES: tuple[str, ...] = ("audio", "video")

FUSIONS: tuple[str, ...] = (*_FUSION_CLASSES, "mmcosine")
"""Fusion heads by name (``mmcosine`` is :class:`gradbalance.MMCosineHead`)."""


@dataclass(frozen=True)
class DatasetRecipe:
    """A dataset of the harness.

    Attributes:
        label: the name printed in tables.
        backbones: the backbones its items feed.
        folds: its number of folds (``fold`` is 0-based: ``0 .. folds - 1``; CREMA-D has the
            five of its split file, of which the paper reports the first three).

    Example:
        >>> DATASETS["cremad"].backbones, DATASETS["cremad"].folds
        (('resnet18', 'conformer'), 5)
    """

    label: str
    backbones: tuple[str, ...]
    folds: int = 3


DATASETS: dict[str, DatasetRecipe] = {
    "synthetic": DatasetRecipe("generated", ("resnet18",)),
    "cremad": DatasetRecipe("CREMA-D", ("resnet18", "conformer"), folds=5),
    "ave": DatasetRecipe("AVE", ("resnet18",)),
    "ucf101": DatasetRecipe("UCF101", ("resnet18",)),
}


Wiring = Callable[[dict[str, Any], nn.Module, int], None]
"""``wire(options, model, seed)``: fill a method's options from the model, in place."""

ForwardPasses = Callable[[float], Iterator[tuple[torch.Tensor, torch.Tensor | None]]]
"""``forward_passes(fraction)``: eval-mode forwards without gradients over that fraction of the
training batches; yields each batch's labels and the presence mask the balancer is told
(``None`` when every sample is complete or the run does not tell it)."""

EpochStart = Callable[[Any, dict[str, Any], ForwardPasses], None]
"""``epoch_start(balancer, options, forward_passes)``: work a method needs before each epoch
(``forward_passes``: see :data:`ForwardPasses`)."""


@dataclass(frozen=True)
class MethodRecipe:
    """A method of the harness and how it is wired to a reference model.

    Attributes:
        label: the row label of the paper's tables.
        balancer: the ``gradbalance.make`` name; ``None`` for the unimodal baselines.
        fusion: the fusion head this method forces (``mmcosine``), else the run's.
        fusion_options: method options that are options of that head, with their defaults.
        modality: the single modality of a unimodal baseline.
        wire: fills the method's options from the model (see :data:`Wiring`).
        harness_options: method options read by the harness, not passed to the library.
        epoch_start: work before each training epoch (see :data:`EpochStart`).

    Example:
        >>> from reference_models.models import build_model
        >>> model = build_model("cremad", "resnet18", "linear", width=2)
        >>> options = METHODS["ogm"].library_options({"alpha": 0.8}, model, seed=0)
        >>> options["alpha"], options["fusion_head"] is model.fusion
        (0.8, True)
    """

    label: str
    balancer: str | None
    fusion: str | None = None
    fusion_options: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None
    wire: Wiring | None = None
    harness_options: tuple[str, ...] = ()
    epoch_start: EpochStart | None = None

    def library_options(
        self, options: dict[str, Any], model: nn.Module, seed: int
    ) -> dict[str, Any]:
        """The keyword options of ``gb.make`` for ``model``: the run's, completed by wiring."""
        options = {
            key: tuple(value) if key == "window" and isinstance(value, list) else value
            for key, value in options.items()
            if key not in self.harness_options and key not in self.fusion_options
        }
        if self.wire is not None:
            self.wire(options, model, seed)
        return options


def _with_probes(options: dict[str, Any], model: nn.Module, seed: int) -> None:
    """Joint training: detached linear probes measure each modality."""
    options.setdefault("probes", True)


def _fused_weight_blocks(options: dict[str, Any], model: nn.Module, seed: int) -> None:
    """MLB: each modality's weight block of the fused head's first layer (Late-Linear, MLP,
    Gated, decision-level) is scaled with it, as the official code's parameter grouping does;
    ``scale_fused_weights=false`` turns it off."""
    blocks = getattr(model.fusion, "modality_parameters", None)
    if options.pop("scale_fused_weights", True) and blocks is not None:
        options.setdefault("extra_parameters", dict(zip(MODALITIES, blocks())))


def _fused_slices(options: dict[str, Any], model: nn.Module, seed: int) -> None:
    """OGM, MSLR: scores from the fused head's per-modality slices when it has them
    (Late-Linear, MMCosine), else detached probes; ``fused_slices=false`` forces probes."""
    if options.pop("fused_slices", True) and callable(
        getattr(model.fusion, "modality_logits", None)
    ):
        options.setdefault("fusion_head", model.fusion)


def _classifier_blocks(options: dict[str, Any], model: nn.Module, seed: int) -> None:
    """CGGM: with its direction term (``lam > 0``), each modality's weight block of a
    late-linear fused head (``modality_logits`` and ``modality_parameters``) is turned towards
    that modality's probe; another head leaves ``fusion_weights`` to the configuration."""
    late_linear = callable(getattr(model.fusion, "modality_logits", None))
    blocks = getattr(model.fusion, "modality_parameters", None)
    if float(options.get("lam", 0.0)) > 0 and late_linear and blocks is not None:
        options.setdefault("fusion_weights", [group[0] for group in blocks()])


def _seeded_slices(options: dict[str, Any], model: nn.Module, seed: int) -> None:
    """OGM-GE, AMSS, AMSS+, OPM: as OGM, with their random draws (OGM-GE's noise, AMSS's masks,
    OPM's feature drops) seeded by the run seed."""
    _fused_slices(options, model, seed)
    options.setdefault("seed", seed)


def _masked_passes(options: dict[str, Any], model: nn.Module, seed: int) -> None:
    """AGM: ``masking="input"`` re-runs the whole model with a modality's input zeroed
    (``model.forward_masked``, the official code); ``masking="feature"`` (default, cheap)
    re-runs only the fusion head on zeroed encoder outputs. The clipping rule (``clip=true``)
    watches ``clip_watch``: ``"fused_weights"`` (default: the fused head's weight matrices, as
    the official code watches its output layer's weight) or ``"fusion"`` (every parameter
    outside the encoders)."""
    options.setdefault("masking", "feature")
    if options["masking"] == "feature":
        options.setdefault("fusion", model.fusion)
        if getattr(model, "takes_tokens", False):
            options.setdefault("fusion_inputs", "outputs")
    elif options["masking"] == "input":
        options.setdefault("forward_masked", model.forward_masked)
    watch = options.pop("clip_watch", "fused_weights")
    if watch == "fused_weights":
        options["clip_watch"] = fused_head_weights(model.fusion)
    elif watch != "fusion":
        raise ValueError(f"clip_watch must be 'fused_weights' or 'fusion', got {watch!r}")


def _official_momentum(options: dict[str, Any], model: nn.Module, seed: int) -> None:
    """PMR's ``momentum_schedule``: ``"official"`` maps to the library's
    ``first_blend_epoch=2``: the prototypes recomputed before epoch 1 (after the first epoch)
    are the plain class means (the official code passes epoch 0 there), so blending with
    ``momentum`` starts with those recomputed before epoch 2; ``"constant"`` (default) blends
    whenever previous prototypes exist."""
    schedule = options.pop("momentum_schedule", "constant")
    if schedule not in ("constant", "official"):
        raise ValueError(f"momentum_schedule must be 'constant' or 'official', got {schedule!r}")
    if schedule == "official":
        if options.get("prototypes", "accumulate") != "explicit":
            raise ValueError("momentum_schedule='official' needs prototypes='explicit'")
        options["first_blend_epoch"] = 2


def _explicit_prototypes(
    balancer: Any, options: dict[str, Any], forward_passes: ForwardPasses
) -> None:
    """PMR with ``prototypes="explicit"``: class prototypes from an eval-mode pass over
    ``prototype_fraction`` (0.1) of the training batches before each epoch (the official
    code); with missing modalities, each modality's from the samples where it is present."""
    if getattr(balancer, "prototype_source", None) != "explicit":
        return
    for labels, present in forward_passes(float(options.get("prototype_fraction", 0.1))):
        if present is None:
            balancer.collect(labels)
        else:
            balancer.collect(labels, present=present)
    balancer.update_prototypes()


def fused_head_weights(fusion: nn.Module) -> list[nn.Parameter]:
    """The weight matrices of a fusion head (its parameters of two or more dimensions)."""
    return [p for p in fusion.parameters() if p.dim() >= 2]


_RECIPES: dict[str, MethodRecipe] = {
    "joint": MethodRecipe("Joint Training", "joint", wire=_with_probes),
    "multiloss": MethodRecipe("Multi-Loss", "multiloss"),
    "mlb": MethodRecipe("MLB", "mlb", wire=_fused_weight_blocks),
    "ogm": MethodRecipe("OGM", "ogm", wire=_fused_slices),
    "ogm_ge": MethodRecipe("OGM-GE", "ogm_ge", wire=_seeded_slices),
    "opm": MethodRecipe("OPM", "opm", wire=_seeded_slices),
    "agm": MethodRecipe("AGM", "agm", wire=_masked_passes),
    "pmr": MethodRecipe(
        "PMR",
        "pmr",
        harness_options=("prototype_fraction",),
        wire=_official_momentum,
        epoch_start=_explicit_prototypes,
    ),
    "mslr": MethodRecipe("MSLR", "mslr", wire=_fused_slices),
    # Gradient Blending's held-out losses come from the per-epoch validation pass, whose
    # loss() calls run under torch.no_grad() (as MSLR's accuracies).
    "gblend": MethodRecipe("G-Blend", "gblend"),
    "mmpareto": MethodRecipe("MMPareto", "mmpareto"),
    "cggm": MethodRecipe("CGGM", "cggm", wire=_classifier_blocks),
    "amss": MethodRecipe("AMSS", "amss", wire=_seeded_slices),
    "amss_plus": MethodRecipe("AMSS+", "amss_plus", wire=_seeded_slices),
    "mmcosine": MethodRecipe(
        "MMCosine", "joint", fusion="mmcosine", fusion_options={"scale": 10.0}, wire=_with_probes
    ),
    "audio_only": MethodRecipe("Audio only", None, fusion="linear", modality="audio"),
    "video_only": MethodRecipe("Video only", None, fusion="linear", modality="video"),
}
"""The harness's wiring of the library's methods, and its own baselines."""


class _LiveTable(Mapping[str, Any]):
    """A read-only mapping rebuilt by ``build()`` at each access (so it follows
    ``gb.registry``: a method registered later is listed)."""

    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        self._build = build

    def __getitem__(self, name: str) -> Any:
        return self._build()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())


def _method_table() -> dict[str, MethodRecipe]:
    """:data:`_RECIPES`, then every other method of ``gb.registry.METHODS`` (a plain recipe
    labelled by its class name)."""
    table = dict(_RECIPES)
    for name, cls in gb.registry.METHODS.items():
        table.setdefault(name, MethodRecipe(cls.__name__, name))
    return table


METHODS: Mapping[str, MethodRecipe] = _LiveTable(_method_table)
"""Every method the harness trains, by the name used in configurations and presets."""

METHOD_ALIASES: Mapping[str, str] = _LiveTable(
    lambda: {**gb.registry.ALIASES, "audio": "audio_only", "video": "video_only"}
)
"""Other spellings accepted for a method name."""
