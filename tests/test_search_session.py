"""Issue #29's search session on real indexes built from feature files (no model): relevance feedback
against a hand computation, search inside one video, fused models against a hand-computed RRF, and
the CLI's options reaching the search."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_aic_support import make_release
from typer.testing import CliRunner

from mergeseek.errors import InputError


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """ix_a and ix_b: the same release (same videos and frames), features of two 'models' (other seeds);
    ix_c: a release without L22_V001 (other media)."""
    from mergeseek.indexing.features import import_features

    root = tmp_path_factory.mktemp("session")
    a, b, c = make_release(root / "ra", seed=0), make_release(root / "rb", seed=1), make_release(root / "rc", seed=2)
    feats = c / "clip-features-32-aic25-b1" / "clip-features-32"
    (feats / "L22_V001.npy").unlink()
    shutil.rmtree(c / "Keyframes_L22")
    import_features([a], root / "ix_a", model="ViT-B-32", pretrained="none")
    import_features([b], root / "ix_b", model="ViT-B-16", pretrained="none")
    import_features([c], root / "ix_c", model="ViT-B-16", pretrained="none")
    return {k: root / f"ix_{k}" for k in "abc"}


def open_searcher(ix, query_vector=None):
    from mergeseek.retrieval.search import Searcher

    s = Searcher(ix)
    if query_vector is not None:
        s.text_vector = lambda text: np.asarray(query_vector, np.float32).reshape(1, -1)
    return s


def stored(ix):
    """{id: (video_id, frame_idx, vector)} read straight from the store."""
    from mergeseek.indexing.store import IndexStore

    store = IndexStore.open_for_read(ix)
    ids, vecs = store.read_vectors()
    meta = store.read_meta()
    where = dict(zip(meta.column("id").to_pylist(), zip(meta.column("video_id").to_pylist(),
                                                        meta.column("frame_idx").to_pylist())))
    return {int(i): (*where[int(i)], v) for i, v in zip(ids, vecs)}


# ---------------------------------------------------------------------------- relevance feedback
def test_rocchio_equals_a_hand_computation():
    from mergeseek.retrieval.feedback import rocchio

    q = np.array([[1.0, 0, 0]])
    liked = np.array([[0, 1.0, 0], [0, 0, 1.0]])
    unliked = np.array([[1.0, 0, 0]])
    # 1 * (1, 0, 0) + 0.75 * (0, .5, .5) - 0.15 * (1, 0, 0) = (0.85, 0.375, 0.375); norm sqrt(1.00375)
    assert rocchio(q, liked, unliked)[0] == pytest.approx([0.848410, 0.374299, 0.374299], abs=1e-6)
    assert rocchio(None, liked, unliked)[0] == pytest.approx(np.array([-0.15, 0.375, 0.375]) / np.sqrt(0.3037500),
                                                             abs=1e-6)
    with pytest.raises(InputError, match="at least one liked frame"):
        rocchio(None, np.zeros((0, 3)), unliked)


def test_feedback_search_ranks_by_the_hand_vector_and_drops_the_unliked(indexes):
    from mergeseek.retrieval.feedback import search_feedback

    rows = stored(indexes["a"])
    ids = sorted(rows)
    q = rows[ids[0]][2]
    like, unlike = [ids[3], ids[5]], [ids[1], ids[2]]
    s = open_searcher(indexes["a"], q)
    got = search_feedback(s, "the query", like, unlike, k=5)
    want_vec = q + 0.75 * (rows[like[0]][2] + rows[like[1]][2]) / 2 - 0.15 * (rows[unlike[0]][2] + rows[unlike[1]][2]) / 2
    want_vec = want_vec / np.linalg.norm(want_vec)
    order = sorted((i for i in ids if i not in unlike), key=lambda i: -float(rows[i][2] @ want_vec))
    assert [h.id for h in got] == order[:5]
    assert [h.score for h in got] == pytest.approx([float(rows[i][2] @ want_vec) for i in order[:5]], abs=1e-5)
    more = search_feedback(s, None, like, (), k=len(ids))  # no text: "more like these"; nothing dropped
    assert len(more) == len(ids) and {h.id for h in more[:2]} <= set(ids)


def test_feedback_with_ids_the_index_does_not_hold_is_one_line(indexes):
    from mergeseek.retrieval.feedback import search_feedback

    s = open_searcher(indexes["a"], np.ones(512) / np.sqrt(512))
    with pytest.raises(InputError, match="no frame with liked id 987654"):
        search_feedback(s, "x", [987654], [])
    with pytest.raises(InputError, match="unliked id -3"):
        search_feedback(s, "x", [], [-3])
    with pytest.raises(InputError, match="both relevant and not relevant"):
        search_feedback(s, "x", [1], [1])


# ---------------------------------------------------------------------------- inside one video
def test_search_in_one_video_is_exact_over_its_frames(indexes):
    from mergeseek.retrieval.query import run_query

    rows = stored(indexes["a"])
    q = rows[sorted(rows)[0]][2]
    s = open_searcher(indexes["a"], q)
    got = run_query(s, "x", video="L21_V002", k=10)
    mine = [i for i in rows if rows[i][0] == "L21_V002"]
    assert [h.id for h in got] == sorted(mine, key=lambda i: -float(rows[i][2] @ q))
    assert run_query(s, "x", video="L21_V002", k=1, per_video=True)[0].id == got[0].id
    with pytest.raises(InputError, match="no video 'L99' in index"):
        run_query(s, "x", video="L99")
    # events inside one video: every chain is in that video
    chains = run_query(s, "x", thens=["y", "z"], within=[100, 100], video="L21_V001", k=50)
    assert chains and {c.video_id for c in chains} == {"L21_V001"}
    assert run_query(s, "x", thens=["y", "z"], within=0.01, k=50) == []  # nothing fits: empty, not an error


# ---------------------------------------------------------------------------- fused models
def test_rrf_of_two_models_equals_a_hand_computation(indexes):
    from mergeseek.retrieval.fusion import search_fused
    from mergeseek.retrieval.hybrid import fuse

    assert fuse({"a": [1, 2], "b": [2, 3]}) == [(2, 1 / 62 + 1 / 61, {"a": 2, "b": 1}), (1, 1 / 61, {"a": 1}),
                                                (3, 1 / 62, {"b": 2})]
    assert fuse({"a": [1], "b": [2]}, weights={"b": 2.0})[0] == (2, 2 / 61, {"b": 1})
    ra, rb = stored(indexes["a"]), stored(indexes["b"])
    qa, qb = ra[sorted(ra)[4]][2], rb[sorted(rb)[7]][2]
    sa, sb = open_searcher(indexes["a"], qa), open_searcher(indexes["b"], qb)
    got = search_fused([sa, sb], "a red car", k=6)
    score: dict = {}
    for rows, q in ((ra, qa), (rb, qb)):
        ranking = sorted(rows.values(), key=lambda r: -float(r[2] @ q))
        for rank, (vid, frame, _) in enumerate(ranking, start=1):
            score[(vid, frame)] = score.get((vid, frame), 0.0) + 1.0 / (60 + rank)
    want = sorted(score.items(), key=lambda kv: -kv[1])[:6]
    assert [(h.video_id, h.frame_idx) for h in got] == [k for k, _ in want]
    assert [h.score for h in got] == pytest.approx([v for _, v in want], abs=1e-6)
    assert all(len(h.channels) == 2 for h in got)  # both indexes ranked every frame (same frames)
    by_key = {(r[0], r[1]): i for i, r in ra.items()}
    assert [h.id for h in got] == [by_key[(h.video_id, h.frame_idx)] for h in got]  # ids of the first index
    shallow = search_fused([sa, sb], "a red car", k=4, depth=2)  # frames only the second index ranked
    assert any(len(h.channels) == 1 and "ix_b" in h.channels for h in shallow)
    assert [h.id for h in shallow] == [by_key[(h.video_id, h.frame_idx)] for h in shallow]


def test_fusing_indexes_of_other_media_is_one_line(indexes):
    from mergeseek.retrieval.fusion import open_fused

    with pytest.raises(InputError, match=r"indexes other media than .* \(1 video\(s\) differ, e.g. 'L22_V001' only in"):
        open_fused([indexes["a"], indexes["c"]])


# ---------------------------------------------------------------------------- the CLI
def test_cli_passes_events_feedback_video_and_fuse_to_the_search(monkeypatch, tmp_path):
    import mergeseek.retrieval as retrieval
    from mergeseek.cli import app

    got = {}
    monkeypatch.setattr(retrieval, "run_search", lambda *a, **k: got.update(k) or [])
    res = CliRunner().invoke(app, ["search", "a", "--then", "b", "--then", "c", "--within", "5", "--within", "9",
                                   "--index", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert got["then"] == ["b", "c"] and got["within_s"] == [5.0, 9.0]
    res = CliRunner().invoke(app, ["search", "a", "--like", "3", "--like", "4", "--unlike", "7", "--video", "L01_V002",
                                   "--fuse", str(tmp_path / "b"), "--index", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (got["like"], got["unlike"], got["video"], got["fuse"]) == ([3, 4], [7], "L01_V002", [tmp_path / "b"])
    import mergeseek.serve as serve

    monkeypatch.setattr(serve, "run_server", lambda *a, **k: got.update(served=k))
    res = CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--fuse", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert got["served"]["fuse"] == [tmp_path / "b"]


@pytest.mark.parametrize("args,words", [
    (["a", "--then", "b", "--like", "3"], "drop --then or the marks"),
    (["--unlike", "3"], "empty query"),
    (["a", "--fuse", "x", "--ocr", "w", "--then", "b"], "--ocr goes with a text query or alone"),
    (["a", "--then", "b", "--then", "c", "--within", "1", "--within", "2", "--within", "3"], "3 --within values for 3"),
    (["a", "--then", " "], "non-empty next event"),
])
def test_cli_refuses_meaningless_combinations_in_one_line(args, words, tmp_path, monkeypatch):
    from mergeseek import encoders
    from mergeseek.cli import app

    monkeypatch.setattr(encoders, "Encoder", lambda **kw: (_ for _ in ()).throw(AssertionError("no model load")))
    res = CliRunner().invoke(app, ["search", *args, "--index", str(tmp_path / "none")])
    assert res.exit_code != 0 and words in res.stderr, res.stderr


def test_api_object_filter_lists_the_release_s_objects_and_filters(indexes):
    """The page's object filter: /api/health lists objects.parquet's classes; POST /api/search keeps
    only keyframes with a detection of the chosen one (the CLI's --object rule)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mergeseek.indexing.aic import objects_in_frames
    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    rows = stored(indexes["a"])
    searcher = CachedSearcher(indexes["a"], ngpu=0)
    searcher.text_vector = lambda text: rows[sorted(rows)[0]][2][None]
    client = TestClient(create_app(Engine(searcher)))
    assert client.get("/api/health").json()["objects"] == ["Dog", "Person"]  # Car scored 0.2: not kept
    hits = client.post("/api/search", json={"events": ["x"], "object": "dog", "k": 50}).json()["hits"]
    assert {(h["video_id"], h["frame_idx"]) for h in hits} == objects_in_frames(indexes["a"], "Dog") != set()
    bad = client.post("/api/search", json={"events": ["x", "y"], "object": "Dog"})
    assert bad.status_code == 422 and "--object" in bad.json()["detail"]


def test_one_home_for_rrf_and_for_event_chains():
    """Reciprocal-rank fusion is retrieval.hybrid.fuse (channels and fused models alike) and the event
    chain search is retrieval.events.chain_events (search --then, the API, TRAKE, the AIC scorer)."""
    import ast
    from pathlib import Path

    import mergeseek.errors as errors

    root = Path(errors.__file__).resolve().parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if {"tests", "bench", ".venv", "build"} & set(path.relative_to(root).parts):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in ("fuse", "chain_events", "pair_events", "rocchio"):
                found.append(f"{rel}:{node.name}")
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "RRF_K" for t in node.targets):
                found.append(f"{rel}:RRF_K")
    assert sorted(found) == ["retrieval/events.py:chain_events", "retrieval/feedback.py:rocchio",
                             "retrieval/hybrid.py:RRF_K", "retrieval/hybrid.py:fuse", "retrieval/search.py:pair_events"]
    fusion = (root / "retrieval" / "fusion.py").read_text(encoding="utf-8")
    assert "from mergeseek.retrieval.hybrid import RRF_K, fuse" in fusion
    pair = (root / "retrieval" / "search.py").read_text(encoding="utf-8")
    assert "from mergeseek.retrieval.events import chain_events" in pair


def test_the_web_app_over_two_models_indexes_fuses_text_searches(indexes):
    """serve --fuse: the plain text search of the API is the RRF of both indexes (hits of the first
    index, with thumbnails and ids the page can use); an index of other media is refused."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mergeseek.retrieval.fusion import search_fused
    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    ra, rb = stored(indexes["a"]), stored(indexes["b"])
    sa, sb = CachedSearcher(indexes["a"], ngpu=0), CachedSearcher(indexes["b"], ngpu=0)
    sa.text_vector = lambda text: ra[sorted(ra)[2]][2][None]
    sb.text_vector = lambda text: rb[sorted(rb)[6]][2][None]
    client = TestClient(create_app(Engine(sa, fused=[sb])))
    assert client.get("/api/health").json()["fused"] == [{"name": "ix_b", "model": "ViT-B-16"}]
    web = client.get("/api/search", params={"q": "a red car", "k": 6}).json()["hits"]
    want = search_fused([open_searcher(indexes["a"], ra[sorted(ra)[2]][2]), open_searcher(indexes["b"], rb[sorted(rb)[6]][2])],
                        "a red car", k=6)
    assert [(h["id"], h["score"]) for h in web] == [(h.id, h.score) for h in want]
    assert all(set(h["channels"]) == {"ix_a", "ix_b"} for h in web)
    with pytest.raises(InputError, match="indexes other media"):
        Engine(sa, fused=[CachedSearcher(indexes["c"], ngpu=0)])


@pytest.mark.parametrize("kwargs,words", [
    ({"text": "a bike", "video": "L99_V001"}, "no video 'L99_V001' in index"),
    ({"text": "a bike", "video": "l21_v001"}, "no video 'l21_v001' in index"),  # ids are exact, case included
    ({"text": "a bike", "like": [987654]}, "no frame with frame id 987654"),
    ({"text": "a bike", "unlike": [-3]}, "no frame with frame id -3"),
    ({"text": "a bike", "ocr": "HÀ NỘI"}, "has no on-screen text; index it with --ocr"),
    ({"text": "a bike", "asr": "hello"}, "has no speech; index it with --asr"),
    ({"asr": "hello"}, "has no speech"),
    ({"text": "a bike", "video": "L99", "fuse": ["b"]}, "no video 'L99'"),
])
def test_what_the_index_lacks_is_refused_before_the_model_loads(indexes, kwargs, words, monkeypatch):
    from mergeseek import encoders
    from mergeseek.retrieval.search import run_search

    monkeypatch.setattr(encoders, "Encoder", lambda **kw: (_ for _ in ()).throw(AssertionError("model loaded")))
    if "fuse" in kwargs:
        kwargs = {**kwargs, "fuse": [indexes[x] for x in kwargs["fuse"]]}
    with pytest.raises(InputError, match=words):
        run_search(indexes["a"], **kwargs)


def test_a_live_video_and_live_ids_pass_the_preflight(indexes):
    from mergeseek.retrieval.scope import preflight

    rows = stored(indexes["a"])
    some = sorted(rows)[:2]
    preflight(indexes["a"], video=rows[some[0]][0], ids=some)  # nothing raised
    preflight(indexes["a"])  # nothing asked: the index is not even opened
    preflight(indexes["a"].parent / "not-an-index")
