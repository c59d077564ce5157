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
    code, _, err = run("export", "--index", ix, "--out", out)
    assert code == 3 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    before = (out / "img_emb" / "img_emb_0.npy").stat().st_ino
    code, out_text, err = run("export", "--index", ix, "--out", out, "--overwrite")
    assert code == 0, err
    assert "exported 7 vectors" in out_text
    assert (out / "img_emb" / "img_emb_0.npy").stat().st_ino != before  # a new folder, not files written into the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "out"]  # no temporary folders left behind
    assert read_clip_retrieval(out)[0].shape == (7, DIM)


def test_overwrite_never_deletes_what_the_user_put_in_the_export_folder(reindexed, tmp_path):
    ix, _ = reindexed
    out = tmp_path / "out"
    assert run("export", "--index", ix, "--out", out)[0] == 0
    emb_before = read_clip_retrieval(out)[0]
    for extra in (out / "notes.txt", out / "img_emb" / "stale.npy", out / "plots" / "recall.png"):
        extra.parent.mkdir(exist_ok=True)
        extra.write_text("mine")
        code, _, err = run("export", "--index", ix, "--out", out, "--overwrite")
        assert code == 3 and len(err.strip().splitlines()) == 1 and str(extra.relative_to(out)) in err
        assert extra.read_text() == "mine" and np.array_equal(read_clip_retrieval(out)[0], emb_before)
        extra.unlink()
    (out / "plots").rmdir()
    assert run("export", "--index", ix, "--out", out, "--overwrite")[0] == 0


def test_a_run_killed_between_the_two_renames_is_repaired_by_the_next(reindexed, tmp_path, monkeypatch):
    """Without the one-step exchange, a kill after moving the old export aside left no export: the
    next run puts it back (then replaces it), and removes temporary folders of killed runs."""
    import os

    import mergeseek.indexing.export as export

    ix, _ = reindexed
    out = tmp_path / "out"
    assert run("export", "--index", ix, "--out", out)[0] == 0
    emb = read_clip_retrieval(out)[0]
    os.replace(out, tmp_path / ".out.old-4242")  # the state a kill between the renames leaves
    (tmp_path / ".out.tmp-4243" / "img_emb").mkdir(parents=True)
    code, _, err = run("export", "--index", ix, "--out", out)  # no --overwrite: the restored export stops it
    assert code == 3 and "--overwrite" in err
    assert np.array_equal(read_clip_retrieval(out)[0], emb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "out"]
    monkeypatch.setattr(export, "_exchange", lambda a, b: False)  # the two-rename path works too
    assert run("export", "--index", ix, "--out", out, "--overwrite")[0] == 0
    assert np.array_equal(read_clip_retrieval(out)[0], emb) and sorted(p.name for p in tmp_path.iterdir()) == ["ix", "out"]


def test_the_switch_is_one_atomic_exchange(reindexed, tmp_path, monkeypatch):
    import os

    import mergeseek.indexing.export as export

    ix, _ = reindexed
    out = tmp_path / "out"
    assert run("export", "--index", ix, "--out", out)[0] == 0
    calls = []
    real_exchange = export._exchange
    monkeypatch.setattr(export, "_exchange", lambda a, b: calls.append((a, b)) or real_exchange(a, b))
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(AssertionError("a rename while an export exists")))
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("the one-step exchange is Linux's renameat2")
    code, _, err = run("export", "--index", ix, "--out", out, "--overwrite")
    assert code == 0, err
    assert len(calls) == 1 and calls[0][1] == out


def test_clip_retrieval_back_end_columns_are_there(reindexed, tmp_path):
    ix, _ = reindexed
    assert run("export", "--index", ix, "--out", tmp_path / "out")[0] == 0
    _, meta = read_clip_retrieval(tmp_path / "out")
    assert meta.column("image_path").to_pylist() == meta.column("path").to_pylist()
    assert all(c == "" for c in meta.column("url").to_pylist())
    caps = meta.column("caption").to_pylist()
    assert caps[0].startswith(f"{meta.column('video_id')[0]} frame {meta.column('frame_idx')[0]}")
    assert json.loads((tmp_path / "out" / ".mergeseek-export").read_text())["format"] == "clip-retrieval"


def test_a_full_disk_is_exit_code_8_in_one_line_and_the_old_export_stays(reindexed, tmp_path, monkeypatch):
    import errno

    ix, _ = reindexed
    out = tmp_path / "out"
    assert run("export", "--index", ix, "--out", out)[0] == 0
    emb = read_clip_retrieval(out)[0]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    code, _, err = run("export", "--index", ix, "--out", out, "--overwrite")
    assert code == 8 and len(err.strip().splitlines()) == 1 and "No space left" in err
    monkeypatch.undo()
    assert np.array_equal(read_clip_retrieval(out)[0], emb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "out"]
    (tmp_path / "exists.txt").write_text("a file")
    code, _, err = run("export", "--index", ix, "--out", tmp_path / "exists.txt" / "sub")
    assert code == 8 and len(err.strip().splitlines()) == 1


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
