"""The web app's documented guards (docs/SERVE.md), each pinned at its boundary (issue #23).

No model and no search: the guard runs in front of a stand-in engine, the upload limits are judged
from hand-made image headers, and the catalog reads a tiny index of seeded vectors.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from mergeseek.errors import InputError  # noqa: E402
from test_indexing_support import IDENTITY, synthetic_source  # noqa: E402

TOKEN = "s3cret-token"


def _client(token=None, bound=None):
    from fastapi.testclient import TestClient

    from mergeseek.serve import allowed_hosts
    from mergeseek.serve.app import create_app

    # the guard answers before any route runs; a thumbnail is the only frame route used here
    engine = SimpleNamespace(health=lambda: {"status": "ok"}, catalog=SimpleNamespace(thumb=lambda i: b"jpeg"))
    return TestClient(create_app(engine, token=token, allowed_hosts=None if bound is None else allowed_hosts(bound)))


# ---------------------------------------------------------------------------- the token
@pytest.mark.parametrize("headers,query,status", [
    ({}, "", 401),  # nothing sent
    ({"Authorization": f"Bearer {TOKEN}"}, "", 200),
    ({"Authorization": f"bearer {TOKEN}"}, "", 200),  # the scheme is case-insensitive (RFC 7235)
    ({"Authorization": f"BEARER {TOKEN}"}, "", 200),
    ({"Authorization": f"Bearer {TOKEN[:-1]}"}, "", 401),  # a prefix of the token
    ({"Authorization": f"Bearer {TOKEN}x"}, "", 401),
    ({"Authorization": f"Basic {TOKEN}"}, "", 401),
    ({}, f"?token={TOKEN}", 200),
    ({}, "?token=", 401),
])
def test_every_request_needs_the_token_when_one_is_set(headers, query, status):
    with _client(token=TOKEN) as c:
        assert c.get("/api/health" + query, headers=headers).status_code == status


# ---------------------------------------------------------------------------- the Host header
def test_host_names_are_read_without_port_brackets_case_or_a_trailing_dot():
    from mergeseek.serve.app import host_name

    cases = {"LocalHost.:8000": "localhost", "localhost": "localhost", "[::1]:8000": "::1", "[::1]": "::1",
             "::1": "", "a:b:c": "", "localhost:": "", "localhost:80x": "", "[::1]x": "", "[::1": ""}
    assert {h: host_name(h) for h in cases} == cases


@pytest.mark.parametrize("bound,host,status", [
    ("127.0.0.1", "localhost:8000", 200), ("127.0.0.1", "[::1]:8000", 200),
    ("127.0.0.1", "::1", 400),  # an IPv6 address must be bracketed
    ("127.0.0.1", "localhost:http", 400),
    ("::", "10.1.2.3:8000", 200), ("::", "[fe80::1]", 200), ("::", "search.lan", 400),  # a wildcard takes address literals
    ("0.0.0.0", "10.1.2.3", 200), ("0.0.0.0", "evil.example", 400), ("0.0.0.0", "evil.example:8000", 400),
    ("10.0.0.5", "10.0.0.6", 400),  # a specific address takes no other
])
def test_only_allowed_host_names_and_on_a_wildcard_address_literals_are_answered(bound, host, status):
    with _client(bound=bound) as c:
        assert c.get("/api/health", headers={"Host": host}).status_code == status


def test_the_host_check_comes_before_the_token():
    from fastapi.testclient import TestClient

    from mergeseek.serve import allowed_hosts
    from mergeseek.serve.app import create_app

    app = create_app(SimpleNamespace(health=lambda: {"status": "ok"}), token=TOKEN, allowed_hosts=allowed_hosts("127.0.0.1"))
    with TestClient(app) as c:
        assert c.get("/api/health", headers={"Host": "evil.example"}).status_code == 400  # not 401: no token is asked
        assert c.get("/api/health", headers={"Host": "localhost"}).status_code == 401


# ---------------------------------------------------------------------------- uploads
def _png_header(width: int, height: int) -> bytes:
    """A PNG that is only its header: its size can be read, its pixels cannot."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _jpeg_header(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x00\x03\x00\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + b"\x00" * 16 + b"\xff\xd9"


def _status(data: bytes) -> int:
    from mergeseek.serve.app import UploadRefused, _open_image

    try:
        _open_image(data)
    except UploadRefused as exc:
        return exc.status
    return 200


@pytest.mark.parametrize("data,status", [
    (_png_header(4000, 6000), 400),  # 24,000,000 pixels: at the limit, judged further (these bytes hold no pixels)
    (_png_header(4000, 6001), 413),  # one row more: refused from the header
    (_jpeg_header(6000, 5000), 400),  # a JPEG of 30 MP is under its own limit (it decodes at a reduced scale)
    (_jpeg_header(8000, 8000), 400),  # 64,000,000: at the JPEG limit
    (_jpeg_header(8000, 8001), 413),
])
def test_upload_pixel_limits_are_24_megapixels_and_64_for_a_jpeg(data, status):
    assert _status(data) == status


@pytest.mark.parametrize("raw,ok", [("0", True), ("123", True), ("9" * 18, True), ("9" * 19, False), ("12x", False),
                                    ("-1", False), ("", False), (" 1", False), ("1\n", False), ("١٢", False)])
def test_a_frame_id_is_1_to_18_ascii_digits(raw, ok):
    from mergeseek.serve.app import _frame_id
    from mergeseek.serve.engine import NotFound

    if ok:
        assert _frame_id(raw) == int(raw)
    else:
        with pytest.raises(NotFound):
            _frame_id(raw)


def test_an_id_with_a_final_newline_is_not_a_frame():
    # "$" also matches before a final newline: /api/thumb/1%0A was frame 1 (fixed with \Z)
    with _client() as c:
        r = c.get("/api/thumb/1%0A")
        assert r.status_code == 404 and "no frame with id" in r.json()["detail"]


@pytest.mark.parametrize("k,ok", [(0, False), (1, True), (1000, True), (1001, False)])
def test_k_is_1_to_1000(k, ok):
    from mergeseek.serve.engine import _check_k

    if ok:
        _check_k(k)
    else:
        with pytest.raises(InputError):
            _check_k(k)


# ---------------------------------------------------------------------------- videos
@pytest.mark.parametrize("name,media", [("a.mp4", "video/mp4"), ("a.MP4", "video/mp4"), ("a.WebM", "video/webm"),
                                        ("a.MKV", "video/x-matroska"), ("a.txt", "application/octet-stream")])
def test_video_media_types_go_by_the_suffix_in_any_case(name, media):
    from mergeseek.serve.engine import _video_file

    assert _video_file(Path(name), None).media_type == media


def _sig(p: Path) -> str:
    st = p.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def test_release_videos_are_served_only_when_a_video_type_with_a_signature(tmp_path):
    from mergeseek.indexing.store import IndexStore
    from mergeseek.serve.engine import Catalog, NotFound

    with IndexStore.open_for_write(tmp_path / "ix", IDENTITY) as store:
        store.commit([dataclasses.replace(synthetic_source(v, 2, i), kind="keyframes", key=f"/data/{v}")
                      for i, v in enumerate(("clip", "notes", "nosig"))])
    files = {}
    for v, name in (("clip", "clip.MP4"), ("notes", "notes.txt"), ("nosig", "nosig.mp4")):
        files[v] = tmp_path / name
        files[v].write_bytes(b"\x00" * 64)
    meta = {"clip": {"video_path": str(files["clip"]), "video_sig": _sig(files["clip"])},
            "notes": {"video_path": str(files["notes"]), "video_sig": _sig(files["notes"])},
            "nosig": {"video_path": str(files["nosig"])}}
    catalog = Catalog(SimpleNamespace(store=IndexStore.open_for_read(tmp_path / "ix"), video_meta=meta))
    assert sorted(catalog.videos) == ["clip", "nosig"]  # a .txt is never a video, whatever the metadata says
    assert catalog.video("clip").media_type == "video/mp4"
    with pytest.raises(NotFound, match="is not a video file"):
        catalog.video("notes")
    with pytest.raises(NotFound, match="signature"):
        catalog.video("nosig")
