"""The audio encoder of the Conformer setting: a wav2vec2-large-robust front end, then a Conformer.

:func:`build_wav2vec2_front_end` builds the front end with ``torchaudio.models.wav2vec2_model``
(the architecture of ``facebook/wav2vec2-large-robust``, truncated to its first 12 transformer
layers) and loads local weights; :class:`Wav2Vec2ConformerEncoder` puts the
:class:`~reference_models.encoders.ConformerEncoder` of the recipe on top. It
shares the encoders' interface: ``encoder(waveform, padding_mask=None)`` and
``token_padding_mask(padding_mask)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchaudio.models import Wav2Vec2Model, wav2vec2_model

from reference_models.encoders import ConformerEncoder, check_padding_mask

__all__ = ["Wav2Vec2ConformerEncoder", "build_wav2vec2_front_end"]


def build_wav2vec2_front_end(
    num_layers: int = 12,
    checkpoint: str | Path | None = None,
    *,
    embed_dim: int = 1024,
    num_heads: int = 16,
    ffn_dim: int = 4096,
    conv_layers: list[tuple[int, int, int]] | None = None,
    pos_conv_kernel: int = 128,
    pos_conv_groups: int = 16,
    dropout: float = 0.1,
    layer_drop: float = 0.1,
) -> Wav2Vec2Model:
    """Build the wav2vec2-large-robust front end with ``torchaudio.models.wav2vec2_model``.

    The defaults are the architecture of ``facebook/wav2vec2-large-robust`` (layer-norm feature
    extractor, pre-norm transformer) truncated to its first ``num_layers`` (12) transformer
    layers, as the VAVL recipe keeps. Weights are never downloaded: without ``checkpoint`` the
    model is randomly initialised; with it, a ``state_dict`` of a torchaudio ``Wav2Vec2Model`` is
    loaded from that local file, dropping its transformer layers beyond ``num_layers`` and any
    ``aux`` (CTC) head. To make such a file from the Hugging Face model once, offline::

        from transformers import Wav2Vec2Model as HFWav2Vec2
        from torchaudio.models.wav2vec2.utils import import_huggingface_model
        hf = HFWav2Vec2.from_pretrained("facebook/wav2vec2-large-robust")
        torch.save(import_huggingface_model(hf).state_dict(), "wav2vec2_large_robust.pt")

    Args:
        num_layers: transformer layers kept.
        checkpoint: local path of a torchaudio ``Wav2Vec2Model`` state dict, or ``None``.
        embed_dim: transformer width.
        num_heads: attention heads.
        ffn_dim: transformer feed-forward width.
        conv_layers: feature-extractor ``(channels, kernel, stride)`` list; ``None`` is
            wav2vec 2.0's (20 ms frames at 16 kHz).
        pos_conv_kernel: convolutional positional embedding kernel.
        pos_conv_groups: its groups (must divide ``embed_dim``).
        dropout: attention, projection and residual dropout.
        layer_drop: LayerDrop probability during training.

    Returns:
        The front end; ``front_end(waveform, lengths)`` gives ``(B, frames, embed_dim)``.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: the checkpoint does not fit this architecture.

    Example:
        >>> tiny = build_wav2vec2_front_end(2, embed_dim=32, num_heads=2, ffn_dim=64,
        ...                                 conv_layers=[(16, 10, 5), (16, 3, 2)],
        ...                                 pos_conv_kernel=16, pos_conv_groups=4)
        >>> tiny(torch.randn(1, 1600))[0].shape
        torch.Size([1, 159, 32])
    """
    front_end = wav2vec2_model(
        extractor_mode="layer_norm",
        extractor_conv_layer_config=conv_layers,
        extractor_conv_bias=True,
        encoder_embed_dim=embed_dim,
        encoder_projection_dropout=dropout,
        encoder_pos_conv_kernel=pos_conv_kernel,
        encoder_pos_conv_groups=pos_conv_groups,
        encoder_num_layers=num_layers,
        encoder_num_heads=num_heads,
        encoder_attention_dropout=dropout,
        encoder_ff_interm_features=ffn_dim,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=dropout,
        encoder_layer_norm_first=True,
        encoder_layer_drop=layer_drop,
        aux_num_out=None,
    )
    if checkpoint is not None:
        _load_front_end(front_end, Path(checkpoint), num_layers)
    return front_end


def _load_front_end(front_end: Wav2Vec2Model, path: Path, num_layers: int) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"wav2vec2 checkpoint {path} does not exist; pass the path of a local torchaudio "
            "Wav2Vec2Model state_dict (see build_wav2vec2_front_end), or None for random weights"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    kept_prefixes = tuple(f"encoder.transformer.layers.{i}." for i in range(num_layers))
    state = {
        key: value
        for key, value in state.items()
        if not key.startswith("aux.")
        and (not key.startswith("encoder.transformer.layers.") or key.startswith(kept_prefixes))
    }
    try:
        front_end.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"wav2vec2 checkpoint {path} does not match the front-end architecture "
            f"(check embed_dim, conv_layers and that it has >= {num_layers} layers): {error}"
        ) from error


class Wav2Vec2ConformerEncoder(nn.Module):
    """Audio encoder of the Conformer setting: wav2vec2 front end, then a :class:`ConformerEncoder`.

    A raw 16 kHz waveform ``(B, S)`` (z-normalised with training-fold statistics, zero-padded to
    the batch's longest clip) goes through the wav2vec2 front end (its CNN feature extractor
    frozen by default; the transformer layers are fine-tuned), giving about 50 frames per second,
    then through the same bias-free bottleneck, projection, Conformer blocks and masked mean as
    the face encoder. Batch-first with padding masks: the official code's
    time-first batch mixing is not reproduced.

    Args:
        front_end: a torchaudio ``Wav2Vec2Model``; ``None`` builds one with
            :func:`build_wav2vec2_front_end` (``checkpoint``, ``front_end_layers``,
            ``front_end_options``).
        checkpoint: local wav2vec2 checkpoint for the built front end (``None``: random).
        front_end_layers: transformer layers kept in the built front end.
        front_end_options: other architecture options of :func:`build_wav2vec2_front_end`
            (``None``: wav2vec2-large-robust's); a smaller one serves CPU smoke tests.
        freeze_feature_extractor: keep the CNN feature extractor fixed, as the recipe does.
        **conformer_options: options of :class:`ConformerEncoder` (``model_dim``,
            ``num_layers``, ``return_tokens``, ...).

    Example:
        >>> tiny = build_wav2vec2_front_end(1, embed_dim=32, num_heads=2, ffn_dim=64,
        ...                                 conv_layers=[(16, 10, 5), (16, 3, 2)],
        ...                                 pos_conv_kernel=16, pos_conv_groups=4)
        >>> encoder = Wav2Vec2ConformerEncoder(tiny, model_dim=16, num_layers=1, num_heads=2)
        >>> wave = torch.randn(2, 1600)
        >>> mask = torch.arange(1600) >= torch.tensor([[1600], [1000]])
        >>> encoder(wave, padding_mask=mask).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        front_end: Wav2Vec2Model | None = None,
        *,
        checkpoint: str | Path | None = None,
        front_end_layers: int = 12,
        front_end_options: Mapping[str, Any] | None = None,
        freeze_feature_extractor: bool = True,
        **conformer_options: object,
    ) -> None:
        super().__init__()
        if front_end is None:
            front_end = build_wav2vec2_front_end(
                front_end_layers, checkpoint, **(front_end_options or {})
            )
        elif checkpoint is not None or front_end_options is not None:
            raise ValueError(
                "pass either a built front_end or the checkpoint and options of one to build, "
                "not both"
            )
        self.front_end = front_end
        if freeze_feature_extractor:
            self.front_end.feature_extractor.requires_grad_(False)
        embed_dim = front_end.encoder.feature_projection.projection.out_features
        self.conformer = ConformerEncoder(embed_dim, **conformer_options)
        self.feature_dim = self.conformer.feature_dim
        self.return_tokens = self.conformer.return_tokens

    def forward(
        self, waveform: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encode ``(B, S)`` waveforms; ``padding_mask`` is ``(B, S)`` bool, True = padded."""
        if waveform.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} expects (batch, samples) waveforms, got "
                f"{tuple(waveform.shape)}"
            )
        lengths = None
        if padding_mask is not None:
            check_padding_mask(padding_mask, *waveform.shape, type(self).__name__)
            lengths = (~padding_mask).sum(dim=1)
        frames, _ = self.front_end(waveform, lengths)
        return self.conformer(frames, self.token_padding_mask(padding_mask))

    def token_padding_mask(self, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The ``(B, frames)`` padding mask of the front end's output for a ``(B, S)`` mask."""
        if padding_mask is None:
            return None
        lengths = (~padding_mask).sum(dim=1)
        total = torch.tensor(padding_mask.shape[1], device=padding_mask.device)
        for layer in self.front_end.feature_extractor.conv_layers:
            lengths = ((lengths - layer.kernel_size) // layer.stride + 1).clamp_min(0)
            total = (total - layer.kernel_size) // layer.stride + 1
        positions = torch.arange(int(total), device=padding_mask.device)
        return positions.unsqueeze(0) >= lengths.unsqueeze(1)
