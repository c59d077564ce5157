"""End-to-end indexing with a random-weight ViT-B-32: counts, incremental runs, kill + resume, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_indexing_support import (  # noqa: F401  (fixtures)
    built_index,
    encoder,
    index_contents,
    sample_index,
    sample_videos,
    shots_dir,
    write_video,
)

from mergeseek.errors import InputError
from mergeseek.indexing import Dedup, IndexOptions, index_paths
from mergeseek.indexing.faiss_index import load_index
from mergeseek.indexing.store import IndexStore

ROOT = Path(__file__).resolve().parents[1]


def test_sample_videos_are_indexed_with_the_right_counts(sample_index):  # noqa: F811
    index_dir, report = sample_index
    # bikes: 10 s at 25 fps -> 10 frames at 1 fps; bigbuckbunny: 5.28 s -> 6 frames.
    assert report.frames_sampled == 16
    assert report.frames_encoded + report.duplicates_skipped == 16
    assert sorted(report.indexed) == ["bigbuckbunny", "bikes"] and not report.failed
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["model"] == "ViT-B-32" and manifest["dim"] == 512 and manifest["sampling"] == "fps=1"
    assert manifest["counts"]["vectors"] == report.frames_encoded == report.vectors_total
    assert manifest["counts"]["duplicates_skipped"] == report.duplicates_skipped
    meta = IndexStore.open_for_read(index_dir).read_meta()
    bikes = [(f, t) for v, f, t in zip(*(meta.column(c).to_pylist() for c in ("video_id", "frame_idx", "pts_time"))) if v == "bikes"]
    assert len(bikes) == 10  # bikes has motion everywhere: no near-duplicates at 1 fps
    assert [f for f, _ in bikes] == list(range(0, 250, 25))
    assert [t for _, t in bikes] == pytest.approx([f / 25 for f, _ in bikes], abs=1e-3)
    assert load_index(index_dir / "index.faiss").ntotal == report.vectors_total
    assert sorted(p.name for p in index_dir.iterdir()) == [".lock", "emb", "index.faiss", "manifest.json", "meta", "thumbs"]


def test_reindexing_the_same_videos_adds_nothing(sample_index, encoder, sample_videos):  # noqa: F811
    index_dir, first = sample_index
    before = index_contents(index_dir)
    stamp = (index_dir / "manifest.json").stat().st_mtime_ns
    again = index_paths(list(sample_videos.values()), index_dir, encoder, IndexOptions())
    assert again.indexed == [] and again.up_to_date == 2 and again.frames_encoded == 0
    assert again.vectors_total == first.vectors_total
    assert (index_dir / "manifest.json").stat().st_mtime_ns == stamp  # nothing rewritten
    after = index_contents(index_dir)
    assert after[0] == before[0] and np.array_equal(after[1], before[1])


def test_only_new_or_changed_videos_are_indexed_again(tmp_path, encoder):  # noqa: F811
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "one.mp4", [("red", 10)])
    write_video(videos / "two.mp4", [("green", 10)])
    index_dir = tmp_path / "index"
    assert index_paths([videos], index_dir, encoder, IndexOptions()).frames_encoded == 2
    write_video(videos / "two.mp4", [("white", 10), ("black", 10)])  # changed: 2 s now
    write_video(videos / "three.mp4", [("blue", 10)])  # new
    report = index_paths([videos], index_dir, encoder, IndexOptions())
    assert sorted(report.indexed) == ["three", "two"] and report.up_to_date == 1 and report.frames_encoded == 3
    rows, vecs = index_contents(index_dir)
    per_video = {v: [r[2] for r in rows if r[1] == v] for v in ("one", "two", "three")}
    assert per_video == {"one": [0], "two": [0, 10], "three": [0]}
    assert len(vecs) == report.vectors_total == 4
    assert load_index(index_dir / "index.faiss").ntotal == 4
    forced = index_paths([videos], index_dir, encoder, IndexOptions(force=True))
    assert sorted(forced.indexed) == ["one", "three", "two"] and forced.vectors_total == 4
    assert index_contents(index_dir)[0][0][0] == 0  # ids start afresh after --force


def test_dedup_skips_a_static_shot_and_can_be_turned_off(tmp_path, encoder):  # noqa: F811
    write_video(tmp_path / "news.mp4", [("white", 30), ("red", 10)])
    on = index_paths([tmp_path / "news.mp4"], tmp_path / "on", encoder, IndexOptions())
    off = index_paths([tmp_path / "news.mp4"], tmp_path / "off", encoder, IndexOptions(dedup=Dedup(enabled=False)))
    assert (on.frames_sampled, on.frames_encoded, on.duplicates_skipped) == (4, 2, 2)
    assert (off.frames_sampled, off.frames_encoded, off.duplicates_skipped) == (4, 4, 0)
    assert any("2 near-duplicates skipped" in line for line in on.summary_lines())


def _uninterrupted(tmp_path_factory, encoder, shots_dir):  # noqa: F811
    def make():
        d = tmp_path_factory.mktemp("uninterrupted")
        index_paths([shots_dir], d, encoder, IndexOptions())
        return d

    return built_index(f"shots-uninterrupted:{shots_dir}", make)


def test_interrupted_run_resumes_to_the_uninterrupted_contents(tmp_path, tmp_path_factory, encoder, shots_dir):  # noqa: F811
    reference = _uninterrupted(tmp_path_factory, encoder, shots_dir)

    def ctrl_c(keys):
        raise KeyboardInterrupt  # after the first video is committed

    with pytest.raises(KeyboardInterrupt):
        index_paths([shots_dir], tmp_path, encoder, IndexOptions(shard_size=1), on_commit=ctrl_c)
    assert len(IndexStore.open_for_read(tmp_path).manifest.sources) == 1
    resumed = index_paths([shots_dir], tmp_path, encoder, IndexOptions(shard_size=1))
    assert resumed.up_to_date == 1 and len(resumed.indexed) == 2
    rows, vecs = index_contents(tmp_path)
    ref_rows, ref_vecs = index_contents(reference)
    assert rows == ref_rows and len(rows) == 6
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_indexing_support import build_encoder
    from mergeseek.indexing import IndexOptions, index_paths

    enc = build_encoder()
    encode, commits = enc.encode_image_tensor, []

    def encode_then_die(pixels):
        if commits:  # mid-way through the second video, with frames read ahead: SIGKILL
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(pixels)

    enc.encode_image_tensor = encode_then_die
    index_paths([{src!r}], {out!r}, enc, IndexOptions(shard_size=1), on_commit=commits.append)
    """
)


def test_sigkilled_run_resumes_to_the_uninterrupted_contents(tmp_path, tmp_path_factory, encoder, shots_dir):  # noqa: F811
    reference = _uninterrupted(tmp_path_factory, encoder, shots_dir)
    out = tmp_path / "index"
    script = KILL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), src=str(shots_dir), out=str(out))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(IndexStore.open_for_read(out).manifest.sources) == 1
    resumed = index_paths([shots_dir], out, encoder, IndexOptions())
    assert resumed.up_to_date == 1 and len(resumed.indexed) == 2
    rows, vecs = index_contents(out)
    ref_rows, ref_vecs = index_contents(reference)
    assert rows == ref_rows
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)


def _bad_folder(root: Path, bikes: Path) -> Path:
    d = root / "mixed"
    d.mkdir()
    write_video(d / "good.mp4", [("red", 10), ("blue", 10)])
    (d / "zero.mp4").write_bytes(b"")
    (d / "truncated.mp4").write_bytes(bikes.read_bytes()[:100_000])
    (d / "notes.mov").write_text("not a video")
    mj = write_video(root / "mj.avi", [("red", 5)], fourcc="MJPG").read_bytes()
    (d / "codec.avi").write_bytes(mj.replace(b"MJPG", b"QQQQ"))
    return d


def test_bad_files_are_skipped_and_listed(tmp_path, encoder, sample_videos):  # noqa: F811
    d = _bad_folder(tmp_path, sample_videos["bikes"])
    stills = tmp_path / "stills"
    stills.mkdir()
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(stills / "ok.png")
    (stills / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    report = index_paths([d, stills, tmp_path / "missing"], tmp_path / "index", encoder, IndexOptions())
    assert sorted(report.indexed) == ["good", "stills"]
    failed = {Path(b.path).name: b.reason for b in report.failed}
    assert sorted(failed) == ["broken.jpg", "codec.avi", "missing", "notes.mov", "truncated.mp4", "zero.mp4"]
    assert "empty file" in failed["zero.mp4"] and "unsupported codec" in failed["codec.avi"]
    assert "does not exist" in failed["missing"]
    lines = report.summary_lines()
    assert sum(line.startswith("skipped ") for line in lines) == 6
    assert report.vectors_total == 3


def test_nothing_indexable_fails_and_keeps_the_index(tmp_path, encoder, sample_videos):  # noqa: F811
    good = write_video(tmp_path / "good.mp4", [("red", 10)])
    index_dir = tmp_path / "index"
    index_paths([good], index_dir, encoder, IndexOptions())
    before = index_contents(index_dir)
    bad = _bad_folder(tmp_path, sample_videos["bikes"])
    (bad / "good.mp4").unlink()
    with pytest.raises(InputError, match="nothing could be indexed: 4 input"):
        index_paths([bad], index_dir, encoder, IndexOptions())
    after = index_contents(index_dir)
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert load_index(index_dir / "index.faiss").ntotal == 1


def test_a_missing_folder_fails_before_the_model_loads(tmp_path):
    def no_model():
        raise AssertionError("the encoder must not be built for a missing folder")

    with pytest.raises(InputError, match="does not exist"):
        index_paths([tmp_path / "nope"], tmp_path / "index", no_model, IndexOptions())
    assert not (tmp_path / "index").exists()


def test_index_type_can_change_and_is_rebuilt(tmp_path, tmp_path_factory, encoder, shots_dir):  # noqa: F811
    import faiss

    index_dir = tmp_path / "index"
    shutil.copytree(_uninterrupted(tmp_path_factory, encoder, shots_dir), index_dir)
    (index_dir / ".lock").unlink()
    report = index_paths([shots_dir], index_dir, encoder, IndexOptions(index_type="HNSW8"))
    assert report.frames_encoded == 0 and report.up_to_date == 3
    assert json.loads((index_dir / "manifest.json").read_text())["index_type"] == "HNSW8"
    index = load_index(index_dir / "index.faiss")
    assert index.ntotal == 6 and isinstance(faiss.downcast_index(index.index), faiss.IndexHNSWFlat)
