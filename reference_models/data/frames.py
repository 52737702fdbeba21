"""Frame loading and clip transforms shared by the datasets.

Prepared frames are JPEG files ``<frames dir>/<clip>/<second:04d>.jpg`` (1 frame per second).
:class:`ClipTransform` turns a clip's frames into the ``(3, T, H, W)`` tensor the video encoder
takes, with ImageNet normalisation of RGB values in [0, 1]. Training augmentation draws one
random crop and one flip per clip and applies it to every frame, keeping the clip temporally
consistent (the official CREMA-D and AVE loaders draw them per frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClipTransform",
    "frame_second",
    "list_frames",
    "load_frames",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_frames(folder: str | Path) -> list[Path]:
    """The ``*.jpg`` frames of one clip folder, in sorted (time) order.

    Raises:
        FileNotFoundError: the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"frame folder {folder} does not exist")
    return sorted(folder.glob("*.jpg"))


def frame_second(path: Path) -> int:
    """The second a prepared frame was taken at, from its name ``<second:04d>.jpg``."""
    try:
        return int(path.stem)
    except ValueError as error:
        raise ValueError(
            f"frame {path} is not named <second>.jpg as `reference_models.data.prepare` writes"
        ) from error


def load_frames(paths: Sequence[Path]) -> torch.Tensor:
    """Decode JPEG frames of one clip into a uint8 tensor ``(T, 3, H, W)`` (RGB), with
    Pillow (torchvision's image decoding is deprecated from torchvision 0.29 on).

    Raises:
        ValueError: no paths, or frames of different sizes.
        RuntimeError: a frame cannot be decoded (corrupt file).
    """
    if not paths:
        raise ValueError("a clip needs at least one frame, got none")
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        except (OSError, ValueError) as error:
            raise RuntimeError(
                f"cannot decode frame {path} ({error}); re-run the dataset's prepare step"
            ) from error
    if len({tuple(image.shape) for image in images}) != 1:
        raise ValueError(f"frames of one clip must share one size: {paths[0].parent}")
    return torch.stack(images)


class ClipTransform:
    """Resize/augment a clip's frames identically and normalise: uint8 ``(T, 3, H, W)`` →
    float32 ``(3, T, image_size, image_size)``.

    Training: one ``RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3))`` and one
    random horizontal flip per clip, shared by all of its frames. Evaluation: resize to
    ``image_size × image_size``. Then values are scaled to [0, 1] and ImageNet-normalised.

    Args:
        image_size: output height and width (224 in the paper).
        train: apply the random augmentation.

    Example:
        >>> frames = torch.randint(0, 256, (3, 3, 48, 64), dtype=torch.uint8)
        >>> ClipTransform(32, train=True)(frames).shape
        torch.Size([3, 3, 32, 32])
    """

    def __init__(self, image_size: int = 224, train: bool = False) -> None:
        if train:
            geometry = [
                v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
                v2.RandomHorizontalFlip(),
            ]
        else:
            geometry = [v2.Resize((image_size, image_size))]
        self.image_size = image_size
        self.train = train
        self.transform = v2.Compose(
            [
                *geometry,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(
                f"expected uint8 frames (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}"
            )
        # v2 transforms treat leading dimensions as a batch sharing one set of random parameters.
        return self.transform(frames).transpose(0, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, train={self.train})"
