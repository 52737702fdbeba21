"""The training loop of a run: build it, train epochs with early stopping, resume, finish.

The protocol (appendix B.2): Adam with L2 weight decay and the warm-up + cosine-restarts
schedule, validation every epoch, early stopping on the fused validation accuracy (strictly
better resets the patience), at most ``max_epochs`` epochs, test metrics of the
best-validation checkpoint. Method-specific work runs through the method's recipe
(:data:`reference_models.recipes.METHODS`), never here.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from torch.utils.data import Dataset

from reference_models.recipes import METHODS
from reference_models.schedule import WarmupCosineRestarts
from reference_models.training import checkpoint, report
from reference_models.training.batches import make_loader, to_device
from reference_models.training.components import (
    build_balancer,
    build_datasets,
    build_model_for,
    collate_for,
    data_report,
    modality_names,
    num_classes_of,
)
from reference_models.training.config import TrainConfig
from reference_models.training.step import RunState, evaluate, forward_passes, train_step
from reference_models.training.tensorboard import TensorBoardLog, open_logger

__all__ = ["Session", "build_run", "train"]


@dataclass
class Session:
    """A run ready to train: its state, loaders and shuffling generator (see :func:`build_run`,
    whose example builds one); ``data`` counts each split's clips and those left out."""

    state: RunState
    train_loader: Any
    val_loader: Any
    test_loader: Any
    generator: torch.Generator
    seed: int
    data: dict[str, dict[str, int]] = field(default_factory=dict)

    def close(self) -> None:
        """Remove the balancer's hooks now (rather than whenever it is garbage-collected)."""
        if self.state.balancer is not None:
            self.state.balancer.remove()

    def epoch_start(self) -> None:
        """The method's work before a training epoch (its recipe's ``epoch_start``)."""
        hook = METHODS[self.state.config.method].epoch_start
        if hook is not None:
            hook(self.state.balancer, self.state.config.method_options, self._forward_passes)

    def _forward_passes(
        self, fraction: float
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return forward_passes(self.state, self.train_loader, fraction)


def _zeros(device: torch.device) -> Callable[..., torch.Tensor]:
    def zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    return zeros


def build_run(
    config: TrainConfig, datasets: tuple[Dataset, Dataset, Dataset] | None = None
) -> Session:
    """Seed, then build the data, model, balancer, probes, optimizer and schedule of a run.

    ``datasets`` (train, validation, test) replaces :func:`build_datasets` (e.g. to reuse
    generated data across runs).

    Example:
        >>> cfg = TrainConfig(width=2, batch_size=8, data_options={"train_size": 16,
        ...                   "val_size": 8, "test_size": 8}, method="mlb", out="/tmp/gb_doc")
        >>> session = build_run(cfg)
        >>> type(session.state.balancer).__name__, len(session.train_loader)
        ('MLB', 2)
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but torch.cuda.is_available() is False")
    seed = config.run_seed
    random.seed(seed)
    torch.manual_seed(seed)

    train_set, val_set, test_set = datasets if datasets is not None else build_datasets(config)
    num_classes = num_classes_of(train_set)
    model = build_model_for(config, num_classes).to(device)
    balancer = build_balancer(config, model, num_classes)
    names = list(balancer.names) if balancer is not None else modality_names(model)
    feature_dims = getattr(model, "feature_dims", None) or {
        n: int(getattr(model, n).feature_dim) for n in names
    }
    probes = nn.ModuleDict(
        {n: nn.Linear(feature_dims[n], num_classes) for n in names} if config.probes else {}
    ).to(device)
    parameters = [*model.parameters(), *probes.parameters()]
    if balancer is not None:
        parameters += list(balancer.parameters())
    optimizer = torch.optim.Adam(
        parameters,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    generator = torch.Generator().manual_seed(seed)

    def loader(dataset: Dataset, train: bool) -> Any:
        return make_loader(
            dataset,
            config.batch_size if train else config.eval_batch_size,
            train=train,
            workers=config.workers,
            generator=generator if train else None,
            device=device,
            collate=collate_for(config.data),
        )

    train_loader = loader(train_set, True)
    scheduler = WarmupCosineRestarts(
        optimizer,
        config.schedule,  # type: ignore[arg-type]
        warmup_steps=config.warmup_steps,
        warmup_epochs=config.warmup_epochs,
        steps_per_epoch=len(train_loader),
    )
    zeros, m = _zeros(device), len(names)
    state = RunState(
        config,
        model,
        balancer,
        probes,
        optimizer,
        scheduler,
        device,
        names,
        loss_sum=zeros(()),
        correct=zeros((), torch.int64),
        coefficient_sum=zeros((m,)),
        score_sum=zeros((m,)),
        window_loss=zeros(()),
    )
    val_loader, test_loader = loader(val_set, False), loader(test_set, False)
    splits = (train_set, val_set, test_set)
    return Session(
        state, train_loader, val_loader, test_loader, generator, seed, data_report(splits)
    )


@dataclass
class Progress:
    """Where a run stands between epochs; saved in ``last.pt`` and restored by ``--resume``.

    Example:
        >>> Progress().best
        {'accuracy': -1.0, 'epoch': -1}
    """

    epoch: int = 0
    step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"accuracy": -1.0, "epoch": -1})
    stale: int = 0
    epochs: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    history: torch.Tensor | None = None
    log_offset: int = 0

    @classmethod
    def resume(cls, session: Session, path: Path) -> Progress:
        """Restore the modules, optimizer, schedule and random state from ``path``."""
        state = session.state
        saved = torch.load(path, map_location=state.device, weights_only=False)
        checkpoint.check_resumable(saved["config"], state.config)
        checkpoint.load_modules(state, saved)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        session.generator.set_state(saved["generator"])
        checkpoint.set_rng_state(saved["rng"])
        # A balancer's state holds its own history; only a checkpoint of a balancer without
        # one needs the steps before the resume prepended.
        restored = report.history(state, None).shape[0] > 0
        return cls(
            saved["epoch"],
            saved["step"],
            saved["best"],
            saved["stale"],
            saved["epochs"],
            saved["elapsed"],
            None if restored else saved["history"],
            saved["log_offset"],
        )

    def save(self, session: Session, path: Path, elapsed: float, log_offset: int) -> None:
        """Write ``last.pt``: everything :meth:`resume` needs."""
        state = session.state
        checkpoint.atomic_save(
            {
                **checkpoint.modules_state(state),
                "config": state.config.to_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "generator": session.generator.get_state(),
                "rng": checkpoint.rng_state(),
                "epoch": self.epoch,
                "step": self.step,
                "best": self.best,
                "stale": self.stale,
                "epochs": self.epochs,
                "elapsed": elapsed,
                "history": report.history(state, self.history),
                "log_offset": log_offset,
            },
            path,
        )


def _open_log(out: Path, progress: Progress, config: TrainConfig, seed: int) -> TextIO:
    """``log.jsonl``, cut back to the checkpoint when resuming (those epochs run again)."""
    path = out / "log.jsonl"
    if progress.epoch > 0 and path.is_file():
        with path.open("r+b") as handle:
            handle.truncate(progress.log_offset)
        return path.open("a", encoding="utf-8")
    log = path.open("w", encoding="utf-8")
    log.write(json.dumps({"kind": "config", "config": config.to_dict(), "seed": seed}) + "\n")
    return log


def _train_epoch(
    session: Session, progress: Progress, log: TextIO, board: TensorBoardLog | None
) -> dict[str, Any]:
    """One pass over the training batches; returns the epoch's training metrics."""
    state, config = session.state, session.state.config
    session.epoch_start()
    state.model.train()
    state.probes.train()
    for tensor in (
        state.loss_sum,
        state.correct,
        state.coefficient_sum,
        state.score_sum,
        state.window_loss,
    ):
        tensor.zero_()
    state.window_samples = 0
    seen = 0
    bar = report.progress(len(session.train_loader), f"epoch {progress.epoch}", config.progress)
    for index, batch in enumerate(session.train_loader):
        tensors = to_device(batch, state.device, carries_present=state.carries_present)
        train_step(state, *tensors)
        size = int(tensors[2].shape[0])
        seen += size
        state.window_samples += size
        progress.step += 1
        if bar is not None:
            bar.update(1)
        if progress.step % config.log_every == 0:
            record = report.step_record(state, progress.epoch, progress.step, index + 1)
            log.write(json.dumps(record) + "\n")
            if board is not None:
                board.step(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    steps = len(session.train_loader)
    loss, accuracy = torch.stack([state.loss_sum / seen, state.correct.double() / seen]).tolist()
    return {
        "loss": loss,
        "accuracy": accuracy,
        "coefficients": (state.coefficient_sum / steps).tolist(),
        "scores": (state.score_sum / steps).tolist(),
    }


def _epoch(
    session: Session,
    progress: Progress,
    log: TextIO,
    board: TensorBoardLog | None,
    best_path: Path,
) -> None:
    """Train one epoch, validate, keep the best checkpoint, log the epoch record."""
    state = session.state
    start = time.perf_counter()
    trained = _train_epoch(session, progress, log, board)
    val = evaluate(state, session.val_loader, collect=True)
    epoch_end = getattr(state.balancer, "epoch_end", None)
    if epoch_end is not None:
        epoch_end()
    improved = val["fused"]["accuracy"] > progress.best["accuracy"]
    if improved:
        progress.best = {"accuracy": val["fused"]["accuracy"], "epoch": progress.epoch}
        progress.stale = 0
        checkpoint.atomic_save(
            {**checkpoint.modules_state(state), "epoch": progress.epoch, "val": val}, best_path
        )
    else:
        progress.stale += 1
    balanced = state.balancer is not None
    record = {
        "kind": "epoch",
        "epoch": progress.epoch,
        "step": progress.step,
        "lr": state.optimizer.param_groups[0]["lr"],
        "train": {"loss": trained["loss"], "accuracy": trained["accuracy"]},
        "val": val,
        "coefficients": dict(zip(state.names, trained["coefficients"])) if balanced else {},
        "scores": dict(zip(state.names, trained["scores"])) if balanced else {},
        "best": improved,
        "time_s": time.perf_counter() - start,
    }
    progress.epochs.append(record)
    log.write(json.dumps(record) + "\n")
    log.flush()
    if board is not None:
        board.epoch(record)
    progress.epoch += 1


def train(config: TrainConfig, *, verbose: bool = True) -> dict[str, Any]:
    """Run (or resume) one training run and return its ``results.json`` content.

    Args:
        config: the run's configuration.
        verbose: print the summary at the end.

    Returns:
        The results dict (also written to ``<out>/results.json``).
    """
    start_time = time.perf_counter()
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    session = build_run(config)
    try:
        return _train(session, out, start_time, verbose)
    finally:
        session.close()


def _train(session: Session, out: Path, start_time: float, verbose: bool) -> dict[str, Any]:
    config = session.state.config
    last_path, best_path = out / "last.pt", out / "best.pt"
    resuming = config.resume and last_path.is_file()
    progress = Progress.resume(session, last_path) if resuming else Progress()
    log = _open_log(out, progress, config, session.seed)
    board: TensorBoardLog | None = None
    stopped_early = False
    epochs_this_call = 0
    try:
        board = open_logger(config.logger, out, session.state.balancer)
        while progress.epoch < config.max_epochs:
            if progress.stale >= config.patience > 0:  # a resumed run that had stopped already
                stopped_early = True
                break
            _epoch(session, progress, log, board, best_path)
            epochs_this_call += 1
            stopped_early = config.patience > 0 and progress.stale >= config.patience
            pausing = config.stop_after is not None and epochs_this_call >= config.stop_after
            if config.checkpoint_every and (
                progress.epoch % config.checkpoint_every == 0
                or progress.epoch == config.max_epochs
                or stopped_early
                or pausing
            ):
                elapsed = progress.elapsed + time.perf_counter() - start_time
                progress.save(session, last_path, elapsed, log.tell())
            if stopped_early or pausing:
                break
    finally:
        log.close()
        if board is not None:
            board.close()
    finished = progress.epoch >= config.max_epochs or stopped_early
    wall_time = progress.elapsed + time.perf_counter() - start_time
    results, history = _finish(session, progress, best_path)
    results.update(
        {
            "seed": session.seed,
            "epochs_run": progress.epoch,
            "steps": progress.step,
            "stopped_early": stopped_early,
            "finished": finished,
            "wall_time_s": wall_time,
            "device": str(session.state.device),
            "data": session.data,
            "output_dir": str(out),
            "num_parameters": sum(p.numel() for p in session.state.model.parameters()),
        }
    )
    report.write_outputs(out, results, history, progress.epochs, verbose=verbose)
    return results


def _finish(
    session: Session, progress: Progress, best_path: Path
) -> tuple[dict[str, Any], torch.Tensor]:
    """Evaluate test at the last epoch, then reload the best-validation checkpoint and evaluate
    validation and test (the protocol's numbers)."""
    state = session.state
    history = report.history(state, progress.history)
    test_last = evaluate(state, session.test_loader) if progress.epochs else None
    final_modules = copy.deepcopy(checkpoint.modules_state(state))
    if best_path.is_file():
        saved = torch.load(best_path, map_location=state.device, weights_only=False)
        checkpoint.load_modules(state, saved)
    val = evaluate(state, session.val_loader)
    test = evaluate(state, session.test_loader)
    last: Mapping[str, Any] = progress.epochs[-1] if progress.epochs else {}
    results = {
        "config": state.config.to_dict(),
        "modalities": list(state.names),
        "best_epoch": progress.best["epoch"],
        "val": val,
        "test": test,
        "test_last": test_last,
        "final_coefficients": last.get("coefficients", {}),
        "final_scores": last.get("scores", {}),
        "history_steps": int(history.shape[0]),
    }
    checkpoint.load_modules(state, final_modules)
    return results, history
