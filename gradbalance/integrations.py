"""Watching a run: a balancer's per-step values written to TensorBoard, a Lightning logger,
the Hugging Face Trainer's logs, or CSV / JSON lines.

The values are those :attr:`~gradbalance.Balancer.history` records, each modality's
coefficient k (``k_<name>``) and score (``score_<name>``: MLB's true-class probability,
AGM's score of its Shapley logits, ...), plus what a method keeps of its own: G-Blend's loss
weights (``weight_<component>``, the fused one included) and MMPareto's last gradient
cosines and conflict counts (``cosine_<name>``, ``conflicts_<name>``). They are read in one
device-to-host copy per logged step; a step that is not logged makes no host
synchronisation.

gradbalance depends on torch only: TensorBoard, Lightning and transformers are imported only
by the adapter that needs them, when it is created.

Example:
    >>> import json, os, tempfile, torch, gradbalance as gb
    >>> from gradbalance.integrations import BalancerLog
    >>> model = gb.testing.TwoTowerNet()
    >>> bal = gb.MLB(model, encoders=[model.audio, model.video], num_classes=3)
    >>> path = os.path.join(tempfile.mkdtemp(), "balance.jsonl")
    >>> log = BalancerLog(bal, path, every=2)
    >>> a, v, y = torch.randn(4, 8), torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    >>> for _ in range(4):
    ...     bal.loss(model(a, v), y).backward()
    ...     logged = log.step()
    >>> log.close()
    >>> [sorted(json.loads(line)) for line in open(path)][0]
    ['epoch', 'k_audio', 'k_video', 'score_audio', 'score_video', 'step']
    >>> [json.loads(line)["step"] for line in open(path)]
    [2, 4]
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from typing import Any

import torch

from gradbalance._checks import check_number
from gradbalance._log_sinks import make_writer, prefixed
from gradbalance.balancer import Balancer
from gradbalance.errors import InputTypeError, LoggerWarning
from gradbalance.methods.gblend import GBlend
from gradbalance.methods.mmpareto import MMPareto

__all__ = ["BalancerLog", "balancer_values", "lightning_callback", "trainer_callback"]


def _series(balancer: Balancer) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Each logged series, keyed by its prefix: its labels and a 1-D device tensor."""
    names = balancer.names
    series = {"k": (names, balancer.last_coefficients), "score": (names, balancer.last_scores)}
    if isinstance(balancer, GBlend):
        series["weight"] = (balancer.components, torch.stack(list(balancer.weights.values())))
    if isinstance(balancer, MMPareto):
        series["cosine"] = (names, balancer.cosine_values)
        series["conflicts"] = (names, balancer.conflicts)
    return series


def _check_balancer(balancer: Any) -> None:
    if not isinstance(balancer, Balancer):
        raise InputTypeError(
            f"balancer must be a gradbalance balancer (gb.MLB(...), ...), got "
            f"{type(balancer).__name__}"
        )


def balancer_values(balancer: Balancer) -> dict[str, float]:
    """``{"k_audio": 0.83, "score_audio": 0.41, ...}``: the balancer's values of its last
    training step, read in one device-to-host copy.

    Args:
        balancer: any balancer.

    Raises:
        InputTypeError: ``balancer`` is not a :class:`~gradbalance.Balancer`.

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MMPareto(model, encoders=[model.audio, model.video], num_classes=3)
        >>> sorted(gb.integrations.balancer_values(bal))[:4]
        ['conflicts_audio', 'conflicts_video', 'cosine_audio', 'cosine_video']
    """
    _check_balancer(balancer)
    series = _series(balancer)
    packed = torch.cat([t.detach().double() for _, t in series.values()])
    host = packed.to("cpu", copy=True).tolist()  # the one host synchronisation
    keys = [f"{prefix}_{label}" for prefix, (labels, _) in series.items() for label in labels]
    return dict(zip(keys, host))


class BalancerLog:
    """Write a balancer's values (:func:`balancer_values`) to a logger every ``every`` steps.

    Call :meth:`step` once per training step, after ``backward()``: it logs when the
    balancer's :attr:`~gradbalance.Balancer.steps` is a multiple of ``every`` (and was not
    logged yet), with one host synchronisation, and does nothing else on the other steps.
    A logger that raises while writing does not stop training: one
    :class:`~gradbalance.errors.LoggerWarning`, and :attr:`failures` counts the failed writes.

    Args:
        balancer: the balancer to watch.
        logger: a ``torch.utils.tensorboard.SummaryWriter`` (scalars
            ``gradbalance/k_audio``, ...), a Lightning logger (``log_metrics``, same names), a
            path ending in ``.csv`` (one row per logged step) or ``.jsonl`` (one JSON object
            per logged step, appended), or a callable ``fn(values, step)``.
        every: log every this many training steps.

    Raises:
        InputTypeError: a logger of another kind (the message names the accepted ones).

    Example:
        >>> import torch, gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MLB(model, encoders=[model.audio, model.video], num_classes=3)
        >>> seen = []
        >>> log = gb.integrations.BalancerLog(bal, lambda values, step: seen.append(step), every=3)
        >>> a, v, y = torch.randn(4, 8), torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
        >>> for _ in range(6):
        ...     bal.loss(model(a, v), y).backward()
        ...     _ = log.step()
        >>> seen, log.failures
        ([3, 6], 0)
    """

    def __init__(self, balancer: Balancer, logger: Any, every: int = 1) -> None:
        if not isinstance(every, int) or isinstance(every, bool):
            raise InputTypeError(f"every must be an int >= 1, got {every!r}")
        self.every = int(check_number("every", every, minimum=1))
        _check_balancer(balancer)
        self.balancer = balancer
        self._write = make_writer(logger)
        self._last: int | None = None
        self.failures = 0
        """Writes that raised (training went on)."""
        self.logged = 0
        """Steps written."""

    def step(self, step: int | None = None) -> bool:
        """Log now if this step is due; returns whether it logged.

        Args:
            step: the step index to log under; default: ``balancer.steps``.
        """
        step = self.balancer.steps if step is None else int(step)
        if step < 1 or step == self._last or step % self.every:  # step 0: nothing trained
            return False
        self._last = step
        self.write(step)
        return True

    def write(self, step: int) -> None:
        """Write the balancer's current values under ``step`` (one host synchronisation)."""
        values = balancer_values(self.balancer)
        try:
            self._write(values, step, self.balancer.epoch)
        except Exception as error:  # noqa: BLE001 - a failing logger must not stop training
            self.failures += 1
            if self.failures == 1:
                warnings.warn(
                    f"writing the balancer's values to the logger failed at step {step} "
                    f"({type(error).__name__}: {error}); training goes on, and "
                    "BalancerLog.failures counts the failed writes",
                    LoggerWarning,
                    stacklevel=3,
                )
        else:
            self.logged += 1

    def close(self) -> None:
        """Close the CSV or JSON-lines file (other loggers are the caller's to close)."""
        close = getattr(self._write, "close", None)
        if close is not None:
            close()


def _import_lightning() -> Any:
    """``pytorch_lightning``, else ``lightning.pytorch`` (the same API under two names)."""
    if importlib.util.find_spec("pytorch_lightning") is not None:
        return importlib.import_module("pytorch_lightning")
    if importlib.util.find_spec("lightning") is not None:
        return importlib.import_module("lightning.pytorch")
    raise ImportError("lightning_callback needs PyTorch Lightning: pip install pytorch-lightning")


@functools.cache
def _lightning_callback_class() -> type:
    pl: Any = _import_lightning()

    class GradbalanceCallback(pl.Callback):
        """Logs the balancer's values to every logger of the Lightning ``Trainer``."""

        def __init__(self, balancer: Balancer, every: int | None) -> None:
            self.balancer = balancer
            self.every = every
            self.trainer: Any = None
            self.log: BalancerLog | None = None

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self.trainer = trainer
            every = self.every if self.every is not None else trainer.log_every_n_steps
            self.log = BalancerLog(self.balancer, self._to_loggers, every=every)

        def _to_loggers(self, values: dict[str, float], step: int) -> None:
            for logger in self.trainer.loggers:
                logger.log_metrics(prefixed(values), step=step)

        def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            if self.log is not None and trainer.loggers:
                self.log.step(trainer.global_step)

    return GradbalanceCallback


def lightning_callback(balancer: Balancer, every: int | None = None) -> Any:
    """A Lightning ``Callback`` that logs the balancer's values under ``gradbalance/k_audio``,
    ``gradbalance/score_audio``, ... to the ``Trainer``'s loggers.

    It logs after a training batch when ``trainer.global_step`` (the optimizer steps) is a
    multiple of ``every`` (default: the Trainer's ``log_every_n_steps``), once per optimizer
    step under gradient accumulation; one host synchronisation per logged step.

    Args:
        balancer: the balancer to watch (e.g. ``module.balancer``).
        every: log every this many optimizer steps.

    Example:
        >>> import gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MLB(model, encoders=[model.audio, model.video], num_classes=3)
        >>> callback = gb.integrations.lightning_callback(bal, every=10)
        >>> type(callback).__mro__[1].__name__
        'Callback'
    """
    _check_balancer(balancer)
    return _lightning_callback_class()(balancer, every)


@functools.cache
def _trainer_callback_class() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as error:
        raise ImportError(
            "trainer_callback needs transformers: pip install transformers"
        ) from error

    class GradbalanceTrainerCallback(TrainerCallback):
        """Adds the balancer's values to each training log of the Hugging Face Trainer."""

        def __init__(self, balancer: Balancer) -> None:
            self.balancer = balancer

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if not logs or "loss" not in logs:  # evaluation and end-of-training summaries
                return
            values = prefixed(balancer_values(self.balancer))
            logs.update(values)
            entry = state.log_history[-1] if state.log_history else None
            if entry is not None and entry.get("step") == state.global_step and "loss" in entry:
                entry.update(values)

    return GradbalanceTrainerCallback


def trainer_callback(balancer: Balancer) -> Any:
    """A Hugging Face ``TrainerCallback`` that adds the balancer's values
    (``gradbalance/k_audio``, ...) to each training log of the ``Trainer``.

    The Trainer decides when to log (``logging_steps``); the values land in the log it is
    writing (the ``logs`` the callbacks after this one receive, and
    ``trainer.state.log_history``), one host synchronisation per log. Reporting integrations
    (``report_to``) are called before callbacks added later, so to have them receive the
    values too, log them with :class:`BalancerLog` (e.g. to a ``SummaryWriter``).

    Args:
        balancer: the balancer to watch.

    Example:
        >>> import gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.MLB(model, encoders=[model.audio, model.video], num_classes=3)
        >>> callback = gb.integrations.trainer_callback(bal)  # trainer.add_callback(callback)
        >>> type(callback).__mro__[1].__name__
        'TrainerCallback'
    """
    _check_balancer(balancer)
    return _trainer_callback_class()(balancer)
