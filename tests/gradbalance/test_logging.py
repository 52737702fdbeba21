"""gradbalance.integrations: a balancer's values written to JSON lines, CSV, TensorBoard, a
Lightning logger and the Hugging Face Trainer's logs, checked against ``bal.history`` (the
same values, recorded independently on the device) and the methods' own attributes; one host
read per logged step, none on the others; bad loggers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import MultiTowerNet, make_batch
from torch.utils._python_dispatch import TorchDispatchMode

import gradbalance as gb
from gradbalance.integrations import BalancerLog, balancer_values


def _mlb():
    torch.manual_seed(0)
    model = gb.testing.TwoTowerNet()
    bal = gb.MLB(model, encoders={"audio": model.audio, "video": model.video}, num_classes=3)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    return model, bal, opt


def _train(model, bal, opt, log=None, steps=6):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        a, v = torch.randn(8, 8, generator=g), torch.randn(8, 6, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        bal.loss(model(a, v), y).backward()
        opt.step()
        if log is not None:
            log.step()


def _expected(bal, step):
    """The history's values of the training step after which ``bal.steps`` was ``step``."""
    history = bal.history
    index = history.steps.tolist().index(step - 1)
    return {
        f"{key}_{name}": float(history[name][series][index])
        for key, series in (("k", "coefficients"), ("score", "scores"))
        for name in history
    }


def test_json_lines_hold_the_history_of_the_logged_steps(tmp_path):
    model, bal, opt = _mlb()
    path = tmp_path / "sub" / "balance.jsonl"
    log = BalancerLog(bal, path, every=3)
    _train(model, bal, opt, log, steps=7)
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert log.logged == 2
    for record in records:
        expected = _expected(bal, record["step"])
        assert record == pytest.approx({"step": record["step"], "epoch": 0, **expected})
    assert len({r["k_audio"] for r in records}) == 2  # the values of each logged step


def test_csv_rows_hold_the_history_and_the_epoch(tmp_path):
    model, bal, opt = _mlb()
    log = BalancerLog(bal, tmp_path / "balance.csv", every=2)
    _train(model, bal, opt, log, steps=2)
    bal.epoch_end()
    _train(model, bal, opt, log, steps=2)
    log.close()
    with (tmp_path / "balance.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["step", "epoch", "k_audio", "k_video", "score_audio", "score_video"]
    assert [(int(r["step"]), int(r["epoch"])) for r in rows] == [(2, 0), (4, 1)]
    for row in rows:
        expected = _expected(bal, int(row["step"]))
        assert {k: float(row[k]) for k in expected} == pytest.approx(expected)


def test_a_step_is_logged_once_and_every_counts_the_balancers_steps():
    model, bal, opt = _mlb()
    seen = []
    log = BalancerLog(bal, lambda values, step: seen.append(step), every=2)
    _train(model, bal, opt, steps=2)
    assert log.step() is True
    assert log.step() is False  # the same step again: nothing written twice
    _train(model, bal, opt, steps=1)
    assert log.step() is False
    assert seen == [2]


def test_method_values_gblend_weights_mmpareto_cosines_and_conflicts_agm_scores():
    dims = (5, 7)
    inputs, target = make_batch(dims)
    torch.manual_seed(0)
    model = MultiTowerNet(dims)
    gblend = gb.GBlend(model, list(model.towers), num_classes=4)
    gblend.loss(model(*inputs), target).backward()
    values = balancer_values(gblend)
    weights = {f"weight_{c}": float(w) for c, w in gblend.weights.items()}
    assert set(weights) == {"weight_fused", "weight_towers_0", "weight_towers_1"}
    assert {k: values[k] for k in weights} == pytest.approx(weights)
    gblend.remove()

    pareto = gb.MMPareto(model, list(model.towers), num_classes=4)
    for _ in range(2):
        pareto.loss(model(*inputs), target).backward()
    values = balancer_values(pareto)
    for name in pareto.names:
        assert values[f"cosine_{name}"] == pytest.approx(float(pareto.cosines[name]))
        assert values[f"conflicts_{name}"] == int(pareto.conflicts[pareto.names.index(name)])
    pareto.remove()

    agm = gb.AGM(model, list(model.towers), num_classes=4, fusion=model.fusion)
    agm.loss(model(*inputs), target).backward()
    values = balancer_values(agm)
    history = agm.history
    for name in agm.names:  # the scores of the Shapley logits, as the history records them
        assert values[f"score_{name}"] == pytest.approx(float(history[name]["scores"][-1]))
        assert values[f"k_{name}"] == pytest.approx(float(history[name]["coefficients"][-1]))
    assert not any(key.startswith(("weight_", "cosine_")) for key in values)


class CountHostReads(TorchDispatchMode):
    """Counts host synchronisations: ``.item()``/``float()`` (``_local_scalar_dense``) and
    copies to the CPU (``_to_copy`` to device cpu), on any device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        elif func is torch.ops.aten._to_copy.default:
            device = kwargs.get("device")
            self.count += device is not None and torch.device(device).type == "cpu"
        return func(*args, **kwargs)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["mlb", "gblend", "mmpareto"])
def test_one_host_read_per_logged_step_none_otherwise(tmp_path, method, device):
    dims = (5, 7)
    inputs, target = make_batch(dims)
    inputs, target = [x.to(device) for x in inputs], target.to(device)
    torch.manual_seed(0)
    model = MultiTowerNet(dims).to(device)
    bal = gb.make(method, model, list(model.towers), num_classes=4, flush_every=1000)
    log = BalancerLog(bal, tmp_path / "balance.jsonl", every=3)
    bal.loss(model(*inputs), target).backward()  # materialises lazy heads
    reads, cuda_syncs = [], []
    for _ in range(6):
        bal.loss(model(*inputs), target).backward()
        counter = CountHostReads()
        if device == "cuda":  # the CUDA runtime's own count of synchronising calls
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught, counter:
                warnings.simplefilter("always")
                log.step()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        reads.append(counter.count)
        cuda_syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    assert reads == [0, 1, 0, 0, 1, 0]  # bal.steps 2..7: steps 3 and 6 are logged
    if device == "cuda":
        assert [cuda_syncs[i] for i in (0, 2, 3, 5)] == [0, 0, 0, 0]
        assert all(cuda_syncs[i] <= 1 for i in (1, 4)), cuda_syncs
    assert log.logged == 2


def test_the_guard_counts_a_copy_to_the_host():
    counter = CountHostReads()
    with counter:
        torch.ones(2).to("cpu", copy=True)
        float(torch.ones(()))
    assert counter.count == 2


@pytest.mark.parametrize("logger", [object(), 3, "balance.txt", None])
def test_a_logger_of_an_unknown_kind_is_a_type_error_naming_the_accepted(logger):
    _, bal, _ = _mlb()
    with pytest.raises(TypeError, match="cannot log to") as info:
        BalancerLog(bal, logger)
    assert isinstance(info.value, gb.errors.InputTypeError)
    for kind in ("SummaryWriter", "Lightning logger", ".csv", ".jsonl", "callable"):
        assert kind in str(info.value)


def test_not_a_balancer_and_bad_every_are_refused():
    with pytest.raises(gb.errors.InputTypeError, match="must be a gradbalance balancer"):
        balancer_values(torch.nn.Linear(2, 2))
    _, bal, _ = _mlb()
    with pytest.raises(gb.errors.ConfigurationError, match="every must be >= 1"):
        BalancerLog(bal, lambda values, step: None, every=0)
    with pytest.raises(gb.errors.InputTypeError, match="every must be an int >= 1"):
        BalancerLog(bal, lambda values, step: None, every=2.5)


def test_a_logger_that_raises_warns_once_counts_and_training_goes_on():
    model, bal, opt = _mlb()
    written = []

    def flaky(values, step):
        if step in (2, 3):
            raise OSError("disk full")
        written.append(step)

    log = BalancerLog(bal, flaky, every=1)
    with pytest.warns(gb.errors.LoggerWarning, match="disk full") as caught:
        _train(model, bal, opt, log, steps=5)
    assert len(caught) == 1
    assert log.failures == 2 and log.logged == 3
    assert written == [1, 4, 5] and bal.steps == 5


def test_tensorboard_event_file_holds_the_history(tmp_path):
    # Part of the dev extra (and the log extra): a missing install fails, never skips.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model, bal, opt = _mlb()
    writer = SummaryWriter(log_dir=str(tmp_path))
    log = BalancerLog(bal, writer, every=2)
    _train(model, bal, opt, log, steps=4)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert sorted(tags) == [
        "gradbalance/k_audio",
        "gradbalance/k_video",
        "gradbalance/score_audio",
        "gradbalance/score_video",
    ]
    for tag in tags:
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [2, 4]
        key = tag.removeprefix("gradbalance/")
        expected = [_expected(bal, s.step)[key] for s in scalars]
        assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_lightning_callback_logs_to_the_trainers_csv_logger(tmp_path):
    # Part of the dev extra (pinned in constraints.txt): a missing install fails, never skips.
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    class Balanced(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = gb.testing.TwoTowerNet()
            encoders = {"audio": self.model.audio, "video": self.model.video}
            self.balancer = gb.MLB(
                self.model, encoders=encoders, num_classes=3, feature_dims=[16, 16]
            )

        def training_step(self, batch, batch_idx):
            audio, video, y = batch
            return self.balancer.loss(self.model(audio, video), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Balanced()
    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 6), torch.randint(0, 3, (64,)))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=8,
        accumulate_grad_batches=2,
        logger=CSVLogger(str(tmp_path), name="run"),
        log_every_n_steps=2,
        callbacks=[gb.integrations.lightning_callback(module.balancer)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert trainer.global_step == 4 and module.balancer.steps == 8
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("gradbalance/k_audio")]
    assert [int(r["step"]) for r in rows] == [2, 4]  # optimizer steps, every log_every_n_steps
    for row in rows:  # logged after the optimizer step's last micro-batch: balancer step 2*s
        expected = _expected(module.balancer, 2 * int(row["step"]))
        logged = {
            k.removeprefix("gradbalance/"): float(v)
            for k, v in row.items()
            if k.startswith("gradbalance/")
        }
        assert logged == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_trainer_callback_puts_the_values_in_the_trainers_log_history(tmp_path):
    # Part of the dev extra (pinned in constraints.txt): a missing install fails, never skips.
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Pairs(Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(2)
            self.a, self.v = torch.randn(n, 8, generator=g), torch.randn(n, 6, generator=g)
            self.y = torch.randint(0, 3, (n,), generator=g)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"audio": self.a[i], "video": self.v[i], "labels": self.y[i]}

    class BalancedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs)
            loss = self.balancer.loss(logits, labels)
            return (loss, logits) if return_outputs else loss

    torch.manual_seed(0)
    model = gb.testing.TwoTowerNet()
    bal = gb.MLB(
        model,
        encoders={"audio": model.audio, "video": model.video},
        num_classes=3,
        feature_dims=[16, 16],
    )
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=2,
        label_names=["labels"],
    )
    trainer = BalancedTrainer(
        model=model,
        args=args,
        train_dataset=Pairs(64),
        optimizers=(opt, None),
        callbacks=[gb.integrations.trainer_callback(bal)],
    )
    trainer.balancer = bal
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "gradbalance/k_audio" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    for entry in logged:
        expected = _expected(bal, entry["step"])
        assert {
            k.removeprefix("gradbalance/"): v
            for k, v in entry.items()
            if k.startswith("gradbalance/")
        } == pytest.approx(expected, rel=1e-6)
        assert "loss" in entry
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and "gradbalance/k_audio" not in summary


def test_importing_gradbalance_imports_no_logging_framework():
    """torch only: TensorBoard, Lightning and transformers load with their adapter, not before."""
    code = (
        "import sys, torch, gradbalance as gb\n"
        "model = gb.testing.TwoTowerNet()\n"
        "bal = gb.MLB(model, [model.audio, model.video], num_classes=3)\n"
        "gb.integrations.BalancerLog(bal, lambda values, step: None)\n"
        "heavy = ('tensorboard', 'pytorch_lightning', 'lightning', 'transformers')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
