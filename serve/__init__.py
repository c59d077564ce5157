"""``cli.py serve``: a search web app over one index (FastAPI + uvicorn; a JSON API and one page).

Public API (FastAPI, uvicorn and the model load lazily, inside the functions)::

    from mergeseek.serve import check_bind, run_server
    run_server("my_index", host="127.0.0.1", port=8000)

    from mergeseek.serve.engine import Engine; from serve.app import create_app
    app = create_app(Engine.open("my_index"))       # an ASGI app, e.g. for FastAPI's TestClient
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from mergeseek.errors import ConfigError

__all__ = ["allowed_hosts", "check_bind", "is_loopback", "run_server"]


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_bind(host: str, token: Optional[str]) -> None:
    """Refuse to serve beyond this machine without a token (one line, before the model loads)."""
    if token is not None and not token.strip():
        raise ConfigError("--token is empty; give a secret string, e.g. --token $(openssl rand -hex 16)")
    if not is_loopback(host) and token is None:
        raise ConfigError(
            f"--host {host} would serve the index to other machines without a password; add --token TOKEN "
            "(clients send it as 'Authorization: Bearer TOKEN' or ?token=TOKEN), or bind to --host 127.0.0.1"
        )


def _need_web_packages() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        from mergeseek.errors import MissingDependencyError

        names = {"multipart": "python-multipart"}
        raise MissingDependencyError(
            f"the web app needs {', '.join(names.get(m, m) for m in missing)}; install the 'serve' extra: "
            "pip install 'mergeseek[serve]' (in a checkout: pip install -e '.[serve]')"
        )


def _check_port_free(host: str, port: int) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port or --host") from None


def allowed_hosts(host: str, extra: Sequence[str] = ()) -> list:
    """The names a ``Host`` header may carry for a server bound to ``host`` (DNS-rebinding guard)."""
    names = ["localhost", "127.0.0.1", "::1", host.strip().strip("[]").lower()]
    for name in extra:
        name = name.strip().strip("[]").lower()
        if not name or "/" in name or " " in name:
            raise ConfigError(f"--allowed-host {name!r} is not a host name; give a name such as search.lan or an address")
        names.append(name)
    return names


def run_server(index_dir: Union[str, Path], host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None,
               model: str = "from-index", pretrained: str = "from-index", merge: str = "from-index",
               device: str = "auto", precision: str = "fp32", on_ready: Optional[Callable[[str, dict], None]] = None,
               extra_hosts: Sequence[str] = (), translate: Optional[str] = None, fuse: Sequence = (), nprobe: Optional[int] = None,
               ef_search: int = 64) -> None:
    """Load the model and the index once, then serve until Ctrl-C (``translate``: a
    ``retrieval.translate`` spec applied to each description, ``--translate``).

    Requests whose ``Host`` header is not ``localhost``, ``127.0.0.1``, ``::1``, ``host`` or one of
    ``extra_hosts`` (``--allowed-host``) get 400 (``serve.app.create_app``). ``on_ready`` gets the
    URL with the token in it: show it only to a person (a terminal), never write it to a log.
    ``fuse``: index folders of the same media built with other models (``serve.engine.Engine.open``).
    ``nprobe`` / ``ef_search``: IVF lists visited and HNSW search depth (recall against speed; exact
    ``Flat`` ignores both).
    """
    from mergeseek.retrieval.translate import get_translator

    check_bind(host, token)
    translator = get_translator(translate)  # a missing command fails before minutes of loading
    hosts = allowed_hosts(host, extra_hosts)
    if not 0 < int(port) < 65536:
        raise ConfigError(f"--port {port} is not valid; give 1..65535 (0 is not allowed)")
    _check_port_free(host, int(port))  # before minutes of loading, not after
    _need_web_packages()
    import uvicorn

    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import Engine

    engine = Engine.open(index_dir, model=model, pretrained=pretrained, merge=merge, device=device, precision=precision,
                         translate=translator, fuse=fuse, nprobe=nprobe, ef_search=ef_search)
    app = create_app(engine, token=token, allowed_hosts=hosts)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    if on_ready is not None:
        on_ready(url, engine.health())
    uvicorn.run(app, host=host, port=int(port), log_level="info", access_log=False)
