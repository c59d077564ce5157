"""`make demo` decides offline mode by one short check instead of forcing HF_HUB_OFFLINE=1."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from mergeseek.retrieval.demo import decide_offline, hub_reachable


@pytest.fixture()
def answering_url():
    """A local HTTP server that answers every HEAD with 404 (a reachable host, whatever the status)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server's name
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def closed_url():
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def no_offline_env(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield
    # decide_offline may set it; monkeypatch only restores what it changed itself
    os.environ["HF_HUB_OFFLINE"] = "1"


def test_reachable_host_counts_whatever_the_status(answering_url, closed_url):
    assert hub_reachable(answering_url, timeout=2.0)
    start = time.perf_counter()
    assert not hub_reachable(closed_url, timeout=2.0)
    assert time.perf_counter() - start < 3.0


def test_online_machine_is_left_online(answering_url, no_offline_env):
    assert decide_offline("openai", url=answering_url) is False
    assert "HF_HUB_OFFLINE" not in os.environ


def test_unreachable_hub_switches_to_offline(closed_url, no_offline_env):
    assert decide_offline("openai", url=closed_url) is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_local_weights_and_random_weights_need_no_check(tmp_path, closed_url, no_offline_env):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    assert decide_offline(str(ckpt), url=closed_url) is False
    assert decide_offline("none", url=closed_url) is False
    assert "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("value, offline", [("1", True), ("0", False), ("false", False), ("true", True)])
def test_the_users_setting_wins(monkeypatch, answering_url, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert decide_offline("openai", url=answering_url) is offline
    assert os.environ["HF_HUB_OFFLINE"] == value


def test_lsh_kernel_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    from mergeseek.encoders.merging import lsh_native

    monkeypatch.delenv("MERGESEEK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lsh_native._cache_dir() == tmp_path / "xdg" / "mergeseek"
    monkeypatch.setenv("MERGESEEK_CACHE", str(tmp_path / "own"))
    assert lsh_native._cache_dir() == tmp_path / "own"
    monkeypatch.delenv("MERGESEEK_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert lsh_native._cache_dir() == Path.home() / ".cache" / "mergeseek"
