"""Methods by name: ``gb.make("mlb", model, encoders, ...)``, ``gb.METHODS`` and
``gb.register_method`` for a method of your own (see "Writing a method" in the docs).

:data:`METHODS` and :data:`ALIASES` are read-only live views: a method registered with
:func:`register_method` appears in both at once, and everything that lists methods by name
(``gb.make``, the training harness, the test suites) picks it up from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from torch import nn

from gradbalance.balancer import Balancer
from gradbalance.errors import ConfigurationError, InputTypeError
from gradbalance.methods.agm import AGM
from gradbalance.methods.amss import AMSS, AMSSPlus
from gradbalance.methods.cggm import CGGM
from gradbalance.methods.gblend import GBlend
from gradbalance.methods.inforeg import InfoReg
from gradbalance.methods.joint import Joint
from gradbalance.methods.mmpareto import MMPareto
from gradbalance.methods.mslr import MSLR
from gradbalance.methods.multiloss import MLB, MultiLoss
from gradbalance.methods.ogm import OGM, OGMGE
from gradbalance.methods.opm import OPM
from gradbalance.methods.pmr import PMR

_METHODS: dict[str, type[Balancer]] = {}
_ALIASES: dict[str, str] = {}

METHODS: Mapping[str, type[Balancer]] = MappingProxyType(_METHODS)
"""Every balancing method by its canonical name (read-only; add one with
:func:`register_method`). MMCosine is not a balancer but a fusion head
(:class:`~gradbalance.MMCosineHead`), used with any of them (with ``"joint"`` it is the
MMCosine baseline)."""

ALIASES: Mapping[str, str] = MappingProxyType(_ALIASES)
"""Other spellings of the canonical names (read-only): ``alias -> name``."""


def _key(name: str) -> str:
    """``name`` normalised: case, ``-`` and spaces ignored."""
    if not isinstance(name, str):
        raise InputTypeError(f"the method name must be a string, got {type(name).__name__}")
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def register_method(
    name: str, cls: type[Balancer], *, aliases: Iterable[str] = (), force: bool = False
) -> None:
    """Make ``cls`` a method by name: ``gb.make(name, ...)``, ``gb.METHODS[name]``.

    ``name`` and every alias are normalised as :func:`make` reads them (case, ``-`` and
    spaces ignored).

    Args:
        name: the canonical name.
        cls: a :class:`~gradbalance.Balancer` subclass (usually of ``gb.Method``).
        aliases: other spellings that :func:`make` accepts.
        force: replace a method or alias already registered under one of these names.

    Raises:
        ConfigurationError: a name or alias already taken (by another class), unless
            ``force=True``.
        InputTypeError: ``cls`` is not a ``Balancer`` subclass.

    Example:
        >>> import gradbalance as gb
        >>> class Plain(gb.Joint):
        ...     '''Joint training under another name.'''
        >>> gb.register_method("plain", Plain, aliases=["plain-joint"])
        >>> model = gb.testing.TwoTowerNet()
        >>> type(gb.make("Plain-Joint", model, [model.audio, model.video], num_classes=3))
        <class 'gradbalance.registry.Plain'>
        >>> gb.unregister_method("plain")
    """
    if not (isinstance(cls, type) and issubclass(cls, Balancer)):
        raise InputTypeError(f"register_method needs a gb.Balancer subclass, got {cls!r}")
    key = _key(name)
    keys = [_key(alias) for alias in aliases]
    clashes = [
        word
        for word in [key, *keys]
        if (word in _ALIASES and _ALIASES[word] != key)
        or (word in _METHODS and (word != key or _METHODS[word] is not cls))
    ]
    if clashes and not force:
        word = clashes[0]
        taken = _METHODS[_ALIASES.get(word, word)]
        raise ConfigurationError(
            f"the method name {word!r} is already registered for {taken.__name__}: "
            "choose another name, or pass force=True to replace it"
        )
    for word in clashes:
        if word in _METHODS and word != key:
            unregister_method(word)
        _ALIASES.pop(word, None)
    _METHODS[key] = cls
    _ALIASES.update(dict.fromkeys(keys, key))


def unregister_method(name: str) -> None:
    """Remove the method ``name`` (canonical name or alias) and its aliases.

    Raises:
        ConfigurationError: no method of that name.
    """
    key = canonical_name(name)
    del _METHODS[key]
    for alias in [a for a, target in _ALIASES.items() if target == key]:
        del _ALIASES[alias]


def canonical_name(name: str) -> str:
    """The key of :data:`METHODS` for ``name`` (case, ``-`` and spaces ignored; aliases).

    Example:
        >>> canonical_name("OGM-GE")
        'ogm_ge'
    """
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in _METHODS:
        raise ConfigurationError(f"unknown balancing method {name!r}; known: {sorted(_METHODS)}")
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


for _name, _cls, _aliases in (
    ("joint", Joint, ()),
    ("multiloss", MultiLoss, ("multi_loss",)),
    ("mlb", MLB, ()),
    ("ogm", OGM, ()),
    ("ogm_ge", OGMGE, ("ogmge",)),
    ("agm", AGM, ()),
    ("pmr", PMR, ()),
    ("mslr", MSLR, ()),
    ("gblend", GBlend, ("g_blend", "gradient_blending")),
    ("mmpareto", MMPareto, ("mm_pareto",)),
    ("cggm", CGGM, ()),
    ("inforeg", InfoReg, ("info_reg",)),
    ("amss", AMSS, ()),
    ("amss_plus", AMSSPlus, ("amss+", "amssplus")),
    ("opm", OPM, ()),
):
    register_method(_name, _cls, aliases=_aliases)
