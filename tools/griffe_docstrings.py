"""Griffe extension for the documentation site: read the library's docstrings as written.

The docstrings follow the Google style with three habits the Google parser of griffe does not
know: a singular ``Example:`` section (read as ``Examples:``, so its doctest renders as code),
Sphinx roles such as :class:`~gradbalance.Balancer` (rendered as inline code) and one entry
for several arguments, ``window, window_unit: ...`` (read as one entry per argument). The
library's text is unchanged; only the site's reading of it.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([\w.]+)`")
EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)
SHARED = re.compile(r"^(\s+)(\*{0,2}\w+(?:, \*{0,2}\w+)+): (.*)$")


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


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
            obj.docstring.value = _split_shared_entries(ROLE.sub(_role, text))
