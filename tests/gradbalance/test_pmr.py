"""PMR against manual computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import MultiTowerNet, make_batch

import gradbalance as gb


def class_means(features, target, num_classes):
    """Per-class means written as a loop (None for an absent class)."""
    out = []
    for k in range(num_classes):
        rows = [features[i] for i in range(len(target)) if target[i] == k]
        out.append(torch.stack(rows).mean(0) if rows else None)
    return out


def features_of(model, inputs):
    with torch.no_grad():
        return [t(x) for t, x in zip(model.towers, inputs)]


def distances(z, prototypes):
    return ((z[:, None, :] - prototypes[None]) ** 2).sum(-1).sqrt()


def test_accumulated_prototypes_momentum_and_absent_classes():
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    bal = gb.PMR(model, list(model.towers), num_classes=4, momentum=0.3)
    batches = [make_batch((5, 7), batch=12, seed=s) for s in range(2)]
    feats = []
    for inputs, target in batches:  # epoch 0: two steps, no prototypes yet
        feats.append((features_of(model, inputs), target))
        logits = model(*inputs)
        torch.testing.assert_close(bal.loss(logits, target), F.cross_entropy(logits, target))
    bal.epoch_end()
    all_target = torch.cat([t for _, t in feats])
    first = {}
    for m, name in enumerate(bal.names):
        z = torch.cat([f[m] for f, _ in feats])
        means = class_means(z, all_target, 4)
        first[name] = means
        for k, mean in enumerate(means):
            torch.testing.assert_close(bal.prototypes()[name][k], mean, atol=1e-6, rtol=1e-5)
    assert bal.prototype_valid.all()
    # Epoch 1: one batch without class 3.
    inputs, target = make_batch((5, 7), batch=12, seed=5)
    target = target % 3
    z_epoch = features_of(model, inputs)
    bal.loss(model(*inputs), target)
    bal.epoch_end()
    for m, name in enumerate(bal.names):
        new = class_means(z_epoch[m], target, 4)
        for k in range(4):
            expected = first[name][k] if new[k] is None else 0.7 * new[k] + 0.3 * first[name][k]
            torch.testing.assert_close(bal.prototypes()[name][k], expected, atol=1e-6, rtol=1e-5)
    assert not any(torch.isnan(p).any() for p in bal.prototypes().values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradients_against_manual(seed):
    torch.manual_seed(seed)
    model = MultiTowerNet((5, 7))
    reference = copy.deepcopy(model)  # (a model with a balancer's hooks cannot be copied)
    bal = gb.PMR(model, list(model.towers), num_classes=4, alpha=1.5, momentum=0.0)
    inputs, target = make_batch((5, 7), batch=16, seed=seed)
    bal.loss(model(*inputs), target)
    bal.epoch_end()
    prototypes = bal.prototypes()
    # The manual loss, written out.
    feats = [t(x) for t, x in zip(reference.towers, inputs)]
    fused = reference.fusion(torch.cat(feats, 1))
    scores, proto_ce = [], []
    for z, name in zip(feats, bal.names):
        logits = -distances(z, prototypes[name])
        probs = torch.softmax(logits.detach(), 1)
        scores.append(sum(probs[i, target[i]].item() for i in range(16)) / 16)
        proto_ce.append(F.cross_entropy(logits, target))
    weights = [1.5, 0.0] if scores[0] < scores[1] else [0.0, 1.5]
    manual = F.cross_entropy(fused, target) + weights[0] * proto_ce[0] + weights[1] * proto_ce[1]
    manual.backward()
    loss = bal.loss(model(*inputs), target)
    loss.backward()
    torch.testing.assert_close(loss, manual, atol=1e-5, rtol=1e-5)
    assert [v.item() for v in bal.scores.values()] == pytest.approx(scores, rel=1e-5)
    assert [v.item() for v in bal.coefficients.values()] == weights  # weaker modality only
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)


def test_a_class_never_seen_gets_no_nan_and_no_loss():
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    reference = copy.deepcopy(model)
    bal = gb.PMR(model, list(model.towers), num_classes=4, alpha=1.0)
    inputs, target = make_batch((5, 7), batch=12)
    target = target % 3  # class 3 never appears
    bal.loss(model(*inputs), target)
    bal.epoch_end()
    assert bal.prototype_valid.tolist() == [[True, True, True, False]] * 2  # per modality
    target = target.clone()
    target[:4] = 3  # samples of the unseen class: left out of the prototype loss
    loss = bal.loss(model(*inputs), target)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    feats = [t(x) for t, x in zip(reference.towers, inputs)]
    manual = F.cross_entropy(reference.fusion(torch.cat(feats, 1)), target)
    weights = [v.item() for v in bal.coefficients.values()]
    for w, z, name in zip(weights, feats, bal.names):
        logits = -distances(z, bal.prototypes()[name][:3])
        manual = manual + w * F.cross_entropy(logits[4:], target[4:])
    torch.testing.assert_close(loss, manual, atol=1e-5, rtol=1e-5)


def test_explicit_prototype_pass():
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    bal = gb.PMR(model, list(model.towers), num_classes=4, prototypes="explicit", momentum=0.0)
    inputs, target = make_batch((5, 7), batch=12)
    bal.loss(model(*inputs), target)  # a training step collects nothing in this mode
    bal.epoch_end()
    assert not bal.ready
    model.eval()
    with torch.no_grad():
        for half in (slice(0, 6), slice(6, 12)):
            model(*(x[half] for x in inputs))
            bal.collect(target[half])
        bal.update_prototypes()
        with pytest.raises(RuntimeError, match="no output"):
            bal.collect(target)  # the forward was consumed
    model.train()
    assert bal.ready
    for m, name in enumerate(bal.names):
        means = class_means(features_of(model, inputs)[m], target, 4)
        for k, mean in enumerate(means):
            torch.testing.assert_close(bal.prototypes()[name][k], mean, atol=1e-6, rtol=1e-5)


def test_window_and_batch_norm_option():
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    bal = gb.PMR(model, list(model.towers), num_classes=4, window=(0, 1), batch_norm=True)
    inputs, target = make_batch((5, 7), batch=12)
    bal.loss(model(*inputs), target)
    bal.epoch_end()
    z = features_of(model, inputs)[0]
    standardised = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    for k, mean in enumerate(class_means(standardised, target, 4)):
        torch.testing.assert_close(bal.prototypes()["towers_0"][k], mean, atol=1e-5, rtol=1e-5)
    logits = model(*inputs)
    assert bal.loss(logits, target) > F.cross_entropy(logits, target)  # epoch 1: in the window
    bal.epoch_end()
    logits = model(*inputs)
    torch.testing.assert_close(bal.loss(logits, target), F.cross_entropy(logits, target))


@pytest.mark.parametrize("dims", [None, [12, 12]])
def test_state_dict_round_trip(dims):
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    twin = copy.deepcopy(model)
    bal = gb.PMR(model, list(model.towers), num_classes=4, feature_dims=dims)
    for epoch in range(2):
        inputs, target = make_batch((5, 7), batch=12, seed=epoch)
        bal.loss(model(*inputs), target)
        bal.epoch_end()
    inputs, target = make_batch((5, 7), batch=12, seed=7)
    bal.loss(model(*inputs), target)  # half an epoch accumulated
    other = gb.PMR(twin, list(twin.towers), num_classes=4, feature_dims=dims)
    other.load_state_dict(bal.state_dict())
    assert other.ready and other.epoch == 2 and other.steps == 3
    for key, value in bal.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other.state_dict()[key]), key
    for net, balancer in ((model, bal), (twin, other)):
        balancer.loss(net(*inputs), target).backward()
        balancer.epoch_end()
    for a, b in zip(bal.prototypes().values(), other.prototypes().values()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_errors():
    model = MultiTowerNet((5, 7, 3))
    with pytest.raises(ValueError, match="alpha"):
        gb.PMR(model, list(model.towers), num_classes=4, alpha=-1.0)
    towers = list(model.towers)[:2]
    with pytest.raises(ValueError, match="momentum"):
        gb.PMR(model, towers, num_classes=4, momentum=1.0)
    with pytest.raises(ValueError, match="prototypes"):
        gb.PMR(model, towers, num_classes=4, prototypes="eval")
    assert not any(t._forward_hooks for t in model.towers)


@pytest.mark.parametrize("first_blend_epoch", [0, 1])
def test_first_blend_epoch_follows_the_official_momentum_schedule(first_blend_epoch):
    """Explicit prototypes: an initial pass before training, then each epoch trains, runs the
    prototype pass and ends (``epoch_end()``). With ``first_blend_epoch=1`` (the official
    schedule) the prototypes after epoch 0 are the plain class means of that pass, although the
    initial pass gave prototypes; blending starts after epoch 1. With the default 0 the update
    after epoch 0 already blends."""
    torch.manual_seed(0)
    model = MultiTowerNet((5, 7))
    options = {"first_blend_epoch": 1} if first_blend_epoch else {}
    bal = gb.PMR(model, list(model.towers), 4, prototypes="explicit", momentum=0.3, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def prototype_pass(seed):
        inputs, _ = make_batch((5, 7), batch=16, seed=seed)
        target = torch.arange(16) % 4
        with torch.no_grad():
            model(*inputs)
            bal.collect(target)
        bal.update_prototypes()
        return [class_means(z, target, 4) for z in features_of(model, inputs)]

    initial = prototype_pass(100)
    for m, name in enumerate(bal.names):
        torch.testing.assert_close(bal.prototypes()[name], torch.stack(initial[m]))
    for epoch in range(2):
        previous = bal.prototypes()
        for step in range(2):
            opt.zero_grad()
            inputs, target = make_batch((5, 7), seed=10 * epoch + step)
            bal.loss(model(*inputs), target).backward()
            opt.step()
        means = prototype_pass(200 + epoch)
        blends = epoch >= first_blend_epoch
        for m, name in enumerate(bal.names):
            plain = torch.stack(means[m])
            expected = 0.7 * plain + 0.3 * previous[name] if blends else plain
            assert not torch.allclose(plain, previous[name], atol=1e-3)  # the model changed
            torch.testing.assert_close(bal.prototypes()[name], expected, atol=1e-6, rtol=1e-5)
        bal.epoch_end()
