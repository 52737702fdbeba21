"""Command-line overrides of a :class:`~reference_models.training.config.TrainConfig`:
``KEY=VALUE`` pairs whose values are read as TOML, and dotted keys (``missing.video=0.5``) that
set one entry of a table field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from reference_models.training.config import TABLE_FIELDS, tomllib  # the presets' TOML reader

__all__ = ["key_values", "nest_dotted", "parse_value"]


def parse_value(text: str) -> Any:
    """Parse a command-line value as a TOML value, else keep it as a string.

    Example:
        >>> parse_value("5.0"), parse_value("[0.7, 1.3]"), parse_value("true"), parse_value("conv")
        (5.0, [0.7, 1.3], True, 'conv')
    """
    if tomllib is not None:
        try:
            return tomllib.loads(f"value = {text}")["value"]
        except Exception:  # noqa: BLE001 - anything that is not a TOML value is a string
            return text
    return text  # pragma: no cover


def nest_dotted(values: Mapping[str, Any]) -> dict[str, Any]:
    """A dotted key sets one entry of a table field (:data:`TABLE_FIELDS`).

    Example:
        >>> nest_dotted({"missing.video": 0.5, "method_options.alpha": 2, "lr": 1e-3})
        {'missing': {'video': 0.5}, 'method_options': {'alpha': 2}, 'lr': 0.001}
    """
    nested: dict[str, Any] = {}
    for key, value in values.items():
        table, dot, entry = key.partition(".")
        if not dot:
            nested[key] = value
            continue
        if table not in TABLE_FIELDS or not entry:
            raise ValueError(
                f"{key!r}: a dotted key sets an entry of a table field, one of "
                f"{list(TABLE_FIELDS)} (e.g. missing.video=0.5)"
            )
        nested.setdefault(table, {})[entry] = value
    return nested


def key_values(pairs: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` given with ``flag`` as ``{"a": 1, "b": "x"}`` (values as TOML)."""
    result: dict[str, Any] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        result[key.strip()] = parse_value(value.strip())
    return result
