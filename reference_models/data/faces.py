"""Per-frame face crops and their 1408-d EfficientNet-B2 features (CREMA-D Conformer setting).

The Conformer setting's visual input is one feature vector per video frame: the face is found,
cropped, resized to 260×260, ImageNet-normalised, and encoded by the EfficientNet-B2 of
HSEmotion (``enet_b2_8``: timm's ``efficientnet_b2`` fine-tuned on AffectNet, Savchenko 2022)
with its classifier removed, which leaves the 1408-d globally pooled feature.

* Detection: OpenCV's bundled frontal-face Haar cascade (Viola & Jones 2001) on each frame; the
  largest detection is kept. A frame without a detection falls back to the centred square crop
  of side ``min(height, width)`` and is flagged, so the fallback can be counted.
* Network: built with ``timm.create_model("efficientnet_b2", num_classes=0)``, so a state dict in
  timm's layout (as HSEmotion's weights are) loads key for key; the classifier keys
  (``classifier.*``, HSEmotion's 8-way emotion head) are dropped. timm is used rather than a
  re-implementation because the weights were trained in exactly that network: its block layout,
  padding, BatchNorm and activation details are reproduced by construction.

HSEmotion distributes ``enet_b2_8.pt`` as a pickled model object, not a state dict. Convert it
once (with timm installed; a pickle runs code, so do this only with a file you trust)::

    python -c "import torch; torch.save(torch.load('enet_b2_8.pt', weights_only=False)
        .state_dict(), 'enet_b2_8_state_dict.pt')"
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import cv2
import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

__all__ = [
    "FACE_FEATURE_DIM",
    "FACE_IMAGE_SIZE",
    "FaceDetector",
    "FaceFeatureExtractor",
    "build_face_encoder",
    "centre_square",
    "crop_square",
]

FACE_FEATURE_DIM = 1408
"""Width of EfficientNet-B2's pooled feature."""

FACE_IMAGE_SIZE = 260
"""Input size HSEmotion uses for its EfficientNet-B2 models."""

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

Box = tuple[int, int, int, int]
"""``(x, y, width, height)`` in pixels."""


def centre_square(height: int, width: int) -> Box:
    """The centred square of side ``min(height, width)``: the crop of a frame without a face.

    Example:
        >>> centre_square(360, 480)
        (60, 0, 360, 360)
    """
    side = min(height, width)
    return (width - side) // 2, (height - side) // 2, side, side


def crop_square(frame: np.ndarray, box: Box, size: int) -> np.ndarray:
    """Crop ``box`` from an ``(H, W, 3)`` uint8 frame (clipped to the frame), resized to ``size``².

    The resize is Pillow's bilinear filter, as torchvision's ``Resize`` on images.
    """
    x, y, width, height = box
    top, left = max(y, 0), max(x, 0)
    crop = frame[top : max(y + height, top + 1), left : max(x + width, left + 1)]
    image = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)
    return np.asarray(image)


class FaceDetector:
    """The largest frontal face of a frame, with OpenCV's bundled Haar cascade.

    Args:
        scale_factor: image pyramid step of the cascade.
        min_neighbors: detections that must overlap for a face to count (higher: fewer false
            positives).
        min_size_fraction: smallest face side, as a fraction of the frame's shorter side.

    Example:
        >>> detector = FaceDetector()
        >>> detector(np.zeros((120, 160, 3), dtype=np.uint8)) is None  # a blank frame
        True
    """

    def __init__(
        self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size_fraction: float = 0.1
    ) -> None:
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise RuntimeError(
                f"OpenCV could not load its face cascade {path}; install "
                "opencv-python-headless < 5 (OpenCV 5 no longer ships the Haar cascades)"
            )
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size_fraction = min_size_fraction

    def __call__(self, frame: np.ndarray) -> Box | None:
        """The ``(x, y, width, height)`` box of the largest face of an RGB frame, or ``None``."""
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        side = max(24, round(self.min_size_fraction * min(grey.shape)))
        boxes = self.cascade.detectMultiScale(
            grey, self.scale_factor, self.min_neighbors, minSize=(side, side)
        )
        if len(boxes) == 0:
            return None
        boxes = np.asarray(boxes)
        x, y, width, height = boxes[np.argmax(boxes[:, 2] * boxes[:, 3])]
        return int(x), int(y), int(width), int(height)


def build_face_encoder(weights: str | Path) -> nn.Module:
    """timm's EfficientNet-B2 without classifier (``(B, 3, H, W) -> (B, 1408)``), in eval mode.

    Args:
        weights: a local state dict in timm's ``efficientnet_b2`` layout (e.g. HSEmotion's
            ``enet_b2_8`` converted as in this module's docstring; ``classifier.*`` keys are
            ignored), or ``"random"`` for random weights, the same ones on every call (seeded,
            so parallel workers agree; smoke tests only; warns).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not such a state dict (a pickled model, another network).
    """
    with torch.random.fork_rng():  # "random" weights are the same in every worker process
        torch.manual_seed(0)
        model = timm.create_model("efficientnet_b2", pretrained=False, num_classes=0)
    if str(weights) == "random":
        warnings.warn(
            "face encoder with RANDOM weights: the face features carry no emotion information; "
            "use this only for smoke tests (pass HSEmotion's enet_b2_8 state dict for real runs)",
            stacklevel=2,
        )
        return model.eval()
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"face weights {path} do not exist; pass a local EfficientNet-B2 state dict in timm's "
            "layout (HSEmotion's enet_b2_8), or 'random' for a smoke test"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise ValueError(
            f"face weights {path} are not a plain state dict ({type(error).__name__}); if it is "
            "HSEmotion's pickled enet_b2_8.pt, convert it once: torch.save(torch.load(path, "
            "weights_only=False).state_dict(), 'enet_b2_8_state_dict.pt') (needs timm)"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"face weights {path} hold a {type(state).__name__}, not a state dict")
    state = {key: value for key, value in state.items() if not key.startswith("classifier.")}
    layout = f"face weights {path} are not timm's efficientnet_b2 layout"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise ValueError(f"{layout}: {error}") from error
    if missing or unexpected:
        raise ValueError(
            f"{layout}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:3]})"
        )
    return model.eval()


class FaceFeatureExtractor:
    """Frames ``(T, H, W, 3)`` uint8 RGB → face features ``(T, 1408)`` and a detected-face flag.

    Args:
        weights: see :func:`build_face_encoder` (a path or ``"random"``).
        image_size: side of the network input (260 for HSEmotion's B2 models).
        device: where the network runs.
        batch_size: frames per forward pass.
        detector: the face detector; ``None`` is a default :class:`FaceDetector`.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     extract = FaceFeatureExtractor("random", image_size=32)
        >>> features, detected = extract(np.zeros((2, 48, 64, 3), dtype=np.uint8))
        >>> features.shape, detected.tolist()
        ((2, 1408), [False, False])
    """

    def __init__(
        self,
        weights: str | Path,
        *,
        image_size: int = FACE_IMAGE_SIZE,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        detector: FaceDetector | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.encoder = build_face_encoder(weights).to(self.device)
        self.image_size = image_size
        self.batch_size = batch_size
        self.detector = FaceDetector() if detector is None else detector

    def crops(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The face crops ``(T, S, S, 3)`` uint8 and whether a face was detected ``(T,)``."""
        boxes = [self.detector(frame) for frame in frames]
        detected = np.array([box is not None for box in boxes], dtype=bool)
        fallback = centre_square(*frames.shape[1:3])
        crops = np.stack(
            [
                crop_square(frame, fallback if box is None else box, self.image_size)
                for frame, box in zip(frames, boxes)
            ]
        )
        return crops, detected

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Face features ``(T, 1408)`` float32 and the detected flags ``(T,)`` of a clip."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 RGB frames (T, H, W, 3), got {frames.dtype} {frames.shape}"
            )
        crops, detected = self.crops(frames)
        pixels = (crops.astype(np.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        features = [
            self.encoder(chunk.to(self.device)).float().cpu()
            for chunk in images.split(self.batch_size)
        ]
        return torch.cat(features).numpy(), detected
