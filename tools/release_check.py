"""Release check: build the sdist and the wheel, ``twine check`` them, and run the Quickstart
from a fresh virtual environment that holds only the wheel and torch.

    python tools/release_check.py [--keep DIR]

Installing torch into a fresh environment would copy gigabytes, so the fresh environment
(``python -m venv --without-pip``, no system site packages) gets the wheel installed with
``pip --no-deps`` and one ``.pth`` line pointing at a folder of symlinks to exactly the files
(as listed in each distribution's RECORD) of torch and the closure of torch's own declared
requirements, with their extras and environment markers, as installed in the running
environment. Everything else, numpy included (torch does not require it), is then not
importable, and the check asserts so. What runs there:

1. ``import gradbalance`` comes from the installed wheel, not from the source tree;
2. the first ``python`` block of docs/index.md (the Quickstart) runs;
3. the importable top-level names are exactly the wheel's and the torch closure's.

Run by ``make release-check`` (and ``make test``); takes well under 90 s.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_EXTRA_TOP_LEVEL = {"gradbalance", "reference_models"}  # what the wheel installs
MUST_NOT_IMPORT = ["numpy", "torchvision", "torchaudio", "pytest", "transformers", "matplotlib"]


STARTED = time.perf_counter()


def phase(text: str) -> None:
    print(f"[{time.perf_counter() - STARTED:5.1f} s] {text}", flush=True)


def run(*command: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"release check: command failed: {' '.join(map(str, command))}")
    return result.stdout


def requirement_closure(root: str) -> dict[str, md.Distribution]:
    """``root`` and every distribution it requires, recursively (extras and markers honoured)."""
    base_env = {k: str(v) for k, v in default_environment().items()}
    found: dict[str, md.Distribution] = {}
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        key = canonicalize_name(name)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError as error:
            message = f"release check: {name}, required by torch, is not installed"
            raise SystemExit(message) from error
        found[key] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            wanted = marker is None or any(
                marker.evaluate({**base_env, "extra": extra}) for extra in ("", *extras)
            )
            if wanted:
                pending.append((requirement.name, frozenset(requirement.extras)))
    return found


def record_paths(dist: md.Distribution) -> list[tuple[str, ...]]:
    """The site-packages-relative paths a distribution's RECORD lists (no scripts, caches)."""
    return [
        file.parts
        for file in dist.files or []
        if file.parts and file.parts[0] != ".." and "__pycache__" not in file.parts
    ]


def link_distributions(dists: dict[str, md.Distribution], target: Path) -> set[str]:
    """Make exactly the files of ``dists`` visible under ``target``; return the top-level
    names this makes importable.

    A folder whose files all belong to one distribution of ``dists`` (by the RECORD of every
    installed distribution) is one symlink; a folder shared with another distribution, such
    as the ``nvidia`` namespace, is recreated and its entries linked one level down.
    """
    owners: dict[tuple[str, ...], set[str]] = {}
    for dist in md.distributions():
        key = canonicalize_name(dist.metadata["Name"])
        for parts in record_paths(dist):
            for depth in range(1, len(parts) + 1):
                owners.setdefault(parts[:depth], set()).add(key)
    top_level: set[str] = set()
    linked: set[tuple[str, ...]] = set()
    for key, dist in dists.items():
        if dist.files is None:
            raise SystemExit(f"release check: {key} has no RECORD; cannot link it")
        for parts in record_paths(dist):
            depth = next(
                d for d in range(1, len(parts) + 1) if owners[parts[:d]] == {key} or d == len(parts)
            )
            prefix = parts[:depth]
            if prefix in linked:
                continue
            linked.add(prefix)
            source = Path(str(dist.locate_file(Path(*prefix))))
            if not source.exists():
                continue
            destination = target.joinpath(*prefix)
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.symlink_to(source)
            head = parts[0]
            if not head.endswith((".dist-info", ".data", ".pth")):
                top_level.add(re.sub(r"(\.cpython.*)?\.(py|so|pyd)$", "", head))
    return top_level


PROBE = """
import importlib, json, pkgutil, sys, sysconfig, warnings
import gradbalance
stdlib = sysconfig.get_paths()["stdlib"]
names = sorted({m.name for m in pkgutil.iter_modules()
                if not getattr(m.module_finder, "path", "").startswith(stdlib)})
failed = []
for name in MUST_NOT_IMPORT:
    try:
        importlib.import_module(name)
    except ImportError:
        failed.append(name)
print(json.dumps({"gradbalance": gradbalance.__file__, "version": gradbalance.__version__,
                  "top_level": names, "not_importable": failed, "path": sys.path}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="gradbalance-release-"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        check(work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    phase("release check passed")


def check(work: Path) -> None:
    dist_dir = work / "dist"
    # sdist from the tree, then the wheel from the sdist (proves the sdist is complete);
    # no isolation: the pinned setuptools of the development environment builds it, offline.
    phase("building the sdist, then the wheel from it")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist_dir, ROOT)
    (wheel,) = dist_dir.glob("*.whl")
    (sdist,) = dist_dir.glob("*.tar.gz")
    phase("twine check")
    run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
        names = archive.namelist()
        packages = sorted({n.split("/")[0] for n in names if "/" in n})
    if "gradbalance/py.typed" not in names:
        raise SystemExit("release check: the wheel lacks gradbalance/py.typed")
    base = [r for r in requires if "extra ==" not in r]  # what `pip install gradbalance` pulls
    if len(base) != 1 or re.match(r"torch\b(?!vision|audio)", base[0]) is None:
        raise SystemExit(f"release check: the wheel requires more than torch: {base}")
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB, packages {packages}")
    print(f"sdist {sdist.name}: {sdist.stat().st_size / 1024:.0f} KiB")
    print("Requires-Dist: " + "; ".join(requires))

    venv = work / "venv"
    # the base interpreter, so the fresh environment sees no site-packages of this one
    base = getattr(sys, "_base_executable", sys.executable)
    phase("fresh venv, the wheel installed with --no-deps")
    run(base, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        wheel,
    )
    phase("linking torch and its requirements")
    closure = requirement_closure("torch")
    linked = work / "torch-only"
    top_level = link_distributions(closure, linked)
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    (Path(site) / "torch_only.pth").write_text(f"{linked}\n")
    print(f"torch closure: {len(closure)} distributions: {', '.join(sorted(closure))}")

    quickstart = re.search(
        r"^```python\n(.*?)^```", (ROOT / "docs" / "index.md").read_text(), re.S | re.M
    )
    if quickstart is None:
        raise SystemExit("release check: docs/index.md has no python block")
    scratch = work / "scratch"  # neither the source tree nor the build folder
    scratch.mkdir()
    (scratch / "quickstart.py").write_text(quickstart.group(1))
    (scratch / "probe.py").write_text(
        "import runpy\n"
        "runpy.run_path('quickstart.py', run_name='__main__')  # first, in a clean process\n"
        f"MUST_NOT_IMPORT = {MUST_NOT_IMPORT!r}\n{PROBE}"
    )
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(scratch)}
    phase("running the Quickstart, then the import probe, in the fresh venv")
    result = subprocess.run(
        [str(python), "-I", "probe.py"], cwd=scratch, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit("release check: the Quickstart failed in the fresh environment")
    output = result.stdout
    report = json.loads(output.strip().splitlines()[-1])
    if not report["gradbalance"].startswith(site):
        raise SystemExit(f"release check: gradbalance imported from {report['gradbalance']}")
    missing = sorted(set(MUST_NOT_IMPORT) - set(report["not_importable"]))
    if missing:
        raise SystemExit(f"release check: importable without being required: {missing}")
    extra = sorted(set(report["top_level"]) - top_level - ALLOWED_EXTRA_TOP_LEVEL - {"_virtualenv"})
    if extra:
        raise SystemExit(f"release check: unexpected importable top-level names: {extra}")
    print(
        f"fresh environment: gradbalance {report['version']} from the wheel, Quickstart ran, "
        f"{len(report['top_level'])} importable top-level names beyond the standard "
        f"library, none outside torch's closure; {', '.join(MUST_NOT_IMPORT)} not importable"
    )


if __name__ == "__main__":
    main()
