"""Issue #29 in the JSON API: ``POST /api/search`` (N events, feedback, one video) and a basket keyed by
the index's identity and exported by (video_id, frame_idx), over the tiny served index of test_serve_api."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from test_indexing_support import build_encoder
from test_serve_api import build_served_index

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_torch_thread):
    from fastapi.testclient import TestClient

    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    root = tmp_path_factory.mktemp("session")
    ix = build_served_index(root)
    engine = Engine(CachedSearcher(ix, build_encoder(), ngpu=0))
    with TestClient(create_app(engine)) as client:
        yield {"client": client, "engine": engine, "ix": ix}


def post(client, **body):
    return client.post("/api/search", json=body)


def test_three_events_give_chains_in_order_inside_each_gap(served):
    client, engine = served["client"], served["engine"]
    r = post(client, events=["colour bars", "a clock", "a test pattern"], within=[1.0, 1.5], k=50)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["kind"] == "chains" and data["hits"]
    for h in data["hits"]:
        chain = h["chain"]
        assert len(chain) == 3 and len({c["video_id"] for c in chain}) == 1
        gaps = [chain[i + 1]["pts_time"] - chain[i]["pts_time"] for i in range(2)]
        assert 0 < gaps[0] <= 1.0 + 1e-9 and 0 < gaps[1] <= 1.5 + 1e-9
        assert h["score"] == pytest.approx(sum(c["score"] for c in chain), abs=1e-4)
    # the same chains as the library's, in the same order
    from mergeseek.retrieval.events import search_events

    want = search_events(engine.searcher, ["colour bars", "a clock", "a test pattern"], [1.0, 1.5], k=50)
    assert [[c["id"] for c in h["chain"]] for h in data["hits"]] == [[x.id for x in c.hits] for c in want]
    # a window nothing satisfies: an empty result, not an error; a window <= 0: 422
    none = post(client, events=["colour bars", "a clock", "a test pattern"], within=0.01)
    assert none.status_code == 200 and none.json()["hits"] == []
    bad = post(client, events=["a", "b", "c"], within=[1, 2, 3])
    assert bad.status_code == 422 and "3 --within values for 3 events" in bad.json()["detail"]
    assert post(client, events=["a", "b"], within=0).status_code == 422
    two = post(client, events=["colour bars", "a clock"], within=2, k=10).json()
    get = client.get("/api/search", params={"q": "colour bars", "then": "a clock", "within": 2, "k": 10}).json()
    assert two["kind"] == "pairs" and [h["then"]["id"] for h in two["hits"]] == [h["then"]["id"] for h in get["hits"]]


def test_feedback_reranks_by_rocchio_and_bad_ids_are_422(served):
    client, engine = served["client"], served["engine"]
    first = post(client, events=["a test pattern"], k=10).json()["hits"]
    like, unlike = [first[3]["id"], first[5]["id"]], [first[0]["id"]]
    r = post(client, events=["a test pattern"], like=like, unlike=unlike, k=10)
    assert r.status_code == 200, r.text
    got = [h["id"] for h in r.json()["hits"]]
    from mergeseek.indexing.store import IndexStore

    ids, vecs = IndexStore.open_for_read(served["ix"]).read_vectors()
    v = dict(zip(ids.tolist(), vecs))
    q = engine.searcher.text_vector("a test pattern")[0]
    want = q + 0.75 * (v[like[0]] + v[like[1]]) / 2 - 0.15 * v[unlike[0]]
    want /= np.linalg.norm(want)
    order = sorted((i for i in v if i not in unlike), key=lambda i: -float(v[i] @ want))
    assert got == order[:10] and unlike[0] not in got
    for body, words in [({"like": [10**9]}, "no frame with liked id 1000000000"), ({"unlike": [-1], "like": [like[0]]},
                        "unliked id -1"), ({"like": ["x"]}, "like"), ({"like": [like[0]], "unlike": [like[0]]},
                        "both relevant and not relevant")]:
        bad = post(client, events=["a test pattern"], **body)
        assert bad.status_code == 422 and words in bad.json()["detail"], bad.text
    only_likes = post(client, like=like, k=5)  # no text: more like these
    assert only_likes.status_code == 200 and len(only_likes.json()["hits"]) == 5


def test_search_in_one_video(served):
    client = served["client"]
    r = post(client, events=["a clock"], video="b", k=100)
    assert r.status_code == 200 and {h["video_id"] for h in r.json()["hits"]} == {"b"}
    n_b = sum(1 for v in served["engine"].catalog.video_code if served["engine"].catalog.video_names[v] == "b")
    assert len(r.json()["hits"]) == n_b
    assert post(client, events=["a clock"], video="nope").status_code == 422


def test_basket_items_export_by_video_and_frame_and_refuse_another_index(served):
    client = served["client"]
    uid = client.get("/api/health").json()["index"]["uid"]
    hits = post(client, events=["a test pattern"], k=5).json()["hits"]
    items = [[{"video_id": h["video_id"], "frame_idx": h["frame_idx"]}] for h in hits[:3]]
    r = client.post("/api/export.csv", json={"items": items, "index": uid, "query_id": "q1"})
    assert r.status_code == 200, r.text
    assert list(csv.reader(io.StringIO(r.text))) == [[h["video_id"], str(h["frame_idx"])] for h in hits[:3]]
    stale = client.post("/api/export.csv", json={"items": items, "index": "0123456789abcdef"})
    assert stale.status_code == 409 and "another index" in stale.json()["detail"]
    assert client.post("/api/export.csv", json={"items": items}).status_code == 422  # which index? never guessed
    missing = client.post("/api/export.csv", json={"items": [[{"video_id": "a", "frame_idx": 99999}]], "index": uid})
    assert missing.status_code == 422 and "frame 99999 of video 'a' is not in this index" in missing.json()["detail"]
    v = client.post("/api/basket/verify", json={"items": items, "index": "0123456789abcdef"}).json()
    assert v["stale"] and not any(r["ok"] for r in v["rows"]) and v["index"]["uid"] == uid
    v = client.post("/api/basket/verify", json={"items": items, "index": uid}).json()
    assert not v["stale"] and all(r["ok"] for r in v["rows"])
    assert [r["frames"][0]["id"] for r in v["rows"]] == [h["id"] for h in hits[:3]]
    chain = post(client, events=["colour bars", "a clock", "a test pattern"], within=[1.0, 1.5], k=1).json()["hits"][0]
    item = [[{"video_id": c["video_id"], "frame_idx": c["frame_idx"]} for c in chain["chain"]]]
    r = client.post("/api/export.csv", json={"items": item, "index": uid})
    assert r.text == ",".join([chain["video_id"], *(str(c["frame_idx"]) for c in chain["chain"])]) + "\n"
