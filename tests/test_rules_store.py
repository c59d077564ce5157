"""The index store's recovery and identity rules (docs/INDEXING.md), each pinned at its boundary.

Issue #23: which journaled names recovery may delete (never one leaving the folder), which shards a
rebuilt manifest keeps, when a folder counts as new, and which thumbnail packs a run may delete
(a --force run keeps the packs of the index readers still use). No model: seeded vectors only.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from mergeseek.errors import InputError
from mergeseek.indexing.journal import Journal
from mergeseek.indexing.layout import check_index_folder, rebuild_manifest
from mergeseek.indexing.store import IndexStore
from mergeseek.indexing.thumbs import ensure_thumbs, make_jpeg, pack_path, write_pack
from test_indexing_support import IDENTITY, synthetic_source

JPEG = make_jpeg(np.zeros((8, 8, 3), np.uint8))


def _index(root, *sizes, identity=IDENTITY):
    """An index with one commit (one shard) per size; returns the ids of each commit."""
    ids = []
    with IndexStore.open_for_write(root, identity) as store:
        for i, n in enumerate(sizes):
            ids.append(store.commit([synthetic_source(f"v{i}", n, i)]).tolist())
    return ids


# ---------------------------------------------------------------------------- the journal
def test_recovery_removes_journaled_leftovers_only_inside_the_folder(tmp_path):
    root = tmp_path / "ix"
    _index(root, 3)
    outside = tmp_path / "outside.tmp"
    absolute = tmp_path / "elsewhere" / "abs.tmp"
    absolute.parent.mkdir()
    for p in (outside, absolute, root / "emb" / "part-00009.npy.tmp", root / "index.faiss"):
        p.write_bytes(b"x")
    (root / ".journal").write_text("\n".join(["../outside.tmp", str(absolute), "emb/../../outside.tmp",
                                              "emb/part-00009.npy.tmp", "index.faiss", "manifest.json",
                                              "emb/part-00000.npy", "meta/part-00000.parquet"]) + "\n")
    Journal(root).recover()
    assert outside.exists() and absolute.exists()  # a journal line never reaches out of the folder
    assert not (root / "emb" / "part-00009.npy.tmp").exists()  # a leftover the manifest does not list
    assert all((root / n).exists() for n in ("index.faiss", "manifest.json", "emb/part-00000.npy", "meta/part-00000.parquet"))
    assert not (root / ".journal").exists()  # done: the journal goes


def test_without_a_manifest_recovery_removes_temp_files_and_keeps_shards_for_repair(tmp_path):
    root = tmp_path / "ix"
    _index(root, 3)
    (root / "manifest.json").unlink()
    (root / "emb" / "part-00001.npy.tmp").write_bytes(b"x")
    (root / ".journal").write_text("emb/part-00000.npy\nmeta/part-00000.parquet\nemb/part-00001.npy.tmp\n")
    Journal(root).recover()
    assert (root / "emb" / "part-00000.npy").exists() and (root / "meta" / "part-00000.parquet").exists()
    assert not (root / "emb" / "part-00001.npy.tmp").exists()
    assert (root / ".journal").exists()  # the shards it names are still to be judged by repair


def test_without_a_manifest_the_journal_goes_once_nothing_it_names_is_left(tmp_path):
    root = tmp_path / "ix"
    (root / "emb").mkdir(parents=True)
    (root / "emb" / "part-00000.npy.tmp").write_bytes(b"x")
    (root / ".journal").write_text("emb/part-00000.npy.tmp\nemb/part-00001.npy\n")  # the second was never made
    Journal(root).recover()
    assert not (root / "emb" / "part-00000.npy.tmp").exists() and not (root / ".journal").exists()


def test_recovery_deletes_files_never_folders(tmp_path):
    root = tmp_path / "ix"
    _index(root, 3)
    (root / "thumbs").mkdir()
    (root / ".journal").write_text("thumbs\nemb\n")
    Journal(root).recover()
    assert (root / "thumbs").is_dir() and (root / "emb" / "part-00000.npy").exists()


# ---------------------------------------------------------------------------- folders
def test_a_folder_holding_only_the_lock_and_journaled_leftovers_is_new(tmp_path):
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "part-00000.npy.tmp").write_bytes(b"x")
    (tmp_path / ".lock").write_text("")
    (tmp_path / ".journal").write_text("emb/part-00000.npy.tmp\n")
    assert check_index_folder(tmp_path) == "new"
    (tmp_path / "emb" / "notes.txt").write_text("mine")  # not journaled: the folder is someone's
    with pytest.raises(InputError, match="not empty"):
        check_index_folder(tmp_path)


def test_a_journaled_name_counts_only_at_its_own_path(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "part-00000.npy.tmp").write_bytes(b"x")  # journaled under emb/, found under meta/
    (tmp_path / ".journal").write_text("emb/part-00000.npy.tmp\n")
    with pytest.raises(InputError, match="not empty"):
        check_index_folder(tmp_path)


# ---------------------------------------------------------------------------- a rebuilt manifest
def test_a_rebuilt_manifest_keeps_every_shard_and_continues_ids_and_names(tmp_path):
    root = tmp_path / "ix"
    ids = _index(root, 3, 4)
    (root / "manifest.json").unlink()
    m = rebuild_manifest(root)
    assert sorted(m.shards) == ["part-00000", "part-00001"]
    assert (m.next_id, m.next_shard) == (max(ids[-1]) + 1, 2)


def test_copies_a_user_made_of_shards_are_not_shards(tmp_path):
    root = tmp_path / "ix"
    _index(root, 3)
    for sub, ext in (("emb", ".npy"), ("meta", ".parquet")):
        shutil.copy(root / sub / f"part-00000{ext}", root / sub / f"part-00000.bak{ext}")
        shutil.copy(root / sub / f"part-00000{ext}", root / sub / f"part-00000 (copy){ext}")
    (root / "manifest.json").unlink()
    assert sorted(rebuild_manifest(root).shards) == ["part-00000"]


@pytest.mark.parametrize("key,value", [("merge", "r=8"), ("model", "ViT-L-14"), ("precision", "fp16")])
def test_the_newest_shards_identity_wins_and_shards_differing_in_one_key_are_left_out(tmp_path, key, value):
    root, other = tmp_path / "ix", tmp_path / "other"
    _index(root, 3, 2)
    _index(other, 5, identity={**IDENTITY, key: value})
    for sub, ext in (("emb", ".npy"), ("meta", ".parquet")):  # the newest shard, made by another identity
        shutil.copy(other / sub / f"part-00000{ext}", root / sub / f"part-00002{ext}")
    (root / "manifest.json").unlink()
    m = rebuild_manifest(root)
    assert (getattr(m, key), sorted(m.shards)) == (value, ["part-00002"])
    assert (root / "emb" / "part-00000.npy").exists()  # left out, left in place


# ---------------------------------------------------------------------------- thumbnail packs
def _known(store):
    counts = {k: e.count for k, e in store.manifest.sources.items()}
    return lambda key: [JPEG] * counts[key]


def test_a_force_run_keeps_the_packs_readers_use_and_removes_only_its_own_leftovers(tmp_path):
    root = tmp_path / "ix"
    with IndexStore.open_for_write(root, IDENTITY) as store:
        store.commit([synthetic_source("a", 3, 0)])
        ensure_thumbs(store, known=_known(store))
    assert pack_path(root, "part-00000").exists()
    tdir = root / "thumbs"
    theirs = [tdir / n for n in ("notes.txt", "part-00042.thumbs.bak", "part-00042.pack", "x.thumbs")]
    for p in theirs:
        p.write_bytes(b"someone else's")
    write_pack(root, "part-00042", np.zeros(1, np.int64), np.zeros(1, np.int64), [JPEG])  # a shard neither lists
    (tdir / "part-00000.thumbs.tmp").write_bytes(b"a killed run's")  # temp file of a listed shard
    with IndexStore.open_for_write(root, IDENTITY, force=True) as store:
        store.commit([synthetic_source("b", 2, 1)])
        assert store.staged and sorted(store.manifest.shards) == ["part-00001"]
        report = ensure_thumbs(store, known=_known(store))
        assert pack_path(root, "part-00000").exists()  # manifest.json still lists it: readers use it
        assert report.made == ["part-00001"] and report.removed == 2
        assert not pack_path(root, "part-00042").exists() and not (tdir / "part-00000.thumbs.tmp").exists()
        assert all(p.read_bytes() == b"someone else's" for p in theirs)


def test_force_makes_current_packs_again_and_without_it_they_are_kept(tmp_path):
    root = tmp_path / "ix"
    with IndexStore.open_for_write(root, IDENTITY) as store:
        store.commit([synthetic_source("a", 3, 0)])
        assert ensure_thumbs(store, known=_known(store)).made == ["part-00000"]
        assert ensure_thumbs(store, known=_known(store)).made == []
        assert ensure_thumbs(store, force=True, known=_known(store)).made == ["part-00000"]


def test_a_pack_of_another_build_of_the_same_shard_is_made_again(tmp_path):
    root = tmp_path / "ix"
    with IndexStore.open_for_write(root, IDENTITY) as store:
        ids = store.commit([synthetic_source("a", 3, 0)])
        write_pack(root, "part-00000", ids, np.full(3, 7, np.int64), [JPEG] * 3)  # same ids, other frames' hashes
        assert ensure_thumbs(store, known=_known(store)).made == ["part-00000"]

