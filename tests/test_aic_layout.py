"""The AI Challenge release layout: discovery, real frame numbers from the maps, metadata, import-features."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_aic_support import FRAMES, MEDIA, UNMAPPED, make_release, pts
from test_indexing_support import build_encoder
from typer.testing import CliRunner

from mergeseek.errors import InputError
from mergeseek.indexing import Dedup, IndexOptions, index_paths
from mergeseek.indexing.aic import find_release, load_video_meta, objects_in_frames
from mergeseek.indexing.features import import_features
from mergeseek.indexing.sources import discover
from mergeseek.indexing.store import IndexStore


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return make_release(tmp_path_factory.mktemp("aic") / "release")


@pytest.fixture(scope="module")
def indexed(release, tmp_path_factory, one_torch_thread):
    ix = tmp_path_factory.mktemp("aic_ix") / "ix"
    report = index_paths([release], ix, build_encoder(), IndexOptions(dedup=Dedup(enabled=False)))
    return ix, report


def _rows(ix: Path) -> list[tuple]:
    t = IndexStore.open_for_read(ix).read_meta()
    return sorted(zip(t.column("video_id").to_pylist(), t.column("frame_idx").to_pylist(),
                      t.column("pts_time").to_pylist(), t.column("path").to_pylist()))


def test_release_parts_are_found_from_the_root_and_from_below(release):
    parts = find_release(release)
    assert parts.root == release.resolve() and parts.archive
    assert sorted(p.parent.name for p in parts.keyframes) == ["Keyframes_L21", "Keyframes_L22"]
    assert parts.map_for("L22_V001") == release.resolve() / "map-keyframes-aic25-b1/map-keyframes/L22_V001.csv"
    assert parts.map_for("L22_V002") is None
    assert parts.video_for("L21_V002").name == "L21_V002.mp4"
    assert parts.media_info_for("L21_V001").name == "L21_V001.json"
    assert parts.features_for("L21_V002").parent.name == "clip-features-32"
    assert parts.objects_for("L21_V001").name == "L21_V001"
    # any path under the release finds the same root
    assert find_release(release / "Keyframes_L22" / "keyframes" / "L22_V001").root == parts.root
    assert not find_release(release.parent).is_release  # above it: not a release


def test_discover_gives_keyframe_folders_with_their_maps_and_not_the_videos(release):
    sources, bad = discover([release])
    assert not bad
    assert [(s.kind, s.video_id) for s in sources] == [
        ("keyframes", "L21_V001"), ("keyframes", "L21_V002"), ("keyframes", "L22_V001"), ("keyframes", "L22_V002")]
    assert [s.map_csv.name if s.map_csv else None for s in sources] == ["L21_V001.csv", "L21_V002.csv", "L22_V001.csv", None]
    # one archive given: only its videos, maps still matched from the release root
    sources, _ = discover([release / "Keyframes_L22"])
    assert [(s.video_id, s.map_csv is not None) for s in sources] == [("L22_V001", True), ("L22_V002", False)]


def test_every_row_has_the_real_frame_and_time_from_the_map(indexed, release):
    ix, report = indexed
    rows = _rows(ix)
    want = []
    for vid, frames in FRAMES.items():
        for n, f in enumerate(frames, start=1):
            want.append((vid, f, pts(vid, n), f"{n:03d}.jpg"))
    got_mapped = [(v, f, t, Path(p).name) for v, f, t, p in rows if v not in UNMAPPED]
    assert got_mapped == sorted(want)
    # the unmapped folder: keyframe number, no time
    unmapped = [(v, f, t) for v, f, t, _ in rows if v in UNMAPPED]
    assert [(v, f) for v, f, _ in unmapped] == [("L22_V002", 1), ("L22_V002", 2)]
    assert all(math.isnan(t) for _, _, t in unmapped)
    assert report.unmapped == ["L22_V002"]
    assert any(line.startswith("WARNING: 1 keyframe folder(s) have no map-keyframes CSV") and "L22_V002" in line
               for line in report.summary_lines())
    assert not any(b.path.endswith(".mp4") for b in report.failed)  # videos were not taken as sources


def test_a_keyframe_folder_without_its_map_warns(release, caplog):
    from mergeseek.indexing import pipeline

    caplog.set_level(logging.WARNING)

    def stop():  # index_paths warns before it builds the model; stop right there
        raise RuntimeError("stop after discovery")

    with pytest.raises(RuntimeError):
        pipeline.index_paths([release], release.parent / "never", stop)
    warned = [r.getMessage() for r in caplog.records if "NO KEYFRAME MAP" in r.getMessage()]
    assert len(warned) == 1 and "L22_V002" in warned[0] and "--maps" in warned[0]


def test_release_metadata_is_written_beside_the_index_and_shown_in_hits(indexed):
    import pyarrow.parquet as pq

    from mergeseek.retrieval import Searcher, hits_json

    ix, report = indexed
    meta = load_video_meta(ix)
    assert meta["L21_V001"]["title"] == MEDIA["L21_V001"]["title"]
    assert meta["L21_V001"]["watch_url"] == MEDIA["L21_V001"]["watch_url"]
    assert meta["L21_V001"]["keywords"] == ["news", "HTV"] and "extra_key" not in meta["L21_V001"]
    assert meta["L22_V001"]["keywords"] == ["a", "b"]
    assert Path(meta["L21_V002"]["video_path"]).name == "L21_V002.mp4" and "title" not in meta["L21_V002"]
    assert "L22_V002" not in meta  # nothing known about it
    assert sorted(p.name for p in ix.iterdir() if p.is_file()) == [".lock", "index.faiss", "manifest.json",
                                                                   "objects.parquet", "videos.json"]
    obj = pq.read_table(ix / "objects.parquet").to_pylist()
    assert [(o["video_id"], o["n"], o["frame_idx"], o["entity"], o["score"]) for o in obj] == [
        ("L21_V001", 1, 0, "Person", 0.91), ("L21_V001", 3, 290, "Dog", 0.66)]  # the 0.2 car is below 0.5
    assert objects_in_frames(ix, "dog") == {("L21_V001", 290)} and objects_in_frames(ix, "car") == set()
    assert report.metadata == {"videos_with_metadata": 3, "objects": 2}
    s = Searcher(ix)
    vec = IndexStore.open_for_read(ix).read_vectors()[1][:1]
    hits = s.search_vectors(vec, 20)[0]
    by_vid = {h.video_id: json.loads(hits_json([h]))[0] for h in hits}
    assert by_vid["L21_V001"]["title"] == MEDIA["L21_V001"]["title"]
    assert by_vid["L21_V001"]["watch_url"] == MEDIA["L21_V001"]["watch_url"]
    assert "title" not in by_vid["L22_V002"]


def test_parts_elsewhere_are_given_by_flags(release, tmp_path, monkeypatch, one_torch_thread):
    from mergeseek.cli import app

    moved = tmp_path / "rel"
    shutil.copytree(release, moved)
    shutil.move(str(moved / "map-keyframes-aic25-b1"), str(tmp_path / "maps_elsewhere"))
    sources, _ = discover([moved])
    assert all(s.map_csv is None for s in sources)
    sources, _ = discover([moved], {"maps": tmp_path / "maps_elsewhere"})
    assert [s.map_csv is not None for s in sources] == [True, True, True, False]

    from mergeseek import encoders
    model = build_encoder()
    monkeypatch.setattr(encoders, "Encoder", lambda **kw: model)
    res = CliRunner().invoke(app, ["index", str(moved / "Keyframes_L21"), "--index", str(tmp_path / "ix"),
                                   "--pretrained", "none", "--no-progress", "--no-dedup",
                                   "--maps", str(tmp_path / "maps_elsewhere")])
    assert res.exit_code == 0, res.stderr
    assert [(v, f) for v, f, _, _ in _rows(tmp_path / "ix")] == sorted(
        (v, f) for v in ("L21_V001", "L21_V002") for f in FRAMES[v])
    res = CliRunner().invoke(app, ["index", str(moved), "--index", str(tmp_path / "ix2"), "--maps", str(tmp_path / "nope")])
    assert res.exit_code == 3 and "--maps" in res.stderr and "no such folder" in res.stderr


def test_import_features_gives_the_rows_of_index_and_the_files_vectors(indexed, release, tmp_path):
    ix, _ = indexed
    imp = tmp_path / "imp"
    report = import_features([release], imp, model="ViT-B-32", pretrained="none")
    assert sorted(report.indexed) == sorted(FRAMES)  # the unmapped folder has no features file
    m = IndexStore.open_for_read(imp).manifest
    assert (m.model, m.pretrained, m.dim) == ("ViT-B-32", "none", 512)
    assert _rows(imp) == [r for r in _rows(ix) if r[0] not in UNMAPPED]
    store = IndexStore.open_for_read(imp)
    t = store.read_meta()
    ids, vecs = store.read_vectors()
    assert vecs.dtype == np.float32
    row_of = dict(zip(t.column("id").to_pylist(), zip(t.column("video_id").to_pylist(), t.column("frame_idx").to_pylist())))
    feats = release / "clip-features-32-aic25-b1" / "clip-features-32"
    for i, v in zip(ids, vecs):
        vid, frame = row_of[int(i)]
        raw = np.load(feats / f"{vid}.npy").astype(np.float32)
        want = (raw / np.linalg.norm(raw, axis=1, keepdims=True))[FRAMES[vid].index(frame)]
        np.testing.assert_array_equal(v, want)
        assert abs(float(np.linalg.norm(v)) - 1) < 1e-6
    assert load_video_meta(imp)["L21_V001"]["title"] == MEDIA["L21_V001"]["title"]
    again = import_features([release], imp, model="ViT-B-32", pretrained="none")
    assert again.indexed == [] and again.up_to_date == 3
    forced = import_features([release], imp, model="ViT-B-32", pretrained="none", force=True)
    assert sorted(forced.indexed) == sorted(FRAMES) and _rows(imp) == [r for r in _rows(ix) if r[0] not in UNMAPPED]
    from mergeseek.retrieval import Searcher

    assert Searcher(imp).size == forced.vectors_total == sum(map(len, FRAMES.values()))
    assert IndexStore.open_for_read(imp).faiss_is_current()
    # a features file that does not match its map is refused with the counts
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    np.save(bad / "clip-features-32-aic25-b1/clip-features-32/L21_V002.npy", np.ones((5, 512), np.float16))
    rep = import_features([bad], tmp_path / "imp2", pretrained="none")
    assert [(Path(b.path).name, "5 rows" in b.reason and "3 keyframes" in b.reason) for b in rep.failed] == [
        ("L21_V002.npy", True)]


def test_search_keeps_only_keyframes_with_the_object(indexed, monkeypatch):
    from mergeseek import encoders
    from mergeseek.cli import app

    ix, _ = indexed
    model = build_encoder()
    monkeypatch.setattr(encoders, "Encoder", lambda **kw: model)
    res = CliRunner().invoke(app, ["search", "a dog", "--index", str(ix), "--object", "dog", "--json"])
    assert res.exit_code == 0, res.stderr
    assert [(h["video_id"], h["frame_idx"]) for h in json.loads(res.stdout)] == [("L21_V001", 290)]
    res = CliRunner().invoke(app, ["search", "a cat", "--index", str(ix), "--object", "Cat"])
    assert res.exit_code == 3 and "no keyframe" in res.stderr and "'Cat'" in res.stderr


def _bad_npys(folder: Path) -> dict:
    """Every kind of broken feature file, written for real."""
    out = {}
    p = folder / "garbage.npy"
    p.write_bytes(b"not numpy at all")
    out["garbage"] = (p, "not a readable .npy")
    p = folder / "truncated.npy"
    np.save(p, np.ones((3, 512), np.float16))
    p.write_bytes(p.read_bytes()[:-100])
    out["truncated"] = (p, "truncated")
    p = folder / "pickled.npy"
    np.save(p, np.array([{"a": 1}, "os.system"], dtype=object), allow_pickle=True)
    out["pickled"] = (p, "pickled objects are never loaded")
    p = folder / "wrong_dim.npy"
    np.save(p, np.ones((3, 768), np.float32))
    out["wrong_dim"] = (p, "expected [keyframes, 512]")
    p = folder / "one_d.npy"
    np.save(p, np.ones(512, np.float32))
    out["one_d"] = (p, "expected [keyframes, 512]")
    p = folder / "huge_header.npy"  # a few bytes that claim 50 million rows
    header = {"descr": "<f4", "fortran_order": False, "shape": (50_000_000, 512)}
    with open(p, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(b"\0" * 64)
    out["huge_header"] = (p, "50000000 rows")
    p = folder / "empty.npy"
    p.write_bytes(b"")
    out["empty"] = (p, "not a readable .npy")
    return out


def test_every_broken_feature_file_is_one_line_and_never_loaded(release, tmp_path, monkeypatch):
    """Each broken file in first, middle and last position: skipped with one reason, the good
    files imported, the index's dim the model's (512 for ViT-B-32) whatever the first file says,
    and no header that claims millions of rows gets its data read."""
    from mergeseek.indexing import features

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = _bad_npys(bad_dir)
    loads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda f, *a, **k: loads.append(Path(f).name) or real_load(f, *a, **k))
    for name, (path, reason) in bad.items():
        with pytest.raises(InputError) as err:
            features._npy_header(path, 512)
        assert reason in str(err.value) and len(str(err.value).splitlines()) == 1, (name, str(err.value))
    assert loads == []  # all refused from the header
    good = release / "clip-features-32-aic25-b1" / "clip-features-32"
    names = sorted(p.stem for p in good.glob("*.npy"))
    for position, stem, kinds in (("first", "A00_V000", list(bad)), ("middle", names[0] + "_x", ["pickled", "huge_header"]),
                                  ("last", "Z99_V999", ["truncated", "wrong_dim"])):
        for kind in kinds:
            path, reason = bad[kind]
            feats = tmp_path / f"{position}_{kind}"
            shutil.copytree(good, feats)
            shutil.copy(path, feats / f"{stem}.npy")
            ix = tmp_path / f"ix_{position}_{kind}"
            rep = import_features([feats], ix, model="ViT-B-32", pretrained="none")
            assert [Path(b.path).name for b in rep.failed] == [f"{stem}.npy"], (position, kind, rep.failed)
            assert reason in rep.failed[0].reason and len(rep.failed[0].reason.splitlines()) == 1
            assert sorted(rep.indexed) == names
            assert IndexStore.open_for_read(ix).manifest.dim == 512


def test_merging_release_indexes_keeps_their_videos_json_and_objects(release, indexed, tmp_path, one_torch_thread):
    """Two indexes of parts of a release, merged: the merged videos.json and objects.parquet are
    the whole release's; a merge resumed after its side files were lost writes them again."""
    import pyarrow.parquet as pq

    from mergeseek.indexing.aic import OBJECTS_FILE, VIDEOS_FILE
    from mergeseek.indexing.merge import merge_indexes

    whole, _ = indexed
    enc = build_encoder()
    opts = IndexOptions(dedup=Dedup(enabled=False))
    index_paths([release / "Keyframes_L21"], tmp_path / "p1", enc, opts)
    index_paths([release / "Keyframes_L22"], tmp_path / "p2", enc, opts)

    def objects(ix):
        t = pq.read_table(ix / OBJECTS_FILE)
        return sorted(map(tuple, zip(*[t.column(c).to_pylist() for c in t.column_names])))

    assert load_video_meta(tmp_path / "p1") and load_video_meta(tmp_path / "p1") != load_video_meta(whole)
    report = merge_indexes([tmp_path / "p1", tmp_path / "p2"], tmp_path / "m")
    assert load_video_meta(tmp_path / "m") == load_video_meta(whole)
    assert objects(tmp_path / "m") == objects(whole) and report.sidecars["videos_with_metadata"] > 0
    (tmp_path / "m" / VIDEOS_FILE).unlink()
    (tmp_path / "m" / OBJECTS_FILE).unlink()
    again = merge_indexes([tmp_path / "p1", tmp_path / "p2"], tmp_path / "m")
    assert again.sources_copied == 0
    assert load_video_meta(tmp_path / "m") == load_video_meta(whole) and objects(tmp_path / "m") == objects(whole)
