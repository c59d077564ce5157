"""`cli.py serve`'s JSON API through FastAPI's TestClient, over a tiny real index built once per module.

Two H.264 test-pattern videos (ffmpeg, browser-playable) indexed at 2 fps with the session's
random-weight ViT-B-32; results are checked against the Searcher itself, brute-force cosine
search over the stored vectors, and frames decoded again from the videos.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_indexing_support import build_encoder

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

HIT_KEYS = {"id", "score", "video_id", "frame_idx", "pts_time", "timestamp", "thumb_url", "video_url"}


def make_video(path: Path, seconds: float, pattern: str = "testsrc", size: str = "160x120", fps: int = 10) -> Path:
    """An H.264 (yuv420p, no B-frames) mp4 that Chromium plays and decord decodes frame-exactly."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (apt-get install ffmpeg)")
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"{pattern}=size={size}:rate={fps}", "-t", str(seconds),
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-bf", "0", "-g", str(fps),
         "-movflags", "+faststart", str(path)],
        check=True, timeout=60,
    )
    return path


def build_served_index(root: Path) -> Path:
    """videos/a.mp4 (6 s) and videos/b.mp4 (4 s) at 2 fps, and stills/ (3 images, no video file), into root/ix."""
    from PIL import Image

    from mergeseek.indexing import IndexOptions, Sampling, index_paths

    videos = root / "videos"
    videos.mkdir()
    make_video(videos / "a.mp4", 6, "testsrc")
    make_video(videos / "b.mp4", 4, "testsrc2")
    stills = root / "stills"
    stills.mkdir()
    y, x = np.mgrid[0:64, 0:96]
    for i, rgb in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        img = np.stack([(c * (x + y * i) / 160) % 256 for c in rgb], -1).astype(np.uint8)
        Image.fromarray(img).save(stills / f"{i}.png")
    index_paths([videos, stills], root / "ix", build_encoder(), IndexOptions(sampling=Sampling.parse("fps=2")))
    return root / "ix"


def source_frame(root: Path, hit) -> np.ndarray:
    """The hit's frame decoded again from its source (video frame, or the still image)."""
    import decord
    from PIL import Image

    if hit["video_id"] == "stills":
        return np.asarray(Image.open(root / "stills" / f"{hit['frame_idx']}.png").convert("RGB"))
    return decord.VideoReader(str(root / "videos" / f"{hit['video_id']}.mp4"))[hit["frame_idx"]].asnumpy()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_torch_thread):
    from fastapi.testclient import TestClient

    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    root = tmp_path_factory.mktemp("serve")
    ix = build_served_index(root)
    before = snapshot(ix)
    engine = Engine(CachedSearcher(ix, build_encoder(), ngpu=0))
    with TestClient(create_app(engine)) as client:
        yield {"client": client, "engine": engine, "ix": ix, "root": root, "before": before}


@pytest.fixture(scope="module")
def client(served):
    return served["client"]


def stored_vectors(ix: Path) -> tuple[np.ndarray, np.ndarray]:
    from mergeseek.indexing.store import IndexStore

    return IndexStore.open_for_read(ix).read_vectors()


# ---------------------------------------------------------------------------- health, page, search
def test_health_and_the_page_loads_nothing_from_the_network(client, served):
    h = client.get("/api/health")
    assert h.status_code == 200
    body = h.json()
    n = len(stored_vectors(served["ix"])[0])
    assert body["status"] == "ok" and body["vectors"] == n and body["model"] == "ViT-B-32" and body["videos"] == 3
    assert body["thumbnails"] == n
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    import re

    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text), "the page must not load from the network"
    assert "/api/search" in page.text and "/api/export.csv" in page.text


def test_search_matches_the_searcher_and_has_the_documented_shape(client, served):
    r = client.get("/api/search", params={"q": "a test pattern", "k": 17})
    assert r.status_code == 200
    data = r.json()
    assert data["kind"] == "frames" and len(data["hits"]) == 17
    for h in data["hits"]:
        assert HIT_KEYS <= set(h)
        assert h["thumb_url"] == f"/api/thumb/{h['id']}"
        if h["video_id"] == "stills":  # an image folder: no video to play, no time
            assert h["video_url"] is None and h["pts_time"] is None and h["timestamp"] is None
        else:
            assert h["video_url"] == f"/api/video/{h['video_id']}" and h["timestamp"].startswith("00:00:0")
    assert {h["video_id"] for h in data["hits"]} == {"a", "b", "stills"}
    direct = served["engine"].searcher.search_text("a test pattern", k=17)
    assert [h["id"] for h in data["hits"]] == [h.id for h in direct]
    assert [h["score"] for h in data["hits"]] == pytest.approx([h.score for h in direct], abs=1e-5)
    assert [h["frame_idx"] for h in data["hits"]] == [h.frame_idx for h in direct]
    for h in data["hits"]:
        if h["pts_time"] is not None:
            assert h["pts_time"] == pytest.approx(h["frame_idx"] / 10, abs=1e-3)

    per = client.get("/api/search", params={"q": "a test pattern", "k": 5, "per_video": 1}).json()["hits"]
    assert sorted(h["video_id"] for h in per) == ["a", "b", "stills"]


def test_then_search_gives_pairs_in_order_within_the_window(client):
    data = client.get("/api/search", params={"q": "colour bars", "then": "a clock", "within": 1.5, "k": 10}).json()
    assert data["kind"] == "pairs" and data["hits"]
    for p in data["hits"]:
        assert HIT_KEYS <= set(p) and HIT_KEYS <= set(p["then"])
        assert p["then"]["video_id"] == p["video_id"]
        assert 0 < p["then"]["pts_time"] - p["pts_time"] <= 1.5 + 1e-9
        assert p["score"] == pytest.approx(p["first_score"] + p["then"]["score"], abs=1e-5)
    # frames 0.5 s apart (2 fps): a 0.1 s window pairs nothing, and says so as an empty list of pairs
    none = client.get("/api/search", params={"q": "colour bars", "then": "a clock", "within": 0.1}).json()
    assert none["kind"] == "pairs" and none["hits"] == []


@pytest.mark.parametrize("params, what", [
    ({"q": "x", "k": 0}, "k"), ({"q": "x", "k": "many"}, "k"), ({"q": "x", "k": 100000}, "k"),
    ({"q": "x", "then": "y", "within": 0}, "within"), ({}, "q"), ({"q": "   "}, "empty query"),
    ({"q": "x", "per_video": "maybe"}, "per_video"),
    ({"q": "x", "video": "cam1"}, "unknown query parameter(s) video; /api/search takes: k, per_video, q, then, within"),
    ({"q": "x", "perVideo": "1", "K": "3"}, "unknown query parameter(s) K, perVideo"),
])
def test_bad_search_parameters_give_422_with_a_message(client, params, what):
    r = client.get("/api/search", params=params)
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], str) and what in r.json()["detail"]


@pytest.mark.parametrize("method, path, body, what", [
    ("get", "/api/health?verbose=1", None, "unknown query parameter(s) verbose"),
    ("get", "/api/thumb/0?size=big", None, "unknown query parameter(s) size"),
    ("post", "/api/search", {"q": "a bike"}, "q: Extra inputs are not permitted"),
    ("post", "/api/search", {"events": ["a bike"], "per_vdeo": True}, "per_vdeo: Extra inputs are not permitted"),
    ("post", "/api/basket/verify", {"rows": []}, "rows: Extra inputs are not permitted"),
    ("post", "/api/export.csv", {"items": [[{"video_id": "v", "frame_idx": 0, "pts": 1.0}]], "index": "x"}, "pts"),
])
def test_unknown_parameters_and_fields_are_named_never_ignored(client, method, path, body, what):
    r = client.get(path) if method == "get" else client.post(path, json=body)
    assert r.status_code == 422 and what in r.json()["detail"]


def test_the_page_keeps_its_own_query_string(client):
    r = client.get("/", params={"q": "a bike", "k": "20", "utm_source": "mail"})
    assert r.status_code == 200 and "<title>mergeseek</title>" in r.text


# ---------------------------------------------------------------------------- by id: similar, neighbours, thumbs
def test_similar_equals_brute_force_cosine_search_without_the_frame_itself(client, served):
    ids, vecs = stored_vectors(served["ix"])
    q = int(ids[3])
    r = client.get(f"/api/similar/{q}", params={"k": 5})
    assert r.status_code == 200
    got = [h["id"] for h in r.json()["hits"]]
    scores = vecs @ vecs[3]
    expected = [int(i) for i in ids[np.argsort(-scores, kind="stable")] if i != q][:5]
    assert got == expected
    assert client.get("/api/similar/999999").status_code == 404
    assert client.get("/api/similar/abc").status_code == 404


def test_neighbours_are_the_adjacent_frames_of_the_same_video(client, served):
    import pyarrow.compute as pc

    from mergeseek.indexing.store import IndexStore

    meta = IndexStore.open_for_read(served["ix"]).read_meta()
    a = meta.filter(pc.equal(meta.column("video_id"), "a")).sort_by("frame_idx")
    ids = a.column("id").to_pylist()
    mid = ids[5]
    r = client.get(f"/api/neighbors/{mid}", params={"n": 2})
    assert r.status_code == 200
    d = r.json()
    assert d["hit"]["id"] == mid and d["video_id"] == "a"
    assert [h["id"] for h in d["before"]] == ids[3:5] and [h["id"] for h in d["after"]] == ids[6:8]
    edge = client.get(f"/api/neighbors/{ids[0]}", params={"n": 6}).json()
    assert edge["before"] == [] and [h["id"] for h in edge["after"]] == ids[1:7]
    assert client.get(f"/api/neighbors/{mid}", params={"n": -1}).status_code == 422
    assert client.get(f"/api/neighbors/{mid}", params={"n": 1000}).status_code == 422
    assert client.get("/api/neighbors/424242").status_code == 404


def test_thumbnails_are_small_jpegs_of_the_right_frames(client, served):
    from PIL import Image

    from mergeseek.indexing.thumbs import make_jpeg

    hits = client.get("/api/search", params={"q": "anything", "k": 100}).json()["hits"]
    assert len(hits) == len(stored_vectors(served["ix"])[0])
    for h in hits:
        r = client.get(h["thumb_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.format == "JPEG" and max(im.size) <= 256
        assert r.content == make_jpeg(source_frame(served["root"], h)), f"the thumbnail of {h} is not its frame"
    assert client.get("/api/thumb/987654").status_code == 404


# ---------------------------------------------------------------------------- video files
def test_video_is_served_whole_and_by_range(client, served):
    path = served["root"] / "videos" / "a.mp4"
    data = path.read_bytes()
    full = client.get("/api/video/a")
    assert full.status_code == 200 and full.content == data and full.headers["content-type"] == "video/mp4"
    assert full.headers["accept-ranges"] == "bytes"
    part = client.get("/api/video/a", headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    tail = client.get("/api/video/a", headers={"Range": "bytes=-300"})
    assert tail.status_code == 206 and tail.content == data[-300:]
    open_end = client.get("/api/video/a", headers={"Range": f"bytes={len(data) - 10}-"})
    assert open_end.status_code == 206 and open_end.content == data[-10:]
    assert client.get("/api/video/a", headers={"Range": f"bytes={len(data) + 5}-"}).status_code == 416


def test_path_traversal_and_unknown_ids_give_404_and_never_file_contents(client, served):
    ix = served["ix"]
    secret = (ix / "manifest.json").read_text()[:60]
    video = served["root"] / "videos" / "a.mp4"
    attempts = [
        "/api/video/..%2F..%2Fetc%2Fpasswd", "/api/video/..%2f..%2fetc%2fpasswd", "/api/video/%2Fetc%2Fpasswd",
        "/api/video//etc/passwd", "/api/video/%2e%2e/%2e%2e/etc/passwd", "/api/video/..%5C..%5Cetc%5Cpasswd",
        f"/api/video/{video}", f"/api/video/{str(video).replace('/', '%2F')}", "/api/video/a.mp4", "/api/video/c", "/api/video/stills",
        "/api/video/..%2Fix%2Fmanifest.json", "/api/video/%2e%2e%2fmanifest.json",
        "/api/thumb/..%2Fmanifest.json", "/api/thumb/-1", "/api/thumb/1e3", "/api/thumb/%2Fetc%2Fpasswd",
        "/api/neighbors/..%2F..%2Fetc%2Fpasswd", "/api/similar/%2e%2e", "/api/thumb/99999999999999999999999",
    ]
    assert "not a video file" in client.get("/api/video/stills").json()["detail"]
    for url in attempts:
        r = client.get(url)
        assert r.status_code == 404, (url, r.status_code)
        assert b"root:" not in r.content and secret.encode() not in r.content and not r.content.startswith(b"\x00\x00\x00")


# ---------------------------------------------------------------------------- image upload
def test_image_upload_finds_that_frame_and_refuses_bad_uploads(client, served):
    import decord
    from PIL import Image

    frame = decord.VideoReader(str(served["root"] / "videos" / "b.mp4"))[20].asnumpy()
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    r = client.post("/api/search/image", params={"k": 3}, files={"file": ("q.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    top = r.json()["hits"][0]
    assert (top["video_id"], top["frame_idx"]) == ("b", 20) and top["score"] > 0.999
    raw = client.post("/api/search/image", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["hits"][0]["id"] == top["id"]

    not_image = client.post("/api/search/image", files={"file": ("x.png", b"this is not a picture", "image/png")})
    assert not_image.status_code == 400 and "not an image" in not_image.json()["detail"]
    assert client.post("/api/search/image", files={"other": ("x.png", buf.getvalue(), "image/png")}).status_code == 400
    assert client.post("/api/search/image", content=b"{}", headers={"content-type": "application/json"}).status_code == 400
    big = b"\xff\xd8" + bytes(20 * 1024 * 1024)
    over = client.post("/api/search/image", files={"file": ("big.jpg", big, "image/jpeg")})
    assert over.status_code == 413 and "20 MB" in over.json()["detail"]
    assert client.post("/api/search/image", content=big, headers={"content-type": "image/jpeg"}).status_code == 413


# ---------------------------------------------------------------------------- export
def read_csv(text: str) -> list:
    return list(csv.reader(io.StringIO(text)))


def test_export_of_a_search_is_the_submission_of_its_results(client, served, tmp_path):
    from mergeseek.retrieval.format import write_submission_csv

    r = client.get("/api/export.csv", params={"q": "a test pattern", "k": 100, "query_id": "query-3"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == 'attachment; filename="query-3.csv"'
    results = served["engine"].searcher.search_text("a test pattern", k=100)
    write_submission_csv(tmp_path / "ref.csv", results)
    assert r.text == (tmp_path / "ref.csv").read_text()
    rows = read_csv(r.text)
    assert 0 < len(rows) <= 100 and all(len(row) == 2 and row[1].isdigit() for row in rows)
    assert rows[0] != ["video_id", "frame_idx"]
    assert client.get("/api/export.csv", params={"q": "x"}).headers["content-disposition"].endswith('"submission.csv"')
    for bad in ("../etc/passwd", "a/b", ".hidden", "x" * 101, "a b"):
        assert client.get("/api/export.csv", params={"q": "x", "query_id": bad}).status_code == 422, bad
    assert client.get("/api/export.csv", params={"q": "x", "k": 101}).status_code == 422


def test_export_of_a_basket_keeps_its_order_and_caps_at_100_rows(client, served):
    hits = client.get("/api/search", params={"q": "a test pattern", "k": 4}).json()["hits"]
    ids = [hits[2]["id"], hits[0]["id"], hits[3]["id"]]
    r = client.post("/api/export.csv", json={"ids": ids, "query_id": "q7"})
    assert r.status_code == 200 and r.headers["content-disposition"].endswith('"q7.csv"')
    by_id = {h["id"]: h for h in hits}
    assert read_csv(r.text) == [[by_id[i]["video_id"], str(by_id[i]["frame_idx"])] for i in ids]

    pair = client.get("/api/search", params={"q": "colour bars", "then": "a clock", "within": 2, "k": 1}).json()["hits"][0]
    r = client.post("/api/export.csv", json={"ids": [[pair["id"], pair["then"]["id"]]]})
    assert read_csv(r.text) == [[pair["video_id"], str(pair["frame_idx"]), str(pair["then"]["frame_idx"])]]

    # repeated frames are written once; more than 100 distinct rows are cut at 100
    r = client.post("/api/export.csv", json={"ids": [ids[0], ids[1], ids[0]]})
    assert read_csv(r.text) == [[by_id[i]["video_id"], str(by_id[i]["frame_idx"])] for i in ids[:2]]
    from mergeseek.indexing.store import IndexStore

    meta = IndexStore.open_for_read(served["ix"]).read_meta()
    frames = {}
    for i, v in zip(meta.column("id").to_pylist(), meta.column("video_id").to_pylist()):
        frames.setdefault(v, []).append(i)
    pairs = [[x, y] for same in frames.values() for x in same for y in same]
    many = meta.column("id").to_pylist() + pairs
    assert len(many) > 100
    r = client.post("/api/export.csv", json={"ids": many})
    assert r.status_code == 200 and len(read_csv(r.text)) == 100 and r.headers["x-rows"] == "100"
    qa = client.post("/api/export.csv", json={"ids": ids[:2], "answer": "a red car"})
    assert read_csv(qa.text) == [[by_id[i]["video_id"], str(by_id[i]["frame_idx"]), "a red car"] for i in ids[:2]]

    assert client.post("/api/export.csv", json={"ids": [123456]}).status_code == 422
    assert client.post("/api/export.csv", json={"ids": []}).status_code == 422
    assert client.post("/api/export.csv", json={"ids": ["1"]}).status_code == 422
    assert client.post("/api/export.csv", json={"ids": [ids[0]], "query_id": "../x"}).status_code == 422
    b_id = next(h["id"] for h in hits if h["video_id"] == "b") if any(h["video_id"] == "b" for h in hits) else None
    if b_id is not None and any(h["video_id"] == "a" for h in hits):
        a_id = next(h["id"] for h in hits if h["video_id"] == "a")
        assert client.post("/api/export.csv", json={"ids": [[a_id, b_id]]}).status_code == 422


# ---------------------------------------------------------------------------- concurrency, cache, read-only
def test_concurrent_requests_agree_with_sequential_ones_and_repeated_queries_hit_the_cache(client, served):
    queries = [f"query number {i % 4}" for i in range(24)]
    sequential = {q: [h["id"] for h in client.get("/api/search", params={"q": q, "k": 5}).json()["hits"]] for q in set(queries)}
    s = served["engine"].searcher
    hits_before, misses_before = s.cache_hits, s.cache_misses

    def one(q):
        r = client.get("/api/search", params={"q": q, "k": 5})
        return q, r.status_code, [h["id"] for h in r.json()["hits"]]

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(one, queries))
    assert all(code == 200 and ids == sequential[q] for q, code, ids in out)
    assert s.cache_misses == misses_before and s.cache_hits == hits_before + len(queries)


def test_token_is_required_on_every_route_when_set(served):
    from fastapi.testclient import TestClient

    from mergeseek.serve.app import create_app

    with TestClient(create_app(served["engine"], token="s3cret-token")) as c:
        for url in ("/", "/api/health", "/api/search?q=x", "/api/thumb/0", "/api/video/a"):
            assert c.get(url).status_code == 401, url
        assert c.get("/api/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/health", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert c.get("/api/health?token=s3cret-token").status_code == 200
        assert c.get("/api/video/a?token=s3cret-token", headers={"Range": "bytes=0-9"}).status_code == 206


def test_serve_refuses_a_public_host_without_a_token_before_loading_anything(served, monkeypatch):
    from typer.testing import CliRunner

    import mergeseek.serve.engine

    from mergeseek import serve
    from mergeseek.cli import app
    from mergeseek.serve import check_bind

    def boom(*a, **k):
        raise AssertionError("the model and index must not load")

    monkeypatch.setattr(serve.engine.Engine, "open", boom)
    result = CliRunner().invoke(app, ["serve", "--index", str(served["ix"]), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--token" in lines[0] and "0.0.0.0" in lines[0]
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, None)
    from mergeseek.errors import ConfigError

    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        with pytest.raises(ConfigError):
            check_bind(host, None)
        check_bind(host, "a-token")
    with pytest.raises(ConfigError):
        check_bind("127.0.0.1", " ")


def test_the_server_never_wrote_to_the_index(client, served):
    # runs after the other tests of this module (file order): every request above was read-only
    client.get("/api/search", params={"q": "one more"})
    assert snapshot(served["ix"]) == served["before"]


# ---------------------------------------------------------------------------- thumbnails for existing indexes
def test_cli_thumbs_remakes_missing_and_stale_packs_identically(served, tmp_path):
    from typer.testing import CliRunner

    from mergeseek.cli import app
    from mergeseek.indexing.thumbs import THUMB_DIR, ThumbReader, pack_path, write_pack

    ix = tmp_path / "ix"
    shutil.copytree(served["ix"], ix)
    original = {p.name: p.read_bytes() for p in (served["ix"] / THUMB_DIR).iterdir()}
    assert original and all(name.endswith(".thumbs") for name in original)
    shutil.rmtree(ix / THUMB_DIR)
    r = CliRunner().invoke(app, ["thumbs", "--index", str(ix), "--json"])
    assert r.exit_code == 0, r.stderr
    import json

    report = json.loads(r.stdout)
    assert report["thumbnails"] == len(stored_vectors(ix)[0]) and not report["missing"]
    assert {p.name: p.read_bytes() for p in (ix / THUMB_DIR).iterdir()} == original

    # a pack from an older build (same shard name, other frames) is not served, and is made again
    (shard,) = [n[: -len(".thumbs")] for n in original]
    ids, _ = stored_vectors(ix)
    write_pack(ix, shard, ids, np.full(len(ids), 7, np.int64), [b"old"] * len(ids))
    from mergeseek.indexing.store import IndexStore

    meta = IndexStore.open_for_read(ix).read_meta()
    assert len(ThumbReader(ix, [shard], meta.column("id").to_numpy(), meta.column("hash").to_numpy())) == 0
    r = CliRunner().invoke(app, ["thumbs", "--index", str(ix)])
    assert r.exit_code == 0 and "1 of 1 shard pack(s) made now" in r.stdout
    assert pack_path(ix, shard).read_bytes() == original[f"{shard}.thumbs"]
    # an orphan pack (a shard the index no longer lists) is removed
    write_pack(ix, "part-09999", ids[:1], np.zeros(1, np.int64), [b"x"])
    r = CliRunner().invoke(app, ["thumbs", "--index", str(ix), "--json"])
    assert json.loads(r.stdout)["removed"] == 1 and not pack_path(ix, "part-09999").exists()
    bad = CliRunner().invoke(app, ["thumbs", "--index", str(tmp_path / "nope")])
    assert bad.exit_code == 3 and "not a mergeseek index" in bad.stderr


def test_next_index_run_fills_missing_packs_without_encoding(served, tmp_path):
    from mergeseek.indexing import IndexOptions, Sampling, index_paths
    from mergeseek.indexing.thumbs import THUMB_DIR

    ix = tmp_path / "ix"
    shutil.copytree(served["ix"], ix)
    original = {p.name: p.read_bytes() for p in (served["ix"] / THUMB_DIR).iterdir()}
    shutil.rmtree(ix / THUMB_DIR)  # as after a run killed between a shard's commit and its pack
    report = index_paths([served["root"] / "videos"], ix, build_encoder(), IndexOptions(sampling=Sampling.parse("fps=2")))
    assert report.up_to_date == 2 and report.frames_encoded == 0
    assert {p.name: p.read_bytes() for p in (ix / THUMB_DIR).iterdir()} == original


def test_serve_refuses_a_busy_port_and_missing_packages_in_one_line(served, monkeypatch):
    import socket

    import mergeseek.serve.engine

    from mergeseek import serve
    from mergeseek.errors import ConfigError, MissingDependencyError
    from mergeseek.serve import run_server

    monkeypatch.setattr(serve.engine.Engine, "open", lambda *a, **k: pytest.fail("must not load"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            run_server(served["ix"], port=port)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"uvicorn; install the 'serve' extra"):
        run_server(served["ix"], port=free_port_for_test())


def free_port_for_test() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_keyframe_sources_play_the_release_video_recorded_in_videos_json(served, tmp_path):
    import json

    from fastapi.testclient import TestClient

    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    ix = tmp_path / "ix"
    shutil.copytree(served["ix"], ix)
    video = served["root"] / "videos" / "a.mp4"
    # what indexing.aic writes for a release's keyframe folder whose video is in the release
    st = video.stat()
    (ix / "videos.json").write_text(json.dumps({"stills": {"video_path": str(video), "title": "t",
                                                           "video_sig": f"{st.st_size}-{st.st_mtime_ns}"},
                                                "nope": {"video_path": "/etc/passwd"}}))
    engine = Engine(CachedSearcher(ix, build_encoder(), ngpu=0))
    with TestClient(create_app(engine)) as c:
        hits = c.get("/api/search", params={"q": "x", "k": 100}).json()["hits"]
        still = next(h for h in hits if h["video_id"] == "stills")
        assert still["video_url"] == "/api/video/stills"
        r = c.get("/api/video/stills", headers={"Range": "bytes=0-99"})
        assert r.status_code == 206 and r.content == video.read_bytes()[:100]
        assert c.get("/api/video/nope").status_code == 404


def test_thumbs_cleanup_touches_only_its_own_files(served, tmp_path):
    from mergeseek.indexing.thumbs import THUMB_DIR, make_thumbs

    ix = tmp_path / "ix"
    shutil.copytree(served["ix"], ix)
    others = [ix / THUMB_DIR / n for n in ("notes.txt", "part-00000.pack", "x.tmp", "part-00099.thumbs.bak")]
    for p in others:
        p.write_bytes(b"someone else's")
    (ix / THUMB_DIR / "part-00098.thumbs.tmp").write_bytes(b"a killed run's")
    report = make_thumbs(ix)
    assert report.removed == 1 and not (ix / THUMB_DIR / "part-00098.thumbs.tmp").exists()
    assert all(p.read_bytes() == b"someone else's" for p in others)


# ---------------------------------------------------------------------------- file identity (issue #23)
def _one_video_index(root: Path):
    from mergeseek.indexing import IndexOptions, Sampling, index_paths

    videos = root / "videos"
    videos.mkdir()
    make_video(videos / "clip.mp4", 2)
    index_paths([videos], root / "ix", build_encoder(), IndexOptions(sampling=Sampling.parse("fps=1")))
    return root / "ix", videos / "clip.mp4"


def test_a_video_swapped_for_a_link_or_rewritten_after_indexing_is_never_served(tmp_path, one_torch_thread):
    import os

    from fastapi.testclient import TestClient

    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    ix, clip = _one_video_index(tmp_path)
    original, st = clip.read_bytes(), clip.stat()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET " * (len(original) // 11 + 1))
    engine = Engine(CachedSearcher(ix, build_encoder(), ngpu=0))
    with TestClient(create_app(engine)) as c:
        assert c.get("/api/video/clip").content == original
        clip.unlink()
        clip.symlink_to(secret)  # the attack: the indexed path now points at another file
        r = c.get("/api/video/clip")
        assert r.status_code == 404 and b"TOP-SECRET" not in r.content and "changed since it was indexed" in r.json()["detail"]
        clip.unlink()
        clip.symlink_to("/etc/passwd")
        assert c.get("/api/video/clip").status_code == 404
        clip.unlink()
        clip.symlink_to(tmp_path / "gone.mp4")  # broken link
        assert c.get("/api/video/clip").status_code == 404
        clip.unlink()
        clip.mkdir()  # a folder in its place
        assert c.get("/api/video/clip").status_code == 404
        clip.rmdir()
        clip.write_bytes(bytes(reversed(original)))  # rewritten in place, same size
        os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        assert c.get("/api/video/clip").status_code == 404
        # the very file that was indexed, moved and linked back (same size and time): still served
        moved = tmp_path / "moved.mp4"
        moved.write_bytes(original)
        os.utime(moved, ns=(st.st_atime_ns, st.st_mtime_ns))
        clip.unlink()
        clip.symlink_to(moved)
        assert c.get("/api/video/clip").content == original


def test_release_videos_are_recorded_only_as_regular_files_inside_the_release(tmp_path):
    import os

    from mergeseek.indexing.aic import _playable

    release = tmp_path / "release"
    (release / "Videos_L01" / "video").mkdir(parents=True)
    real = release / "Videos_L01" / "video" / "L01_V001.mp4"
    real.write_bytes(b"\x00" * 1000)
    outside = tmp_path / "private.key"
    outside.write_text("secret")
    inside_link = release / "Videos_L01" / "video" / "L01_V002.mp4"
    inside_link.symlink_to(real)
    escaping = release / "Videos_L01" / "video" / "L01_V003.mp4"
    escaping.symlink_to(outside)
    etc = release / "Videos_L01" / "video" / "L01_V004.mp4"
    etc.symlink_to("/etc/passwd")
    broken = release / "Videos_L01" / "video" / "L01_V005.mp4"
    broken.symlink_to(release / "missing.mp4")
    folder = release / "Videos_L01" / "video" / "L01_V006.mp4"
    folder.mkdir()
    st = real.stat()
    assert _playable(real, release) == (str(real), f"{st.st_size}-{st.st_mtime_ns}")
    assert _playable(inside_link, release) == (str(inside_link), f"{st.st_size}-{st.st_mtime_ns}")
    for bad in (escaping, etc, broken, folder):
        assert _playable(bad, release) is None, bad
    assert os.path.islink(escaping)  # the test really built links


def test_a_release_video_without_a_recorded_signature_is_not_served(served, tmp_path):
    import json

    from fastapi.testclient import TestClient

    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    ix = tmp_path / "ix"
    shutil.copytree(served["ix"], ix)
    video = served["root"] / "videos" / "a.mp4"
    (ix / "videos.json").write_text(json.dumps({"stills": {"video_path": str(video)}}))  # an older index's entry
    engine = Engine(CachedSearcher(ix, build_encoder(), ngpu=0))
    with TestClient(create_app(engine)) as c:
        r = c.get("/api/video/stills")
        assert r.status_code == 404 and "signature" in r.json()["detail"]


# ---------------------------------------------------------------------------- DNS rebinding (issue #23)
@pytest.mark.parametrize("bound,host,status", [
    ("127.0.0.1", "127.0.0.1:8000", 200), ("127.0.0.1", "localhost:8000", 200), ("127.0.0.1", "LOCALHOST", 200),
    ("127.0.0.1", "[::1]:8000", 200), ("127.0.0.1", "localhost.:8000", 200),
    ("127.0.0.1", "evil.example", 400), ("127.0.0.1", "evil.example:8000", 400), ("127.0.0.1", "127.0.0.1.evil.example", 400),
    ("127.0.0.1", "", 400), ("127.0.0.1", "a:b:c", 400), ("127.0.0.1", "localhost:80x", 400), ("127.0.0.1", "[::1", 400),
    ("127.0.0.1", "192.168.1.5:8000", 400),
    ("0.0.0.0", "192.168.1.5:8000", 200), ("0.0.0.0", "[fe80::1]:8000", 200), ("0.0.0.0", "evil.example:8000", 400),
    ("::", "10.0.0.7", 200), ("search.lan", "search.lan:8000", 200), ("search.lan", "other.lan", 400),
])
def test_only_the_bound_host_names_are_answered(served, bound, host, status):
    from fastapi.testclient import TestClient

    from mergeseek.serve import allowed_hosts
    from mergeseek.serve.app import create_app

    with TestClient(create_app(served["engine"], allowed_hosts=allowed_hosts(bound))) as c:
        for path in ("/api/health", "/", "/api/search?q=x", "/api/video/a"):
            r = c.get(path, headers={"Host": host})
            assert r.status_code == status, (path, host, r.status_code)
            if status == 400:
                assert "is not served here" in r.json()["detail"] and "--allowed-host" in r.json()["detail"]


def test_allowed_host_option_adds_names_and_refuses_junk(served):
    from fastapi.testclient import TestClient

    from mergeseek.errors import ConfigError
    from mergeseek.serve import allowed_hosts
    from mergeseek.serve.app import create_app

    hosts = allowed_hosts("127.0.0.1", ["Search.LAN", "[fd00::2]"])
    with TestClient(create_app(served["engine"], allowed_hosts=hosts)) as c:
        assert c.get("/api/health", headers={"Host": "search.lan:8000"}).status_code == 200
        assert c.get("/api/health", headers={"Host": "[fd00::2]:8000"}).status_code == 200
        assert c.get("/api/health", headers={"Host": "evil.lan"}).status_code == 400
    for junk in ("", "http://x/", "a b"):
        with pytest.raises(ConfigError, match="--allowed-host"):
            allowed_hosts("127.0.0.1", [junk])


def test_the_startup_line_never_writes_the_token_to_a_log(monkeypatch, tmp_path):
    """stderr is not a terminal (a log file, a pipe): the URL is printed without its token."""
    from typer.testing import CliRunner

    import mergeseek.serve as serve_pkg
    from mergeseek import cli

    def fake_run_server(index_dir, on_ready=None, **kwargs):
        on_ready("http://127.0.0.1:8000/?token=s3cr3t-value", {"vectors": 1, "videos": 1, "thumbnails": 1,
                                                                 "model": "m", "pretrained": "p"})

    monkeypatch.setattr(serve_pkg, "run_server", fake_run_server)
    result = CliRunner().invoke(cli.app, ["serve", "--index", str(tmp_path), "--token", "s3cr3t-value"])
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "s3cr3t-value" not in out and "http://127.0.0.1:8000/" in out


# ---------------------------------------------------------------------------- upload memory (issue #23)
def _png(width: int, height: int) -> bytes:
    """A real PNG of the given size that compresses to little (a few flat bands)."""
    from PIL import Image

    im = Image.new("RGB", (width, height), (30, 90, 200))
    im.paste((220, 40, 40), (0, 0, width, height // 3))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def _peak_rss_mb() -> float:
    from mergeseek.eval.timing import _read_status_kb

    return _read_status_kb("VmHWM") / 1024


def _reset_peak() -> bool:
    from mergeseek.eval.timing import _reset_hwm

    return _reset_hwm()


def test_a_tiny_file_claiming_64_megapixels_is_refused_from_its_header(client):
    data = _png(8000, 8000)  # 64 MP, a few hundred KB
    assert len(data) < 2 * 2**20
    if not _reset_peak():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    before = _peak_rss_mb()
    r = client.post("/api/search/image", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 413 and "8000x8000" in r.json()["detail"]
    assert _peak_rss_mb() - before < 60  # decoding it would have taken 192 MB


@pytest.mark.slow  # 8 concurrent 20 MP uploads
def test_concurrent_large_uploads_keep_memory_bounded_and_still_search(client, served):
    """Eight uploads of a 20-megapixel PNG at once (60 MB each when decoded) and a 48-megapixel
    JPEG: answered, with peak memory far under what eight whole decodes take."""
    from PIL import Image

    png = _png(5000, 4000)
    buf = io.BytesIO()
    Image.new("RGB", (8000, 6000), (10, 120, 60)).save(buf, format="JPEG", quality=70)
    jpeg = buf.getvalue()
    if not _reset_peak():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    before = _peak_rss_mb()

    def post(data, ctype):
        return client.post("/api/search/image", params={"k": 2}, content=data, headers={"content-type": ctype})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post(png, "image/png") if i < 8 else post(jpeg, "image/jpeg"), range(9)))
    assert [a.status_code for a in answers] == [200] * 9
    assert all(len(a.json()["hits"]) == 2 for a in answers)
    grew = _peak_rss_mb() - before
    assert grew < 500, f"peak memory grew {grew:.0f} MB for 9 concurrent large uploads"


def test_an_upload_is_scaled_before_it_is_kept():
    from mergeseek.serve.app import QUERY_SIDE, _open_image

    im = _open_image(_png(3000, 1200))
    assert max(im.size) == QUERY_SIDE and im.size == (QUERY_SIDE, round(1200 * QUERY_SIDE / 3000)) and im.mode == "RGB"
    small = _open_image(_png(300, 200))
    assert small.size == (300, 200)
