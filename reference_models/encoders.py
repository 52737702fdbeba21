"""Reference encoders of the paper: ResNet-18 (audio spectrogram, video frames) and Conformers.

Every encoder maps one modality to either pooled features ``(B, feature_dim)`` or, with
``return_tokens=True``, the unpooled token sequence ``(B, tokens, feature_dim)`` that the
Transformer fusion needs. All encoders share the call signature
``encoder(x, padding_mask=None)`` and the method ``token_padding_mask(padding_mask)``, so a model
can treat them alike.

The ResNet-18 encoders are assembled from ``torchvision``'s ``BasicBlock`` and trained from
scratch (no downloaded weights). The Conformer encoders use ``torchaudio.models.Conformer``
batch-first, with padding masks. The official MLB/VAVL code feeds ``(time, batch, dim)`` to a
batch-first Conformer, so attention, the depthwise convolution and BatchNorm mix the samples of a
mini-batch at each time index; the encoders here do not copy that bug.
The wav2vec2 audio encoder of the Conformer setting is in :mod:`reference_models.wav2vec2`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchaudio.models import Conformer
from torchvision.models.resnet import BasicBlock, conv1x1

__all__ = [
    "ConformerEncoder",
    "MaskedConformer",
    "ResNet18AudioEncoder",
    "ResNet18VideoEncoder",
    "check_padding_mask",
    "masked_mean",
]


def _resnet18_body(in_channels: int, width: int) -> nn.Sequential:
    """ResNet-18 without its pooling and classifier, base width ``width`` (64 = torchvision's).

    Initialised as the MLB code: convolutions kaiming-normal (fan_out, relu),
    BatchNorm weights ~ N(1, 0.02) and biases 0.
    """
    if width < 1:
        raise ValueError(f"width must be a positive channel count (64 = ResNet-18), got {width}")
    stem = [
        ("conv1", nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)),
        ("bn1", nn.BatchNorm2d(width)),
        ("relu", nn.ReLU(inplace=True)),
        ("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]
    stages = []
    channels = width
    for index, out_channels in enumerate((width, 2 * width, 4 * width, 8 * width)):
        stride = 1 if index == 0 else 2
        downsample = None
        if stride != 1 or channels != out_channels:
            downsample = nn.Sequential(
                conv1x1(channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )
        blocks = nn.Sequential(
            BasicBlock(channels, out_channels, stride, downsample),
            BasicBlock(out_channels, out_channels),
        )
        stages.append((f"layer{index + 1}", blocks))
        channels = out_channels
    body = nn.Sequential(OrderedDict(stem + stages))
    for module in body.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, mean=1.0, std=0.02)
            nn.init.zeros_(module.bias)
    return body


def _no_padding(padding_mask: torch.Tensor | None, encoder: str) -> None:
    if padding_mask is not None:
        raise ValueError(
            f"{encoder} takes fixed-size inputs and no padding_mask; pad or crop the inputs "
            "to one size instead (the datasets already do)"
        )


class ResNet18AudioEncoder(nn.Module):
    """ResNet-18 on a log-magnitude spectrogram ``(B, F, T)`` with a one-channel stem.

    The spectrogram is treated as a one-channel image. The output feature map ``(B, C, h, w)``
    (C = 8·width; 9×6 for CREMA-D's 257×188 input) is average-pooled to ``(B, C)``, or returned
    as ``h·w`` tokens ``(B, h·w, C)`` with ``return_tokens=True``.

    Args:
        width: base channel count; 64 is the real ResNet-18 (512-d features), smaller values
            give a reduced-width model whose feature dimension is ``8 * width``.
        return_tokens: return the unpooled token grid instead of pooled features.

    Example:
        >>> encoder = ResNet18AudioEncoder(width=8)
        >>> encoder(torch.randn(2, 257, 188)).shape
        torch.Size([2, 64])
        >>> ResNet18AudioEncoder(width=8, return_tokens=True)(torch.randn(2, 257, 188)).shape
        torch.Size([2, 54, 64])
    """

    def __init__(self, width: int = 64, return_tokens: bool = False) -> None:
        super().__init__()
        self.body = _resnet18_body(1, width)
        self.feature_dim = 8 * width
        self.return_tokens = return_tokens

    def forward(
        self, spectrogram: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encode ``(B, F, T)`` spectrograms into ``(B, C)`` or tokens ``(B, h·w, C)``."""
        _no_padding(padding_mask, type(self).__name__)
        if spectrogram.dim() != 3:
            raise ValueError(
                f"{type(self).__name__} expects a (batch, frequency, time) spectrogram, got "
                f"shape {tuple(spectrogram.shape)}"
            )
        feature_map = self.body(spectrogram.unsqueeze(1))
        if self.return_tokens:
            return feature_map.flatten(2).transpose(1, 2)
        return feature_map.mean(dim=(2, 3))

    def token_padding_mask(self, padding_mask: torch.Tensor | None) -> None:
        """Always ``None``: every spectrogram token is valid."""
        _no_padding(padding_mask, type(self).__name__)


class ResNet18VideoEncoder(nn.Module):
    """ResNet-18 applied to each frame of a clip ``(B, 3, T, H, W)``, average-pooled over time.

    Frames are folded into the batch, go through one shared 2-D ResNet-18, and the maps
    ``(B, T, C, h, w)`` are average-pooled over time and space to ``(B, C)``; with
    ``return_tokens=True`` they become ``T·h·w`` tokens ``(B, T·h·w, C)`` in time-major order
    (147 tokens for 3 frames of 224×224).

    Args:
        width: base channel count; 64 is the real ResNet-18 (512-d features).
        return_tokens: return the unpooled token grid instead of pooled features.

    Example:
        >>> encoder = ResNet18VideoEncoder(width=8)
        >>> encoder(torch.randn(2, 3, 3, 64, 64)).shape
        torch.Size([2, 64])
        >>> ResNet18VideoEncoder(width=8, return_tokens=True)(torch.randn(2, 3, 3, 64, 64)).shape
        torch.Size([2, 12, 64])
    """

    def __init__(self, width: int = 64, return_tokens: bool = False) -> None:
        super().__init__()
        self.body = _resnet18_body(3, width)
        self.feature_dim = 8 * width
        self.return_tokens = return_tokens

    def forward(
        self, frames: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encode ``(B, 3, T, H, W)`` clips into ``(B, C)`` or tokens ``(B, T·h·w, C)``."""
        _no_padding(padding_mask, type(self).__name__)
        if frames.dim() != 5 or frames.shape[1] != 3:
            hint = ""
            if frames.dim() == 5 and frames.shape[2] == 3:
                hint = "; it looks like (B, T, 3, H, W): use frames.transpose(1, 2)"
            raise ValueError(
                f"{type(self).__name__} expects clips of shape (batch, 3, time, height, width), "
                f"got {tuple(frames.shape)}{hint}"
            )
        batch, channels, time, height, width = frames.shape
        folded = frames.transpose(1, 2).reshape(batch * time, channels, height, width)
        feature_map = self.body(folded)
        feature_map = feature_map.view(batch, time, *feature_map.shape[1:])
        if self.return_tokens:
            return feature_map.permute(0, 1, 3, 4, 2).reshape(batch, -1, feature_map.shape[2])
        return feature_map.mean(dim=(1, 3, 4))

    def token_padding_mask(self, padding_mask: torch.Tensor | None) -> None:
        """Always ``None``: every frame token is valid."""
        _no_padding(padding_mask, type(self).__name__)


def masked_mean(tokens: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of ``(B, T, D)`` tokens, ignoring positions where ``padding_mask`` is True.

    Example:
        >>> x = torch.tensor([[[1.0], [3.0], [100.0]]])
        >>> masked_mean(x, torch.tensor([[False, False, True]]))
        tensor([[2.]])
    """
    if padding_mask is None:
        return tokens.mean(dim=1)
    keep = (~padding_mask).unsqueeze(-1).to(tokens.dtype)
    return (tokens * keep).sum(dim=1) / keep.sum(dim=1)


def check_padding_mask(padding_mask: torch.Tensor, batch: int, length: int, what: str) -> None:
    """Raise ``ValueError`` unless ``padding_mask`` is ``(batch, length)`` bool with a valid
    (False) position in every row; ``what`` names the caller in the message."""
    if padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != (batch, length):
        raise ValueError(
            f"{what}: padding_mask must be a bool tensor of shape {(batch, length)} "
            f"(True = padded), got {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )
    if bool(padding_mask.all(dim=1).any()):
        raise ValueError(f"{what}: every sequence needs at least one valid (unpadded) position")


class MaskedConformer(nn.Module):
    """``torchaudio.models.Conformer``, batch-first, with an arbitrary key-padding mask.

    torchaudio's Conformer masks padding only inside self-attention; its depthwise convolution
    still reads the padded frames next to the valid ones. This wrapper runs the same layers with
    any boolean ``padding_mask`` (True = padded, anywhere in the sequence) and zeroes the padded
    frames right before every depthwise convolution, so in eval mode a sample's valid outputs do
    not depend on how much padding follows it, nor on the other samples of the batch. Padded
    output positions are set to 0. (In train mode BatchNorm uses batch statistics, as usual.)
    There is no positional encoding: torchaudio's Conformer relies on the depthwise convolution
    for position (the VAVL copy uses relative positional attention).

    Args:
        dim: token width.
        num_layers: number of Conformer blocks.
        num_heads: attention heads (must divide ``dim``).
        ffn_dim: feed-forward hidden width; ``None`` gives ``4 * dim``.
        kernel_size: depthwise convolution kernel (odd).
        dropout: dropout probability inside the blocks.

    Example:
        >>> conformer = MaskedConformer(dim=16, num_layers=1, num_heads=2).eval()
        >>> x = torch.randn(2, 7, 16)
        >>> mask = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
        >>> conformer(x, mask).shape
        torch.Size([2, 7, 16])
    """

    def __init__(
        self,
        dim: int,
        num_layers: int,
        num_heads: int = 8,
        ffn_dim: int | None = None,
        kernel_size: int = 31,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        self.conformer = Conformer(
            input_dim=dim,
            num_heads=num_heads,
            ffn_dim=4 * dim if ffn_dim is None else ffn_dim,
            num_layers=num_layers,
            depthwise_conv_kernel_size=kernel_size,
            dropout=dropout,
        )
        self._keep: torch.Tensor | None = None
        for layer in self.conformer.conformer_layers:
            glu = layer.conv_module.sequential[1]
            if not isinstance(glu, nn.GLU):
                raise RuntimeError(
                    "this torchaudio version's Conformer layout is not the one MaskedConformer "
                    "was written for (expected a GLU before the depthwise convolution)"
                )
            glu.register_forward_hook(self._zero_padded_frames)

    def _zero_padded_frames(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        # The GLU output is (B, C, T); padded frames become 0 before the depthwise convolution.
        return None if self._keep is None else output * self._keep

    def forward(
        self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the Conformer on ``(B, T, dim)`` tokens; ``padding_mask`` is ``(B, T)`` bool."""
        if tokens.dim() != 3:
            raise ValueError(f"expected (batch, time, dim) tokens, got {tuple(tokens.shape)}")
        if padding_mask is not None:
            check_padding_mask(padding_mask, tokens.shape[0], tokens.shape[1], "MaskedConformer")
            self._keep = (~padding_mask).unsqueeze(1).to(tokens.dtype)
        x = tokens.transpose(0, 1)
        try:
            for layer in self.conformer.conformer_layers:
                x = layer(x, padding_mask)
        finally:
            self._keep = None
        x = x.transpose(0, 1)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return x


class ConformerEncoder(nn.Module):
    """Conformer over per-frame feature sequences: the face-feature encoder of the VAVL recipe.

    ``(B, T, input_dim)`` features (default: 1408-d EfficientNet-B2 face features per frame,
    z-normalised with training-fold statistics) go through a bias-free 1×1 projection to
    ``bottleneck_dim`` (50), a linear projection to ``model_dim`` (512) with dropout, and
    ``num_layers`` (5) :class:`MaskedConformer` blocks; the result is mean-pooled over the valid
    frames to ``(B, model_dim)``.

    Batch-first throughout, unlike the official code, which feeds ``(time, batch, dim)`` and so
    mixes samples of a mini-batch: here each sample is encoded on its
    own, and padded frames are masked in attention, zeroed before every convolution and left out
    of the mean.

    Args:
        input_dim: width of each frame's feature vector.
        bottleneck_dim: width of the bias-free input projection.
        model_dim: Conformer width (the feature dimension).
        num_layers: number of Conformer blocks.
        num_heads: attention heads.
        kernel_size: depthwise convolution kernel.
        dropout: dropout after the input projection and inside the blocks.
        return_tokens: return the per-frame outputs ``(B, T, model_dim)`` (padded frames are 0)
            instead of the pooled feature.

    Example:
        >>> encoder = ConformerEncoder(input_dim=20, model_dim=16, num_layers=1, num_heads=2)
        >>> faces = torch.randn(2, 9, 20)
        >>> mask = torch.arange(9) >= torch.tensor([[9], [6]])  # second clip has 6 frames
        >>> encoder(faces, padding_mask=mask).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        input_dim: int = 1408,
        *,
        bottleneck_dim: int = 50,
        model_dim: int = 512,
        num_layers: int = 5,
        num_heads: int = 8,
        kernel_size: int = 31,
        dropout: float = 0.1,
        return_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.bottleneck = nn.Linear(input_dim, bottleneck_dim, bias=False)
        self.input_projection = nn.Sequential(
            nn.Linear(bottleneck_dim, model_dim), nn.Dropout(dropout)
        )
        self.conformer = MaskedConformer(
            model_dim, num_layers, num_heads=num_heads, kernel_size=kernel_size, dropout=dropout
        )
        self.feature_dim = model_dim
        self.return_tokens = return_tokens

    def forward(
        self, features: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encode ``(B, T, input_dim)`` sequences; ``padding_mask`` is ``(B, T)``, True = padded."""
        if features.dim() != 3 or features.shape[-1] != self.bottleneck.in_features:
            raise ValueError(
                f"{type(self).__name__} expects (batch, time, {self.bottleneck.in_features}) "
                f"features, got {tuple(features.shape)}"
            )
        tokens = self.conformer(self.input_projection(self.bottleneck(features)), padding_mask)
        if self.return_tokens:
            return tokens
        return masked_mean(tokens, padding_mask)

    def token_padding_mask(self, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The padding mask of the output tokens: the input mask (one token per frame)."""
        return padding_mask
