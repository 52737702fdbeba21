"""Missing modalities: a dataset wrapper that blanks a modality per sample and returns the mask.

Real multimodal data has holes (a clip without its face track, a video without sound).
:func:`with_missing` simulates them on any dataset whose items are ``(audio, video, label,
...)``: a fixed, seeded set of samples loses one modality; its input is replaced by zeros and
the item carries a ``present`` row, ``(M,)`` bool (True = the modality's input is there), right
after the label: ``(audio, video, label, present, ...)``. A batch of such items has a ``(B, M)``
``present`` tensor, the form ``bal.loss(logits, target, present=...)`` takes; the model may
replace the zeros by a fill of its own (:class:`reference_models.missing_fill.MissingFill`).

The draw: for ``rates = {"audio": a, "video": v}`` exactly ``round(a N)`` samples lose audio and
``round((a + v) N) - round(a N)`` others lose video (disjoint sets of one seeded permutation), so
no sample loses every modality (the rates must sum to at most 1). The mask of a split is fixed
for the whole run (the same samples are incomplete at every epoch), as in the field's protocol
of training and testing at a missing rate eta.

Example:
    >>> from reference_models.data.synthetic import SyntheticAudioVisual
    >>> data = with_missing(SyntheticAudioVisual("test", size=10, seed=0), {"video": 0.3}, seed=0)
    >>> spectrogram, frames, label, present = data[0]
    >>> data.present.shape, int((~data.present[:, 1]).sum()), bool(data.present[:, 0].all())
    (torch.Size([10, 2]), 3, True)
    >>> absent = int((~data.present[:, 1]).nonzero()[0])
    >>> bool((data[absent][1] == 0).all()), data[absent][3].tolist()
    (True, [True, False])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

__all__ = [
    "MISSING_MODES",
    "MODE_SPLITS",
    "MissingModalities",
    "PresentCollate",
    "check_rates",
    "draw_present",
    "with_missing",
]

MISSING_MODES: tuple[str, ...] = ("train", "test", "both")
"""Where samples lose modalities: the training split only, validation and test only, or all."""

MODE_SPLITS: dict[str, frozenset[str]] = {
    "train": frozenset({"train"}),
    "test": frozenset({"val", "test"}),
    "both": frozenset({"train", "val", "test"}),
}
"""The splits each mode blanks; validation follows test (it estimates the test conditions)."""

_SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}


def check_rates(rates: Mapping[str, float], modalities: Sequence[str]) -> dict[str, float]:
    """``rates`` as a plain dict after checking it: known modalities, each rate in [0, 1), and
    a sum of at most 1 (each incomplete sample misses one modality).

    Example:
        >>> check_rates({"video": 0.5}, ("audio", "video"))
        {'video': 0.5}
    """
    if not isinstance(rates, Mapping):
        raise ValueError(f"missing rates are a table modality -> rate, got {rates!r}")
    unknown = sorted(set(rates) - set(modalities))
    if unknown:
        raise ValueError(
            f"missing rates name unknown modalities {unknown}; the modalities are "
            f"{list(modalities)} (e.g. missing.video=0.5)"
        )
    checked = {}
    for name, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"missing rate of {name} must be a number in [0, 1), got {rate!r}")
        checked[name] = float(rate)
    if sum(checked.values()) > 1 + 1e-9:
        raise ValueError(
            f"missing rates {checked} sum to more than 1: each incomplete sample misses one "
            "modality (a sample missing every modality carries no input)"
        )
    return checked


def draw_present(
    size: int, rates: Mapping[str, float], modalities: Sequence[str], seed: int
) -> torch.Tensor:
    """The ``(size, M)`` bool presence mask of :func:`with_missing`'s draw (columns in the
    order of ``modalities``): disjoint sets of one seeded permutation lose one modality each.

    Example:
        >>> present = draw_present(10, {"audio": 0.2, "video": 0.5}, ("audio", "video"), seed=1)
        >>> (~present).sum(dim=0).tolist(), bool(present.any(dim=1).all())
        ([2, 5], True)
    """
    rates = check_rates(rates, modalities)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    present = torch.ones(size, len(modalities), dtype=torch.bool)
    cumulative, start = 0.0, 0
    for column, name in enumerate(modalities):
        cumulative += rates.get(name, 0.0)
        end = min(size, round(cumulative * size))
        present[order[start:end], column] = False
        start = end
    return present


class MissingModalities(Dataset):
    """A dataset whose samples lose modalities: items ``(audio, video, label, present, ...)``.

    Built by :func:`with_missing` (see there). Absent inputs are zeros; ``present`` is the
    ``(N, M)`` mask of the whole split (all True when ``mode`` leaves this split complete).
    A dataset with ``tensors()`` (in-memory batches) keeps it: blanked copies plus the mask.
    """

    def __init__(
        self,
        dataset: Dataset,
        present: torch.Tensor,
        modalities: Sequence[str],
        rates: Mapping[str, float],
    ) -> None:
        self.dataset = dataset
        self.present = present
        self.modalities = tuple(modalities)
        self.rates = dict(rates)
        self._absent = [
            [index for index in range(len(modalities)) if not row[index]]
            for row in present.tolist()
        ]

    @property
    def num_classes(self) -> int:
        """The wrapped dataset's number of classes."""
        return self.dataset.num_classes  # type: ignore[attr-defined,no-any-return]

    @property
    def excluded(self) -> Any:
        """The wrapped dataset's left-out clips, if it reports them."""
        return getattr(self.dataset, "excluded", {})

    @property
    def tensors(self) -> Callable[[], tuple[torch.Tensor, ...]]:
        """``tensors() -> (audio, video, labels, present)``, absent inputs zeroed (copies);
        only when the wrapped dataset has ``tensors()``."""
        if not hasattr(self.dataset, "tensors"):
            raise AttributeError(f"{type(self.dataset).__name__} has no tensors()")
        return self._tensors

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        *inputs, labels = self.dataset.tensors()  # type: ignore[attr-defined]
        blanked = [
            torch.where(self.present[:, column].view(-1, *[1] * (x.dim() - 1)), x, 0)
            for column, x in enumerate(inputs)
        ]
        return (*blanked, labels, self.present)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        count = len(self.modalities)
        inputs = list(item[:count])
        for column in self._absent[index]:
            inputs[column] = torch.zeros_like(inputs[column])
        return (*inputs, item[count], self.present[index], *item[count + 1 :])


def with_missing(
    dataset: Dataset,
    rates: Mapping[str, float],
    *,
    seed: int,
    mode: str = "both",
    split: str | None = None,
    modalities: Sequence[str] = ("audio", "video"),
) -> MissingModalities:
    """``dataset`` with a seeded share of its samples missing a modality, and the mask.

    Args:
        dataset: items ``(input of each modality..., label, ...)`` in the order of
            ``modalities``.
        rates: ``{modality: rate}``, the share of samples that lose that modality (each in
            [0, 1), summing to at most 1: an incomplete sample misses one modality).
        seed: the draw's seed; each split draws its own samples from it.
        mode: ``"train"``, ``"test"`` or ``"both"``: the splits that lose modalities
            (:data:`MODE_SPLITS`; validation follows test). Other splits stay complete and
            still carry an all-True mask, so every batch has the same form.
        split: ``"train"``, ``"val"`` or ``"test"``; default ``dataset.split``.
        modalities: the names of the item's leading inputs.

    Returns:
        A :class:`MissingModalities` with items ``(audio, video, label, present, ...)``.

    Raises:
        ValueError: an unknown modality or mode, a rate outside [0, 1), rates summing past 1,
            or no split known.
    """
    if mode not in MISSING_MODES:
        raise ValueError(f"missing mode must be one of {list(MISSING_MODES)}, got {mode!r}")
    split = split if split is not None else getattr(dataset, "split", None)
    if split not in _SPLIT_OFFSETS:
        raise ValueError(
            f"with_missing needs the split ('train', 'val' or 'test'), got {split!r}: pass split="
        )
    rates = check_rates(rates, modalities)
    size = len(dataset)  # type: ignore[arg-type]
    if split in MODE_SPLITS[mode]:
        present = draw_present(size, rates, modalities, seed * 1000 + _SPLIT_OFFSETS[split])
    else:
        present = torch.ones(size, len(modalities), dtype=torch.bool)
    return MissingModalities(dataset, present, modalities, rates)


class PresentCollate:
    """Collate ``(audio, video, label, present)`` items: the wrapped collate (default:
    ``default_collate``) on ``(audio, video, label)``, the ``(B, M)`` mask inserted after the
    labels (before any padding masks the wrapped collate adds). Picklable for worker processes.

    Example:
        >>> items = [(torch.ones(2), torch.ones(3), 1, torch.tensor([True, False]))] * 4
        >>> audio, video, labels, present = PresentCollate()(items)
        >>> present.shape, labels.tolist()
        (torch.Size([4, 2]), [1, 1, 1, 1])
    """

    def __init__(self, collate: Callable[[Sequence[Any]], Any] | None = None) -> None:
        self.collate = collate

    def __call__(self, items: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
        collate = self.collate or default_collate
        batch = collate([item[:3] for item in items])
        present = torch.stack([item[3] for item in items])
        return (*batch[:3], present, *batch[3:])
