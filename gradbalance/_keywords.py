"""The keyword options a balancer class accepts, and the error for one it does not.

A method's constructor forwards ``**options`` to its base classes, so a misspelt option would
otherwise surface as Python's bare "unexpected keyword argument" from the base class, naming
neither the method nor the valid spellings. :func:`check_keywords` refuses it first, with the
method's full list of options and the closest ones (``difflib``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable

from gradbalance.errors import InputTypeError


def accepted_keywords(cls: type) -> list[str]:
    """The named parameters of ``cls.__init__`` and of every base ``__init__`` it forwards
    ``**options`` to (in MRO order, until one takes no ``**``)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]
        names += [p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


def check_keywords(cls: type, keywords: Iterable[str]) -> None:
    """Refuse keyword arguments that no ``__init__`` of ``cls`` accepts.

    Example:
        >>> import gradbalance as gb
        >>> try:
        ...     check_keywords(gb.MLB, ["alpah"])
        ... except TypeError as error:
        ...     print(str(error)[:62])
        MLB got an unexpected keyword argument 'alpah' (did you mean '
    """
    valid = accepted_keywords(cls)
    for word in keywords:
        if word in valid:
            continue
        close = difflib.get_close_matches(word, valid, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise InputTypeError(
            f"{cls.__name__} got an unexpected keyword argument {word!r}{hint}; its options "
            f"are: {', '.join(valid)}"
        )
