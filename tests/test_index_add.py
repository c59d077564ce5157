"""Adding to an index (issue #29): a new source goes into a new shard and its vectors into the
delta beside the saved FAISS index (``index.delta.faiss``, exact): the existing shard files and
index.faiss keep their bytes and modification times, nothing is trained again, and search finds old
and new rows. A run killed after its commit and before the FAISS step loses nothing: the next run
appends what the saved files lack (read from the ids they hold). tests/test_faiss_delta.py has the
rest of the delta's life (search equality, kills, folding, repair/compact/merge/export)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_indexing_support import IDENTITY, synthetic_source

from mergeseek.indexing import faiss_index
from mergeseek.indexing.faiss_index import held_ids, load_index, quantizer_bytes
from mergeseek.indexing.store import IndexStore
from mergeseek.indexing.writer import IndexWriter

ROOT = Path(__file__).resolve().parents[1]


def write(root: Path, sources, index_type=None):
    with IndexWriter(root, IDENTITY, index_type=index_type, ngpu=0) as w:
        for s in sources:
            w.add(s)
            w.commit()
        w.finish()


def shard_state(root: Path) -> dict:
    """name -> (bytes, mtime_ns) of every shard file."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for sub in ("emb", "meta") for p in sorted((root / sub).iterdir())}


def finds_itself(root: Path, vectors: np.ndarray, ids: np.ndarray) -> bool:
    from mergeseek.retrieval.search import Searcher

    s = Searcher(root, ngpu=0, nprobe=64, ef_search=128)
    return all(s.search_vector(v[None], k=1)[0].id == i for v, i in zip(vectors, ids))


@pytest.mark.parametrize("index_type", ["IVF16,Flat", "HNSW16", "Flat"])
def test_adding_a_source_appends_without_training_or_touching_the_shards(tmp_path, index_type, monkeypatch):
    base = [synthetic_source(f"v{i}", 200, seed=i) for i in range(5)]
    write(tmp_path, base, index_type)
    before = shard_state(tmp_path)
    old = load_index(tmp_path / "index.faiss")
    old_quantizer = quantizer_bytes(old)
    assert (old_quantizer != b"") == index_type.startswith("IVF")
    main_bytes, main_mtime = (tmp_path / "index.faiss").read_bytes(), (tmp_path / "index.faiss").stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("an add must not train or rebuild the index")

    monkeypatch.setattr(faiss_index, "_train", no_training)
    monkeypatch.setattr("mergeseek.indexing.writer.build_index", no_training)
    new = synthetic_source("added", 100, seed=99)
    write(tmp_path, [new])  # the next `cli.py index` run with one more video

    after = shard_state(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # same bytes, same mtimes
    assert len(after) == len(before) + 2  # one new shard pair
    assert (tmp_path / "index.faiss").read_bytes() == main_bytes  # the main index is not rewritten
    assert (tmp_path / "index.faiss").stat().st_mtime_ns == main_mtime
    index = load_index(tmp_path / "index.faiss")
    assert quantizer_bytes(index) == old_quantizer and held_ids(index).tolist() == held_ids(old).tolist()
    assert held_ids(load_index(tmp_path / "index.delta.faiss")).tolist() == list(range(1000, 1100))
    store = IndexStore.open_for_read(tmp_path)
    assert store.faiss_is_current()
    assert finds_itself(tmp_path, np.concatenate([base[0].vectors[:5], new.vectors[:5]]),
                        np.r_[np.arange(5), np.arange(1000, 1005)])


def test_a_replaced_source_rebuilds_rather_than_keeping_dead_rows(tmp_path):
    write(tmp_path, [synthetic_source(f"v{i}", 50, seed=i) for i in range(3)], "Flat")
    write(tmp_path, [synthetic_source("v1", 40, seed=7, fingerprint="f2")])  # v1 changed: its old rows are dead
    index = load_index(tmp_path / "index.faiss")
    live = IndexStore.open_for_read(tmp_path).read_vectors()[0]
    assert sorted(held_ids(index).tolist()) == sorted(live.tolist()) and index.ntotal == 140


def test_a_run_killed_before_the_faiss_step_is_appended_by_the_next_run(tmp_path, monkeypatch):
    write(tmp_path, [synthetic_source(f"v{i}", 100, seed=i) for i in range(3)], "IVF8,Flat")
    quantizer = quantizer_bytes(load_index(tmp_path / "index.faiss"))
    before = shard_state(tmp_path)
    main_bytes = (tmp_path / "index.faiss").read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_indexing_support import IDENTITY, synthetic_source
        import mergeseek.indexing.writer as writer
        writer.refresh_faiss = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        w = writer.IndexWriter({str(tmp_path)!r}, IDENTITY, ngpu=0)
        w.add(synthetic_source("late", 30, seed=42))
        w.commit()
        w.finish()
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == -9, run.stderr
    store = IndexStore.open_for_read(tmp_path)
    assert "/data/late.mp4" in store.manifest.sources and not store.faiss_is_current()  # committed, nothing lost

    monkeypatch.setattr(faiss_index, "_train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    write(tmp_path, [])  # the next run: nothing new to index, the delta gets the killed run's shard
    assert (tmp_path / "index.faiss").read_bytes() == main_bytes and quantizer_bytes(load_index(tmp_path / "index.faiss")) == quantizer
    assert held_ids(load_index(tmp_path / "index.delta.faiss")).tolist() == list(range(300, 330))
    assert {k: v for k, v in shard_state(tmp_path).items() if k in before} == before
    assert IndexStore.open_for_read(tmp_path).faiss_is_current()
    late = synthetic_source("late", 30, seed=42)
    assert finds_itself(tmp_path, late.vectors[:3], np.arange(300, 303))


def test_a_new_index_type_still_rebuilds(tmp_path):
    write(tmp_path, [synthetic_source(f"v{i}", 100, seed=i) for i in range(3)], "Flat")
    write(tmp_path, [synthetic_source("more", 20, seed=5)], "IVF4,Flat")
    index = load_index(tmp_path / "index.faiss")
    assert quantizer_bytes(index) != b"" and index.ntotal == 320
