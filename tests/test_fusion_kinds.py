"""Fused models for every query kind (``retrieval.fusion.fused_query``, ``serve --fuse``): an image,
feedback marks, one video, N events and a text channel, each against a reciprocal-rank fusion
computed by hand from the stored vectors of two indexes of the same frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_search_session import indexes, open_searcher, stored  # noqa: F401 (the module's index fixture)

from mergeseek.errors import InputError


def hand_rrf(rankings: list) -> dict:
    """``{(video_id, frame_idx): score}`` of ``sum 1 / (60 + rank)`` over rankings of frame keys."""
    score: dict = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, start=1):
            score[key] = score.get(key, 0.0) + 1.0 / (60 + rank)
    return score


def ranking(rows: dict, q: np.ndarray, keep=lambda i: True) -> list:
    """Frame keys of ``rows`` (``stored``) by inner product with ``q``, best first."""
    mine = [i for i in rows if keep(i)]
    return [(rows[i][0], rows[i][1]) for i in sorted(mine, key=lambda i: (-float(rows[i][2] @ q), i))]


def best(score: dict, k: int) -> list:
    return [key for key, _ in sorted(score.items(), key=lambda kv: -kv[1])[:k]]


def two(indexes, qa, qb):  # noqa: F811
    sa, sb = open_searcher(indexes["a"], qa), open_searcher(indexes["b"], qb)
    sa.image_vector = lambda image: np.asarray(qa, np.float32)[None]
    sb.image_vector = lambda image: np.asarray(qb, np.float32)[None]
    return sa, sb


@pytest.fixture(scope="module")
def rows(indexes):  # noqa: F811
    ra, rb = stored(indexes["a"]), stored(indexes["b"])
    return ra, rb, ra[sorted(ra)[4]][2], rb[sorted(rb)[7]][2]


def test_an_image_query_fuses_each_model_s_ranking(indexes, rows):  # noqa: F811
    from mergeseek.retrieval.fusion import fused_query

    ra, rb, qa, qb = rows
    got = fused_query(two(indexes, qa, qb), image="query.jpg", k=6)
    want = hand_rrf([ranking(ra, qa), ranking(rb, qb)])
    assert [(h.video_id, h.frame_idx) for h in got] == best(want, 6)
    assert [h.score for h in got] == pytest.approx([want[k] for k in best(want, 6)], abs=1e-6)


def test_feedback_marks_are_the_same_frames_in_every_index(indexes, rows):  # noqa: F811
    from mergeseek.retrieval.feedback import rocchio
    from mergeseek.retrieval.fusion import fused_query

    ra, rb, qa, qb = rows
    ids_a = sorted(ra)
    b_of = {(v, f): i for i, (v, f, _) in rb.items()}
    like, unlike = [ids_a[3], ids_a[9]], [ids_a[1]]
    got = fused_query(two(indexes, qa, qb), "a red car", like=like, unlike=unlike, k=8)
    rankings = []
    for rws, q, to in ((ra, qa, lambda i: i), (rb, qb, lambda i: b_of[ra[i][:2]])):
        vec = rocchio(q[None], np.stack([rws[to(i)][2] for i in like]), np.stack([rws[to(i)][2] for i in unlike]))[0]
        drop = {to(i) for i in unlike}
        rankings.append(ranking(rws, vec, keep=lambda i, drop=drop: i not in drop))
    want = hand_rrf(rankings)
    assert [(h.video_id, h.frame_idx) for h in got] == best(want, 8)
    assert ra[unlike[0]][:2] not in {(h.video_id, h.frame_idx) for h in got}
    # "more like this" (the web app's similar): one liked frame, no text, in both indexes
    alone = fused_query(two(indexes, qa, qb), like=[ids_a[5]], k=3)
    assert (alone[0].video_id, alone[0].frame_idx) == ra[ids_a[5]][:2]
    with pytest.raises(InputError, match="no frame with liked id 987654"):
        fused_query(two(indexes, qa, qb), "x", like=[987654])


def test_one_video_ranks_only_its_frames_in_each_index(indexes, rows):  # noqa: F811
    from mergeseek.retrieval.fusion import fused_query

    ra, rb, qa, qb = rows
    got = fused_query(two(indexes, qa, qb), "x", video="L21_V002", k=50)
    want = hand_rrf([ranking(r, q, keep=lambda i, r=r: r[i][0] == "L21_V002") for r, q in ((ra, qa), (rb, qb))])
    assert [(h.video_id, h.frame_idx) for h in got] == best(want, 50) and {h.video_id for h in got} == {"L21_V002"}


def test_three_events_chain_on_the_fused_scores_as_a_brute_force_does(indexes, rows):  # noqa: F811
    from mergeseek.retrieval.fusion import fused_query

    ra, rb, qa, qb = rows
    ids_a, ids_b = sorted(ra), sorted(rb)
    qs = [(qa, qb), (ra[ids_a[2]][2], rb[ids_b[-1]][2]), (ra[ids_a[8]][2], rb[ids_b[0]][2])]
    sa, sb = two(indexes, qa, qb)
    sa.text_vector = lambda t: np.asarray(qs[int(t)][0], np.float32)[None]
    sb.text_vector = lambda t: np.asarray(qs[int(t)][1], np.float32)[None]
    windows = [100.0, 100.0]
    got = fused_query([sa, sb], "0", thens=["1", "2"], within=windows, k=1000)
    pts = {(v, f): t for v, f, t in zip(sa._video, sa._frame, sa._pts)}
    fused = [hand_rrf([ranking(ra, a), ranking(rb, b)]) for a, b in qs]
    chains = {}
    for k1 in fused[0]:
        for k2 in fused[1]:
            for k3 in fused[2]:
                if not (k1[0] == k2[0] == k3[0]) or not all(math.isfinite(pts[x]) for x in (k1, k2, k3)):
                    continue
                if 0 < pts[k2] - pts[k1] <= windows[0] and 0 < pts[k3] - pts[k2] <= windows[1]:
                    s = fused[0][k1] + fused[1][k2] + fused[2][k3]
                    chains[k1] = max(chains.get(k1, -1.0), s)
    assert chains, "the fixture must hold chains"
    assert len(got) == len(chains)
    assert sorted(c.score for c in got) == pytest.approx(sorted(chains.values()), abs=1e-6)
    assert {(c.hits[0].video_id, c.hits[0].frame_idx): c.score for c in got} == pytest.approx(chains, abs=1e-6)
    assert fused_query([sa, sb], "0", thens=["1", "2"], within=0.001, k=10) == []  # nothing fits: empty
    pairs = fused_query([sa, sb], "0", thens=["1"], within=100.0, k=5)  # two events: pairs, as search_temporal gives
    assert pairs and all(hasattr(p, "first") and hasattr(p, "then") for p in pairs)


def test_a_text_channel_is_one_more_ranking_in_the_fusion(indexes, rows, monkeypatch):  # noqa: F811
    from mergeseek.retrieval import hybrid
    from mergeseek.retrieval.fusion import fused_query

    ra, rb, qa, qb = rows
    sa, sb = two(indexes, qa, qb)
    ids_a = sorted(ra)
    said = [ids_a[7], ids_a[0], ids_a[-1]]  # the frames the on-screen text matched, best first
    monkeypatch.setattr(hybrid, "text_hits", lambda s, words, channel, depth: s._hits(np.ones(3, np.float32), np.asarray(said)))
    got = fused_query([sa, sb], "a crowd", ocr="HÀ NỘI", k=5)
    want = hand_rrf([ranking(ra, qa), ranking(rb, qb), [ra[i][:2] for i in said]])
    assert [(h.video_id, h.frame_idx) for h in got] == best(want, 5)
    assert set(got[0].channels) == {"ix_a", "ix_b", "ocr"}
    with pytest.raises(InputError, match="ocr: and asr: go with a plain description or alone"):
        fused_query([sa, sb], "a crowd", ocr="x", video="L21_V001")


def test_the_web_app_fuses_every_kind(indexes, rows):  # noqa: F811
    """serve --fuse: POST /api/search (marks, one video, events), GET /api/similar and the image upload
    give fused_query's answer; bad ids stay 422, an unknown id 404."""
    pytest.importorskip("fastapi")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from mergeseek.retrieval.fusion import fused_query
    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    ra, rb, qa, qb = rows
    ids_a = sorted(ra)
    sa, sb = CachedSearcher(indexes["a"], ngpu=0), CachedSearcher(indexes["b"], ngpu=0)
    for s, q in ((sa, qa), (sb, qb)):
        s.text_vector = lambda text, q=q: np.asarray(q, np.float32)[None]
        s.image_vector = lambda image, q=q: np.asarray(q, np.float32)[None]
    client = TestClient(create_app(Engine(sa, fused=[sb])))
    ref = two(indexes, qa, qb)

    def ids(hits):
        return [h["id"] for h in hits]

    body = {"events": ["a red car"], "k": 5, "like": [ids_a[3]], "unlike": [ids_a[1]]}
    web = client.post("/api/search", json=body).json()
    assert ids(web["hits"]) == [h.id for h in fused_query(ref, "a red car", like=[ids_a[3]], unlike=[ids_a[1]], k=5)]
    assert set(web["hits"][0]["channels"]) == {"ix_a", "ix_b"}
    web = client.post("/api/search", json={"events": ["x"], "video": "L21_V001", "k": 4}).json()
    assert ids(web["hits"]) == [h.id for h in fused_query(ref, "x", video="L21_V001", k=4)]
    web = client.post("/api/search", json={"events": ["x", "y", "z"], "within": 100, "k": 3}).json()
    assert web["kind"] == "chains" and [h["score"] for h in web["hits"]] == [
        round(c.score, 6) for c in fused_query(ref, "x", thens=["y", "z"], within=100, k=3)]
    sim = client.get(f"/api/similar/{ids_a[5]}", params={"k": 4}).json()["hits"]
    assert ids(sim) == [h.id for h in fused_query(ref, like=[ids_a[5]], k=5) if h.id != ids_a[5]][:4]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    img = client.post("/api/search/image", params={"k": 4}, files={"file": ("q.png", buf.getvalue(), "image/png")}).json()
    assert ids(img["hits"]) == [h.id for h in fused_query(ref, image="q", k=4)]
    assert client.post("/api/search", json={"events": ["x"], "like": [987654]}).status_code == 422
    assert client.get("/api/similar/987654").status_code == 404


def test_serve_passes_its_search_settings_to_every_index(monkeypatch, tmp_path):
    """cli.py serve --nprobe / --ef-search reach the searcher of the index and of each fused one."""
    from typer.testing import CliRunner

    import mergeseek.serve as serve
    from mergeseek.cli import app
    from mergeseek.serve.engine import CachedSearcher, Engine

    got = {}
    monkeypatch.setattr(serve, "run_server", lambda *a, **k: got.update(k))
    res = CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--nprobe", "96", "--ef-search", "200"])
    assert res.exit_code == 0, res.output
    assert (got["nprobe"], got["ef_search"]) == (96, 200)
    opened = []
    monkeypatch.setattr(CachedSearcher, "open", classmethod(lambda cls, d, **k: opened.append((d, k)) or d))
    monkeypatch.setattr(Engine, "__init__", lambda self, searcher, fused=(): None)
    monkeypatch.setattr("mergeseek.retrieval.fusion.check_same_media", lambda stores: None)
    monkeypatch.setattr("mergeseek.indexing.store.IndexStore.open_for_read", classmethod(lambda cls, d: d))
    Engine.open(tmp_path / "a", fuse=[tmp_path / "b"], nprobe=96, ef_search=200)
    assert sorted(str(d) for d, _ in opened) == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert all((k["nprobe"], k["ef_search"]) == (96, 200) for _, k in opened)
