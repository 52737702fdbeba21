"""Fusion heads: formulas against independent references, M = 3, errors, masks, MMCosine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradbalance as gb
from reference_models.fusion import (
    FUSIONS,
    FiLMFusion,
    GatedFusion,
    LateLinear,
    MLPFusion,
    TransformerFusion,
    build_fusion,
)

DIMS = [8, 6]


@pytest.fixture
def features():
    torch.manual_seed(0)
    return torch.randn(5, 8), torch.randn(5, 6)


def test_late_linear_equals_one_linear_on_the_concatenation(features):
    head = LateLinear(DIMS, num_classes=4)
    weight = torch.cat([head.linears[0].weight, head.linears[1].weight], dim=1)
    expected = F.linear(torch.cat(features, dim=1), weight, head.bias)
    torch.testing.assert_close(head(*features), expected)


def test_late_linear_slices_share_the_bias_and_sum_to_the_output(features):
    head = LateLinear(DIMS, num_classes=4)
    audio, video = head.modality_logits(*features)
    torch.testing.assert_close(audio, features[0] @ head.linears[0].weight.T + head.bias / 2)
    torch.testing.assert_close(video, features[1] @ head.linears[1].weight.T + head.bias / 2)
    torch.testing.assert_close(audio + video, head(*features))
    blocks = head.modality_parameters()
    assert [[p is head.linears[m].weight for p in block] for m, block in enumerate(blocks)] == [
        [True],
        [True],
    ]
    assert all(linear.bias is None for linear in head.linears)
    assert head.bias.shape == (4,)


def test_late_linear_with_three_modalities():
    torch.manual_seed(0)
    head = LateLinear([4, 5, 6], num_classes=3)
    z = [torch.randn(2, d) for d in (4, 5, 6)]
    slices = head.modality_logits(*z)
    assert len(slices) == 3
    torch.testing.assert_close(slices[2], z[2] @ head.linears[2].weight.T + head.bias / 3)
    torch.testing.assert_close(sum(slices), head(*z))


def test_mlp_fusion_matches_its_definition(features):
    head = MLPFusion(DIMS, num_classes=4).eval()
    assert head.project.linears[0].out_features == 64
    hidden = torch.relu(head.project(*features))
    hidden = torch.relu(head.classifier[2](hidden))
    torch.testing.assert_close(head(*features), head.classifier[5](hidden))


def test_film_fusion_matches_its_definition(features):
    head = FiLMFusion(DIMS, num_classes=4)
    audio, video = features
    film = audio @ head.film.weight.T + head.film.bias
    gamma, beta = film[:, :6], film[:, 6:]
    expected = (gamma * video + beta) @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(head(*features), expected)


def test_gated_fusion_matches_its_definition(features):
    head = GatedFusion(DIMS, num_classes=4)
    assert head.value.out_features == 6  # hidden width defaults to the gated modality's
    audio, video = features
    gate = torch.sigmoid(audio @ head.gate.weight.T + head.gate.bias)
    value = video @ head.value.weight.T + head.value.bias
    expected = (gate * value) @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(head(*features), expected)


@pytest.mark.parametrize("head_class", [FiLMFusion, GatedFusion])
@pytest.mark.parametrize("dims", [[8], [8, 6, 4]])
def test_two_modality_heads_reject_other_counts(head_class, dims):
    with pytest.raises(ValueError, match="exactly 2 modalities"):
        head_class(dims, num_classes=3)


def test_feature_count_and_width_mismatches_are_clear_errors(features):
    head = LateLinear(DIMS, num_classes=3)
    with pytest.raises(ValueError, match="built for 2 modalities, got 1"):
        head(features[0])
    with pytest.raises(ValueError, match="modality 1 should have feature dimension 6"):
        head(features[0], torch.randn(5, 7))
    with pytest.raises(ValueError, match="positive feature dimension"):
        LateLinear([], num_classes=3)


def tokens(batch=2, lengths=(5, 7), dims=(16, 16)):
    return [torch.randn(batch, length, dim) for length, dim in zip(lengths, dims)]


def test_transformer_fusion_shapes_and_modalities():
    torch.manual_seed(0)
    head = TransformerFusion([16, 16], num_classes=4, num_heads=2, kernel_size=3)
    assert len(head.conformer.conformer.conformer_layers) == 2
    assert head(*tokens()).shape == (2, 4)
    three = TransformerFusion([16, 8, 12], num_classes=4, num_heads=2, kernel_size=3)
    assert three(*tokens(lengths=(3, 4, 5), dims=(16, 8, 12))).shape == (2, 4)
    with pytest.raises(ValueError, match="return_tokens=True"):
        head(torch.randn(2, 16), torch.randn(2, 16))


def test_transformer_fusion_ignores_the_content_of_padded_tokens():
    torch.manual_seed(0)
    head = TransformerFusion([16, 16], num_classes=4, num_heads=2, kernel_size=3).eval()
    audio, video = tokens()
    audio_mask = torch.zeros(2, 5, dtype=torch.bool)
    audio_mask[1, 3:] = True
    reference = head(audio, video, padding_masks=[audio_mask, None])
    changed = audio.clone()
    changed[1, 3:] = 1000 * torch.randn(2, 16)
    torch.testing.assert_close(head(changed, video, padding_masks=[audio_mask, None]), reference)
    assert not torch.allclose(head(changed, video), reference)  # without the mask it matters
    with pytest.raises(ValueError, match="one per modality"):
        head(audio, video, padding_masks=[audio_mask])


def test_transformer_fusion_with_padding_equals_the_unpadded_sample():
    torch.manual_seed(0)
    head = TransformerFusion([16, 16], num_classes=4, num_heads=2, kernel_size=3).eval()
    audio, video = tokens(batch=1, lengths=(5, 7))
    padded_audio = torch.cat([audio, torch.randn(1, 3, 16)], dim=1)
    padded_video = torch.cat([video, torch.randn(1, 2, 16)], dim=1)
    masks = [torch.arange(8).unsqueeze(0) >= 5, torch.arange(9).unsqueeze(0) >= 7]
    padded = head(padded_audio, padded_video, padding_masks=masks)
    torch.testing.assert_close(padded, head(audio, video), atol=1e-5, rtol=1e-5)


def test_transformer_fusion_depends_on_every_modality():
    torch.manual_seed(0)
    head = TransformerFusion([16, 8], num_classes=4, num_heads=2, kernel_size=3)
    audio, video = tokens(dims=(16, 8))
    audio.requires_grad_(True)
    video.requires_grad_(True)
    head(audio, video).sum().backward()
    assert audio.grad.abs().sum() > 0 and video.grad.abs().sum() > 0
    assert head.cls_token.grad.abs().sum() > 0


def test_build_fusion_knows_every_head_and_mmcosine(features):
    assert set(FUSIONS) == {"linear", "mlp", "film", "gated", "tf", "decision"}
    for name in ("linear", "mlp", "film", "gated"):
        assert build_fusion(name, DIMS, 3)(*features).shape == (5, 3)
    with pytest.raises(ValueError, match="mmcosine"):
        build_fusion("concat", DIMS, 3)


def test_mmcosine_is_the_library_head(features):
    head = build_fusion("mmcosine", DIMS, 4, scale=8.0)
    assert isinstance(head, gb.MMCosineHead)
    audio, video = features
    expected = 8.0 * (
        F.normalize(audio, dim=1) @ F.normalize(head.weights[0], dim=1).T
        + F.normalize(video, dim=1) @ F.normalize(head.weights[1], dim=1).T
    )
    torch.testing.assert_close(head(audio, video), expected)
    torch.testing.assert_close(sum(head.modality_logits(audio, video)), expected)
    three = build_fusion("mmcosine", [8, 6, 4], 4)
    assert three(audio, video, torch.randn(5, 4)).shape == (5, 4)


def test_decision_fusion_sums_batch_standardised_heads():
    from reference_models.fusion import DecisionFusion

    torch.manual_seed(0)
    head = DecisionFusion([4, 3], num_classes=2)
    a, v = torch.randn(5, 4), torch.randn(5, 3)

    def standardised(u):
        values = u.flatten().tolist()
        mean = sum(values) / len(values)
        std = (sum((x - mean) ** 2 for x in values) / (len(values) - 1)) ** 0.5
        return (u - mean) / std

    heads = [a @ head.heads[0].weight.T + head.heads[0].bias]
    heads.append(v @ head.heads[1].weight.T + head.heads[1].bias)
    expected = standardised(heads[0]) + standardised(heads[1])
    torch.testing.assert_close(head(a, v), expected)
    torch.testing.assert_close(head.eval()(a, v), expected)  # batch statistics in eval too
    raw = DecisionFusion([4, 3], num_classes=2, standardize=False)
    raw.load_state_dict(head.state_dict())
    torch.testing.assert_close(raw(a, v), heads[0] + heads[1])
    assert [len(block) for block in head.modality_parameters()] == [2, 2]
