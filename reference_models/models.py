"""Model factory: the paper's audio-visual classifiers, by dataset, backbone and fusion.

``build_model("cremad", "resnet18", "linear")`` returns an :class:`AudioVisualClassifier` whose
encoders are the attributes ``model.audio`` and ``model.video`` and whose head is
``model.fusion``, ready for a balancer::

    model = build_model("cremad", "resnet18", "linear")
    bal = gb.MLB(model, encoders=[model.audio, model.video], num_classes=6)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reference_models.encoders import (
    ConformerEncoder,
    ResNet18AudioEncoder,
    ResNet18VideoEncoder,
    masked_mean,
)
from reference_models.fusion import build_fusion
from reference_models.missing_fill import MISSING_FILLS, MissingFill
from reference_models.wav2vec2 import Wav2Vec2ConformerEncoder

__all__ = ["BACKBONES", "NUM_CLASSES", "AudioVisualClassifier", "build_model"]

NUM_CLASSES: dict[str, int] = {"cremad": 6, "ave": 28, "ucf101": 51}
"""Default number of classes of each dataset."""

BACKBONES = ("resnet18", "conformer")
"""``resnet18``: spectrogram + frames (all datasets). ``conformer``: wav2vec2 waveform + face
features (the CREMA-D Conformer setting)."""


class AudioVisualClassifier(nn.Module):
    """Two encoders and a fusion head: ``model(audio, video) -> logits (B, K)``.

    Each encoder returns pooled features ``(B, D)``, or token sequences ``(B, T, D)`` when the
    head is the Transformer fusion; a balancer then needs ``pool="tokens"`` for those encoders,
    e.g. ``gb.MLB(model, encoders=[model.audio, model.video], num_classes=K, pool="tokens")``.
    Encoders that take variable-length inputs (the Conformer ones) accept padding masks
    (``(B, length)`` bool, True = padded) through the keyword arguments of :meth:`forward`.
    Samples missing a modality (``present``, ``(B, 2)`` bool, True = there) reach the fusion
    head through the ``missing_fill`` (:mod:`reference_models.missing_fill`).

    Args:
        audio: audio encoder (``encoder(x, padding_mask=None)``, ``token_padding_mask``).
        video: video encoder, same interface.
        fusion: fusion head called as ``fusion(audio_features, video_features)``.
        missing_fill: ``"input"`` (the encoder's output of the zero input), ``"zero"`` or
            ``"learned"`` (the absent rows' features replaced after the encoder).

    Example:
        >>> from reference_models.encoders import ResNet18AudioEncoder, ResNet18VideoEncoder
        >>> from reference_models.fusion import LateLinear
        >>> model = AudioVisualClassifier(ResNet18AudioEncoder(width=8),
        ...                               ResNet18VideoEncoder(width=8), LateLinear([64, 64], 6))
        >>> model(torch.randn(2, 257, 188), torch.randn(2, 3, 3, 64, 64)).shape
        torch.Size([2, 6])
    """

    def __init__(
        self, audio: nn.Module, video: nn.Module, fusion: nn.Module, missing_fill: str = "input"
    ) -> None:
        super().__init__()
        if missing_fill not in MISSING_FILLS:
            raise ValueError(
                f"missing_fill must be one of {list(MISSING_FILLS)}, got {missing_fill!r}"
            )
        takes_tokens = getattr(fusion, "takes_tokens", False)
        wanted = "token sequences" if takes_tokens else "pooled features"
        for name, encoder in (("audio", audio), ("video", video)):
            returns_tokens = getattr(encoder, "return_tokens", False)
            if returns_tokens != takes_tokens:
                given = "token sequences" if returns_tokens else "pooled features"
                raise ValueError(
                    f"the {name} encoder returns {given} but {type(fusion).__name__} takes "
                    f"{wanted}; build the encoder with return_tokens={takes_tokens}"
                )
        self.audio = audio
        self.video = video
        self.fusion = fusion
        self.takes_tokens = takes_tokens
        self.missing_fill = missing_fill
        self.fill = (
            None
            if missing_fill == "input"
            else MissingFill([audio.feature_dim, video.feature_dim], missing_fill)
        )
        self._last_batch: tuple[torch.Tensor | None, ...] | None = None
        self.token_padding_masks: dict[str, torch.Tensor | None] = {}

    def forward(
        self,
        audio: torch.Tensor,
        video: torch.Tensor,
        *,
        audio_padding_mask: torch.Tensor | None = None,
        video_padding_mask: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, K)`` of one batch; padding masks only for the Conformer encoders;
        ``present`` ``(B, 2)`` bool (audio, video; True = there) for samples missing a modality.

        The batch is kept (by reference) until the next forward, for :meth:`forward_masked`.
        """
        self._last_batch = (audio, video, audio_padding_mask, video_padding_mask, present)
        return self._logits(audio, video, audio_padding_mask, video_padding_mask, present)

    def pooled_tokens(self, modality: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """A balancer's ``features`` callable for token-returning encoders (Transformer
        fusion): the mean of ``modality``'s valid tokens in the last forward, padding left out.

        Example:
            >>> from reference_models.encoders import ResNet18AudioEncoder, ResNet18VideoEncoder
            >>> from reference_models.fusion import TransformerFusion
            >>> audio = ResNet18AudioEncoder(width=2, return_tokens=True)
            >>> video = ResNet18VideoEncoder(width=2, return_tokens=True)
            >>> head = TransformerFusion([16, 16], 6, num_heads=2)
            >>> model = AudioVisualClassifier(audio, video, head)
            >>> logits = model(torch.randn(2, 65, 63), torch.randn(2, 3, 2, 32, 32))
            >>> model.pooled_tokens("audio")(torch.ones(2, 5, 16)).shape
            torch.Size([2, 16])
        """
        if modality not in ("audio", "video"):
            raise ValueError(f"pooled_tokens: unknown modality {modality!r}")

        def pool(tokens: torch.Tensor) -> torch.Tensor:
            return masked_mean(tokens, self.token_padding_masks.get(modality))

        return pool

    def forward_masked(self, masked: Collection[str]) -> torch.Tensor:
        """The logits of the last forward's batch with the inputs of ``masked`` zeroed.

        AGM's input masking (the official code re-runs the whole model on the batch with a
        modality's input set to zero): ``gb.AGM(..., masking="input",
        forward_masked=model.forward_masked)``. Padding masks and ``present`` are kept.

        Args:
            masked: the modalities to zero, among ``"audio"`` and ``"video"``.

        Raises:
            ValueError: an unknown modality name.
            RuntimeError: no forward has run yet.

        Example:
            >>> from reference_models.encoders import ResNet18AudioEncoder, ResNet18VideoEncoder
            >>> from reference_models.fusion import LateLinear
            >>> audio, video = ResNet18AudioEncoder(width=4), ResNet18VideoEncoder(width=4)
            >>> model = AudioVisualClassifier(audio, video, LateLinear([32, 32], 6))
            >>> logits = model(torch.randn(2, 65, 63), torch.randn(2, 3, 2, 32, 32))
            >>> model.forward_masked({"audio"}).shape
            torch.Size([2, 6])
        """
        unknown = set(masked) - {"audio", "video"}
        if unknown:
            raise ValueError(f"forward_masked: unknown modalities {sorted(unknown)}")
        if self._last_batch is None:
            raise RuntimeError("forward_masked re-runs the last batch: call the model first")
        audio, video, audio_mask, video_mask, present = self._last_batch
        audio = torch.zeros_like(audio) if "audio" in masked else audio
        video = torch.zeros_like(video) if "video" in masked else video
        return self._logits(audio, video, audio_mask, video_mask, present)

    def _logits(
        self,
        audio: torch.Tensor,
        video: torch.Tensor,
        audio_padding_mask: torch.Tensor | None,
        video_padding_mask: torch.Tensor | None,
        present: torch.Tensor | None,
    ) -> torch.Tensor:
        audio_features = self.audio(audio, padding_mask=audio_padding_mask)
        video_features = self.video(video, padding_mask=video_padding_mask)
        if self.fill is not None and present is not None:
            audio_features, video_features = self.fill([audio_features, video_features], present)
        if not self.takes_tokens:
            return self.fusion(audio_features, video_features)
        masks = [
            self.audio.token_padding_mask(audio_padding_mask),
            self.video.token_padding_mask(video_padding_mask),
        ]
        self.token_padding_masks = {"audio": masks[0], "video": masks[1]}
        return self.fusion(audio_features, video_features, padding_masks=masks)


def _wav2vec2_weights(checkpoint: str | Path | None) -> Path | None:
    """The checkpoint path of the wav2vec2 front end, or ``None`` for ``"random"`` (warned)."""
    if checkpoint is None:
        raise ValueError(
            "the conformer backbone needs wav2vec2_checkpoint: the path of a local torchaudio "
            "state dict of wav2vec2-large-robust (see the README for the one-time conversion "
            "from the Hugging Face weights), or 'random' for a smoke test"
        )
    if str(checkpoint) == "random":
        warnings.warn(
            "wav2vec2 front end with RANDOM weights (wav2vec2_checkpoint='random'): fine for "
            "smoke tests, meaningless for results",
            stacklevel=3,
        )
        return None
    return Path(checkpoint)


def build_model(
    dataset: str,
    backbone: str = "resnet18",
    fusion: str = "linear",
    num_classes: int | None = None,
    width: int = 64,
    *,
    wav2vec2_checkpoint: str | Path | None = None,
    audio_options: Mapping[str, Any] | None = None,
    video_options: Mapping[str, Any] | None = None,
    fusion_options: Mapping[str, Any] | None = None,
    missing_fill: str = "input",
) -> AudioVisualClassifier:
    """Build one of the paper's reference models.

    Args:
        dataset: ``cremad``, ``ave`` or ``ucf101``; sets the default ``num_classes``
            (6, 28, 51).
        backbone: ``resnet18`` (spectrogram ``(B, F, T)`` and frames ``(B, 3, T, H, W)``) or
            ``conformer`` (16 kHz waveform ``(B, S)`` through wav2vec2, and face features
            ``(B, T, 1408)``).
        fusion: ``linear`` (Late-Linear), ``mlp``, ``film``, ``gated``, ``tf`` (Transformer
            fusion; the encoders then return token sequences) or ``mmcosine``.
        num_classes: overrides the dataset's number of classes.
        width: ResNet-18 base width (64 = the paper's model, 512-d features; 8 or 16 give a
            reduced-width model for CPU demos). Ignored by the Conformer backbone.
        wav2vec2_checkpoint: the Conformer backbone's wav2vec2-large-robust weights: a local
            torchaudio ``Wav2Vec2Model`` state dict (never downloaded; converted once from the
            Hugging Face model, see
            :func:`~reference_models.wav2vec2.build_wav2vec2_front_end`), or ``"random"`` for
            random weights (smoke tests only; warns). Required for that backbone unless
            ``audio_options`` passes a built ``front_end``.
        audio_options: extra keyword options of the audio encoder.
        video_options: extra keyword options of the video encoder.
        fusion_options: extra keyword options of the fusion head (e.g. ``{"scale": 8}`` for
            ``mmcosine``).
        missing_fill: what the fusion head sees for a missing modality: ``"input"``,
            ``"zero"`` or ``"learned"`` (:mod:`reference_models.missing_fill`).

    Returns:
        An :class:`AudioVisualClassifier` with attributes ``audio``, ``video`` and ``fusion``.

    Example:
        >>> model = build_model("cremad", "resnet18", "film", width=8)
        >>> model(torch.randn(2, 257, 188), torch.randn(2, 3, 3, 64, 64)).shape
        torch.Size([2, 6])
    """
    if dataset not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(NUM_CLASSES)}")
    num_classes = NUM_CLASSES[dataset] if num_classes is None else num_classes
    return_tokens = fusion == "tf"
    audio_options = {"return_tokens": return_tokens, **(audio_options or {})}
    video_options = {"return_tokens": return_tokens, **(video_options or {})}
    if backbone == "resnet18":
        audio = ResNet18AudioEncoder(width=width, **audio_options)
        video = ResNet18VideoEncoder(width=width, **video_options)
    elif backbone == "conformer":
        if "front_end" not in audio_options:
            audio_options["checkpoint"] = _wav2vec2_weights(wav2vec2_checkpoint)
        elif wav2vec2_checkpoint is not None:
            raise ValueError("pass either wav2vec2_checkpoint or a built front_end, not both")
        audio = Wav2Vec2ConformerEncoder(**audio_options)
        video = ConformerEncoder(**video_options)
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")
    head = build_fusion(
        fusion, [audio.feature_dim, video.feature_dim], num_classes, **(fusion_options or {})
    )
    return AudioVisualClassifier(audio, video, head, missing_fill)
