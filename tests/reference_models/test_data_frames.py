"""Frame loading and the clip transform (one augmentation per clip, ImageNet normalisation)."""

from __future__ import annotations

import pytest
import torch
from fixtures_media import colour_of_second, write_frames

from reference_models.data.frames import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipTransform,
    frame_second,
    list_frames,
    load_frames,
)


def test_train_augmentation_is_identical_for_every_frame_of_a_clip():
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    clip = frame.expand(4, -1, -1, -1).contiguous()
    transform = ClipTransform(24, train=True)
    outputs = [transform(clip) for _ in range(10)]
    for out in outputs:
        assert out.shape == (3, 4, 24, 24)
        for t in range(1, 4):
            assert torch.equal(out[:, t], out[:, 0])
    # ... while different clips get different crops (the augmentation is random).
    assert any(not torch.equal(outputs[0], out) for out in outputs[1:])


def test_eval_transform_resizes_and_normalises():
    colour = (200, 100, 50)
    clip = torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 30, 40)
    out = ClipTransform(16, train=False)(clip.contiguous())
    assert out.shape == (3, 2, 16, 16) and out.dtype == torch.float32
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(
        out.mean(dim=(1, 2, 3)), torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0
    )
    assert torch.equal(ClipTransform(16)(clip.contiguous()), out)  # deterministic


def test_transform_rejects_other_layouts():
    with pytest.raises(ValueError, match=r"uint8 frames \(T, 3, H, W\)"):
        ClipTransform(16)(torch.zeros(3, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        ClipTransform(16)(torch.zeros(2, 3, 8, 8))


def test_frames_load_in_time_order_as_rgb(tmp_path):
    write_frames(tmp_path / "clip", [2, 0, 1])
    paths = list_frames(tmp_path / "clip")
    assert [frame_second(path) for path in paths] == [0, 1, 2]
    frames = load_frames(paths)
    assert frames.shape == (3, 3, 24, 32) and frames.dtype == torch.uint8
    for second in range(3):
        mean = frames[second].double().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(colour_of_second(second)).double(), atol=6)


def test_frame_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        list_frames(tmp_path / "absent")
    with pytest.raises(ValueError, match="at least one frame"):
        load_frames([])
    bad = tmp_path / "0000.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(RuntimeError, match="0000.jpg"):
        load_frames([bad])
    with pytest.raises(ValueError, match="<second>.jpg"):
        frame_second(tmp_path / "first.jpg")
