"""The append-only FAISS layout (issue #29): an add writes ``index.delta.faiss`` (exact IDMap2,Flat)
beside ``index.faiss`` and never rewrites the main file; search merges the two top-k lists exactly;
a kill at any point of an add, a damaged delta, the fold past the bound, and every path that reads
or rewrites the FAISS files (repair, compact, merge-index, export, sharded search, the web app's
engine). Small synthetic indexes (``test_indexing_support.synthetic_source``, dim 8)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_indexing_support import IDENTITY, synthetic_source

from mergeseek.indexing import faiss_index
from mergeseek.indexing.faiss_index import (
    DELTA_MAX_ROWS, delta_limit, file_ids, held_ids, load_index, merge_top_k, quantizer_bytes,
)
from mergeseek.indexing.store import IndexStore
from mergeseek.indexing.writer import IndexWriter
from mergeseek.retrieval.search import Searcher

ROOT = Path(__file__).resolve().parents[1]
BASE = [("v0", 400), ("v1", 400), ("v2", 400), ("v3", 400), ("v4", 400)]  # 2,000 rows: the delta may hold 200
ADDED = [("a0", 120), ("a1", 30)]


def sources(spec, seed0=0):
    return [synthetic_source(name, n, seed=seed0 + i) for i, (name, n) in enumerate(spec)]


def write(root: Path, items, index_type=None, identity=IDENTITY, force=False):
    with IndexWriter(root, identity, index_type=index_type, ngpu=0, force=force) as w:
        for s in items:
            w.add(s)
            w.commit()
        w.finish()


def with_delta(root: Path, index_type: str = "Flat") -> None:
    """2,000 rows in index.faiss, then a second run adding 150 (within the bound: they go to the delta)."""
    write(root, sources(BASE), index_type)
    write(root, sources(ADDED, seed0=100))


def no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("an add must not train or rebuild the index")

    monkeypatch.setattr(faiss_index, "_train", refuse)
    monkeypatch.setattr("mergeseek.indexing.writer.build_index", refuse)


def live(root: Path):
    return IndexStore.open_for_read(root).read_vectors()


def queries(root: Path, n: int = 12, seed: int = 5) -> np.ndarray:
    """Half random directions, half stored rows (old and new) plus a little noise."""
    ids, vecs = live(root)
    rng = np.random.default_rng(seed)
    q = np.concatenate([rng.standard_normal((n // 2, vecs.shape[1])),
                        vecs[rng.choice(len(ids), n - n // 2, replace=False)] + 0.05 * rng.standard_normal((n - n // 2, vecs.shape[1]))])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def hits_of(searcher, q, k):
    return [[(h.id, h.score, h.video_id, h.frame_idx) for h in hs] for hs in searcher.search_vectors(q, k)]


def delta_state(root: Path) -> tuple[list, np.ndarray]:
    """(the delta's ids, its stored vectors)."""
    return faiss_index.delta_contents(load_index(root / "index.delta.faiss"))


def assert_consistent(root: Path) -> None:
    """The FAISS state holds every live row once, with the shards' vectors, and is current."""
    ids, vecs = live(root)
    store = IndexStore.open_for_read(root)
    assert store.faiss_is_current()
    main = held_ids(load_index(root / "index.faiss"))
    delta_ids, delta_vecs = delta_state(root) if (root / "index.delta.faiss").is_file() else (np.zeros(0, np.int64), None)
    both = np.concatenate([main, delta_ids])
    assert len(np.unique(both)) == len(both) and sorted(both.tolist()) == sorted(ids.tolist())  # no duplicate, none lost
    if delta_vecs is not None:
        at = {int(i): k for k, i in enumerate(ids)}
        assert np.array_equal(delta_vecs, vecs[[at[int(i)] for i in delta_ids]])  # the shards' vectors, bit for bit
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- the pieces
def test_merge_top_k_equals_a_naive_sort_with_ties_and_padding():
    rng = np.random.default_rng(0)
    for _ in range(50):
        m, k = 3, int(rng.integers(1, 8))
        parts = []
        for _ in range(int(rng.integers(1, 4))):
            kk = int(rng.integers(1, 8))
            s = rng.choice([0.5, 0.25, 0.125, -1.0], (m, kk)).astype(np.float32)  # many exact ties
            i = rng.choice(1000, (m, kk), replace=False).astype(np.int64)
            i[rng.random((m, kk)) < 0.2] = -1  # FAISS's padding
            parts.append((s, i))
        got_s, got_i = merge_top_k([p[0] for p in parts], [p[1] for p in parts], k)
        for row in range(m):
            cands = sorted((-float(s[row, j]), int(i[row, j])) for s, i in parts for j in range(s.shape[1]) if i[row, j] >= 0)
            want = [c[1] for c in cands[:k]] + [-1] * max(0, k - len(cands))
            assert got_i[row].tolist() == want
            assert [float(x) for x in got_s[row][: len(cands)]] == [-c[0] for c in cands[:k]]


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8"])
def test_file_ids_reads_the_id_map_without_loading_and_refuses_other_bytes(tmp_path, factory):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    ids = rng.permutation(10_000)[:300].astype(np.int64)
    faiss_index.save_index(faiss_index.build_index(x, ids, factory, ngpu=0), tmp_path / "ix.faiss")
    assert file_ids(tmp_path / "ix.faiss").tolist() == ids.tolist()
    data = (tmp_path / "ix.faiss").read_bytes()
    (tmp_path / "cut.faiss").write_bytes(data[:-9])  # truncated: the length before the tail no longer matches
    (tmp_path / "junk.faiss").write_bytes(os.urandom(len(data)))
    assert file_ids(tmp_path / "cut.faiss") is None and file_ids(tmp_path / "junk.faiss") is None


def test_delta_limit_is_ten_percent_capped():
    assert delta_limit(2000) == 200 and delta_limit(1999) == 199 and delta_limit(0) == 0
    assert delta_limit(10 * DELTA_MAX_ROWS) == DELTA_MAX_ROWS == delta_limit(10**9)


# ---------------------------------------------------------------------------- an add
def test_an_add_writes_only_the_delta_and_search_equals_a_flat_index_built_from_scratch(tmp_path, monkeypatch):
    root, whole = tmp_path / "ix", tmp_path / "whole"
    write(root, sources(BASE), "Flat")
    main = root / "index.faiss"
    before = (main.read_bytes(), main.stat().st_mtime_ns)
    no_training(monkeypatch)
    write(root, sources(ADDED, seed0=100))
    monkeypatch.undo()
    assert (main.read_bytes(), main.stat().st_mtime_ns) == before  # index.faiss not rewritten
    assert held_ids(load_index(root / "index.delta.faiss")).tolist() == list(range(2000, 2150))
    m = IndexStore.open_for_read(root).manifest
    assert m.delta_size == (root / "index.delta.faiss").stat().st_size and m.faiss_size == len(before[0])
    assert_consistent(root)
    write(whole, sources(BASE) + sources(ADDED, seed0=100), "Flat")  # the same rows, one index.faiss
    assert not (whole / "index.delta.faiss").exists()
    a, b = Searcher(root, ngpu=0), Searcher(whole, ngpu=0)
    assert a.delta is not None and a.delta.ntotal == 150 and b.delta is None
    q = queries(root)
    for k in (1, 10, 200, 2150):  # ids and scores identical, to the last bit
        assert [hits_of(a, x[None], k) for x in q] == [hits_of(b, x[None], k) for x in q]
        assert hits_of(a, q, k) == hits_of(b, q, k)  # a batch too
    # filters behave the same for the delta's rows: best per video, an allow-list, one video
    allow = {("a0", int(f)) for f in range(0, 3000, 50)} | {("v1", 25)}
    for x in q[:4]:
        for kw in ({"per_video": True}, {"allow": allow}, {"allow": allow, "per_video": True}):
            assert [(h.id, h.score) for h in a.search_vector(x[None], 5, **kw)] == \
                   [(h.id, h.score) for h in b.search_vector(x[None], 5, **kw)]
    from mergeseek.retrieval.scope import search_in_video

    assert [(h.id, h.score) for h in search_in_video(a, q[0][None], "a1", 7)] == \
           [(h.id, h.score) for h in search_in_video(b, q[0][None], "a1", 7)]


@pytest.mark.parametrize("index_type", ["IVF16,Flat", "HNSW16"])
def test_approximate_main_index_plus_an_exact_delta(tmp_path, monkeypatch, index_type):
    """The delta's rows are found exactly: every answer is the exact merge of what index.faiss alone
    answers and a brute force over the delta's rows; each new row finds itself first."""
    write(tmp_path, sources(BASE), index_type)
    quantizer = quantizer_bytes(load_index(tmp_path / "index.faiss"))
    no_training(monkeypatch)
    write(tmp_path, sources(ADDED, seed0=100))
    monkeypatch.undo()
    assert_consistent(tmp_path)
    assert quantizer_bytes(load_index(tmp_path / "index.faiss")) == quantizer
    s = Searcher(tmp_path, ngpu=0, nprobe=4, ef_search=32)
    main = faiss_index.for_search(load_index(tmp_path / "index.faiss"), ngpu=0, nprobe=4, ef_search=32)
    ids, vecs = live(tmp_path)
    new = ids >= 2000
    q, k = queries(tmp_path, 16), 10
    ms, mi = main.search(q, k)
    exact = q @ vecs[new].T
    for row, hits in enumerate(s.search_vectors(q, k)):
        cands = sorted([(-float(v), int(i)) for v, i in zip(ms[row], mi[row]) if i >= 0]
                       + [(-float(v), int(i)) for v, i in zip(exact[row], ids[new])])[:k]
        assert [h.id for h in hits] == [c[1] for c in cands]
        np.testing.assert_allclose([h.score for h in hits], [-c[0] for c in cands], rtol=0, atol=1e-5)
    first = s.search_vectors(vecs[new][:40], 1)
    assert [h[0].id for h in first] == ids[new][:40].tolist()


# ---------------------------------------------------------------------------- kill -9 during an add
KILL = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_indexing_support import IDENTITY, synthetic_source
    import faiss
    import mergeseek.indexing.writer as writer
    from mergeseek.indexing.store import IndexStore
    point = {point!r}
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if point == "before_delta":  # committed; the FAISS step never starts
        writer._append = die
    elif point in ("mid_delta_save", "fold_mid_main_save"):
        # half of the new delta written under its temporary name; folding: the delta removed, index.faiss half written
        real = faiss.write_index
        def half(index, path):
            real(index, path)
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
            die()
        faiss.write_index = half
    elif point in ("after_delta_save", "fold_after_main_save"):
        # the new delta (folding: the new index.faiss) in place, the manifest that lists it not written
        real_wm = IndexStore.write_manifest
        def wm(self, *a, **k):
            if k.get("faiss_current"):
                die()
            return real_wm(self, *a, **k)
        IndexStore.write_manifest = wm
    w = writer.IndexWriter({root!r}, IDENTITY, ngpu=0)
    w.add(synthetic_source("late", {n}, seed=42))
    w.commit()
    w.finish()
""")


@pytest.mark.parametrize("point", ["before_delta", "mid_delta_save", "after_delta_save"])
def test_a_kill_during_an_add_loses_nothing_and_the_next_run_catches_up(tmp_path, monkeypatch, point):
    with_delta(tmp_path)
    main = (tmp_path / "index.faiss").read_bytes()
    run = subprocess.run([sys.executable, "-c", KILL.format(tests=str(ROOT / "tests"), point=point, root=str(tmp_path), n=40)],
                         capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == -9, run.stderr
    assert "/data/late.mp4" in IndexStore.open_for_read(tmp_path).manifest.sources  # committed before the kill
    ids, vecs = live(tmp_path)
    assert len(ids) == 2190
    # a reader meanwhile: every row is searched (the rows the saved files lack, exactly from the shards)
    s = Searcher(tmp_path, ngpu=0)
    assert s.index.ntotal + s.delta.ntotal == 2190
    late = ids >= 2150
    assert [h[0].id for h in s.search_vectors(vecs[late], 1)] == ids[late].tolist()
    no_training(monkeypatch)
    write(tmp_path, [])  # the next run: nothing new to encode; it completes the FAISS state
    assert (tmp_path / "index.faiss").read_bytes() == main
    assert held_ids(load_index(tmp_path / "index.delta.faiss")).tolist() == list(range(2000, 2190))
    assert_consistent(tmp_path)


@pytest.mark.parametrize("point", ["fold_mid_main_save", "fold_after_main_save"])
def test_a_kill_while_folding_loses_nothing_and_leaves_no_duplicate(tmp_path, monkeypatch, point):
    with_delta(tmp_path)  # 150 in the delta; 60 more pass the bound of 200: this add folds
    run = subprocess.run([sys.executable, "-c", KILL.format(tests=str(ROOT / "tests"), point=point, root=str(tmp_path), n=60)],
                         capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == -9, run.stderr
    ids, vecs = live(tmp_path)
    assert len(ids) == 2210
    s = Searcher(tmp_path, ngpu=0)
    assert s.index.ntotal + (s.delta.ntotal if s.delta is not None else 0) == 2210
    assert [h[0].id for h in s.search_vectors(vecs[-70:], 1)] == ids[-70:].tolist()
    no_training(monkeypatch)
    write(tmp_path, [])
    assert_consistent(tmp_path)
    assert load_index(tmp_path / "index.faiss").ntotal == 2210 and not (tmp_path / "index.delta.faiss").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_delta_is_rebuilt_from_the_shards_with_one_warning(tmp_path, caplog, damage):
    with_delta(tmp_path)
    delta = tmp_path / "index.delta.faiss"
    data = delta.read_bytes()
    delta.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(len(data)))
    ids, vecs = live(tmp_path)
    s = Searcher(tmp_path, ngpu=0)  # a reader: the delta's rows come from the shards
    assert [h[0].id for h in s.search_vectors(vecs[-20:], 1)] == ids[-20:].tolist()
    caplog.clear()
    main = (tmp_path / "index.faiss").read_bytes()
    with caplog.at_level(logging.INFO):
        write(tmp_path, [])
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "index.delta.faiss" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert "\n" not in warnings[0].getMessage()
    assert (tmp_path / "index.faiss").read_bytes() == main
    assert held_ids(load_index(delta)).tolist() == list(range(2000, 2150))
    assert_consistent(tmp_path)


# ---------------------------------------------------------------------------- the fold
def test_the_delta_is_folded_into_index_faiss_only_past_the_bound(tmp_path, monkeypatch):
    write(tmp_path, sources(BASE), "IVF16,Flat")
    quantizer = quantizer_bytes(load_index(tmp_path / "index.faiss"))
    main = (tmp_path / "index.faiss").read_bytes()
    no_training(monkeypatch)
    write(tmp_path, sources([("a0", 199)], seed0=100))
    write(tmp_path, sources([("a1", 1)], seed0=200))  # 200 = 10% of 2,000: still the delta
    assert (tmp_path / "index.faiss").read_bytes() == main and delta_state(tmp_path)[0].tolist() == list(range(2000, 2200))
    write(tmp_path, sources([("a2", 1)], seed0=300))  # 201: one more than the bound, folded (one rewrite)
    assert not (tmp_path / "index.delta.faiss").exists() and IndexStore.open_for_read(tmp_path).manifest.delta_size == -1
    index = load_index(tmp_path / "index.faiss")
    assert held_ids(index).tolist() == list(range(2201)) and quantizer_bytes(index) == quantizer  # not trained again
    assert_consistent(tmp_path)
    write(tmp_path, sources([("a3", 5)], seed0=400))  # the next add starts a new delta beside the bigger index
    assert delta_state(tmp_path)[0].tolist() == list(range(2201, 2206))


def test_auto_moving_to_another_type_still_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setattr(faiss_index, "choose_index_type", lambda n, dim, budget=None: "Flat" if n <= 2100 else "IVF8,Flat")
    write(tmp_path, sources(BASE), "auto")
    write(tmp_path, sources([("a0", 100)], seed0=100))  # 2,100: still Flat, into the delta
    assert (tmp_path / "index.delta.faiss").exists() and quantizer_bytes(load_index(tmp_path / "index.faiss")) == b""
    write(tmp_path, sources([("a1", 1)], seed0=200))  # 2,101: auto says IVF, so index.faiss is rebuilt
    assert not (tmp_path / "index.delta.faiss").exists()
    index = load_index(tmp_path / "index.faiss")
    assert quantizer_bytes(index) != b"" and index.ntotal == 2101
    assert_consistent(tmp_path)


def test_a_replaced_source_and_force_rebuild_and_drop_the_delta(tmp_path):
    with_delta(tmp_path)
    write(tmp_path, [synthetic_source("v1", 50, seed=77, fingerprint="f2")])  # v1 changed: its rows in index.faiss die
    assert not (tmp_path / "index.delta.faiss").exists() and load_index(tmp_path / "index.faiss").ntotal == 1800
    assert_consistent(tmp_path)
    write(tmp_path, sources([("a9", 20)], seed0=900))
    assert (tmp_path / "index.delta.faiss").exists()
    write(tmp_path, sources([("new", 30)], seed0=1000), identity=dict(IDENTITY, model="ViT-B-16"), force=True)
    assert not (tmp_path / "index.delta.faiss").exists()  # the old generation's delta: its ids mean other rows now
    assert held_ids(load_index(tmp_path / "index.faiss")).tolist() == list(range(30))
    assert_consistent(tmp_path)


# ---------------------------------------------------------------------------- repair, compact, merge, export, readers
def test_repair_folds_the_delta_without_training(tmp_path, monkeypatch):
    from mergeseek.indexing.repair import repair_index

    with_delta(tmp_path, "IVF16,Flat")
    quantizer = quantizer_bytes(load_index(tmp_path / "index.faiss"))
    q = queries(tmp_path)
    before = hits_of(Searcher(tmp_path, ngpu=0, nprobe=16), q, 10)  # nprobe = nlist: exact
    monkeypatch.setattr(faiss_index, "_train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    report = repair_index(tmp_path)
    assert report.faiss.startswith("folded (150 vector"), report.faiss
    assert not (tmp_path / "index.delta.faiss").exists()
    index = load_index(tmp_path / "index.faiss")
    assert index.ntotal == 2150 and quantizer_bytes(index) == quantizer
    assert_consistent(tmp_path)
    after = hits_of(Searcher(tmp_path, ngpu=0, nprobe=16), q, 10)
    assert [[h[0] for h in r] for r in after] == [[h[0] for h in r] for r in before]
    assert repair_index(tmp_path).faiss == "ok"


def test_compact_folds_the_delta_and_keeps_ids(tmp_path):
    from mergeseek.indexing.repair import compact_index

    with_delta(tmp_path)
    write(tmp_path, [synthetic_source("a1", 30, seed=101, fingerprint="f2")])  # a1 re-indexed: a1's old rows are dead
    write(tmp_path, sources([("a2", 10)], seed0=300))
    assert (tmp_path / "index.delta.faiss").exists()
    ids = live(tmp_path)[0]
    r = compact_index(tmp_path)
    assert "folded" in r["faiss"] and r["after"]["dead_rows"] == 0
    assert not (tmp_path / "index.delta.faiss").exists() and sorted(held_ids(load_index(tmp_path / "index.faiss"))) == sorted(ids)
    assert_consistent(tmp_path)


def test_merge_index_and_export_carry_the_delta_rows(tmp_path):
    from mergeseek.indexing.export import export_index
    from mergeseek.indexing.merge import merge_indexes

    a, b = tmp_path / "a", tmp_path / "b"
    with_delta(a)
    merged = tmp_path / "merged"
    merge_indexes([a], merged, ngpu=0)  # a new target: one index.faiss over every live row of a (delta included)
    assert_consistent(merged)
    assert held_ids(load_index(merged / "index.faiss")).tolist() == list(range(2150)) and not (merged / "index.delta.faiss").exists()
    write(b, sources([("b0", 60)], seed0=500))
    merge_indexes([b], merged, ngpu=0)  # into an existing target: appended to its delta
    assert held_ids(load_index(merged / "index.delta.faiss")).tolist() == list(range(2150, 2210))
    assert_consistent(merged)
    ids, vecs = live(merged)
    s = Searcher(merged, ngpu=0)
    assert [h[0].id for h in s.search_vectors(vecs[-60:], 1)] == ids[-60:].tolist()
    out = export_index(merged, tmp_path / "export")
    exported = np.load(tmp_path / "export" / "img_emb" / "img_emb_0.npy")
    assert out.rows == 2210 and np.array_equal(exported, vecs)


def test_sharded_search_and_the_web_engine_see_the_delta(tmp_path):
    from mergeseek.retrieval.sharded import ShardedSearcher
    from mergeseek.serve.engine import CachedSearcher, Engine

    a, b, whole = tmp_path / "a", tmp_path / "b", tmp_path / "whole"
    with_delta(a)
    write(b, sources([("b0", 300)], seed0=500))
    write(b, sources([("b1", 20)], seed0=600))
    write(whole, sources(BASE) + sources(ADDED, seed0=100), "Flat")
    q = queries(a)
    one = ShardedSearcher([a], ngpu=0)
    assert len(one.parts) == 2  # index.faiss and the delta
    assert [[(h.id, h.score) for h in r] for r in one.search_vectors(q, 10)] == \
           [[(h.id, h.score) for h in r] for r in Searcher(whole, ngpu=0).search_vectors(q, 10)]
    two = ShardedSearcher([a, b], ngpu=0)
    ids_b, vecs_b = live(b)
    found = [h[0] for h in two.search_vectors(vecs_b[-20:], 1)]
    assert [two.locate(h.id) for h in found] == [(b, int(i)) for i in ids_b[-20:]]
    engine = Engine(CachedSearcher(a, ngpu=0))
    for i in (5, 2001, 2149):  # "more like this" on old and new rows: the nearest other frame, exactly
        ids, vecs = live(a)
        scores = vecs @ vecs[ids == i][0]
        scores[ids == i] = -np.inf
        assert engine.similar(i, k=1)[0].id == int(ids[np.argmax(scores)])


def test_a_missing_delta_file_is_searched_from_the_shards_and_made_again(tmp_path, caplog):
    with_delta(tmp_path)
    (tmp_path / "index.delta.faiss").unlink()
    assert not IndexStore.open_for_read(tmp_path).faiss_is_current()
    ids, vecs = live(tmp_path)
    with caplog.at_level(logging.WARNING):
        s = Searcher(tmp_path, ngpu=0)
    assert "lacks 150 of the 2150 rows" in caplog.text and s.index.ntotal == 2000
    assert [h[0].id for h in s.search_vectors(vecs[-5:], 1)] == ids[-5:].tolist()
    write(tmp_path, [])
    assert_consistent(tmp_path)


def test_a_copied_folder_keeps_its_delta(tmp_path):
    with_delta(tmp_path / "ix")
    shutil.copytree(tmp_path / "ix", tmp_path / "copy")
    assert IndexStore.open_for_read(tmp_path / "copy").faiss_is_current()
    assert Searcher(tmp_path / "copy", ngpu=0).delta.ntotal == 150


def test_the_gpu_path_clones_the_main_index_and_the_delta(tmp_path, monkeypatch):
    """With a GPU FAISS build, search moves both files' indexes to the GPU (``for_search``); here the
    clone is a CPU copy standing in for it, so the answers must not change."""
    import faiss

    with_delta(tmp_path)
    q = queries(tmp_path)
    want = hits_of(Searcher(tmp_path, ngpu=0), q, 10)
    cloned = []

    def to_gpu(index, ngpu):
        cloned.append((int(index.ntotal), ngpu))
        return faiss.clone_index(index) if ngpu else None

    monkeypatch.setattr(faiss_index, "_to_gpu", to_gpu)
    s = Searcher(tmp_path, ngpu=-1)
    assert sorted(cloned) == [(150, -1), (2000, -1)]
    assert hits_of(s, q, 10) == want
