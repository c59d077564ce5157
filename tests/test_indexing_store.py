"""The on-disk index without a model: commits, replaced sources, crash recovery, identity checks, FAISS types."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mergeseek.errors import ConfigError, IndexMismatchError, InputError
from mergeseek.indexing.faiss_index import build_index, for_search, make_index
from mergeseek.indexing.store import IndexStore
from test_indexing_support import DIM, IDENTITY, synthetic_source

ROOT = Path(__file__).resolve().parents[1]


def _enc(key: str, n: int, seed: int, fingerprint: str = "f1"):
    return synthetic_source(key, n, seed, fingerprint)


def test_commits_are_read_back_with_explicit_ids(tmp_path):
    with IndexStore.open_for_write(tmp_path, IDENTITY) as store:
        a, b, c = _enc("a", 3, 0), _enc("b", 2, 1), _enc("c", 4, 2)
        assert store.commit([a, b]).tolist() == [0, 1, 2, 3, 4]
        assert store.commit([c]).tolist() == [5, 6, 7, 8]
    store = IndexStore.open_for_read(tmp_path)
    meta = store.read_meta()
    assert meta.column("id").to_pylist() == list(range(9))
    assert meta.column("video_id").to_pylist() == ["a"] * 3 + ["b"] * 2 + ["c"] * 4
    assert meta.column("frame_idx").to_pylist()[:3] == [0, 25, 50]
    ids, vecs = store.read_vectors()
    np.testing.assert_array_equal(vecs, np.concatenate([a.vectors, b.vectors, c.vectors]))
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["vectors"] == 9 and manifest["dim"] == DIM and manifest["metric"] == "inner_product"


def test_a_changed_source_replaces_its_rows(tmp_path):
    with IndexStore.open_for_write(tmp_path, IDENTITY) as store:
        store.commit([_enc("a", 3, 0), _enc("b", 2, 1)])
        store.commit([_enc("c", 1, 2)])
        assert store.is_current("/data/a.mp4", "f1", "fps=1")
        assert not store.is_current("/data/a.mp4", "f2", "fps=1")
        assert not store.is_current("/data/a.mp4", "f1", "fps=2")
        store.commit([_enc("a", 5, 9, fingerprint="f2")])
        store.commit([_enc("b", 1, 8, fingerprint="f2")])  # part-00000 now holds no live row
    store = IndexStore.open_for_read(tmp_path)
    meta = store.read_meta()
    assert sorted(meta.column("video_id").to_pylist()) == ["a"] * 5 + ["b"] + ["c"]
    some = store.read_meta(columns=["id", "video_id"])  # the same live rows, only the columns asked (+ source)
    assert set(some.column_names) == {"id", "video_id", "source"}
    for col in some.column_names:
        assert some.column(col).to_pylist() == meta.column(col).to_pylist()
    assert store.read_vectors()[1].shape == (7, DIM)
    assert not (tmp_path / "emb" / "part-00000.npy").exists()  # fully dead shard deleted
    assert store.manifest.counts()["vectors"] == 7


KILL_AFTER_SHARD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_indexing_store import IDENTITY, _enc
    from mergeseek.indexing.store import IndexStore

    store = IndexStore.open_for_write({out!r}, IDENTITY)
    store.commit([_enc("a", 3, 0)])
    # die right after the second shard pair is renamed into place, before manifest.json names it
    store.write_manifest = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    store.commit([_enc("b", 2, 1)])
    """
)


def test_crash_between_shard_and_manifest_leaves_the_last_commit(tmp_path):
    out = tmp_path / "index"
    script = KILL_AFTER_SHARD.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "emb" / "part-00001.npy").exists() and (out / ".journal").exists()  # the orphan is on disk...
    (out / "meta" / "part-00009.parquet.tmp").write_bytes(b"a user's file that only looks like ours")
    with IndexStore.open_for_write(out, IDENTITY) as store:  # ...and gone on the next open
        assert sorted(p.name for p in (out / "emb").iterdir()) == ["part-00000.npy"]
        assert sorted(p.name for p in (out / "meta").iterdir()) == ["part-00000.parquet", "part-00009.parquet.tmp"]
        assert store.commit([_enc("b", 2, 1)]).tolist() == [3, 4]  # ids continue, none duplicated
    assert IndexStore.open_for_read(out).read_meta().column("id").to_pylist() == [0, 1, 2, 3, 4]
    assert (out / "meta" / "part-00009.parquet.tmp").read_bytes().startswith(b"a user's file")  # never ours to delete
    assert not (out / ".journal").exists()  # a clean close leaves no journal


def test_another_model_is_refused_unless_forced(tmp_path):
    with IndexStore.open_for_write(tmp_path, IDENTITY) as store:
        store.commit([_enc("a", 3, 0)])
    other = dict(IDENTITY, model="ViT-L-14", dim=768)
    with pytest.raises(IndexMismatchError, match="ViT-L-14") as info:
        IndexStore.open_for_write(tmp_path, other)
    assert "--model ViT-B-32" in str(info.value) and "--force" in str(info.value)
    with pytest.raises(IndexMismatchError, match="merge"):
        IndexStore.open_for_write(tmp_path, dict(IDENTITY, merge="method=bipartite,r=8"))
    assert IndexStore.open_for_read(tmp_path).manifest.counts()["vectors"] == 3  # nothing lost
    with IndexStore.open_for_write(tmp_path, other, force=True) as store:
        assert store.manifest.counts()["vectors"] == 0 and store.manifest.dim == 768


def test_one_writer_at_a_time(tmp_path):
    with IndexStore.open_for_write(tmp_path, IDENTITY):
        with pytest.raises(InputError, match="another process"):
            IndexStore.open_for_write(tmp_path, IDENTITY)


def test_reading_a_folder_that_is_not_an_index(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        IndexStore.open_for_read(tmp_path / "nope")
    with pytest.raises(InputError, match="not a mergeseek index"):
        IndexStore.open_for_read(tmp_path)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16", "IVF8,SQ8"])
def test_faiss_types_find_a_stored_vector_by_its_id(factory):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((2000, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.arange(2000, dtype=np.int64) * 7 + 100  # ids are not row positions
    index = for_search(build_index(v, ids, factory), nprobe=16, ef_search=64)
    _, found = index.search(v[[5, 1234]], 3)
    assert found[:, 0].tolist() == [ids[5], ids[1234]]


def test_bad_faiss_types_are_config_errors():
    with pytest.raises(ConfigError, match="factory string"):
        make_index(16, "NotAnIndex42")
    v = np.eye(16, dtype=np.float32)
    with pytest.raises(ConfigError, match="at least 64 vectors"):
        build_index(v, np.arange(16), "IVF64,Flat")
