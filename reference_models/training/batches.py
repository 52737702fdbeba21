"""Mini-batches of a run: in-memory batches of generated sets, DataLoaders of prepared ones."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "MASK_NAMES",
    "InMemoryBatches",
    "make_loader",
    "padded_batch",
    "split_extras",
    "to_device",
]

MASK_NAMES: tuple[str, ...] = ("audio_padding_mask", "video_padding_mask")
"""The model's keyword names of the padding masks a batch may carry after its labels (and
after the presence mask, when the run has missing modalities)."""


class InMemoryBatches:
    """Shuffled mini-batches straight from a dataset's tensors (no per-item collation).

    For datasets with ``tensors() -> (audio, video, labels)`` (the generated set): each epoch
    draws one permutation from ``generator``, so the order is reproducible and resumable.
    ``drop_last`` leaves out a final incomplete batch.

    Example:
        >>> batches = InMemoryBatches([torch.arange(5)], 2, shuffle=False, drop_last=True)
        >>> len(batches), [b[0].tolist() for b in batches]
        (2, [[0, 1], [2, 3]])
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
        drop_last: bool = False,
    ) -> None:
        self.tensors = [t.to(device) if device is not None else t for t in tensors]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.size = self.tensors[0].shape[0]
        self.drop_last = drop_last

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // self.batch_size
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=self.generator)
        else:
            order = torch.arange(self.size)
        order = order.to(self.tensors[0].device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            yield tuple(t[index] for t in self.tensors)


def padded_batch(items: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[Any, ...]:
    """Collate variable-length ``(waveform, faces, label)`` items for the harness: zero-padded
    ``(waveform, faces, labels, waveform_mask, faces_mask)``, masks True = padded."""
    from reference_models.data.padding import pad_collate

    waveform, waveform_mask, faces, faces_mask, labels = pad_collate(items)
    return waveform, faces, labels, waveform_mask, faces_mask


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int,
    generator: torch.Generator | None,
    device: torch.device,
    collate: Callable[[Sequence[Any]], Any] | None = None,
) -> Any:
    """Batches of ``dataset``: shuffled with ``generator`` for training, in order otherwise.

    A dataset with ``tensors()`` and no workers gives :class:`InMemoryBatches`; any other a
    ``DataLoader`` with ``collate`` (e.g. :func:`padded_batch` for variable-length items).
    A final training batch of a single sample is dropped: batch statistics (BatchNorm in
    train mode, PMR's ``batch_norm``) are undefined for one sample. Worker processes are
    started with ``spawn`` (never ``fork`` from a process whose threads may hold locks) and
    kept for the whole run.
    """
    drop_last = train and len(dataset) % batch_size == 1
    if hasattr(dataset, "tensors") and workers == 0:
        return InMemoryBatches(
            dataset.tensors(),
            batch_size,
            shuffle=train,
            generator=generator,
            device=device if device.type == "cuda" else None,
            drop_last=drop_last,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        generator=generator,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        multiprocessing_context="spawn" if workers > 0 else None,
        drop_last=drop_last,
        collate_fn=collate,
    )


def to_device(
    batch: Sequence[Any], device: torch.device, *, carries_present: bool = False
) -> tuple[torch.Tensor, ...]:
    """``(audio, video, labels, [present,] *padding masks)`` on ``device`` (masks: see
    :data:`MASK_NAMES`; ``present``, the ``(B, M)`` presence mask, when ``carries_present``)."""
    audio, video, label, *extras = batch
    if len(extras) > len(MASK_NAMES) + carries_present:
        mask = "a presence mask and " if carries_present else ""
        raise ValueError(
            f"a batch is (audio, video, labels), {mask}at most {len(MASK_NAMES)} padding "
            f"masks, got {len(batch)} items"
        )
    tensors = (audio, video, torch.as_tensor(label), *extras)
    return tuple(x if x is None else x.to(device, non_blocking=True) for x in tensors)


def split_extras(
    extras: Sequence[Any], carries_present: bool
) -> tuple[torch.Tensor | None, tuple[Any, ...]]:
    """A batch's items after its labels as ``(present or None, padding masks)``.

    Example:
        >>> present = torch.ones(2, 2, dtype=torch.bool)
        >>> split_extras((present, None), carries_present=True)[1], split_extras((), False)
        ((None,), (None, ()))
    """
    if carries_present:
        return extras[0], tuple(extras[1:])
    return None, tuple(extras)
