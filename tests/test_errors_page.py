"""The messages quoted on docs/errors.md are the ones the library raises.

Each case below provokes one error or warning and checks that the page quotes its message
as it reads: the quoted text (up to the ``...`` that marks a cut) starts the actual message,
and the page names the exception's class in the same row.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradbalance as gb

PAGE = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
ROW = re.compile(r"^\| `(?P<message>[^`]+)` \((?P<kinds>[^|]*)\) \|", flags=re.MULTILINE)

A, V, Y = torch.randn(4, 8), torch.randn(4, 6), torch.tensor([0, 1, 2, 0])


def quoted() -> list[tuple[str, str]]:
    """``(message without the trailing cut, the kinds column)`` of every message row."""
    return [
        (match["message"].removesuffix("...").rstrip(), match["kinds"])
        for match in ROW.finditer(PAGE.read_text(encoding="utf-8"))
    ]


def two_towers(**options) -> tuple[gb.testing.TwoTowerNet, list[nn.Module]]:
    model = gb.testing.TwoTowerNet(**options)
    return model, [model.audio, model.video]


def trained(method: type, **options) -> gb.Balancer:
    model, encoders = two_towers()
    bal = method(model, encoders, 3, **options)
    bal.loss(model(A, V), Y).backward()
    return bal


def joint_logits() -> None:
    trained(gb.Joint).unimodal_logits()


def ogm_slices() -> None:
    trained(gb.OGM).modality_slices()


def agm_without_fusion() -> None:
    model, encoders = two_towers()
    gb.AGM(model, encoders, 3)


def agm_width_at_construction() -> None:
    model, encoders = two_towers()
    gb.AGM(model, encoders, 3, fusion=nn.Linear(20, 3), feature_dims=[16, 16])


def agm_width_at_the_first_step() -> None:
    model, encoders = two_towers()
    gb.AGM(model, encoders, 3, fusion=nn.Linear(20, 3)).loss(model(A, V), Y)


def agm_one_tensor_fusion_on_outputs() -> None:
    model, encoders = two_towers()
    gb.AGM(model, encoders, 3, fusion=model.fusion, fusion_inputs="outputs")


def ogm_regression() -> None:
    model, encoders = two_towers()
    gb.OGM(model, encoders, task="regression")


def integer_regression_targets() -> None:
    model, encoders = two_towers(num_classes=1)
    gb.MLB(model, encoders, task="regression").loss(model(A, V), Y)


def regression_width() -> None:
    model, encoders = two_towers(num_classes=1)
    gb.MLB(model, encoders, task="regression", output_dim=2).loss(model(A, V), torch.randn(4, 2))


def regression_classes() -> None:
    model, encoders = two_towers()
    gb.MLB(model, encoders, 3, task="regression")


def classification_loss() -> None:
    model, encoders = two_towers()
    gb.MLB(model, encoders, 3, loss="mse")


def agm_error() -> None:
    model, encoders = two_towers(num_classes=1)
    gb.AGM(model, encoders, fusion=model.fusion, task="regression", error="mae")


def cosine_head_count() -> None:
    gb.MMCosineHead([4, 5], 3)(torch.randn(2, 4))


def pmr_without_epoch_end() -> None:
    model, encoders = two_towers()
    bal = gb.PMR(model, encoders, 3)
    bal.loss(model(A, V), Y).backward()
    with torch.no_grad():
        model(A, V)  # validation
    bal.loss(model(A, V), Y).backward()  # training again, no epoch_end()


def reparametrized_after_balancer() -> None:
    model = nn.Module()
    model.towers = nn.ModuleList(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()) for _ in range(2))
    bal = gb.OGM(model, list(model.towers), 2, parameters="conv", feature_dims=[8, 8])
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([0, 1])

    def forward() -> torch.Tensor:
        return sum(tower(x)[:, :2] for tower in model.towers)

    bal.loss(forward(), y).backward()
    torch.nn.utils.parametrizations.weight_norm(model.towers[0][0])
    bal.loss(forward(), y)


def agm_many_modalities() -> None:
    towers = nn.ModuleList(nn.Linear(2, 2) for _ in range(16))
    model = nn.Module()
    model.towers = towers
    gb.AGM(model, list(towers), 2, fusion=lambda *z: sum(z))


def misspelt_option() -> None:
    model, encoders = two_towers()
    gb.make("mlb", model, encoders, num_classes=3, alpah=1)


def taken_method_name() -> None:
    gb.register_method("MLB", gb.Joint)


def unknown_method_name() -> None:
    model, encoders = two_towers()
    gb.make("mmcosine", model, encoders, num_classes=3)


def removed_balancer() -> None:
    model, encoders = two_towers()
    bal = gb.MLB(model, encoders, 3)
    bal.remove()
    bal.loss(model(A, V), Y)


def unknown_logger() -> None:
    model, encoders = two_towers()
    gb.integrations.BalancerLog(gb.MLB(model, encoders, 3), "balance.txt")


def failing_logger() -> None:
    model, encoders = two_towers()
    bal = gb.MLB(model, encoders, 3)

    def full(values, step):
        raise OSError("disk full")

    log = gb.integrations.BalancerLog(bal, full)
    for _ in range(3):
        bal.loss(model(A, V), Y).backward()
    log.step()


class Reentrant(gb.testing.TwoTowerNet):
    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        a = checkpoint(self.audio, audio.requires_grad_(), use_reentrant=True)
        return self.fusion(torch.cat([a, self.video(video)], dim=-1))


def reentrant_checkpoint() -> None:
    model = Reentrant()
    gb.MLB(model, [model.audio, model.video], 3).loss(model(A.clone(), V), Y)


def functional_transform() -> None:
    model, encoders = two_towers()
    bal = gb.MLB(model, encoders, 3)
    params = dict(model.named_parameters())
    torch.func.grad(lambda p: bal.loss(torch.func.functional_call(model, p, (A, V)), Y))(params)


class Opaque:
    def __init__(self, feature: torch.Tensor):
        self.feature = feature


class OpaqueTowers(gb.testing.TwoTowerNet):
    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return self.fusion(torch.cat([self.audio(audio).feature, self.video(video)], dim=-1))


def unreachable_tensors() -> None:
    model = OpaqueTowers()
    gb.MLB(model, [model.audio, model.video], 3, features=lambda out: out.feature)
    model.audio.register_forward_hook(lambda module, inputs, out: Opaque(out), prepend=True)
    model(A, V)


class DictTowers(gb.testing.TwoTowerNet):
    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return self.fusion(torch.cat([self.audio(audio)["z"], self.video(video)], dim=-1))


def dict_without_features() -> None:
    model = DictTowers()
    bal = gb.MLB(model, [model.audio, model.video], 3)
    model.audio.register_forward_hook(lambda module, inputs, out: {"z": out}, prepend=True)
    bal.loss(model(A, V), Y)


def model_output_without_pool() -> None:
    import transformers

    sizes = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = transformers.BertConfig(vocab_size=100, intermediate_size=64, **sizes)
    model = nn.ModuleDict({"text": transformers.BertModel(config, add_pooling_layer=False)})
    model.add_module("video", nn.Linear(6, 32))
    bal = gb.MLB(model, {"text": model.text, "video": model.video}, 3)
    model.text(input_ids=torch.randint(0, 100, (4, 12)))
    model.video(V)
    bal.features()


def parameters_replaced() -> None:
    """As FSDP2's fully_shard does: new parameter objects under the same names."""
    model, encoders = two_towers()
    bal = gb.OGM(model, encoders, 3, parameters=lambda name, param: name.endswith("weight"))
    model.audio[0].weight = nn.Parameter(model.audio[0].weight.detach().clone())
    bal.loss(model(A, V), Y)


def mask_of_another_shape() -> None:
    model, encoders = two_towers()
    gb.MLB(model, encoders, 3).loss(model(A, V), Y, present=torch.ones(4, 3, dtype=torch.bool))


def sample_with_no_modality() -> None:
    model, encoders = two_towers()
    present = torch.ones(4, 2, dtype=torch.bool)
    present[2] = False
    gb.MLB(model, encoders, 3).loss(model(A, V), Y, present=present)


class TimeFirst(nn.Module):
    """Two encoders whose outputs are ``(T, B, D)``, pooled over time before the fusion."""

    def __init__(self) -> None:
        super().__init__()
        self.audio, self.video = nn.Linear(8, 6), nn.Linear(6, 6)
        self.fusion = nn.Linear(12, 3)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return self.fusion(torch.cat([self.audio(audio).mean(0), self.video(video).mean(0)], -1))


def mmpareto_mask_for_time_first_outputs() -> None:
    model = TimeFirst()
    bal = gb.MMPareto(model, [model.audio, model.video], 3, features=lambda out: out.mean(0))
    present = torch.ones(4, 2, dtype=torch.bool)
    bal.loss(model(torch.randn(5, 4, 8), torch.randn(5, 4, 6)), Y, present=present)


CASES: dict[str, Callable[[], None]] = {
    "joint_logits": joint_logits,
    "ogm_slices": ogm_slices,
    "agm_without_fusion": agm_without_fusion,
    "agm_width_at_construction": agm_width_at_construction,
    "agm_width_at_the_first_step": agm_width_at_the_first_step,
    "agm_one_tensor_fusion_on_outputs": agm_one_tensor_fusion_on_outputs,
    "ogm_regression": ogm_regression,
    "integer_regression_targets": integer_regression_targets,
    "regression_width": regression_width,
    "regression_classes": regression_classes,
    "classification_loss": classification_loss,
    "agm_error": agm_error,
    "cosine_head_count": cosine_head_count,
    "pmr_without_epoch_end": pmr_without_epoch_end,
    "reparametrized_after_balancer": reparametrized_after_balancer,
    "agm_many_modalities": agm_many_modalities,
    "misspelt_option": misspelt_option,
    "taken_method_name": taken_method_name,
    "unknown_method_name": unknown_method_name,
    "removed_balancer": removed_balancer,
    "unknown_logger": unknown_logger,
    "failing_logger": failing_logger,
    "reentrant_checkpoint": reentrant_checkpoint,
    "functional_transform": functional_transform,
    "unreachable_tensors": unreachable_tensors,
    "dict_without_features": dict_without_features,
    "model_output_without_pool": model_output_without_pool,
    "parameters_replaced": parameters_replaced,
    "mask_of_another_shape": mask_of_another_shape,
    "sample_with_no_modality": sample_with_no_modality,
    "mmpareto_mask_for_time_first_outputs": mmpareto_mask_for_time_first_outputs,
}


def provoke(case: Callable[[], None]) -> tuple[str, str]:
    """``(class name, message)`` of the error raised, or of the gradbalance warning issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case()
        except Exception as error:  # noqa: BLE001 - the class is what is checked
            return type(error).__name__, str(error)
    warned = (gb.errors.MissingCallWarning, gb.errors.CostWarning, gb.errors.LoggerWarning)
    issued = [w for w in caught if issubclass(w.category, warned)]
    assert issued, "the case neither raised nor warned"
    return issued[0].category.__name__, str(issued[0].message)


SLOW_CASES = ("model_output_without_pool",)  # imports transformers


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_CASES else []) for n in CASES]
)
def test_the_page_quotes_the_message_as_it_reads(name):
    kind, message = provoke(CASES[name])
    rows = [(text, kinds) for text, kinds in quoted() if message.startswith(text)]
    assert rows, f"docs/errors.md does not quote: {message}"
    assert any(f"`{kind}`" in kinds for _, kinds in rows), (kind, rows)


def test_every_error_class_has_a_row():
    text = PAGE.read_text(encoding="utf-8")
    classes = [
        value
        for value in vars(gb.errors).values()
        if isinstance(value, type)
        and issubclass(value, Exception)
        and value.__module__ == "gradbalance.errors"
    ]
    assert {c.__name__ for c in classes} >= {"UnavailableError", "MissingCallWarning"}
    for error in classes:
        assert f"| `{error.__name__}` |" in text, error.__name__
