"""The capture and scaling path off the happy path, for every method of ``gb.METHODS``.

* an encoder returning the user's own dataclass: every tensor it holds is scaled (and
  MMPareto combines it); an object whose tensors cannot be reached is refused at the first
  forward, naming its type and the fix;
* the encoders called in another order than the balancer lists them: each head reads its
  own encoder's feature;
* one encoder compiled on its own after the balancer (``model.audio.compile()`` or
  ``model.audio = torch.compile(model.audio)``), the other eager: trains like eager;
* ``torch.func`` transforms over a balanced model: a gradbalance error naming the supported
  ways (``torch.func.functional_call`` without a transform trains like an ordinary call, and
  transforms run inside ``bal.paused()``);
* an encoder inside ``torch.utils.checkpoint(..., use_reentrant=True)``: the error asking for
  ``use_reentrant=False``, naming the encoder;
* ``pool=`` with an encoder returning a Hugging Face ``ModelOutput``: applied to its
  ``last_hidden_state``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from balancer_factories import FACTORIES, HIDDEN, INPUT_DIMS, NUM_CLASSES, factory_params
from conftest import make_batch
from contract_models import TowerNet
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

import gradbalance as gb


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def gradients(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]


def assert_same_gradients(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# --- row 2: an encoder returning the user's own dataclass -------------------------------------


@dataclass
class Encoded:
    feature: torch.Tensor  # what the heads read (features=)
    side: torch.Tensor  # read by the model's fusion only


@dataclass(frozen=True)
class FrozenEncoded:
    feature: torch.Tensor
    side: torch.Tensor


Pack = Callable[[torch.Tensor, torch.Tensor], Any]
Unpack = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]

OUTPUTS: dict[str, tuple[Pack, Unpack]] = {
    "tuple": (lambda z, s: (z, s), lambda out: out),  # the reference: a pytree container
    "dataclass": (Encoded, lambda out: (out.feature, out.side)),
    "frozen_dataclass": (FrozenEncoded, lambda out: (out.feature, out.side)),
    "dataclass_in_a_dict": (
        lambda z, s: {"out": Encoded(z, s)},
        lambda out: (out["out"].feature, out["out"].side),
    ),
}


class PackedTower(nn.Sequential):
    """A tower of ``TowerNet`` plus a side branch ``side(x)``; returns both, packed."""

    def __init__(self, dim: int, kind: str):
        super().__init__(nn.Linear(dim, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN))
        self.side = nn.Linear(dim, HIDDEN)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        z = self[2](self[1](self[0](x)))
        return OUTPUTS[self.kind][0](z, self.side(x))


class PackedNet(nn.Module):
    """Two packed towers; the fusion reads ``feature + side`` of each."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.towers = nn.ModuleList(PackedTower(d, kind) for d in INPUT_DIMS)
        self.fusion = nn.Linear(HIDDEN * len(INPUT_DIMS), NUM_CLASSES)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        parts = [OUTPUTS[self.kind][1](tower(x)) for tower, x in zip(self.towers, inputs)]
        return self.fusion(torch.cat([z + s for z, s in parts], dim=-1))


def packed(name: str, kind: str) -> tuple[PackedNet, gb.Balancer]:
    torch.manual_seed(0)
    model = PackedNet(kind)
    torch.manual_seed(1)
    unpack = OUTPUTS[kind][1]
    return model, FACTORIES[name](model, features=lambda out: unpack(out)[0])


def two_steps(model: nn.Module, bal: gb.Balancer) -> list[list[torch.Tensor]]:
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    seen = []
    for seed in range(2):
        opt.zero_grad(set_to_none=True)
        inputs, target = make_batch(INPUT_DIMS, seed=seed)
        bal.loss(model(*inputs), target).backward()
        bal.after_backward()
        seen.append(gradients(model, bal))
        opt.step()
    return seen


@pytest.mark.parametrize("kind", ["dataclass", "frozen_dataclass", "dataclass_in_a_dict"])
@pytest.mark.parametrize("name", factory_params())
def test_dataclass_output_trains_like_a_tuple_output(name, kind):
    """Every tensor of the dataclass is scaled (combined by MMPareto): the gradients of every
    parameter, model and balancer, equal those of the same model returning a tuple."""
    model, bal = packed(name, kind)
    reference_model, reference = packed(name, "tuple")
    for got, expected in zip(two_steps(model, bal), two_steps(reference_model, reference)):
        assert_same_gradients(got, expected)
    torch.testing.assert_close(
        torch.stack(list(bal.coefficients.values())),
        torch.stack(list(reference.coefficients.values())),
    )
    if isinstance(bal, gb.MMPareto):
        assert all(c != 0 for c in bal.cosines.values())
        torch.testing.assert_close(bal.cosine_values, reference.cosine_values)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name", factory_params())
def test_dataclass_output_under_compile_trains_like_eager_in_one_graph(name):
    model, bal = packed(name, "dataclass")
    reference_model, reference = packed(name, "tuple")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)  # after the balancer
    for got, expected in zip(two_steps(compiled, bal), two_steps(reference_model, reference)):
        assert_same_gradients(got, expected)
    assert counter.frame_count == 1  # no graph break


FUSED_PATH_FACTOR: dict[str, Callable[[gb.Balancer, str], torch.Tensor | float]] = {
    "mmpareto": lambda bal, _: bal.gamma,  # g_uni = 0 on the side branch: gamma * g_mm
    "gblend": lambda bal, _: bal.weights["fused"],  # the fused loss's weight
}
"""The factor on the fused loss's gradient of a parameter that the fused path alone reaches:
the encoder's coefficient for methods that scale gradients, 1 for the others, except these."""


@pytest.mark.parametrize("name", factory_params())
def test_dataclass_fields_get_k_times_the_plain_gradient(name):
    """The side branch reaches the loss only through the model's fused path: its parameters'
    gradient is k (the method's factor) times the plain cross-entropy gradient, by hand."""
    model, bal = packed(name, "dataclass")
    plain = copy.deepcopy(model)  # the plain model: no balancer travels with a copy
    inputs, target = make_batch(INPUT_DIMS)
    bal.loss(model(*inputs), target).backward()
    owners = [n for n, tower in zip(bal.names, plain.towers) for _ in tower.side.parameters()]
    side_params = [p for tower in plain.towers for p in tower.side.parameters()]
    by_hand = torch.autograd.grad(F.cross_entropy(plain(*inputs), target), side_params)
    if name in FUSED_PATH_FACTOR:
        factor = {n: FUSED_PATH_FACTOR[name](bal, n) for n in bal.names}
    elif bal.scales_gradients:
        factor = bal.coefficients
        assert any(abs(float(k) - 1) > 1e-3 for k in factor.values()), "k must differ from 1"
    else:
        factor = dict.fromkeys(bal.names, 1.0)
    expected = [factor[n] * g for n, g in zip(owners, by_hand)]
    got = [p.grad for tower in model.towers for p in tower.side.parameters()]
    assert_same_gradients(got, expected)


class Opaque:
    """An object of the user's that holds a tensor (neither a container nor a dataclass)."""

    def __init__(self, feature: torch.Tensor):
        self.feature = feature


class OpaqueTower(nn.Sequential):
    def forward(self, x: torch.Tensor) -> Opaque:
        return Opaque(super().forward(x))


class OpaqueNet(TowerNet):
    """The first tower returns an :class:`Opaque`."""

    def __init__(self):
        super().__init__(INPUT_DIMS)
        self.towers[0] = OpaqueTower(*self.towers[0])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        first, second = (tower(x) for tower, x in zip(self.towers, inputs))
        return self.fusion(torch.cat([first.feature, second], dim=-1))


@pytest.mark.parametrize("name", factory_params())
def test_output_holding_unreachable_tensors_is_refused_at_the_first_forward(name):
    """Never partly scaled: the first forward (PMR's prototype pass in its factory) raises."""
    torch.manual_seed(0)
    model = OpaqueNet()
    inputs, _ = make_batch(INPUT_DIMS)
    with pytest.raises(TypeError, match=r"'towers_0' returned a Opaque .*register_pytree_node"):
        FACTORIES[name](model, features={"towers_0": lambda out: out.feature})
        model(*inputs)


# --- the encoders called in another order than the balancer lists them -----------------------


class ReversedNet(TowerNet):
    """Runs the second tower before the first (the fusion order is unchanged)."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        second = self.towers[1](inputs[1])
        first = self.towers[0](inputs[0])
        return self.fusion(torch.cat([first, second], dim=-1))


@pytest.mark.parametrize("name", factory_params())
def test_encoders_called_in_another_order_train_like_in_order(name):
    """Each head reads its own encoder's feature, whatever order the model calls them in."""
    torch.manual_seed(0)
    model = ReversedNet(INPUT_DIMS)
    in_order = TowerNet(INPUT_DIMS)
    in_order.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    bal = FACTORIES[name](model)
    torch.manual_seed(1)
    reference = FACTORIES[name](in_order)
    for got, expected in zip(two_steps(model, bal), two_steps(in_order, reference)):
        assert_same_gradients(got, expected)
    assert list(bal.features()) == bal.names
    for n in bal.names:
        torch.testing.assert_close(bal.scores[n], reference.scores[n])
        torch.testing.assert_close(bal.coefficients[n], reference.coefficients[n])


# --- row 8: one encoder compiled on its own, after the balancer -------------------------------


def compile_one_encoder(model: TowerNet, how: str) -> None:
    if how == "module.compile()":
        model.towers[0].compile(backend="aot_eager")
    else:
        model.towers[0] = torch.compile(model.towers[0], backend="aot_eager")


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("how", ["module.compile()", "torch.compile(module)"])
@pytest.mark.parametrize("name", factory_params())
def test_one_encoder_compiled_after_the_balancer_trains_like_eager(name, how):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    eager_model = copy.deepcopy(model)
    torch.manual_seed(1)
    bal = FACTORIES[name](model)
    torch.manual_seed(1)
    eager = FACTORIES[name](eager_model)
    compile_one_encoder(model, how)
    for step in range(2):
        inputs, target = make_batch(INPUT_DIMS, seed=step)
        for m, b in ((model, bal), (eager_model, eager)):
            m.zero_grad(set_to_none=True)
            b.zero_grad(set_to_none=True)
            b.loss(m(*inputs), target).backward()
        assert_same_gradients(gradients(model, bal), gradients(eager_model, eager))
        for n in bal.names:
            torch.testing.assert_close(bal.coefficients[n], eager.coefficients[n])
    assert bal.steps == eager.steps == 2
    # A forward that skips the compiled encoder after an abandoned one: never the output of
    # the earlier forward.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the abandoned forward
        model(*inputs)
        model.skip = 0
        logits = model(*inputs)
    with pytest.raises(gb.errors.CaptureError, match="towers_0"):
        bal.loss(logits, target)


# --- row 9: torch.func transforms -------------------------------------------------------------


@pytest.mark.parametrize("name", factory_params())
def test_torch_func_grad_over_a_balanced_model_names_the_supported_ways(name):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    bal = FACTORIES[name](model)
    inputs, target = make_batch(INPUT_DIMS)
    params = dict(model.named_parameters())

    def balanced_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return bal.loss(torch.func.functional_call(model, p, tuple(inputs)), target)

    with pytest.raises(gb.errors.CaptureError, match=r"torch\.func transform.*bal\.paused\(\)"):
        torch.func.grad(balanced_loss)(params)
    assert bal.steps == 0
    # The ordinary step still works after the refusal.
    bal.loss(model(*inputs), target).backward()
    assert bal.steps == 1


@pytest.mark.parametrize("name", factory_params())
def test_functional_call_trains_like_the_module_call(name):
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    twin = copy.deepcopy(model)
    torch.manual_seed(1)
    bal = FACTORIES[name](model)
    torch.manual_seed(1)
    reference = FACTORIES[name](twin)
    inputs, target = make_batch(INPUT_DIMS)
    params = dict(model.named_parameters())
    bal.loss(torch.func.functional_call(model, params, tuple(inputs)), target).backward()
    reference.loss(twin(*inputs), target).backward()
    assert_same_gradients(gradients(model, bal), gradients(twin, reference))


@pytest.mark.parametrize("name", factory_params())
def test_torch_func_transforms_run_inside_paused(name):
    """Per-sample gradients of the plain loss (vmap over grad), inside ``bal.paused()``."""
    torch.manual_seed(0)
    model = TowerNet(INPUT_DIMS)
    plain = copy.deepcopy(model)
    bal = FACTORIES[name](model)
    inputs, target = make_batch(INPUT_DIMS, batch=4)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, *sample):
        *xs, y = (t.unsqueeze(0) for t in sample)
        return F.cross_entropy(torch.func.functional_call(model, p, tuple(xs)), y)

    with bal.paused():
        per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0, 0))(
            params, *inputs, target
        )
    weight = plain.fusion.weight
    for i in range(4):
        loss = F.cross_entropy(plain(*(x[i : i + 1] for x in inputs)), target[i : i + 1])
        (expected,) = torch.autograd.grad(loss, weight)
        torch.testing.assert_close(per_sample["fusion.weight"][i], expected)


# --- row 10: an encoder inside reentrant activation checkpointing ------------------------------


class ReentrantNet(TowerNet):
    """``checkpointed`` holds the indices of the towers run by reentrant checkpointing."""

    checkpointed: frozenset[int] = frozenset()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        zs = [
            checkpoint(tower, x, use_reentrant=True) if i in self.checkpointed else tower(x)
            for i, (tower, x) in enumerate(zip(self.towers, inputs))
        ]
        return self.fusion(torch.cat(zs, dim=-1))


@pytest.mark.parametrize("which", [{0}, {1}, {0, 1}], ids=["first", "second", "both"])
@pytest.mark.parametrize("name", factory_params())
def test_reentrant_checkpointing_of_any_encoder_asks_for_use_reentrant_false(name, which):
    torch.manual_seed(0)
    model = ReentrantNet(INPUT_DIMS)
    bal = FACTORIES[name](model)
    model.checkpointed = frozenset(which)
    inputs, target = make_batch(INPUT_DIMS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # checkpoint: inputs without grad
        logits = model(*[x.clone().requires_grad_() for x in inputs])
    with pytest.raises(gb.errors.CaptureError, match="use_reentrant=False") as raised:
        bal.loss(logits, target)
    assert all(f"'towers_{i}'" in str(raised.value) for i in which)
    model.checkpointed = frozenset()
    bal.loss(model(*inputs), target).backward()  # the next ordinary step works
    assert bal.steps == 1


# --- row 14: pool= with a Hugging Face ModelOutput --------------------------------------------

TOKENS = 4


class HuggingFaceTower(nn.Sequential):
    """``Linear(d, .)`` into a tiny Hugging Face model built from a config (no download); it
    returns the model's ``ModelOutput``."""

    def __init__(self, dim: int, kind: str):
        from transformers import BertConfig, BertModel, ViTConfig, ViTModel

        small = {
            "hidden_size": HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }
        if kind == "bert":
            body = BertModel(BertConfig(vocab_size=8, **small), add_pooling_layer=False)
            super().__init__(nn.Linear(dim, TOKENS * HIDDEN), body)
        else:  # ViT on 3 x 4 x 4 images in 2 x 2 patches: 4 patches and the CLS token
            body = ViTModel(
                ViTConfig(image_size=4, patch_size=2, num_channels=3, **small),
                add_pooling_layer=False,
            )
            super().__init__(nn.Linear(dim, 3 * 4 * 4), body)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        h = self[0](x)
        if self.kind == "bert":
            return self[1](inputs_embeds=h.view(len(x), TOKENS, HIDDEN))
        return self[1](pixel_values=h.view(len(x), 3, 4, 4))


class HuggingFaceNet(nn.Module):
    """A BERT and a ViT tower; the fusion reads BERT's CLS token and ViT's mean token."""

    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList(
            [HuggingFaceTower(INPUT_DIMS[0], "bert"), HuggingFaceTower(INPUT_DIMS[1], "vit")]
        )
        self.fusion = nn.Linear(2 * HIDDEN, NUM_CLASSES)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        text, image = (tower(x).last_hidden_state for tower, x in zip(self.towers, inputs))
        return self.fusion(torch.cat([text[:, 0], image.mean(1)], dim=-1))


POOLS = {"towers_0": "cls", "towers_1": "tokens"}
BY_HAND = {
    "towers_0": lambda out: out.last_hidden_state[:, 0],
    "towers_1": lambda out: out.last_hidden_state.mean(1),
}


def hugging_face(name: str, **options: Any) -> tuple[HuggingFaceNet, gb.Balancer]:
    torch.manual_seed(0)
    model = HuggingFaceNet()
    torch.manual_seed(1)
    return model, FACTORIES[name](model, **options)


@pytest.mark.parametrize("name", factory_params())
def test_pool_applies_to_the_last_hidden_state_of_a_model_output(name):
    model, bal = hugging_face(name, pool=POOLS)
    reference_model, reference = hugging_face(name, features=BY_HAND)
    inputs, target = make_batch(INPUT_DIMS)
    for m, b in ((model, bal), (reference_model, reference)):
        b.loss(m(*inputs), target).backward()
        b.after_backward()
    features = bal.features()
    with torch.no_grad():
        outputs = [tower(x) for tower, x in zip(reference_model.towers, inputs)]
    for encoder, out in zip(bal.names, outputs):
        torch.testing.assert_close(features[encoder], BY_HAND[encoder](out))
    assert_same_gradients(gradients(model, bal), gradients(reference_model, reference))


@pytest.mark.parametrize("name", factory_params())
def test_model_output_without_pool_names_the_last_hidden_state_and_pool(name):
    """At the first loss() (PMR: its prototype pass in the factory)."""
    inputs, target = make_batch(INPUT_DIMS)
    with pytest.raises(
        gb.errors.ConfigurationError,
        match=r"'towers_0' returned a BaseModelOutput\w* whose last_hidden_state has shape "
        r"\(\d+, 4, 12\).*pool=\{'towers_0': 'tokens'\}",
    ):
        model, bal = hugging_face(name, pool={"towers_1": "tokens"})
        bal.loss(model(*inputs), target)
