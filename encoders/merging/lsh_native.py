"""Build and call the fused C kernels: the hashed partner search (``lsh_kernel.c``, ``load``) and
the greedy one-to-one matching of ``method=pairs`` / ``ward`` (``pairs_kernel.c``, ``load_pairs``;
``MERGESEEK_PAIRS_NATIVE=0`` turns that one off). CPU; float32 scores.

The kernel (``lsh_kernel.c``) does per (image, table) what ``lsh.lsh_partners`` does with ~60
tensor operations: hash keys, radix sort, windowed same-code scoring, best partner. It needs only
a C compiler (``cc``/``gcc``/``clang``) and no Python headers: the first use compiles it into a
per-user cache (``$MERGESEEK_CACHE``, else ``$XDG_CACHE_HOME/mergeseek``, by default
``~/.cache/mergeseek``), later uses load the cached library. Without a compiler, or with
``MERGESEEK_LSH_NATIVE=0``, ``load()`` returns None and the tensor version runs (same results;
see ``tests/test_lsh_native.py``). ``MERGESEEK_LSH_CFLAGS`` adds compiler flags (e.g.
``-mno-avx512f`` builds the portable path on an AVX-512 machine; the cache key includes them).
A new build removes builds older than ``STALE_DAYS``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lsh_kernel.c")
PAIRS_SOURCE = Path(__file__).with_name("pairs_kernel.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
_lock = threading.Lock()
_state: dict = {}


def enabled(variable: str = "MERGESEEK_LSH_NATIVE") -> bool:
    return os.environ.get(variable, "1").lower() not in ("0", "off", "false", "no")


def _cache_dir() -> Path:
    # $MERGESEEK_CACHE, else the XDG cache folder ($XDG_CACHE_HOME, by default ~/.cache) / mergeseek.
    from mergeseek.runtime import cache_dir

    return cache_dir()


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux) or the platform string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _extra_flags() -> list:
    return os.environ.get("MERGESEEK_LSH_CFLAGS", "").split()


def _compile(cc: str, out: Path, source: Path = SOURCE) -> Optional[str]:
    """Compile to ``out`` atomically; returns None or the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    error = "failed"
    try:
        # Some compilers reject -march=native or lack OpenMP: then build without (serial kernel).
        for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
            cmd = [cc, *FLAGS, *extra, *_extra_flags(), str(source), "-o", tmp, "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                from mergeseek.runtime import commit_file

                commit_file(tmp, out)  # fsync, rename, fsync the folder
                return None
            error = ((proc.stderr or proc.stdout).strip().splitlines() or [f"{cc} exited with {proc.returncode}"])[-1]
        return error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


STALE_DAYS = 30  # builds of other sources / CPUs untouched this long are removed after a new build


def _prune(cache: Path, keep: Path, prefix: str = "lsh_kernel") -> None:
    """Remove kernel builds (and leftovers of interrupted builds) not written for STALE_DAYS.

    Runs only after a new build, i.e. when the source or the CPU changed. A build another machine
    sharing this cache still uses is at worst rebuilt (about a second) on its next use.
    """
    cutoff = time.time() - STALE_DAYS * 86400
    for old in (*cache.glob(f"{prefix}-*.so"), *cache.glob("tmp*.so")):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:  # gone already, or not ours to remove
            pass


def _build(source: Path) -> "tuple[Optional[ctypes.CDLL], Optional[str]]":
    """(the library built from ``source``, loaded; or None and why): compiled on first use into the
    cache, named by a digest of the source, flags, CPU and compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    flags = " ".join([*FLAGS, *_extra_flags()])
    digest = hashlib.sha256(source.read_bytes() + flags.encode() + _cpu_id().encode() + cc.encode())
    path = _cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    try:
        if not path.is_file():
            why = _compile(cc, path, source)
            if why is not None:
                return None, why
            _prune(path.parent, path, source.stem)
        return ctypes.CDLL(str(path)), None
    except OSError as exc:  # unwritable cache, unloadable library
        return None, str(exc)


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel's library, or None when it cannot be used here (reason in ``reason()``)."""
    if not enabled():
        return None
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why = _build(SOURCE)
        if lib is not None:
            try:
                fn = lib.mergeseek_lsh_search
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 7 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
                lib.mergeseek_lsh_simd_bits.restype = ctypes.c_int
                fb = lib.mergeseek_lsh_fallback
                fb.restype = ctypes.c_int
                fb.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_float]
                               + [ctypes.c_void_p] * 3)
            except AttributeError as exc:  # a library without the expected symbols
                lib, why = None, str(exc)
        if why:
            log.info("fused LSH kernel unavailable (%s); using the tensor implementation", why)
        _state["lib"], _state["why"] = lib, why
        return lib


def load_pairs() -> Optional[ctypes.CDLL]:
    """The greedy pairs kernel's library (``pairs_kernel.c``), or None when it cannot be used here
    (off with ``MERGESEEK_PAIRS_NATIVE=0``; reason in ``pairs_reason()``)."""
    if not enabled("MERGESEEK_PAIRS_NATIVE"):
        return None
    with _lock:
        if "pairs" in _state:
            return _state["pairs"]
        lib, why = _build(PAIRS_SOURCE)
        if lib is not None:
            try:
                fn = lib.mergeseek_pairs_greedy
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 3 + [ctypes.c_int]
                fe = lib.mergeseek_pairs_edges
                fe.restype = ctypes.c_int
                fe.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 3 + [ctypes.c_int]
            except AttributeError as exc:
                lib, why = None, str(exc)
        if why:
            log.info("fused pairs kernel unavailable (%s); using the tensor implementation", why)
        _state["pairs"], _state["pairs_why"] = lib, why
        return lib


def pairs_reason() -> Optional[str]:
    """Why ``load_pairs()`` returned None (None when it loaded or was not tried)."""
    if not enabled("MERGESEEK_PAIRS_NATIVE"):
        return "disabled by MERGESEEK_PAIRS_NATIVE=0"
    return _state.get("pairs_why")


def reason() -> Optional[str]:
    """Why ``load()`` returned None (None when it loaded or was not tried)."""
    if not enabled():
        return "disabled by MERGESEEK_LSH_NATIVE=0"
    return _state.get("why")


def variant() -> Optional[str]:
    """The loaded kernel's scoring path: ``avx512`` or ``portable`` (None when not loaded)."""
    lib = load()
    if lib is None:
        return None
    return "avx512" if lib.mergeseek_lsh_simd_bits() == 512 else "portable"


def backend() -> str:
    """``native`` when the fused CPU kernel is in use for float32 CPU inputs, else ``torch``."""
    return "native" if load() is not None else "torch"
