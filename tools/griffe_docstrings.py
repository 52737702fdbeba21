"""Griffe extension for the documentation site: read the library's docstrings as written.

The docstrings follow the Google style with three habits the Google parser of griffe does not
know: a singular ``Example:`` section (read as ``Examples:``, so its doctest renders as code),
Sphinx roles such as :class:`~gradbalance.Balancer` (rendered as inline code, linked to the
object's entry in the API reference when it has one: an optional mkdocs-autorefs reference,
so a target the site does not document stays plain code) and one entry for several
arguments, ``window, window_unit: ...`` (read as one entry per argument). The library's text
is unchanged; only the site's reading of it.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([\w.]+)`")
EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)
SHARED = re.compile(r"^(\s+)(\*{0,2}\w+(?:, \*{0,2}\w+)+): (.*)$")


def _role(match: re.Match[str], scope: str) -> str:
    """Inline code linked to the role's target; a bare name (``:meth:`epoch_end```) is looked
    up in ``scope``, the class the docstring belongs to."""
    target = match.group(2)
    title = target.rsplit(".", 1)[-1] if match.group(1) else target
    identifier = target if "." in target else f"{scope}.{target}"
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


def _scope(obj: Object) -> str:
    """The path of the class a docstring belongs to (its module outside classes)."""
    node: Object | None = obj
    while node is not None and not node.is_class and not node.is_module:
        node = node.parent  # type: ignore[assignment]
    return node.path if node is not None else obj.path


def _split_shared_entries(text: str) -> str:
    """``a, b: text`` (with its indented continuation lines) becomes one entry per name."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        match = SHARED.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent, names, first = match.groups()
        rest = []
        i += 1
        while i < len(lines) and lines[i].startswith(indent + " ") and lines[i].strip():
            rest.append(lines[i])
            i += 1
        for name in names.split(", "):
            out.extend([f"{indent}{name}: {first}", *rest])
    return "\n".join(out)


class LibraryDocstrings(Extension):
    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            role = partial(_role, scope=_scope(obj))
            obj.docstring.value = _split_shared_entries(ROLE.sub(role, text))
