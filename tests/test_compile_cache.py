"""A compiled kernel an interrupted compile left damaged in torch inductor's cache (a ``.so`` cut
short) is removed and compiled again, instead of failing every later ``--compile`` run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mergeseek.encoders.compile import drop_damaged_kernel


class FakeBackendFailure(Exception):
    """Shaped like dynamo's BackendCompilerFailed: the loader's error is its inner_exception."""

    def __init__(self, inner: BaseException):
        super().__init__(f"backend='inductor' raised:\n{type(inner).__name__}: {inner}")
        self.inner_exception = inner


def kernel(root: Path) -> Path:
    path = root / "ab" / "cabc123.main.so"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("reason", ["file too short", "invalid ELF header"])
def test_a_damaged_kernel_in_the_cache_is_removed(tmp_path, reason, caplog):
    so = kernel(tmp_path / "torchinductor_someone")
    assert drop_damaged_kernel(FakeBackendFailure(ImportError(f"{so}: {reason}")))
    assert not so.exists() and str(so) in caplog.text


def test_the_cache_named_by_the_environment_counts(tmp_path, monkeypatch):
    so = kernel(tmp_path / "my-cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "my-cache"))
    try:
        raise RuntimeError("compile failed") from ImportError(f"{so}: file too short")
    except RuntimeError as exc:
        assert drop_damaged_kernel(exc)
    assert not so.exists()


def test_anything_else_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    elsewhere = kernel(tmp_path / "lib")  # not an inductor cache
    assert not drop_damaged_kernel(FakeBackendFailure(ImportError(f"{elsewhere}: file too short")))
    assert elsewhere.exists()
    assert not drop_damaged_kernel(RuntimeError("shape mismatch"))
    gone = tmp_path / "torchinductor_x" / "zz" / "missing.so"
    assert not drop_damaged_kernel(ImportError(f"{gone}: file too short"))


SCRIPT = """
import torch
from mergeseek.encoders.compile import CompiledTower
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).eval()
with torch.no_grad():
    out = CompiledTower(m, batch_size=2)(torch.ones(2, 8))
    torch.testing.assert_close(out, m(torch.ones(2, 8)))
print("ok")
"""


@pytest.mark.slow
def test_a_compile_after_an_interrupted_one_works(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile needs a C compiler on CPU and none is installed")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "ok" in first.stdout, first.stderr[-2000:]
    kernels = list((tmp_path / "cache").rglob("*.so"))
    assert kernels
    for so in kernels:
        so.write_bytes(b"")  # what a compile killed while writing its kernels leaves
    again = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ok" in again.stdout, again.stderr[-2000:]
    assert "left damaged (file too short); compiling it again" in again.stderr
