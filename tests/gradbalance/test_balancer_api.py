"""The balancer's public behaviour: construction checks, bad calls, remove, state, history."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch
from torch import nn

import gradbalance as gb


def grads_of(model):
    return [p.grad.clone() for p in model.parameters()]


def test_mlb_changes_gradients_until_removed(two_tower):
    inputs, target = make_batch((5, 7))
    bal = gb.MLB(two_tower, encoders=list(two_tower.towers), num_classes=4, alpha=3.0)
    bal.loss(two_tower(*inputs), target).backward()
    k = bal.coefficients
    assert abs(k["towers_0"] - 1) > 1e-3 and abs(k["towers_1"] - 1) > 1e-3


def test_names_from_list_and_dict(two_tower):
    bal = gb.MLB(two_tower, encoders=list(two_tower.towers), num_classes=4)
    assert bal.names == ["towers_0", "towers_1"]
    assert list(bal.heads) == bal.names
    bal.remove()
    bal = gb.MLB(
        two_tower,
        encoders={"audio": two_tower.towers[0], "video": two_tower.towers[1]},
        num_classes=4,
    )
    inputs, target = make_batch((5, 7))
    bal.loss(two_tower(*inputs), target)
    assert list(bal.coefficients) == ["audio", "video"] == list(bal.scores)


def test_state_dict_round_trip(two_tower):
    inputs, target = make_batch((5, 7))
    bal = gb.MLB(two_tower, encoders=list(two_tower.towers), num_classes=4, alpha=2.0)
    bal.loss(two_tower(*inputs), target).backward()
    state = bal.state_dict()
    assert set(state) >= {
        "last_coefficients",
        "last_scores",
        "heads.towers_0.weight",
        "_extra_state",
    }
    assert not any(k.startswith(("towers", "fusion")) for k in state)
    other_model = MultiTowerNet((5, 7))
    other = gb.MLB(other_model, encoders=list(other_model.towers), num_classes=4, alpha=2.0)
    other.loss(other_model(*inputs), target)
    other.load_state_dict(state)
    assert other.steps == bal.steps == 1
    for key, value in bal.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other.state_dict()[key]), key
    assert other.coefficients == bal.coefficients


def test_state_dict_of_the_first_release_still_loads(two_tower):
    """Checkpoints written before the coefficients became one buffer kept one per encoder."""
    inputs, target = make_batch((5, 7))
    bal = gb.MLB(two_tower, encoders=list(two_tower.towers), num_classes=4, alpha=2.0)
    bal.loss(two_tower(*inputs), target).backward()
    state = dict(bal.state_dict())
    values = state.pop("last_coefficients")
    old = {**state, "coefficient_towers_0": values[0], "coefficient_towers_1": values[1]}
    other_model = MultiTowerNet((5, 7))
    other = gb.MLB(other_model, encoders=list(other_model.towers), num_classes=4, alpha=2.0)
    other.loss(other_model(*inputs), target)
    other.load_state_dict(old)  # strict: no missing, no unexpected key
    assert torch.equal(other.last_coefficients, values)


def test_parameters_are_only_the_heads(two_tower):
    bal = gb.MLB(two_tower, encoders=list(two_tower.towers), num_classes=4, feature_dims=[12, 12])
    own = {id(p) for p in bal.parameters()}
    assert own == {id(p) for p in bal.heads.parameters()}
    assert not own & {id(p) for p in two_tower.parameters()}


def test_lazy_heads_train_with_an_optimizer_built_before_the_first_forward(two_tower):
    bal = gb.MLB(two_tower, encoders=list(two_tower.towers), num_classes=4)
    opt = torch.optim.SGD([*two_tower.parameters(), *bal.parameters()], lr=0.1)
    inputs, target = make_batch((5, 7))
    bal.loss(two_tower(*inputs), target).backward()
    before = bal.heads["towers_0"].weight.detach().clone()
    opt.step()
    assert bal.heads["towers_0"].weight.shape == (4, 12)
    assert not torch.equal(before, bal.heads["towers_0"].weight)


class ConvNet(nn.Module):
    def __init__(self, second: nn.Module):
        super().__init__()
        self.audio = nn.Conv2d(1, 3, 3)
        self.video = second
        self.fusion = nn.LazyLinear(4)

    def forward(self, a, v):
        za = self.audio(a).mean((2, 3))
        out = self.video(v)
        zv = out[0] if isinstance(out, tuple) else out
        zv = zv.flatten(1) if zv.dim() > 2 else zv
        return self.fusion(torch.cat([za, zv], 1))


def test_conv_maps_are_average_pooled():
    model = ConvNet(nn.Conv3d(1, 2, 3))
    bal = gb.MultiLoss(model, encoders=[model.audio, model.video], num_classes=4)
    a, v = torch.randn(3, 1, 6, 6), torch.randn(3, 1, 4, 5, 5)
    bal.loss(model(a, v), torch.tensor([0, 1, 2]))
    feats = bal.features()
    torch.testing.assert_close(feats["audio"], model.audio(a).mean((2, 3)))
    torch.testing.assert_close(feats["video"], model.video(v).mean((2, 3, 4)))


class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 5)

    def forward(self, x):
        return self.proj(x)


def test_sequence_output_needs_a_pool_choice():
    model = ConvNet(Seq())
    a, v, y = torch.randn(2, 1, 6, 6), torch.randn(2, 4, 3), torch.tensor([0, 1])
    bal = gb.MultiLoss(model, encoders=[model.audio, model.video], num_classes=4)
    with pytest.raises(ValueError, match=r"'video' returned shape \(2, 4, 5\)"):
        bal.loss(model(a, v), y)
    bal.remove()
    for pool, reduce in [("tokens", lambda z: z.mean(1)), ("cls", lambda z: z[:, 0])]:
        bal = gb.MultiLoss(
            model, encoders=[model.audio, model.video], num_classes=4, pool={"video": pool}
        )
        bal.loss(model(a, v), y)
        torch.testing.assert_close(bal.features()["video"], reduce(model.video.proj(v)))
        bal.remove()


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 5)

    def forward(self, x):
        z = self.proj(x)
        return z, torch.tensor([x.shape[0]])


def test_tuple_output_needs_features_callable():
    model = ConvNet(TupleOut())
    a, v, y = torch.randn(2, 1, 6, 6), torch.randn(2, 3), torch.tensor([0, 1])
    bal = gb.MLB(model, encoders=[model.audio, model.video], num_classes=4)
    with pytest.raises(TypeError, match="'video' returned a tuple"):
        bal.loss(model(a, v), y)
    bal.remove()
    bal = gb.MLB(
        model,
        encoders=[model.audio, model.video],
        num_classes=4,
        alpha=2.0,
        features={"video": lambda out: out[0]},
    )
    bal.loss(model(a, v), y).backward()
    assert model.video.proj.weight.grad is not None


def test_in_place_op_after_the_encoder_is_allowed():
    model = nn.Module()
    model.audio, model.video, model.fusion = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(8, 3)
    bal = gb.MLB(model, encoders=[model.audio, model.video], num_classes=3)
    za = model.audio(torch.randn(5, 3)).relu_()
    zv = model.video(torch.randn(5, 2)).relu_()
    bal.loss(model.fusion(torch.cat([za, zv], 1)), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert model.audio.weight.grad is not None


# --- bad construction -------------------------------------------------------------------


def test_encoder_outside_the_model(two_tower):
    with pytest.raises(ValueError, match="not a submodule"):
        gb.MLB(two_tower, encoders=[two_tower.towers[0], nn.Linear(2, 2)], num_classes=4)


def test_duplicate_encoders(two_tower):
    with pytest.raises(ValueError, match="listed twice"):
        gb.MLB(two_tower, encoders=[two_tower.towers[0], two_tower.towers[0]], num_classes=4)


def test_nested_encoders(two_tower):
    with pytest.raises(ValueError, match="nested inside"):
        gb.MLB(two_tower, encoders=[two_tower.towers[0], two_tower.towers[0][0]], num_classes=4)


def test_model_itself_as_encoder(two_tower):
    with pytest.raises(ValueError, match="whole model"):
        gb.MLB(two_tower, encoders=[two_tower, two_tower.towers[0]], num_classes=4)


@pytest.mark.parametrize("encoders", [[], "one"])
def test_fewer_than_two_encoders(two_tower, encoders):
    chosen = [two_tower.towers[0]] if encoders == "one" else []
    with pytest.raises(ValueError, match="at least two encoders"):
        gb.MLB(two_tower, encoders=chosen, num_classes=4)


def test_single_module_instead_of_list(two_tower):
    with pytest.raises(TypeError, match="list or dict"):
        gb.MLB(two_tower, encoders=two_tower.towers[0], num_classes=4)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"beta_max": 0.0}, "beta_max"),
        ({"beta_max": -2.0}, "beta_max"),
        ({"alpha": -1.0}, "alpha"),
        ({"scale": "some"}, "scale"),
        ({"num_classes": 1}, "num_classes"),
        ({"pool": "max"}, "pool"),
        ({"unimodal_weight": -1.0}, "loss weight"),
        ({"feature_dims": [3]}, "feature_dims"),
        ({"pool": {"nope": "tokens"}}, "unknown encoders"),
    ],
)
def test_bad_options(two_tower, kwargs, error):
    options = {"num_classes": 4, **kwargs}
    with pytest.raises(ValueError, match=error):
        gb.MLB(two_tower, encoders=list(two_tower.towers), **options)


def test_wrapped_model_is_refused(two_tower):
    with pytest.raises(ValueError, match="Create the balancer on the plain model first"):
        gb.MLB(nn.DataParallel(two_tower), encoders=list(two_tower.towers), num_classes=4)


def test_extra_parameter_inside_encoder_is_refused(two_tower):
    with pytest.raises(ValueError, match="inside that encoder"):
        gb.MLB(
            two_tower,
            encoders={"a": two_tower.towers[0], "v": two_tower.towers[1]},
            num_classes=4,
            extra_parameters={"a": [two_tower.towers[0][0].weight]},
        )


# --- bad calls --------------------------------------------------------------------------


@pytest.fixture
def ready(two_tower):
    bal = gb.MLB(two_tower, encoders=list(two_tower.towers), num_classes=4)
    inputs, target = make_batch((5, 7))
    return two_tower, bal, inputs, target


def test_loss_before_forward(ready):
    _, bal, _, target = ready
    with pytest.raises(RuntimeError, match="produced no output"):
        bal.loss(torch.randn(10, 4, requires_grad=True), target)


def test_loss_twice_after_one_forward(ready):
    model, bal, inputs, target = ready
    bal.loss(model(*inputs), target)
    with pytest.raises(RuntimeError, match="produced no output since the last loss"):
        bal.loss(model.fusion(torch.randn(10, 24)), target)


def test_encoder_not_called(ready):
    model, bal, inputs, target = ready
    z = model.towers[0](inputs[0])
    with pytest.raises(RuntimeError, match=r"\['towers_1'\]"):
        bal.loss(model.fusion(torch.cat([z, z], 1)), target)


@pytest.mark.parametrize(
    "bad_target, error, match",
    [
        (torch.full((10,), 4), RuntimeError, r"in \[0, 4\)"),
        (torch.full((10,), -1), RuntimeError, r"in \[0, 4\)"),
        (torch.zeros(10, 1, dtype=torch.long), ValueError, "shape"),
        (torch.zeros(9, dtype=torch.long), ValueError, "shape"),
        (torch.zeros(10), TypeError, "integer class indices"),
    ],
)
def test_bad_labels(ready, bad_target, error, match):
    model, bal, inputs, _ = ready
    with pytest.raises(error, match=match):
        bal.loss(model(*inputs), bad_target)


def test_logits_width_differs_from_num_classes(two_tower):
    bal = gb.MLB(two_tower, encoders=list(two_tower.towers), num_classes=5)
    inputs, target = make_batch((5, 7))
    with pytest.raises(ValueError, match="num_classes=5"):
        bal.loss(two_tower(*inputs), target)


# --- switches, validation, history ------------------------------------------------------


def test_disabled_mlb_is_multiloss(two_tower):
    inputs, target = make_batch((5, 7))
    twin = copy.deepcopy(two_tower)
    bal = gb.MLB(
        two_tower,
        encoders=list(two_tower.towers),
        num_classes=4,
        alpha=3.0,
        feature_dims=[12, 12],
        enabled=False,
    )
    ref = gb.MultiLoss(twin, encoders=list(twin.towers), num_classes=4, feature_dims=[12, 12])
    ref.heads.load_state_dict(bal.heads.state_dict())
    bal.loss(two_tower(*inputs), target).backward()
    ref.loss(twin(*inputs), target).backward()
    assert all(v == 1 for v in bal.coefficients.values())
    for a, b in zip(grads_of(two_tower), grads_of(twin)):
        torch.testing.assert_close(a, b)
    bal.enabled = True
    two_tower.zero_grad()
    bal.loss(two_tower(*inputs), target).backward()
    assert any(abs(v - 1) > 1e-3 for v in bal.coefficients.values())


def test_validation_loss_leaves_state_alone(ready):
    model, bal, inputs, target = ready
    bal.loss(model(*inputs), target).backward()
    before = bal.coefficients, bal.steps, len(bal.history["towers_0"]["coefficients"])
    with torch.no_grad():
        val = bal.loss(model(*[x * 3 for x in inputs]), target)
    assert torch.isfinite(val)
    assert (bal.coefficients, bal.steps, len(bal.history["towers_0"]["coefficients"])) == before


def test_history_records_every_step_and_flushes(two_tower):
    bal = gb.MLB(
        two_tower, encoders=list(two_tower.towers), num_classes=4, alpha=2.0, flush_every=3
    )
    opt = torch.optim.SGD([*two_tower.parameters(), *bal.parameters()], lr=0.05)
    seen = []
    for step in range(7):
        inputs, target = make_batch((5, 7), seed=step)
        opt.zero_grad()
        bal.loss(two_tower(*inputs), target).backward()
        opt.step()
        seen.append((bal.coefficients["towers_0"].item(), bal.scores["towers_1"].item()))
    history = bal.history
    assert history["towers_0"]["coefficients"].tolist() == pytest.approx([k for k, _ in seen])
    assert history["towers_1"]["scores"].tolist() == pytest.approx([s for _, s in seen])
    assert bal.steps == 7


def test_plot_history_writes_png(tmp_path, two_tower):
    bal = gb.MLB(two_tower, encoders=list(two_tower.towers), num_classes=4)
    for step in range(3):
        inputs, target = make_batch((5, 7), seed=step)
        bal.loss(two_tower(*inputs), target).backward()
    path = gb.plot_history(bal.history, tmp_path / "k.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_joint_probes_send_no_gradient_into_encoders(two_tower):
    inputs, target = make_batch((5, 7))
    twin = copy.deepcopy(two_tower)
    bal = gb.Joint(two_tower, encoders=list(two_tower.towers), num_classes=4, probes=True)
    bal.loss(two_tower(*inputs), target).backward()
    F.cross_entropy(twin(*inputs), target).backward()
    for a, b in zip(grads_of(two_tower), grads_of(twin)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(p.grad is not None for p in bal.parameters())
    logits = bal.unimodal_logits()
    assert logits["towers_0"].shape == (10, 4) and not logits["towers_0"].requires_grad


def test_joint_without_probes_has_no_parameters(two_tower):
    bal = gb.Joint(two_tower, encoders=list(two_tower.towers), num_classes=4)
    assert list(bal.parameters()) == []
    inputs, target = make_batch((5, 7))
    loss = bal.loss(two_tower(*inputs), target)
    torch.testing.assert_close(loss, F.cross_entropy(two_tower(*inputs), target))


def test_balancer_collected_during_an_optimizer_step(two_tower):
    """A balancer garbage-collected while an optimizer steps does not disturb that step."""
    import gc
    import weakref

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from gradbalance import _attach as attach_module

    doomed = [MultiTowerNet((5, 7))]
    doomed.append(gb.MLB(doomed[0], list(doomed[0].towers), num_classes=4, feature_dims=[12, 12]))
    bal = gb.MLB(two_tower, encoders=list(two_tower.towers), num_classes=4, feature_dims=[12, 12])
    collected = weakref.ref(doomed[1])
    opt = torch.optim.SGD([*two_tower.parameters(), *bal.parameters()], lr=0.1)

    def collect(optimizer, args, kwargs):
        doomed.clear()
        gc.collect()

    handle = register_optimizer_step_pre_hook(collect)
    try:
        inputs, target = make_batch((5, 7))
        bal.loss(two_tower(*inputs), target).backward()
        opt.step()
        bal.loss(two_tower(*inputs), target).backward()
        opt.step()
    finally:
        handle.remove()
    assert bal.steps == 2
    assert collected() is None
    assert bal in attach_module._WATCHED
