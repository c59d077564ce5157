"""`cli.py export --format clip-retrieval`: live rows only, read back by a plain numpy + pyarrow reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mergeseek.cli import app
from mergeseek.indexing.store import IndexStore
from test_indexing_support import DIM, IDENTITY, synthetic_source


def _source(key: str, n: int, seed: int, fingerprint: str = "f1"):
    return synthetic_source(key, n, seed, fingerprint, frame_offset=seed, time_offset=0.5)


@pytest.fixture
def reindexed(tmp_path):
    """An index where source a was re-indexed once: its first 3 rows are dead in part-00000 (beside b's live rows)."""
    a_old, b, c, a_new = _source("a", 3, 0), _source("b", 2, 1), _source("c", 1, 2), _source("a", 4, 3, "f2")
    with IndexStore.open_for_write(tmp_path / "ix", IDENTITY) as store:
        store.commit([a_old, b])
        store.commit([c])
        store.commit([a_new])
    return tmp_path / "ix", {"a_old": a_old, "b": b, "c": c, "a_new": a_new}


def read_clip_retrieval(folder: Path):
    """An independent reader of the clip-retrieval layout: nothing but numpy and pyarrow."""
    emb = np.load(folder / "img_emb" / "img_emb_0.npy")
    meta = pq.read_table(folder / "metadata" / "metadata_0.parquet")
    return emb, meta


def run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def test_export_writes_live_rows_only_in_the_store_order(reindexed, tmp_path):
    ix, src = reindexed
    # The problem being solved: the shards themselves still hold the dead rows.
    raw = np.concatenate([np.load(p) for p in sorted((ix / "emb").glob("*.npy"))])
    assert len(raw) == 3 + 2 + 1 + 4

    code, out, err = run("export", "--index", ix, "--format", "clip-retrieval", "--out", tmp_path / "out", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["rows"] == 7 and report["dim"] == DIM and report["dead_rows_skipped"] == 3

    emb, meta = read_clip_retrieval(tmp_path / "out")
    assert emb.dtype == np.float32 and emb.shape == (7, DIM)
    assert meta.num_rows == 7
    assert {"video_id", "frame_idx", "pts_time", "path"} <= set(meta.column_names)
    # Same order as the store's own read: shard by shard, rows in commit order.
    assert meta.column("video_id").to_pylist() == ["b", "b", "c", "a", "a", "a", "a"]
    expected = np.concatenate([src["b"].vectors, src["c"].vectors, src["a_new"].vectors])
    np.testing.assert_array_equal(emb, expected)
    want_frames = np.concatenate([src[k].frame_idx for k in ("b", "c", "a_new")])
    assert meta.column("frame_idx").to_pylist() == want_frames.tolist()
    assert meta.column("pts_time").to_pylist() == np.concatenate([src[k].pts_time for k in ("b", "c", "a_new")]).tolist()
    assert meta.column("path").to_pylist() == ["/data/b.mp4"] * 2 + ["/data/c.mp4"] + ["/data/a.mp4"] * 4
    # None of the dead vectors survives, and each row's vector is the one committed for that frame.
    assert not any(np.any(np.all(emb == v, axis=1)) for v in src["a_old"].vectors)
    store = IndexStore.open_for_read(ix)
    ids, vecs = store.read_vectors()
    assert meta.column("id").to_pylist() == ids.tolist()
    np.testing.assert_array_equal(emb, vecs)


def test_an_existing_export_needs_overwrite_and_is_replaced_whole(reindexed, tmp_path):
    ix, _ = reindexed
    out = tmp_path / "out"
    assert run("export", "--index", ix, "--out", out)[0] == 0
    (out / "img_emb" / "stale.npy").write_bytes(b"old")
    code, _, err = run("export", "--index", ix, "--out", out)
    assert code == 3 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, out_text, err = run("export", "--index", ix, "--out", out, "--overwrite")
    assert code == 0, err
    assert "exported 7 vectors" in out_text
    assert not (out / "img_emb" / "stale.npy").exists()  # a new folder, not files written into the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "out"]  # no temporary folders left behind
    assert read_clip_retrieval(out)[0].shape == (7, DIM)


def test_a_folder_that_is_not_an_export_is_left_alone(reindexed, tmp_path):
    ix, _ = reindexed
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = run("export", "--index", ix, "--out", tmp_path / "mine", "--overwrite")
    assert code == 3 and "not an export folder" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_bad_format_and_missing_index(reindexed, tmp_path):
    ix, _ = reindexed
    code, _, err = run("export", "--index", ix, "--format", "webdataset", "--out", tmp_path / "o")
    assert code == 2 and "clip-retrieval" in err
    code, _, err = run("export", "--index", tmp_path / "nope", "--out", tmp_path / "o")
    assert code != 0 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
