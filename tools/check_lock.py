"""Check that the development venv holds exactly what the lock pins.

``python tools/check_lock.py [LOCK]`` (default ``constraints.txt``, written by ``make lock``)
compares every distribution installed in the running interpreter's environment with the lock
(markers evaluated for this interpreter) and exits 1, naming each package, when one is installed
but not pinned, or installed at another version than its pin. The project itself is exempt.
``make venv`` and ``make test`` run it, so a green run always means "the locked environment".
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

PROJECT = "gradbalance"


def read_lock(path: Path) -> dict[str, str]:
    """Name → pinned version of every lock line whose marker holds for this interpreter."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as error:
            raise SystemExit(f"{path}:{number}: not a requirement: {line!r} ({error})") from error
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        versions = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if len(versions) != 1:
            raise SystemExit(f"{path}:{number}: {line!r} is not pinned with ==")
        pins[canonicalize_name(requirement.name)] = versions[0]
    return pins


def installed() -> dict[str, str]:
    """Name → version of every distribution in this environment."""
    return {
        canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()
    }


def problems(pins: dict[str, str], present: dict[str, str]) -> list[str]:
    """One line per package installed but not pinned, or installed at another version."""
    lines = []
    for name, version in sorted(present.items()):
        if name == PROJECT:
            continue
        if name not in pins:
            lines.append(f"{name} {version} is installed but the lock does not pin it")
        elif pins[name] != version:
            lines.append(f"{name} {version} is installed but the lock pins {pins[name]}")
    return lines


def main(argv: list[str]) -> int:
    lock = Path(argv[1] if len(argv) > 1 else "constraints.txt")
    found = problems(read_lock(lock), installed())
    if not found:
        return 0
    print(f"check-lock: {sys.prefix} differs from {lock}:", file=sys.stderr)
    for line in found:
        print(f"  {line}", file=sys.stderr)
    print(
        "Rebuild the venv from the lock (`make clean venv`). A package the project needs belongs "
        "in pyproject.toml's extras, then `make lock` pins it; one installed by hand must go "
        "(`pip uninstall NAME`).",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
