"""Model factory: every dataset × fusion, gradient flow, balancer readiness, parameter counts."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import torchvision

import gradbalance as gb
from reference_models.data.padding import pad_collate
from reference_models.encoders import ResNet18AudioEncoder, ResNet18VideoEncoder
from reference_models.fusion import FUSIONS, LateLinear, TransformerFusion
from reference_models.models import NUM_CLASSES, AudioVisualClassifier, build_model
from reference_models.wav2vec2 import build_wav2vec2_front_end

FUSION_NAMES = [*FUSIONS, "mmcosine"]


def small_options(fusion: str) -> dict | None:
    return {"num_heads": 2} if fusion == "tf" else None


def small_batch(batch: int = 2):
    torch.manual_seed(0)
    return torch.randn(batch, 64, 48), torch.randn(batch, 3, 2, 32, 32)


@pytest.mark.parametrize("dataset", list(NUM_CLASSES))
@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_every_dataset_and_fusion_builds_and_classifies(dataset, fusion):
    model = build_model(
        dataset,
        "resnet18",
        fusion,
        width=4,
        fusion_options={"num_heads": 2} if fusion == "tf" else None,
    )
    logits = model(*small_batch())
    assert logits.shape == (2, NUM_CLASSES[dataset])
    assert isinstance(model.audio, ResNet18AudioEncoder)
    assert isinstance(model.video, ResNet18VideoEncoder)
    assert model.audio.return_tokens == model.video.return_tokens == (fusion == "tf")


def test_num_classes_defaults_and_override():
    assert NUM_CLASSES == {"cremad": 6, "ave": 28, "ucf101": 51}
    model = build_model("ave", fusion="linear", num_classes=5, width=2)
    assert model.fusion.bias.shape == (5,)


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_gradients_flow_into_both_encoders(fusion):
    model = build_model(
        "cremad",
        fusion=fusion,
        width=4,
        fusion_options={"num_heads": 2} if fusion == "tf" else None,
    )
    torch.nn.functional.cross_entropy(model(*small_batch(4)), torch.tensor([0, 1, 2, 3])).backward()
    for encoder in (model.audio, model.video):
        assert encoder.body.conv1.weight.grad.abs().sum() > 0
        assert encoder.body.layer4[1].bn2.weight.grad.abs().sum() > 0


def test_mismatched_encoder_and_fusion_outputs_are_rejected():
    with pytest.raises(ValueError, match="return_tokens=True"):
        AudioVisualClassifier(
            ResNet18AudioEncoder(width=2),
            ResNet18VideoEncoder(width=2),
            TransformerFusion([16, 16], 3, num_heads=2),
        )
    with pytest.raises(ValueError, match="return_tokens=False"):
        AudioVisualClassifier(
            ResNet18AudioEncoder(width=2, return_tokens=True),
            ResNet18VideoEncoder(width=2),
            LateLinear([16, 16], 3),
        )


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="cremad"):
        build_model("kinetics")
    with pytest.raises(ValueError, match="resnet18"):
        build_model("cremad", "vit")
    with pytest.raises(ValueError, match="linear"):
        build_model("cremad", fusion="concat", width=2)


def test_mlb_balances_the_reference_model():
    model = build_model("cremad", "resnet18", "linear", width=4)
    bal = gb.MLB(model, encoders=[model.audio, model.video], num_classes=6, alpha=1.0)
    labels = torch.tensor([0, 1, 2, 3])
    loss = bal.loss(model(*small_batch(4)), labels)
    loss.backward()
    assert sorted(bal.coefficients) == ["audio", "video"]
    assert model.audio.body.conv1.weight.grad.abs().sum() > 0
    bal.remove()


def test_transformer_fusion_model_works_with_token_pooling():
    model = build_model("cremad", fusion="tf", width=4, fusion_options={"num_heads": 2})
    bal = gb.MultiLoss(model, encoders=[model.audio, model.video], num_classes=6, pool="tokens")
    bal.loss(model(*small_batch(4)), torch.tensor([0, 1, 2, 3])).backward()
    assert model.video.body.conv1.weight.grad.abs().sum() > 0
    bal.remove()


def test_conformer_backbone_with_padding_masks():
    torch.manual_seed(0)
    front_end = build_wav2vec2_front_end(
        1,
        embed_dim=32,
        num_heads=2,
        ffn_dim=64,
        conv_layers=[(16, 10, 5), (16, 3, 2)],
        pos_conv_kernel=16,
        pos_conv_groups=4,
    )
    small = {"model_dim": 16, "num_layers": 1, "num_heads": 2, "kernel_size": 3}
    for fusion in ("linear", "tf"):
        model = build_model(
            "cremad",
            "conformer",
            fusion,
            audio_options={"front_end": front_end, **small},
            video_options={"input_dim": 20, **small},
            fusion_options=small_options(fusion),
        ).eval()
        waveform, faces = torch.randn(2, 3200), torch.randn(2, 7, 20)
        audio_mask = torch.arange(3200).unsqueeze(0) >= torch.tensor([[3200], [2100]])
        video_mask = torch.arange(7).unsqueeze(0) >= torch.tensor([[7], [4]])
        logits = model(
            waveform, faces, audio_padding_mask=audio_mask, video_padding_mask=video_mask
        )
        assert logits.shape == (2, 6)
        # The second sample does not see its padding: same logits when encoded unpadded.
        alone = model(waveform[1:, :2100], faces[1:, :4])
        torch.testing.assert_close(logits[1:], alone, atol=1e-4, rtol=1e-4)


TINY_WAV2VEC2 = dict(
    embed_dim=32,
    num_heads=2,
    ffn_dim=64,
    conv_layers=[(16, 10, 5), (16, 3, 2)],
    pos_conv_kernel=16,
    pos_conv_groups=4,
)


def test_conformer_model_trains_on_padded_batches_of_the_dataset_layout():
    small = {"model_dim": 16, "num_layers": 1, "num_heads": 2, "kernel_size": 3}
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model = build_model(
            "cremad",
            "conformer",
            wav2vec2_checkpoint="random",
            audio_options={"front_end_layers": 2, "front_end_options": TINY_WAV2VEC2, **small},
            video_options=small,
        )
    lengths = [(3200, 7), (2000, 3), (2600, 5)]
    items = [(torch.randn(s), torch.randn(t, 1408), label) for label, (s, t) in enumerate(lengths)]
    waveform, waveform_mask, faces, faces_mask, labels = pad_collate(items)
    logits = model(waveform, faces, audio_padding_mask=waveform_mask, video_padding_mask=faces_mask)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    front_end = model.audio.front_end
    assert all(
        p.grad is None and not p.requires_grad for p in front_end.feature_extractor.parameters()
    )
    assert front_end.encoder.transformer.layers[1].attention.k_proj.weight.grad.abs().sum() > 0
    assert model.video.bottleneck.weight.grad.abs().sum() > 0
    model.eval()  # each clip's logits do not depend on the padding of the batch
    with torch.no_grad():
        padded = model(
            waveform, faces, audio_padding_mask=waveform_mask, video_padding_mask=faces_mask
        )
        alone = model(items[1][0].unsqueeze(0), items[1][1].unsqueeze(0))
    torch.testing.assert_close(padded[1:2], alone, atol=1e-4, rtol=1e-4)


def test_conformer_backbone_needs_explicit_wav2vec2_weights(tmp_path):
    with pytest.raises(ValueError, match="wav2vec2_checkpoint.*'random'"):
        build_model("cremad", "conformer")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_model("cremad", "conformer", wav2vec2_checkpoint=tmp_path / "absent.pt")
    tiny = build_wav2vec2_front_end(1, **TINY_WAV2VEC2)
    with pytest.raises(ValueError, match="not both"):
        build_model(
            "cremad", "conformer", wav2vec2_checkpoint="random", audio_options={"front_end": tiny}
        )


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("dataset", list(NUM_CLASSES))
def test_reference_resnet_late_linear_parameter_count(dataset):
    torchvision_resnet = torchvision.models.resnet18(weights=None)
    body = parameter_count(torchvision_resnet) - parameter_count(torchvision_resnet.fc)
    audio_body = body - 64 * 2 * 7 * 7  # one input channel instead of three
    classes = NUM_CLASSES[dataset]
    expected = body + audio_body + 2 * 512 * classes + classes
    assert parameter_count(build_model(dataset, "resnet18", "linear")) == expected


@pytest.mark.parametrize(
    "module",
    [
        "reference_models.encoders",
        "reference_models.wav2vec2",
        "reference_models.fusion",
        "reference_models.models",
        "reference_models.data.audio",
        "reference_models.data.frames",
        "reference_models.data.cremad",
        "reference_models.data.faces",
        "reference_models.data.normalisation",
        "reference_models.data.padding",
        "reference_models.data.prepare_faces",
        "reference_models.data.ucf101",
    ],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
