"""Indexing on a local Ray (2 CPUs, started once for the module): the index equals the single-process one.

"Equal" is what ``index_contents`` compares: the rows (id, video_id, frame_idx, pts_time, path) in
id order, and the vectors in that order within 1e-5. Shard boundaries may differ (they follow
commit timing), ids may not.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from test_indexing_support import build_encoder, comparable_contents, index_contents, thumbnails_by_id, write_video  # noqa: E402

from mergeseek.errors import IndexMismatchError  # noqa: E402
from mergeseek.indexing import IndexOptions, index_paths  # noqa: E402
from mergeseek.indexing.dedup import Dedup  # noqa: E402
from mergeseek.indexing.distributed import RayOptions, _EncodeActor, index_paths_ray  # noqa: E402
from mergeseek.indexing.store import IndexStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module (starting Ray takes seconds); workers can import the tests."""
    from test_indexing_support import local_ray

    with local_ray() as address:
        yield address


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Three 2 s videos, an empty .mp4 and a non-video .mov, and an image folder with one broken image."""
    from PIL import Image

    d = tmp_path_factory.mktemp("ray_media")
    write_video(d / "a_rg.mp4", [("red", 10), ("green", 10)])
    write_video(d / "b_yw.mp4", [("yellow", 10), ("white", 10)])
    write_video(d / "c_bk.mp4", [("blue", 10), ("black", 10), ("black", 5)])  # a near-duplicate at 2 s
    (d / "d_zero.mp4").write_bytes(b"")
    (d / "e_notes.mov").write_text("not a video")
    stills = d / "stills"
    stills.mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(stills / "1.png")
    (stills / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory, media, one_torch_thread):
    """The single-process index of ``media`` and its report."""
    out = tmp_path_factory.mktemp("ray_reference")
    return out, index_paths([media], out, build_encoder(), IndexOptions())


def _failed(report) -> list:
    return [(Path(b.path).name, b.reason) for b in report.failed]






def _assert_same_index(index_dir: Path, reference_dir: Path) -> None:
    rows, vecs = comparable_contents(index_dir)
    ref_rows, ref_vecs = comparable_contents(reference_dir)
    assert rows == ref_rows
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)
    thumbs = thumbnails_by_id(index_dir)
    assert thumbs == thumbnails_by_id(reference_dir) and all(thumbs.values())  # every frame has its thumbnail


def dying_encoder(flag: str, device: str):
    """The test encoder, except that the first forward in any process ends that process (``os._exit``),
    once per flag file: an actor killed mid-run."""
    enc = build_encoder()
    encode = enc.encode_image_tensor

    def encode_or_die(pixels):
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return encode(pixels)
        os.close(fd)
        os._exit(1)

    enc.encode_image_tensor = encode_or_die
    return enc


@pytest.mark.parametrize("workers,shard_size,dies", [(1, 4096, False), pytest.param(2, 1, True, marks=pytest.mark.slow)],
                         ids=["1-worker", "2-workers-one-dies"])
def test_ray_index_equals_the_single_process_index(tmp_path, cluster, reference, media, workers, shard_size, dies):
    ref_dir, ref = reference
    out, flag = tmp_path / "index", tmp_path / "died-once"
    report = index_paths_ray([media], out, build_encoder(), IndexOptions(shard_size=shard_size),
                             RayOptions(workers=workers),
                             actor_encoder=functools.partial(dying_encoder, str(flag)) if dies else None)
    assert flag.exists() == dies  # an actor did die mid-run (it was restarted, its chunk encoded again)
    _assert_same_index(out, ref_dir)
    assert len(index_contents(out)[0]) == ref.vectors_total == 7  # 2 + 2 + (3 - 1 duplicate) frames at 1 fps + 1 image
    assert report.indexed == ref.indexed == ["a_rg", "b_yw", "c_bk", "stills"]
    assert (report.frames_sampled, report.frames_encoded, report.duplicates_skipped) == (
        ref.frames_sampled, ref.frames_encoded, ref.duplicates_skipped) == (8, 7, 1)
    # Bad input: the same one line per file as the single process, nothing else lost.
    assert sorted(_failed(report)) == sorted(_failed(ref))
    assert sorted(n for n, _ in _failed(report)) == ["2.jpg", "d_zero.mp4", "e_notes.mov"]
    assert sum(line.startswith("skipped ") for line in report.summary_lines()) == 3
    store = IndexStore.open_for_read(out)
    assert store.faiss_is_current()
    if shard_size == 1:
        assert len(store.manifest.shards) == 4  # one commit per source, in discover order


def dying_stream_encoder(flag: str, device: str):
    """The test encoder whose reuse stream ends its process at its second batch (after one chunk of
    the source went out), once per flag file."""
    enc = build_encoder()
    make = enc.stream
    calls = []

    def stream(reuse):
        s = make(reuse)
        encode = s.encode_image_tensor

        def encode_or_die(pixels, video_ids):
            calls.append(video_ids[0])
            if len(calls) < 2 or calls[0] != calls[1]:
                return encode(pixels, video_ids)
            try:
                fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return encode(pixels, video_ids)
            os.close(fd)
            os._exit(1)

        s.encode_image_tensor = encode_or_die
        return s

    enc.stream = stream
    return enc


@pytest.mark.slow  # Ray actors with reuse, one dies mid-video: ~1 min of CPU
def test_ray_with_reuse_equals_the_single_process_reuse_run(tmp_path, cluster, media):
    """--reuse under Ray: each actor reads its sources and encodes them in order through its reuse
    stream, so the index and the reuse counters equal the single process's, even though one of the
    two actors dies between two batches of a video (that video is read and encoded again from its
    start by the restarted actor)."""
    opts = IndexOptions(sampling="fps=5", dedup=Dedup(enabled=False), reuse="threshold=0.05,refresh=4,audit=3")
    encoder = build_encoder()
    encoder.batch_size = 4  # three batches per video, so an actor can die between two of them
    local = index_paths([media], tmp_path / "local", encoder, opts)
    flag = tmp_path / "died-once"
    report = index_paths_ray([media], tmp_path / "ray", encoder, opts, RayOptions(workers=2),
                             actor_encoder=functools.partial(dying_stream_encoder, str(flag)))
    assert flag.exists()  # an actor did die mid-video
    _assert_same_index(tmp_path / "ray", tmp_path / "local")
    assert report.indexed == local.indexed and sorted(_failed(report)) == sorted(_failed(local))
    mine, theirs = report.reuse, local.reuse
    assert mine["config"] == theirs["config"] == "threshold=0.05,refresh=4,audit=3"
    for key in ("frames", "references", "cuts", "refreshes", "reuse_rate", "gate_reuse", "block_reuse"):
        assert mine[key] == theirs[key], key
    assert mine["frames"] == report.frames_encoded and 0 < mine["references"] < mine["frames"] and mine["reuse_rate"] > 0
    # the audit counts reused frames per actor, so which frames it picks may differ; it ran and was close
    assert mine["audit"]["frames"] >= 1 and mine["audit"]["cos_min"] > 0.99


def test_a_source_read_twice_by_one_reuse_actor_gives_the_same_chunks(media, one_torch_thread):
    """A retried source on the same actor (its first attempt failed part-way) must not reuse the
    cache or the counts of that attempt."""
    import pickle

    import pyarrow as pa

    from mergeseek.indexing.distributed import _Preprocess, _ReadEncodeActor
    from mergeseek.indexing.sources import discover

    enc = build_encoder()
    sources, _ = discover([media / "a_rg.mp4"])
    read = {"sampling": IndexOptions(sampling="fps=5").sampling, "dedup": Dedup(enabled=False),
            "preprocess": _Preprocess(enc.preprocess), "batch_size": 4, "decoder": "decord"}
    row = pa.table({"order": [0], "source": [pickle.dumps(sources[0])]})

    def actor():
        return _ReadEncodeActor(lambda device: enc, enc.describe(), "cpu", 1, "threshold=0.05,refresh=8,audit=0", read)

    def chunks(a):
        return [pickle.loads(t.column("payload")[0].as_py()) for t in a(row)]

    first = chunks(actor())
    retried = actor()
    attempt = retried(row)
    next(attempt)  # an attempt that stopped after its first batch (its task failed and was retried)
    attempt.close()
    second = chunks(retried)
    assert len(first) == len(second) >= 3  # batches, then the end of the source
    for a, b in zip(first, second):
        assert (a.vectors is None) == (b.vectors is None)
        if a.vectors is not None:
            np.testing.assert_array_equal(a.vectors, b.vectors)
    assert first[-1].reuse.frames == second[-1].reuse.frames == sum(len(c.vectors) for c in first[:-1])
    assert first[-1].reuse.references == second[-1].reuse.references < first[-1].reuse.frames


def test_up_to_date_sources_are_skipped_under_ray(tmp_path, cluster, reference, media):
    import shutil

    ref_dir, _ = reference
    out = tmp_path / "index"
    shutil.copytree(ref_dir, out)
    report = index_paths_ray([media], out, build_encoder(), IndexOptions(), RayOptions(workers=1))
    assert report.indexed == [] and report.up_to_date == 4 and report.frames_encoded == 0
    _assert_same_index(out, ref_dir)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import ray
    ray.init(address={address!r}, configure_logging=False)
    from test_indexing_support import build_encoder
    from mergeseek.indexing import IndexOptions
    from mergeseek.indexing.distributed import RayOptions, index_paths_ray

    def die(keys):  # right after the first commit: the driver is SIGKILLed with work in flight
        os.kill(os.getpid(), signal.SIGKILL)

    index_paths_ray([{src!r}], {out!r}, build_encoder(), IndexOptions(shard_size=1), RayOptions(workers=1),
                    on_commit=die)
    """
)


@pytest.mark.slow  # a Ray driver killed and rerun
def test_a_sigkilled_driver_resumes_to_the_same_index(tmp_path, cluster, reference, media):
    ref_dir, ref = reference
    out = tmp_path / "index"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    script = KILL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), address=cluster, src=str(media), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert list(IndexStore.open_for_read(out).manifest.sources) == [str(media / "a_rg.mp4")]
    report = index_paths_ray([media], out, build_encoder(), IndexOptions(), RayOptions(workers=1))
    assert report.up_to_date == 1 and report.indexed == ["b_yw", "c_bk", "stills"]
    _assert_same_index(out, ref_dir)


def always_dying_encoder(device: str):
    os._exit(1)  # an actor that cannot start (out of memory at load, a broken node)


def test_workers_dying_past_their_retries_stop_the_run_with_one_line(tmp_path, cluster, media):
    from mergeseek.indexing.distributed import RayRunError

    out = tmp_path / "index"
    with pytest.raises(RayRunError) as info:
        index_paths_ray([media], out, build_encoder(), IndexOptions(), RayOptions(workers=1, max_retries=1),
                        actor_encoder=always_dying_encoder)
    msg = str(info.value)
    assert "\n" not in msg and "Ray run stopped" in msg and "run the same command again to resume" in msg
    assert "0 sources, 0 vectors" in msg
    assert not (out / "manifest.json").exists()  # nothing was committed, nothing half-written


def test_cli_ray_options_reach_the_library(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import mergeseek.indexing.distributed as dist
    from mergeseek.cli import app
    from mergeseek.indexing import IndexReport

    seen = {}

    def fake(paths, index_dir, encoder, options, ray_options):
        seen.update(paths=paths, options=options, ray=ray_options)
        return IndexReport(str(index_dir))

    monkeypatch.setattr(dist, "index_paths_ray", fake)
    result = CliRunner().invoke(app, ["index", "v", "--index", str(tmp_path), "--ray", "10.0.0.1:6379", "--workers", "3",
                                      "--every", "5", "--json"])
    assert result.exit_code == 0, result.stderr
    assert (seen["ray"].address, seen["ray"].workers, seen["ray"].gpus_per_worker) == ("10.0.0.1:6379", 3, None)
    assert str(seen["options"].sampling) == "every=5" and seen["paths"] == [Path("v")]
    result = CliRunner().invoke(app, ["index", "v", "--index", str(tmp_path), "--ray", "local", "--device", "cpu", "--json"])
    assert result.exit_code == 0 and seen["ray"].gpus_per_worker == 0
    result = CliRunner().invoke(app, ["index", "v", "--index", str(tmp_path), "--ray", "local", "--reuse", "threshold=0.1", "--json"])
    assert result.exit_code == 0 and str(seen["options"].reuse) == "threshold=0.1,refresh=16"  # --reuse runs under Ray too
    result = CliRunner().invoke(app, ["index", "v", "--index", str(tmp_path), "--workers", "2"])
    assert result.exit_code == 2 and "--workers 2 only applies with --ray" in result.stderr


class _OtherModel:
    def describe(self) -> dict:
        return {"model": "ViT-B-16", "pretrained": "none", "merge": "none", "precision": "fp32", "dim": 512}


def test_an_actor_with_another_model_is_refused():
    identity = {"model": "ViT-B-32", "pretrained": "none", "merge": "none", "precision": "fp32", "dim": 512}
    with pytest.raises(IndexMismatchError, match="model=ViT-B-16 but the run indexes with model=ViT-B-32"):
        _EncodeActor(lambda device: _OtherModel(), identity, "cpu", 1)


def test_ray_options_are_checked():
    from mergeseek.errors import ConfigError

    with pytest.raises(ConfigError, match="--workers 0"):
        RayOptions(workers=0)
