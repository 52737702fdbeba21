"""Methods by name: ``gb.make("mlb", model, encoders, ...)`` and ``gb.METHODS``, for CLIs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from torch import nn

from gradbalance.balancer import Balancer
from gradbalance.methods.agm import AGM
from gradbalance.methods.gblend import GBlend
from gradbalance.methods.joint import Joint
from gradbalance.methods.mmpareto import MMPareto
from gradbalance.methods.mslr import MSLR
from gradbalance.methods.multiloss import MLB, MultiLoss
from gradbalance.methods.ogm import OGM, OGMGE
from gradbalance.methods.pmr import PMR

METHODS: Mapping[str, type[Balancer]] = MappingProxyType(
    {
        "joint": Joint,
        "multiloss": MultiLoss,
        "mlb": MLB,
        "ogm": OGM,
        "ogm_ge": OGMGE,
        "agm": AGM,
        "pmr": PMR,
        "mslr": MSLR,
        "gblend": GBlend,
        "mmpareto": MMPareto,
    }
)
"""Every balancing method by its canonical name (read-only). MMCosine is not a balancer but a
fusion head (:class:`~gradbalance.MMCosineHead`), used with any of them (with ``"joint"`` it is
the MMCosine baseline)."""

_ALIASES = {
    "multi_loss": "multiloss",
    "ogmge": "ogm_ge",
    "g_blend": "gblend",
    "gradient_blending": "gblend",
    "mm_pareto": "mmpareto",
}


def canonical_name(name: str) -> str:
    """The key of :data:`METHODS` for ``name`` (case, ``-`` and spaces ignored).

    Example:
        >>> canonical_name("OGM-GE")
        'ogm_ge'
    """
    if not isinstance(name, str):
        raise TypeError(f"the method name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown balancing method {name!r}; known: {sorted(METHODS)}")
    return key


def make(
    name: str,
    model: nn.Module,
    encoders: Sequence[nn.Module] | Mapping[str, nn.Module],
    **kwargs: Any,
) -> Balancer:
    """Build the balancer called ``name`` (a key of :data:`METHODS`) on ``model``.

    Args:
        name: the method, e.g. ``"mlb"``, ``"OGM-GE"`` (case and ``-``/``_`` ignored).
        model: the multimodal model.
        encoders: one submodule per modality.
        **kwargs: the method's options, ``num_classes`` included.

    Example:
        >>> import gradbalance as gb
        >>> model = gb.testing.TwoTowerNet()
        >>> bal = gb.make("MLB", model, [model.audio, model.video], num_classes=3, alpha=0.5)
        >>> type(bal).__name__, bal.alpha
        ('MLB', 0.5)
    """
    return METHODS[canonical_name(name)](model, encoders, **kwargs)
