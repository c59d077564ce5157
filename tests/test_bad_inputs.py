"""Bad inputs never abort a run: links, unreadable files and folders, damaged videos, bad keyframe
maps, 16-bit images, id collisions, long queries, odd file names. Real files made in the test."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_indexing_support import encoder, index_contents, sample_videos, write_video  # noqa: F401  (fixtures)

from mergeseek.errors import InputError
from mergeseek.indexing import IndexOptions, index_paths
from mergeseek.indexing.formats import read_keyframe_map
from mergeseek.indexing.sampling import Sampling
from mergeseek.indexing.sources import MediaSource, SourceReader, assign_ids, discover

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg is not installed (apt-get install ffmpeg)")


def _frames(source: MediaSource, sampling: str = "all", batch_size: int = 16):
    reader = SourceReader(source, Sampling.parse(sampling), batch_size)
    return [f for b in reader.batches() for f in b], reader.skipped


def _video(path: Path) -> MediaSource:
    return MediaSource("video", path, path.stem, "x")


def _jpg(path: Path, value: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 32, 3), value, np.uint8)).save(path)
    return path


def _ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-v", "error", "-y", *args], check=True)


# ---------------------------------------------------------------------------- symbolic links
def test_broken_and_looping_links_are_listed_and_skipped(tmp_path):
    d = tmp_path / "videos"
    d.mkdir()
    write_video(d / "good.mp4", [("red", 4)])
    os.symlink(d / "gone.mp4", d / "broken.mp4")  # target never existed
    os.symlink(d / "self.mp4", d / "self.mp4")  # a link to itself
    os.symlink(d / "pong.mp4", d / "ping.mp4")
    os.symlink(d / "ping.mp4", d / "pong.mp4")
    (d / "sub").mkdir()
    write_video(d / "sub" / "inner.mp4", [("blue", 4)])
    os.symlink(d, d / "sub" / "up")  # a folder link back to an ancestor
    photos = tmp_path / "photos"
    _jpg(photos / "a.jpg", 100)
    os.symlink(photos / "missing.jpg", photos / "b.jpg")
    os.symlink(tmp_path / "nowhere", tmp_path / "given_broken")
    os.symlink(tmp_path / "given_loop", tmp_path / "given_loop")

    sources, bad = discover([d, photos, tmp_path / "given_broken", tmp_path / "given_loop"])

    assert sorted((s.kind, s.video_id) for s in sources) == [("images", "photos"), ("video", "good"), ("video", "inner")]
    reasons = {Path(b.path).name: b.reason for b in bad}
    for name in ("broken.mp4", "b.jpg", "given_broken"):
        assert "broken symbolic link" in reasons[name], reasons
    for name in ("self.mp4", "ping.mp4", "pong.mp4", "given_loop"):
        assert "symbolic link loop" in reasons[name], reasons
    assert "already visited" in reasons["up"]
    (img,) = [s for s in sources if s.kind == "images"]
    frames, skipped = _frames(img)
    assert [Path(f.path).name for f in frames] == ["a.jpg"] and not skipped  # listed once, by discover


def test_a_link_to_a_good_file_or_folder_is_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    write_video(real / "clip.mp4", [("green", 3)])
    lib = tmp_path / "lib"
    lib.mkdir()
    os.symlink(real, lib / "linked")
    sources, bad = discover([lib])
    assert [(s.kind, s.video_id) for s in sources] == [("video", "clip")] and not bad


# ---------------------------------------------------------------------------- keyframe maps
def _keyframes(root: Path, numbers, map_text: str | None, vid: str = "L01_V001", bom: bool = False) -> Path:
    for n in numbers:
        _jpg(root / "keyframes" / vid / f"{n:03d}.jpg", 10 * n)
    if map_text is not None:
        (root / "map-keyframes").mkdir(parents=True, exist_ok=True)
        (root / "map-keyframes" / f"{vid}.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + map_text.encode())
    return root


def test_keyframe_map_with_bom_bad_rows_and_a_missing_keyframe(tmp_path):
    # Saved by Excel: a BOM and CRLF line ends; row 3 has a bad number, row 4 is short.
    text = "n,pts_time,fps,frame_idx\r\n1,0.0,25.0,0\r\n2,abc,25.0,50\r\n3,4.2\r\n10,61.36,25.0,1534\r\n\r\n"
    root = _keyframes(tmp_path / "aic", (1, 2, 3, 10, 11), text, bom=True)
    (src,) = discover([root])[0]
    frames, skipped = _frames(src)
    # Only the keyframes whose rows are good are indexed, with the map's frame numbers and times.
    assert [(Path(f.path).name, f.frame_idx, f.pts_time) for f in frames] == [("001.jpg", 0, 0.0), ("010.jpg", 1534, 61.36)]
    why = {Path(b.path).name: b.reason for b in skipped}
    assert "L01_V001.csv:3" in why and "pts_time='abc' is not a number" in why["L01_V001.csv:3"]
    assert "L01_V001.csv:4" in why and "short row" in why["L01_V001.csv:4"]
    for name in ("002.jpg", "003.jpg", "011.jpg"):
        assert "has no row n=" in why[name] and "skipped" in why[name]
    assert len(skipped) == 5


def test_map_reader_is_the_same_for_eval(tmp_path):
    from mergeseek.eval.datasets.keyframes import load_keyframes

    root = _keyframes(tmp_path / "set", (1, 2), "n,pts_time,fps,frame_idx\n1,0.0,25,0\n2,2.0,25,50\n", bom=True)
    (root / "queries.jsonl").write_text(json.dumps({"query": "grey", "video_id": "L01_V001", "frame_idx": 50}) + "\n")
    rs = load_keyframes(root)
    assert list(rs.frame_idx) == [0, 50] and rs.queries[0].relevant == (1,)
    m = read_keyframe_map(root / "map-keyframes" / "L01_V001.csv")
    assert sorted(m.rows) == [1, 2] and m[2].pts_time == 2.0 and m[2].fps == 25.0 and not m.problems


def test_map_without_the_needed_columns_fails_that_source_only(tmp_path, encoder):  # noqa: F811
    root = _keyframes(tmp_path / "aic", (1, 2), "a;b;c\n1;2;3\n")
    write_video(tmp_path / "aic" / "ok.mp4", [("red", 10)])
    report = index_paths([root], tmp_path / "idx", encoder, IndexOptions())
    assert report.indexed == ["ok"]
    (fail,) = report.failed
    assert fail.path.endswith("L01_V001") and "needs columns n,pts_time,fps,frame_idx" in fail.reason


def test_an_unexpected_error_in_one_source_fails_that_source_not_the_run(tmp_path, encoder, monkeypatch):  # noqa: F811
    import mergeseek.indexing.sources as sources_mod

    d = tmp_path / "v"
    d.mkdir()
    write_video(d / "a.mp4", [("red", 10)])
    write_video(d / "b.mp4", [("blue", 10)])
    real_open = sources_mod.open_bounded  # how SourceReader opens a video

    def buggy(path, *args, **kwargs):  # a decoder bug (not an InputError) on one file
        if Path(path).name == "a.mp4":
            raise ZeroDivisionError("division by zero inside the decoder")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sources_mod, "open_bounded", buggy)
    report = index_paths([d], tmp_path / "idx", encoder, IndexOptions())
    assert report.indexed == ["b"]
    (fail,) = report.failed
    assert fail.path.endswith("a.mp4") and "unexpected error" in fail.reason and "ZeroDivisionError" in fail.reason
    rows, _ = index_contents(tmp_path / "idx")
    assert {r[1] for r in rows} == {"b"}


# ---------------------------------------------------------------------------- damaged videos
@needs_ffmpeg
def _truncated(tmp_path: Path, bikes: Path) -> Path:
    """6 s of bikes.mp4 as H.264 (150 frames), cut in half: about 79 frames left, the last few broken."""
    full = tmp_path / "full.mp4"
    # moov first (faststart), so the first half of the file is still a playable prefix
    _ffmpeg("-i", str(bikes), "-t", "6", "-an", "-c:v", "libx264", "-movflags", "+faststart", str(full))
    raw = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(raw[: len(raw) // 2])
    return cut


@needs_ffmpeg
def test_truncated_video_is_indexed_in_part_and_reported(tmp_path, sample_videos):  # noqa: F811
    cut = _truncated(tmp_path, sample_videos["bikes"])
    full = tmp_path / "full.mp4"
    frames, skipped = _frames(_video(cut), "all")
    assert 60 <= len(frames) < 79
    (note,) = skipped
    assert note.path == str(cut) and note.reason.startswith("partly indexed: ")
    assert f"{len(frames)} indexed" in note.reason and "truncated" in note.reason
    # what was indexed is the true content: the same frames as the intact file
    ref, _ = _frames(_video(full), "all")
    for f in frames[:: max(1, len(frames) // 6)]:
        assert f.frame_idx == ref[f.frame_idx].frame_idx and f.pts_time == pytest.approx(ref[f.frame_idx].pts_time)
        assert np.abs(f.image.astype(int) - ref[f.frame_idx].image.astype(int)).mean() < 1.0


@needs_ffmpeg
def test_truncated_video_in_a_run_is_committed_in_part_and_listed(tmp_path, sample_videos, encoder):  # noqa: F811
    cut = _truncated(tmp_path, sample_videos["bikes"])
    report = index_paths([cut], tmp_path / "idx", encoder, IndexOptions(sampling=Sampling.parse("every=4")))
    # 79 frames are left, the last ones broken: frames 0, 4, ..., 72 decode, 76 does not
    assert report.indexed == ["cut"] and 15 <= report.frames_sampled <= 19
    (note,) = report.failed
    assert note.path == str(cut) and "partly indexed" in note.reason
    rows, vecs = index_contents(tmp_path / "idx")
    assert len(rows) == len(vecs) == report.frames_encoded and max(r[2] for r in rows) < 79


@needs_ffmpeg
def test_vp9_webm_without_a_seek_index_is_decoded_sequentially_not_called_truncated(tmp_path, sample_videos):  # noqa: F811
    piped = tmp_path / "piped.webm"
    # Written to a pipe, the WebM muxer cannot go back to write the Cues (the seek index).
    with open(piped, "wb") as fh:
        subprocess.run([FFMPEG, "-v", "error", "-i", str(sample_videos["bikes"]), "-t", "4", "-an", "-c:v", "libvpx-vp9",
                        "-b:v", "200k", "-deadline", "realtime", "-cpu-used", "8", "-f", "webm", "-"], stdout=fh, check=True)
    seekable = tmp_path / "seekable.webm"
    _ffmpeg("-i", str(piped), "-c", "copy", str(seekable))  # the same packets, with Cues
    frames, skipped = _frames(_video(piped), "fps=5")
    ref, ref_skipped = _frames(_video(seekable), "fps=5")
    assert not skipped and not ref_skipped
    assert [f.frame_idx for f in frames] == [f.frame_idx for f in ref] == list(range(0, 100, 5))
    for a, b in zip(frames, ref):
        assert np.array_equal(a.image, b.image) and a.pts_time == b.pts_time


def test_a_file_that_is_not_a_video_still_fails_alone(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(InputError, match="cannot be decoded as a video"):
        _frames(_video(tmp_path / "notes.mp4"))


# ---------------------------------------------------------------------------- permissions
def _as_nobody(fn) -> dict:
    """Run ``fn()`` in a forked child that dropped root (uid/gid 65534); returns its JSON result.

    Everything the child needs must be imported before the fork: after setuid it cannot read the
    interpreter's own library folder.
    """
    from PIL import Image

    Image.init()  # load every image plugin now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = fn()
        except BaseException as exc:  # reported to the parent, which fails the test
            out, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        os.write(w, json.dumps(out).encode())
        os.close(w)
        os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def world_dir():
    """A folder under /tmp that uid 65534 can reach (pytest's tmp_path is private to root)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="mergeseek-perm-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    for p in d.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(d)


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="drops root in a forked child: needs root and fork")
def test_permission_errors_are_named_and_unreadable_folders_listed(world_dir):
    import decord  # noqa: F401  (loaded before the fork)

    import mergeseek.indexing.decoders  # noqa: F401

    from mergeseek import indexing

    top = world_dir / "media"
    (top / "open").mkdir(parents=True)
    write_video(top / "open" / "ok.mp4", [("red", 5)])
    write_video(top / "open" / "locked.mp4", [("blue", 5)])
    _jpg(top / "photos" / "a.jpg", 50)
    _jpg(top / "photos" / "b.jpg", 150)
    _jpg(top / "closed" / "c.jpg", 200)
    _keyframes(top / "aic", (1, 2), "n,pts_time,fps,frame_idx\n1,0.0,25,0\n2,1.0,25,25\n")
    for p in top.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    (top / "open" / "locked.mp4").chmod(0o000)
    (top / "photos" / "b.jpg").chmod(0o000)
    (top / "closed").chmod(0o000)
    (top / "aic" / "map-keyframes" / "L01_V001.csv").chmod(0o000)

    def run():
        sources, bad = discover([top])
        out = {"sources": sorted(s.video_id for s in sources), "bad": {Path(b.path).name: b.reason for b in bad}}
        for s in sources:
            try:
                frames, skipped = _frames(s)
                out[s.video_id] = {"frames": len(frames), "skipped": {Path(b.path).name: b.reason for b in skipped}}
            except InputError as exc:
                out[s.video_id] = {"error": str(exc)}
        return out

    got = _as_nobody(run)
    assert "error" not in got, got
    assert got["sources"] == ["L01_V001", "locked", "ok", "photos"]
    assert "keyframe map" in got["L01_V001"]["error"] and "permission denied" in got["L01_V001"]["error"]
    assert "permission denied" in got["bad"]["closed"] and "folder" in got["bad"]["closed"]
    assert got["ok"]["frames"] == 5
    assert "permission denied" in got["locked"]["error"] and "locked.mp4" in got["locked"]["error"]
    assert got["photos"]["frames"] == 1 and "permission denied" in got["photos"]["skipped"]["b.jpg"]


# ---------------------------------------------------------------------------- 16-bit images
def test_16_bit_png_and_tiff_are_scaled_not_clipped(tmp_path):
    import cv2
    from PIL import Image

    grey16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 65535 // (48 * 64 - 1)).astype(np.uint16)
    d = tmp_path / "scans"
    d.mkdir()
    Image.fromarray(grey16).save(d / "1.png")  # PIL mode I;16
    assert Image.open(d / "1.png").mode == "I;16"
    cv2.imwrite(str(d / "2.tif"), grey16)  # 16-bit grey TIFF
    colour16 = np.stack([grey16, 65535 - grey16, grey16 // 2], axis=-1)
    cv2.imwrite(str(d / "3.tif"), colour16[..., ::-1])  # 16-bit colour TIFF (OpenCV writes BGR)
    (src,) = discover([d])[0]
    frames, skipped = _frames(src)
    assert not skipped and [Path(f.path).name for f in frames] == ["1.png", "2.tif", "3.tif"]
    expect_grey = np.round(grey16 / 257.0)
    for f in frames[:2]:
        assert f.image.dtype == np.uint8 and f.image.shape == (48, 64, 3)
        assert np.abs(f.image[..., 0].astype(float) - expect_grey).max() <= 1
        assert f.image.min() == 0 and f.image.max() == 255 and abs(f.image.mean() - 127.5) < 1
    assert np.abs(frames[2].image.astype(float) - np.round(colour16 / 257.0)).max() <= 1


# ---------------------------------------------------------------------------- video ids
def _src(path: str, vid: str | None = None) -> MediaSource:
    p = Path(path)
    return MediaSource("video", p, vid or p.stem, "f")


def test_assign_ids_keeps_unique_stems_and_the_index_ids():
    run = [_src("/d/a/clip.mp4"), _src("/d/b/clip.mp4"), _src("/d/L01_V001.mp4")]
    assert [s.video_id for s in assign_ids(run)] == ["a/clip", "b/clip", "L01_V001"]
    # clip from /d/a is already in the index as "clip": it keeps it; the new one is told apart
    got = assign_ids([_src("/d/b/clip.mp4"), _src("/d/a/clip.mp4")], {"/d/a/clip.mp4": "clip"})
    assert [s.video_id for s in got] == ["b/clip", "clip"]
    # a prefixed id that is taken too goes one folder further up, then gets a number
    got = assign_ids([_src("/x/a/clip.mp4")], {"/y/a/clip.mp4": "a/clip", "/z/clip.mp4": "clip"})
    assert [s.video_id for s in got] == ["x/a/clip"]
    got = assign_ids([_src("/clip.mp4")], {"/y/clip.mp4": "clip"})
    assert [s.video_id for s in got] == ["clip#2"]


def test_same_stem_in_a_second_run_gets_a_distinct_id(tmp_path, encoder, caplog):  # noqa: F811
    for sub, colour in (("a", "red"), ("b", "blue")):
        (tmp_path / sub).mkdir()
        write_video(tmp_path / sub / "clip.mp4", [(colour, 10)])
    idx = tmp_path / "idx"
    first = index_paths([tmp_path / "a"], idx, encoder, IndexOptions())
    assert first.indexed == ["clip"]
    rows_before, vecs_before = index_contents(idx)
    with caplog.at_level(logging.WARNING, logger="mergeseek.indexing.sources"):
        second = index_paths([tmp_path / "b"], idx, encoder, IndexOptions())
    assert second.indexed == ["b/clip"]
    assert any("video id 'b/clip'" in r.getMessage() and "already has 'clip'" in r.getMessage() for r in caplog.records)
    rows, vecs = index_contents(idx)
    assert rows[: len(rows_before)] == rows_before and np.array_equal(vecs[: len(vecs_before)], vecs_before)
    by_id = {}
    for r in rows:
        by_id.setdefault(r[1], set()).add(Path(r[4]).parent.name)
    assert by_id == {"clip": {"a"}, "b/clip": {"b"}}
    manifest = json.loads((idx / "manifest.json").read_text())
    assert {k: v["video_id"] for k, v in manifest["sources"].items()} == {
        str((tmp_path / "a" / "clip.mp4").resolve()): "clip",
        str((tmp_path / "b" / "clip.mp4").resolve()): "b/clip",
    }
    # the first file again: up to date, its id unchanged
    third = index_paths([tmp_path / "a", tmp_path / "b"], idx, encoder, IndexOptions())
    assert third.up_to_date == 2 and not third.indexed


# ---------------------------------------------------------------------------- queries and output
def test_a_query_longer_than_the_context_is_truncated_with_a_warning(encoder, caplog):  # noqa: F811
    long = " ".join(f"word{i}" for i in range(120))
    with caplog.at_level(logging.WARNING, logger="mergeseek.encoders.encoder"):
        v_short = encoder.encode_texts(["a man riding a bike"])
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="mergeseek.encoders.encoder"):
        v_long = encoder.encode_texts([long, long + " and more words at the end"])
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and all("longer than the text tower's context of 77" in m for m in msgs)
    # truncation really happened: what follows the 75th token changes nothing
    assert np.allclose(v_long[0], v_long[1], atol=1e-6) and v_short.shape == v_long[:1].shape


def test_file_names_with_newlines_and_wide_characters_keep_the_table_and_csv(tmp_path):
    from mergeseek.retrieval.format import _width, hits_table, write_submission_csv
    from mergeseek.retrieval.search import Hit
    from mergeseek.retrieval.submission import read_rows

    hits = [
        Hit(0.9, "旅行_ビデオ", 12, 1.5, "/data/旅行_ビデオ.mp4"),
        Hit(0.8, "two\nlines", 3, math.nan, "/data/two\nlines.mp4"),
        Hit(0.7, "comma,quote\"", 40, 2.0, "/data/x.mp4"),
    ]
    table = hits_table(hits).split("\n")
    assert len(table) == 2 + len(hits)  # a newline in a name does not start a row
    assert "two\\nlines" in table[3]
    # the path column starts at one display column on every row (CJK characters are two columns wide)
    starts = {_width(line[: line.rindex("/data/")]) for line in table[2:]}
    assert len(starts) == 1 and starts == {_width(table[0][: table[0].index("path")])}, table
    out = tmp_path / "q1.csv"
    assert write_submission_csv(out, hits) == 3
    assert read_rows(out) == [["旅行_ビデオ", "12"], ["two\nlines", "3"], ["comma,quote\"", "40"]]


# ---------------------------------------------------------------------------- user text files
@pytest.mark.parametrize("reader, what", [
    ("mergeseek.retrieval.submission:read_queries", "query file"),
    ("mergeseek.retrieval.submission:read_answers", "answers file"),
    ("mergeseek.retrieval.submission:read_rows", "submission file"),
    ("mergeseek.eval.aic_score:read_truth", "ground-truth file"),
])
def test_every_user_text_file_reader_refuses_bad_paths_in_one_line(tmp_path, reader, what):
    import importlib

    mod, _, name = reader.partition(":")
    read = getattr(importlib.import_module(mod), name)
    with pytest.raises(InputError, match=f"^{what} .*missing.txt does not exist$"):
        read(tmp_path / "missing.txt")
    with pytest.raises(InputError, match=f"^{what} .* is not a file$"):
        read(tmp_path)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match=f"^{what} .*latin1.txt is not UTF-8 text \\(byte 3\\); save it as UTF-8$"):
        read(latin)


def test_read_text_file_drops_the_bom_and_keeps_the_text():
    from mergeseek.runtime import read_text_file

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "q.txt"
        p.write_bytes("\ufeffkis\ta cat\n旅行\n".encode("utf-8"))
        assert read_text_file(p, "query file") == "kis\ta cat\n旅行\n"


def test_a_release_part_of_the_wrong_kind_does_not_hide_the_next_folder(tmp_path):
    from mergeseek.indexing.aic import ReleaseParts

    first, second = tmp_path / "maps-a", tmp_path / "maps-b"
    (first / "L01_V001.csv").mkdir(parents=True)  # a folder with a map's name
    second.mkdir()
    (second / "L01_V001.csv").write_text("n,pts_time,fps,frame_idx\n1,0.0,25,0\n", encoding="utf-8")
    (first / "L01_V001").mkdir()  # objects are folders: a file of that name must not count
    (second / "L01_V001").write_text("not a folder", encoding="utf-8")
    parts = ReleaseParts(maps=(first, second), objects=(second, first))
    assert parts.map_for("L01_V001") == second / "L01_V001.csv"
    assert parts.objects_for("L01_V001") == first / "L01_V001"
    assert parts.map_for("L01_V002") is None and parts.features_for("L01_V001") is None


# ---------------------------------------------------------------------------- faststart MP4 cut short (issue #23)
def _pattern_mp4(path: Path, faststart: bool = True) -> Path:
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=10", "-t", "6", "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv420p", *(["-movflags", "+faststart"] if faststart else []), str(path))
    return path


@needs_ffmpeg
def test_a_faststart_mp4_cut_short_that_decodes_cleanly_is_still_reported_partly_indexed(tmp_path):
    """Cut at 60%: the decoder sees fewer frames and no error; the box sizes tell it was cut."""
    from mergeseek.indexing.formats import mp4_truncation

    full = _pattern_mp4(tmp_path / "full.mp4")
    raw = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(raw[: int(len(raw) * 0.6)])
    assert mp4_truncation(full) is None
    t = mp4_truncation(cut)
    assert t is not None and t.size == len(raw) * 6 // 10 and t.needed == len(raw) and t.duration_s == pytest.approx(6.0)
    frames, skipped = _frames(_video(cut), "fps=2")
    (note,) = skipped
    assert note.reason.startswith("partly indexed: the file is cut short") and "6.0 s" in note.reason
    assert f"{len(frames)} frames" in note.reason and 0 < len(frames) < 12  # 12 at 2 fps over the whole 6 s
    whole, none = _frames(_video(full), "fps=2")
    assert none == [] and len(whole) == 12
    assert [f.frame_idx for f in frames] == [f.frame_idx for f in whole[: len(frames)]]


def test_mp4_box_walk_on_odd_files(tmp_path):
    import struct

    from mergeseek.indexing.formats import mp4_truncation

    def box(kind: bytes, payload: bytes = b"", size: int = None) -> bytes:
        return struct.pack(">I4s", size if size is not None else 8 + len(payload), kind) + payload

    cases = {
        "whole.mp4": (box(b"ftyp", b"isom") + box(b"mdat", b"x" * 100), None),
        "cut.mp4": ((box(b"ftyp", b"isom") + box(b"mdat", b"x" * 100))[:60], 120),
        "to_end.mp4": (box(b"ftyp", b"isom") + box(b"mdat", b"x" * 50, size=0), None),  # size 0: to the end
        "large.mov": (box(b"ftyp", b"qt  ") + struct.pack(">I4sQ", 1, b"mdat", 16 + 1000) + b"x" * 10, 12 + 16 + 1000),
        "garbage.mp4": (b"\x00\x00\x00\x02junk" * 3, None),  # a size under 8 is no box: the decoder decides
        "empty.mp4": (b"", None),
        "clip.mkv": ((box(b"ftyp", b"isom") + box(b"mdat", b"x" * 100))[:60], None),  # not ISO BMFF
    }
    for name, (data, needed) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        got = mp4_truncation(p)
        assert (got.needed if got else None) == needed, name
    assert mp4_truncation(tmp_path / "missing.mp4") is None
