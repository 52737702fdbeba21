"""Reference encoders: shapes, structure, initialisation, masking, checkpoints, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from reference_models.encoders import (
    ConformerEncoder,
    MaskedConformer,
    ResNet18AudioEncoder,
    ResNet18VideoEncoder,
    masked_mean,
)
from reference_models.wav2vec2 import Wav2Vec2ConformerEncoder, build_wav2vec2_front_end

TINY_FRONT_END = dict(
    embed_dim=32,
    num_heads=2,
    ffn_dim=64,
    conv_layers=[(16, 10, 5), (16, 3, 2)],
    pos_conv_kernel=16,
    pos_conv_groups=4,
)


def tiny_front_end(num_layers: int = 2, **options):
    torch.manual_seed(0)
    return build_wav2vec2_front_end(num_layers, **{**TINY_FRONT_END, **options})


def test_full_width_resnet_has_torchvision_resnet18_structure():
    reference = torchvision.models.resnet18(weights=None).state_dict()
    expected = {key: value.shape for key, value in reference.items() if not key.startswith("fc.")}
    video = {key: value.shape for key, value in ResNet18VideoEncoder().body.state_dict().items()}
    assert video == expected
    audio = ResNet18AudioEncoder().body.state_dict()
    assert audio["conv1.weight"].shape == (64, 1, 7, 7)
    assert ResNet18AudioEncoder().feature_dim == ResNet18VideoEncoder().feature_dim == 512


@pytest.mark.parametrize("width", [8, 16])
def test_reduced_width_scales_every_stage(width):
    encoder = ResNet18VideoEncoder(width=width)
    assert encoder.feature_dim == 8 * width
    assert encoder.body.layer1[0].conv1.out_channels == width
    assert encoder.body.layer4[1].conv2.out_channels == 8 * width
    with pytest.raises(ValueError, match="width"):
        ResNet18AudioEncoder(width=0)


def test_initialisation_follows_the_mlb_code():
    torch.manual_seed(0)
    body = ResNet18VideoEncoder().body
    bn_weights = torch.cat([m.weight for m in body.modules() if isinstance(m, nn.BatchNorm2d)])
    bn_biases = torch.cat([m.bias for m in body.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn_weights.mean().item() - 1.0) < 0.005
    assert abs(bn_weights.std().item() - 0.02) < 0.003
    assert torch.all(bn_biases == 0)
    conv = body.layer3[0].conv2  # 256 -> 256, 3x3: fan_out = 256 * 9
    expected_std = (2.0 / (256 * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected_std - 1.0) < 0.02


@pytest.mark.parametrize(
    ("frequency", "time", "tokens"),
    [(257, 188, 54), (257, 136, 45), (257, 1004, 288)],  # CREMA-D, UCF101, AVE grids
)
def test_audio_token_grid_of_each_dataset(frequency, time, tokens):
    spectrogram = torch.randn(2, frequency, time)
    assert ResNet18AudioEncoder(width=4)(spectrogram).shape == (2, 32)
    grid = ResNet18AudioEncoder(width=4, return_tokens=True)(spectrogram)
    assert grid.shape == (2, tokens, 32)


def test_audio_pooled_feature_is_the_mean_of_its_tokens():
    torch.manual_seed(0)
    encoder = ResNet18AudioEncoder(width=4).eval()
    spectrogram = torch.randn(2, 64, 48)
    pooled = encoder(spectrogram)
    encoder.return_tokens = True
    torch.testing.assert_close(encoder(spectrogram).mean(dim=1), pooled)


def test_video_encoder_averages_per_frame_features_over_time():
    torch.manual_seed(0)
    encoder = ResNet18VideoEncoder(width=4).eval()
    clip = torch.randn(2, 3, 3, 64, 64)
    per_frame = torch.stack([encoder.body(clip[:, :, t]).mean(dim=(2, 3)) for t in range(3)], dim=1)
    torch.testing.assert_close(encoder(clip), per_frame.mean(dim=1))
    encoder.return_tokens = True
    tokens = encoder(clip)
    assert tokens.shape == (2, 3 * 2 * 2, 32)
    # Time-major token order: the first 4 tokens are frame 0's 2x2 grid.
    first_frame = encoder.body(clip[:, :, 0]).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[:, :4], first_frame)


def test_video_token_count_at_paper_shape():
    clip = torch.randn(1, 3, 3, 224, 224)
    assert ResNet18VideoEncoder(width=2, return_tokens=True)(clip).shape == (1, 147, 16)


def test_wrong_layouts_are_clear_errors():
    with pytest.raises(ValueError, match=r"transpose\(1, 2\)"):
        ResNet18VideoEncoder(width=2)(torch.randn(1, 4, 3, 32, 32))
    with pytest.raises(ValueError, match="frequency, time"):
        ResNet18AudioEncoder(width=2)(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="padding_mask"):
        ResNet18AudioEncoder(width=2)(torch.randn(1, 64, 64), torch.zeros(1, 64, dtype=torch.bool))


def test_masked_mean_ignores_padded_positions():
    tokens = torch.tensor(
        [[[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]], [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]]
    )
    mask = torch.tensor([[False, False, True], [False, False, False]])
    expected = torch.tensor([[2.0, 3.0], [2.0, 2.0]])
    torch.testing.assert_close(masked_mean(tokens, mask), expected)


def test_masked_conformer_is_batch_first_and_does_not_mix_samples():
    """The official code feeds (time, batch, dim), mixing samples; here they are independent."""
    torch.manual_seed(0)
    conformer = MaskedConformer(16, num_layers=2, num_heads=2, kernel_size=3).eval()
    batch = torch.randn(4, 9, 16)
    together = conformer(batch)
    alone = torch.cat([conformer(batch[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    other = batch.clone()
    other[1:] = torch.randn(3, 9, 16)
    torch.testing.assert_close(conformer(other)[0], together[0], atol=1e-5, rtol=1e-5)


def test_masked_conformer_outputs_do_not_depend_on_padding():
    torch.manual_seed(0)
    conformer = MaskedConformer(16, num_layers=2, num_heads=2, kernel_size=5).eval()
    sequence = torch.randn(1, 6, 16)
    padded = torch.cat([sequence, 100 * torch.randn(1, 5, 16)], dim=1)
    mask = torch.arange(11).unsqueeze(0) >= 6
    out = conformer(padded, mask)
    torch.testing.assert_close(out[:, :6], conformer(sequence), atol=1e-5, rtol=1e-5)
    assert torch.all(out[:, 6:] == 0)
    copied = copy.deepcopy(conformer)  # the masking hooks must follow the copy
    torch.testing.assert_close(copied(padded, mask)[:, :6], copied(sequence), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one valid"):
        conformer(padded, torch.ones(1, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        conformer(padded, torch.zeros(1, 10, dtype=torch.bool))


def test_face_encoder_pools_valid_frames_only():
    torch.manual_seed(0)
    encoder = ConformerEncoder(
        input_dim=20, model_dim=16, num_layers=1, num_heads=2, kernel_size=3
    ).eval()
    faces = torch.randn(2, 8, 20)
    mask = torch.arange(8).unsqueeze(0) >= torch.tensor([[8], [5]])
    pooled = encoder(faces, mask)
    assert pooled.shape == (2, 16)
    torch.testing.assert_close(pooled[1:], encoder(faces[1:, :5]), atol=1e-5, rtol=1e-5)
    assert encoder.token_padding_mask(mask) is mask
    with pytest.raises(ValueError, match="20"):
        encoder(torch.randn(2, 8, 21))


def test_face_encoder_default_is_the_vavl_recipe():
    encoder = ConformerEncoder()
    assert encoder.bottleneck.in_features == 1408 and encoder.bottleneck.bias is None
    assert encoder.bottleneck.out_features == 50
    assert len(encoder.conformer.conformer.conformer_layers) == 5
    assert encoder.feature_dim == 512


def test_wav2vec2_front_end_default_architecture_is_large_robust_truncated():
    front_end = build_wav2vec2_front_end(num_layers=1)  # 12 in the recipe; 1 keeps this light
    assert front_end.encoder.feature_projection.projection.out_features == 1024
    assert len(front_end.encoder.transformer.layers) == 1
    assert len(front_end.feature_extractor.conv_layers) == 7


def test_wav2vec2_encoder_masks_follow_the_front_end_lengths():
    torch.manual_seed(0)
    encoder = Wav2Vec2ConformerEncoder(
        tiny_front_end(), model_dim=16, num_layers=1, num_heads=2, kernel_size=3
    ).eval()
    waveform = torch.randn(3, 3200)
    lengths = torch.tensor([3200, 2000, 777])
    mask = torch.arange(3200).unsqueeze(0) >= lengths.unsqueeze(1)
    frames, frame_lengths = encoder.front_end(waveform, lengths)
    token_mask = encoder.token_padding_mask(mask)
    assert token_mask.shape == frames.shape[:2]
    assert torch.equal((~token_mask).sum(dim=1), frame_lengths)
    assert encoder(waveform, mask).shape == (3, 16)
    assert encoder.feature_dim == 16


def test_wav2vec2_encoder_freezes_only_the_feature_extractor():
    encoder = Wav2Vec2ConformerEncoder(tiny_front_end(), model_dim=16, num_layers=1, num_heads=2)
    assert not any(p.requires_grad for p in encoder.front_end.feature_extractor.parameters())
    assert all(p.requires_grad for p in encoder.front_end.encoder.parameters())
    encoder(torch.randn(2, 1600)).sum().backward()
    assert encoder.front_end.encoder.transformer.layers[0].attention.k_proj.weight.grad is not None


def test_wav2vec2_checkpoint_loads_locally_and_drops_extra_layers(tmp_path):
    source = tiny_front_end(num_layers=3)
    path = tmp_path / "front_end.pt"
    torch.save(source.state_dict(), path)
    loaded = build_wav2vec2_front_end(2, path, **TINY_FRONT_END)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key])
    with pytest.raises(FileNotFoundError, match="never|local"):
        build_wav2vec2_front_end(2, tmp_path / "absent.pt", **TINY_FRONT_END)
    with pytest.raises(ValueError, match="does not match"):
        build_wav2vec2_front_end(2, path, **{**TINY_FRONT_END, "embed_dim": 48})
    with pytest.raises(ValueError, match="not both"):
        Wav2Vec2ConformerEncoder(source, checkpoint=path)


@pytest.mark.parametrize(
    "encoder_and_input",
    [
        lambda: (ResNet18AudioEncoder(width=4), torch.randn(2, 64, 48)),
        lambda: (ResNet18VideoEncoder(width=4), torch.randn(2, 3, 2, 32, 32)),
        lambda: (
            ConformerEncoder(input_dim=12, model_dim=8, num_layers=1, num_heads=2),
            torch.randn(2, 5, 12),
        ),
    ],
)
def test_gradients_reach_the_first_layer(encoder_and_input):
    encoder, x = encoder_and_input()
    encoder(x).square().sum().backward()
    first = next(p for p in encoder.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0
