"""Every ```python block of every page under docs/ runs as written.

Pages are found by globbing, so a page added under docs/ is covered without editing this
file. Each block runs on its own (a fresh namespace, in a temporary working directory), as a
reader would paste it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)


def python_blocks() -> list[tuple[str, int, str]]:
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).as_posix()
        for index, code in enumerate(FENCE.findall(page.read_text(encoding="utf-8"))):
            blocks.append((name, index, code))
    return blocks


BLOCKS = python_blocks()
# Blocks that start a process group, compile or import a training framework take seconds.
SLOW = ("torch.compile(", "init_process_group(", "import pytorch_lightning", "import transformers")


def case(name: str, index: int, code: str):
    marks = [pytest.mark.slow] if any(s in code for s in SLOW) else []
    return pytest.param(name, index, code, marks=marks, id=f"{name}[{index}]")


def test_pages_have_examples():
    assert {name for name, _, _ in BLOCKS} >= {"index.md", "own-model.md", "choosing.md"}


def test_every_block_is_found():
    """An indented or otherwise unusual python fence would silently escape the test."""
    for page in DOCS.rglob("*.md"):
        text = page.read_text(encoding="utf-8")
        fences = len(re.findall(r"^\s*```\s*python", text, flags=re.MULTILINE))
        assert fences == len(FENCE.findall(text)), page


@pytest.mark.parametrize(("page", "index", "code"), [case(*block) for block in BLOCKS])
def test_docs_example_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/{page}[block {index}]", "exec"), {"__name__": "__docs__"})
