"""Batching variable-length clips: zero-padding to the batch's longest item, with padding masks.

The Conformer setting's items have clip-dependent lengths (a waveform of ``S`` samples, ``T``
face-feature frames). :func:`pad_collate` pads each to the batch maximum with zeros and returns
boolean padding masks, ``True`` at padded positions: the convention of the reference encoders'
``padding_mask`` and of ``AudioVisualClassifier``'s ``audio_padding_mask`` /
``video_padding_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

__all__ = ["ConformerBatch", "pad_collate", "pad_sequences"]

ConformerBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(waveform (B, S), waveform_mask (B, S), faces (B, T, D), faces_mask (B, T), labels (B,))``;
masks are bool, True = padded."""


def pad_sequences(sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(L_i, ...)`` tensors into ``(B, max L_i, ...)`` zero-padded, and the padding mask.

    Returns:
        ``(padded, mask)`` with ``mask[i, t]`` True where ``t >= L_i`` (a padded position).

    Raises:
        ValueError: a sequence is empty (it would have no valid position).

    Example:
        >>> padded, mask = pad_sequences([torch.ones(3), torch.ones(1)])
        >>> padded
        tensor([[1., 1., 1.],
                [1., 0., 0.]])
        >>> mask
        tensor([[False, False, False],
                [False,  True,  True]])
    """
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    if bool((lengths == 0).any()):
        empty = torch.nonzero(lengths == 0)[:, 0].tolist()
        raise ValueError(
            f"cannot pad a batch with empty sequences (items {empty} have length 0): every clip "
            "needs at least one sample and one frame"
        )
    padded = pad_sequence(list(sequences), batch_first=True)
    mask = torch.arange(padded.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
    return padded, mask


def pad_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> ConformerBatch:
    """``DataLoader`` collate of ``(waveform (S,), faces (T, D), label)`` items.

    Returns:
        ``(waveform (B, S_max), waveform_mask (B, S_max), faces (B, T_max, D),
        faces_mask (B, T_max), labels (B,) int64)``; the masks are bool, True = padded, so a
        model is called as ``model(waveform, faces, audio_padding_mask=waveform_mask,
        video_padding_mask=faces_mask)``.

    Example:
        >>> items = [(torch.ones(5), torch.ones(2, 3), 1), (torch.ones(4), torch.ones(3, 3), 0)]
        >>> waveform, waveform_mask, faces, faces_mask, labels = pad_collate(items)
        >>> waveform.shape, faces.shape, labels.tolist()
        (torch.Size([2, 5]), torch.Size([2, 3, 3]), [1, 0])
        >>> waveform_mask.sum(dim=1).tolist(), faces_mask.sum(dim=1).tolist()
        ([0, 1], [1, 0])
    """
    waveforms, faces, labels = zip(*batch)
    waveform, waveform_mask = pad_sequences(waveforms)
    face_features, faces_mask = pad_sequences(faces)
    return waveform, waveform_mask, face_features, faces_mask, torch.tensor(labels)
