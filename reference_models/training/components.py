"""A run's components, each built from its own slice of the configuration.

* :func:`build_datasets` (:class:`~reference_models.training.config.DataSlice`): the train,
  validation and test splits;
* :func:`build_model_for` (:class:`~reference_models.training.config.ModelSlice` and the
  method's recipe): the reference model, or a single-encoder classifier;
* :func:`build_balancer` (:class:`~reference_models.training.config.MethodSlice`): the
  library method, wired to the model by its recipe (:data:`reference_models.recipes.METHODS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.utils.data import Dataset

import gradbalance as gb
from reference_models.data.missing import PresentCollate, with_missing
from reference_models.recipes import METHODS, MODALITIES
from reference_models.training.batches import padded_batch
from reference_models.training.config import DataSlice, MethodSlice, ModelSlice, TrainConfig
from reference_models.unimodal import UnimodalClassifier

__all__ = [
    "build_balancer",
    "collate_for",
    "data_report",
    "build_datasets",
    "build_model_for",
    "modality_names",
    "num_classes_of",
]

SPLITS = ("train", "val", "test")


def _synthetic(data: DataSlice) -> tuple[Dataset, ...]:
    from reference_models.data.synthetic import SyntheticAudioVisual, SyntheticConfig

    options = dict(data.options)
    sizes = {
        "train": options.pop("train_size", 1200),
        "val": options.pop("val_size", 300),
        "test": options.pop("test_size", 600),
    }
    data_seed = options.pop("seed", data.seed)
    knobs = SyntheticConfig.from_dict(options)
    return tuple(SyntheticAudioVisual(split, sizes[split], data_seed, knobs) for split in SPLITS)


def _prepared(data: DataSlice) -> tuple[Dataset, ...]:
    from reference_models import data as datasets

    options = dict(data.options)
    if data.dataset == "cremad":
        # Clips of the split missing from the prepared data are left out and reported (warning,
        # results.json), as the official loader drops them (silently).
        options.setdefault("missing", "skip")
        dataset = datasets.CremaDWaveformFaces if data.backbone == "conformer" else datasets.CremaD
        return tuple(dataset(data.root, split, fold=data.fold, **options) for split in SPLITS)
    if data.dataset == "ave":
        return tuple(datasets.AVE(data.root, split, **options) for split in SPLITS)
    options.setdefault("seed", data.seed)
    return tuple(datasets.UCF101(data.root, split, fold=data.fold, **options) for split in SPLITS)


def build_datasets(config: TrainConfig | DataSlice) -> tuple[Dataset, Dataset, Dataset]:
    """The train, validation and test splits of the configured dataset and fold.

    The Conformer backbone reads CREMA-D's waveforms and face features
    (:class:`~reference_models.data.CremaDWaveformFaces`), the ResNet one spectrograms and
    frames. With missing modalities (``missing``) each split goes through
    :func:`~reference_models.data.missing.with_missing` (seeded by the run seed).
    """
    data = config.data if isinstance(config, TrainConfig) else config
    build = _synthetic if data.dataset == "synthetic" else _prepared
    splits = build(data)
    if not data.missing:
        return splits  # type: ignore[return-value]
    return tuple(  # type: ignore[return-value]
        with_missing(
            dataset,
            data.missing,
            seed=data.seed,
            mode=data.missing_mode,
            split=split,
            modalities=MODALITIES,
        )
        for dataset, split in zip(splits, SPLITS)
    )


def data_report(splits: tuple[Dataset, ...]) -> dict[str, dict[str, int]]:
    """Per split: the clips used and the clips of the split left out (missing or failed)."""
    return {
        name: {"clips": len(dataset), "left_out": len(getattr(dataset, "excluded", {}))}
        for name, dataset in zip(SPLITS, splits)
    }


def collate_for(data: DataSlice) -> Callable[[Sequence[Any]], Any] | None:
    """The batch collate of the datasets :func:`build_datasets` makes: the padding one for the
    Conformer backbone's variable-length items, else the default; with missing modalities,
    that one with the presence mask after the labels (:class:`PresentCollate`)."""
    collate = padded_batch if data.backbone == "conformer" else None
    return PresentCollate(collate) if data.missing else collate


def num_classes_of(dataset: Dataset) -> int:
    """The number of classes a dataset declares (``dataset.num_classes``)."""
    count = getattr(dataset, "num_classes", None)
    if not isinstance(count, int):
        raise ValueError(f"the dataset {type(dataset).__name__} does not say its num_classes")
    return count


def build_model_for(
    config: TrainConfig | ModelSlice,
    num_classes: int,
    *,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    dataset: str = "cremad",
) -> nn.Module:
    """The reference model of the run (:func:`reference_models.models.build_model`).

    The method's recipe may force the fusion head (MMCosine, whose ``scale`` is a method
    option) or keep one encoder (the unimodal baselines).
    """
    from reference_models.models import NUM_CLASSES, build_model

    if isinstance(config, TrainConfig):
        method, method_options, dataset = config.method, config.method_options, config.dataset
        config = config.model
    recipe = METHODS[method or "joint"]
    fusion_options = dict(config.fusion_options)
    for key, default in recipe.fusion_options.items():
        fusion_options.setdefault(key, (method_options or {}).get(key, default))
    # The generated set is CREMA-D-shaped (spectrogram + frames); num_classes is explicit.
    conformer = {"wav2vec2_checkpoint": config.wav2vec2_checkpoint}
    model = build_model(
        dataset if dataset in NUM_CLASSES else "cremad",
        config.backbone,
        recipe.fusion or config.fusion,
        num_classes=num_classes,
        width=config.width,
        audio_options=config.audio_options,
        video_options=config.video_options,
        fusion_options=fusion_options,
        missing_fill=config.missing_fill,
        **(conformer if config.backbone == "conformer" else {}),
    )
    if recipe.modality is None:
        return model
    encoder = getattr(model, recipe.modality)
    return UnimodalClassifier(encoder, encoder.feature_dim, num_classes, recipe.modality)


def modality_names(model: nn.Module) -> list[str]:
    """The modalities a model encodes (one for a unimodal classifier)."""
    return list(getattr(model, "names", MODALITIES))


def build_balancer(
    config: TrainConfig | MethodSlice, model: nn.Module, num_classes: int
) -> gb.Balancer | None:
    """The run's balancer on ``model`` via ``gb.make``; ``None`` for the unimodal baselines.

    The method's recipe wires it to the model (:data:`reference_models.recipes.METHODS`);
    every balancer gets the encoders' feature widths, and token-returning encoders (Transformer
    fusion) are pooled by the mean of their valid tokens (padding left out).
    """
    method = config.method_slice if isinstance(config, TrainConfig) else config
    recipe = METHODS[method.method]
    if recipe.balancer is None:
        return None
    options = recipe.library_options(method.options, model, method.seed)
    encoders = {name: getattr(model, name) for name in MODALITIES}
    common: dict[str, Any] = {
        "feature_dims": {n: int(m.feature_dim) for n, m in encoders.items()},
        "flush_every": max(method.log_every, 64),
    }
    if getattr(model, "takes_tokens", False):
        common["features"] = {name: model.pooled_tokens(name) for name in encoders}
    return gb.make(recipe.balancer, model, encoders, num_classes=num_classes, **common, **options)
