"""Small runtime helpers every package shares: durable atomic writes, writability checks, reading
a user's text file, version records, device resolution, autocast and the top-level splitting of
``key=value,...`` strings.

Every file mergeseek writes goes through :func:`atomic_write` (or :func:`commit_file` for a file
another program produced): the data go to a temporary name, the file is fsynced, renamed over
the target, and the folder is fsynced so the rename itself survives a power cut. A failed write
removes its temporary file and raises :class:`errors.WriteError` with one line that says what to do.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

from mergeseek.errors import ConfigError, InputError, WriteError

TMP_SUFFIX = ".tmp"

Writer = Union[str, bytes, Callable[[Path], object]]


def xdg_cache_home() -> Path:
    """The user's cache folder: ``$XDG_CACHE_HOME``, by default ``~/.cache``."""
    return Path(os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache"))


def cache_dir() -> Path:
    """mergeseek's own cache (the compiled LSH kernel, OpenVINO's compiled OCR models):
    ``$MERGESEEK_CACHE``, else ``xdg_cache_home() / "mergeseek"``."""
    return Path(os.environ.get("MERGESEEK_CACHE") or xdg_cache_home() / "mergeseek")


def tmp_path_for(path: Union[str, Path]) -> Path:
    """The temporary name :func:`atomic_write` uses for ``path`` (callers that journal it need it first)."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(path: Union[str, Path]) -> None:
    """fsync a folder, so renames and new names in it are on disk (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows, or a folder that cannot be opened for reading: nothing more we can do
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_file(path: Union[str, Path]) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def commit_file(tmp: Union[str, Path], path: Union[str, Path]) -> Path:
    """fsync ``tmp``, rename it over ``path`` and fsync the folder: readers see the old or the new file."""
    tmp, path = Path(tmp), Path(path)
    try:
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise write_error(path, exc) from None
    return path


def atomic_write(path: Union[str, Path], write: Writer, tmp: Optional[Union[str, Path]] = None) -> Path:
    """Write ``path`` atomically and durably.

    Args:
        path: the file to (re)place.
        write: the content (``str`` is written as UTF-8, ``bytes`` as is) or a callable that writes
            the temporary path it is given (``np.save``, ``pq.write_table``, ``torch.save``, ...).
        tmp: the temporary name (default ``path`` + ``.tmp``; must be in the same folder).

    Raises:
        WriteError: the folder is missing or read-only, the disk is full, ... (the old file is intact).
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else tmp_path_for(path)
    try:
        if isinstance(write, str):
            write = write.encode("utf-8")
        if isinstance(write, bytes):
            data = write
            with open(tmp, "wb") as fh:
                fh.write(data)
        else:
            write(tmp)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise write_error(path, exc) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return commit_file(tmp, path)


def write_error(path: Union[str, Path], exc: OSError, committed: bool = False) -> WriteError:
    """A one-line :class:`WriteError` for an ``OSError`` met while writing ``path``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    code = exc.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        hint = "free some space (or choose another location) and run the command again"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "choose a writable location"
    elif code in (errno.ENOENT, errno.ENOTDIR):
        hint = "create the folder first or choose an existing one"
    else:
        hint = "check the location and run the command again"
    cls = WriteError
    if committed:
        from mergeseek.errors import PartialWriteError

        cls = PartialWriteError
    err = cls(f"cannot write {path}: {reason}; {hint}")
    err.errno = code
    return err


def check_writable(path: Union[str, Path], folder: bool = False, what: str = "") -> Path:
    """Fail fast (before hours of work) when ``path`` cannot be written.

    Args:
        path: a file to be written (its folder must exist), or with ``folder`` a folder that is
            created when missing (its nearest existing parent must be writable).
        what: the option the path came from, for the message (``--csv``).

    A probe file is created and removed in the folder that will receive the writes: permission
    bits alone say nothing for root, and a read-only mount is only seen by trying.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise WriteError(f"{label} is a file, not a folder; choose a folder")
        probe_dir = path
        while not probe_dir.exists():
            if probe_dir.parent == probe_dir:
                break
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise WriteError(f"{label}: {probe_dir} is a file, not a folder; choose another location")
    else:
        if path.is_dir():
            raise WriteError(f"{label} is a folder; give a file name")
        probe_dir = path.parent if str(path.parent) else Path(".")
        if not probe_dir.is_dir():
            raise WriteError(f"{label}: folder {probe_dir} does not exist; create it first or choose an existing one")
    try:
        fd, name = tempfile.mkstemp(prefix=".mergeseek-probe-", dir=probe_dir)
    except OSError as exc:
        err = write_error(path, exc)
        raise WriteError(f"{label} is not writable: {str(err).split(': ', 1)[-1]}") from None
    os.close(fd)
    _unlink_quietly(Path(name))
    return path


def read_text_file(path: Union[str, Path], what: str) -> str:
    """The text of a file the user named (``what``: "query file", ...), UTF-8 with or without a
    BOM; a missing path, a folder, an unreadable or a non-UTF-8 file is one ``InputError`` line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def parse_bytes(text: Optional[str]) -> Optional[int]:
    """``"8G"``, ``"512MiB"``, ``"1.5GB"``, ``"1000000"`` -> bytes (binary units); None for None/empty."""
    from mergeseek.errors import ConfigError

    if text is None or not str(text).strip():
        return None
    raw = str(text).strip().upper().replace("IB", "").rstrip("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(raw[-1:], 1)
    number = raw[:-1] if scale > 1 else raw
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"memory size {text!r} is not valid; give a positive size such as 512M, 8G or 16GiB")
    return int(value * scale)


def release_freed_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def software_versions() -> dict:
    """Versions of the packages that decide what an index or a report holds (recorded in manifests)."""
    from importlib import metadata

    out = {}
    for dist in ("mergeseek", "torch", "open_clip_torch", "faiss-cpu", "faiss-gpu-cu12", "decord", "pyarrow", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; ``cpu``/``cuda``/``cuda:N`` checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for but no CUDA device is present; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device={device!r} is not valid; choose one of: auto, cpu, cuda, cuda:N")
    return device


def autocast(device: str, precision: str):
    """The autocast context of ``precision`` on ``device`` (fp32: none; on CPU fp16 and bf16 both mean bf16)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    dtype = torch.float16 if precision == "fp16" and dev == "cuda" else torch.bfloat16
    return torch.autocast(device_type=dev, dtype=dtype)


def file_sig(p: Path) -> str:
    """``size-mtime_ns`` of ``p`` (links followed): the identity a source's fingerprint is made of."""
    st = p.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def regular_file_sig(p: Path) -> tuple[Path, str]:
    """(real path, size-mtime signature as in a video's fingerprint) of the regular file ``p``
    leads to, links followed; ``OSError`` when it cannot be read, ``ValueError`` when it is not a
    regular file. The web app serves a video only while this still equals what was indexed."""
    import stat

    real = Path(os.path.realpath(p))
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{p} is not a regular file")
    return real, f"{st.st_size}-{st.st_mtime_ns}"


def first_by(items, key: Callable) -> list:
    """The first item of each ``key(item)``, in order (later ones with a key already seen are dropped)."""
    seen, out = set(), []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out


def split_top_level(text: str) -> list[str]:
    """Split ``text`` on the commas outside brackets: ``r=[16,8],method=lsh`` -> ``["r=[16,8]", "method=lsh"]``."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
