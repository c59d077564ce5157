"""``index --detect`` (issue #31, the product part): a deterministic plug-in detector of saturated
squares on real photos (so every stored row is checked against the pasted ground truth), a
torchvision detection model with seeded random weights, bad specs, kill -9 and resume, what
``search --object`` keeps, compact / merge-index / export / repair, the release's own objects."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_indexing_support import build_encoder

from mergeseek.indexing import Dedup, IndexOptions, index_paths

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = f"{Path(__file__).resolve()}:SquareDetector"  # the file form of a plug-in spec
COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}  # a saturated square of this colour is that object
BROKEN = (255, 0, 255)  # a frame holding a magenta pixel makes the detector raise


class SquareDetector:
    """Finds axis-aligned solid squares of the ``COLOURS`` (each channel within 40 of the colour), one
    object per 4-connected region: exact pixel-edge boxes; score 0.9 for regions of 16+ pixels a side,
    else 0.3. Raises on a frame with a magenta pixel (a detector failing on one frame)."""

    labels = tuple(COLOURS)

    def detect(self, images, min_score=0.3):
        from scipy import ndimage

        out = []
        for im in images:
            a = np.asarray(im.convert("RGB")).astype(np.int16)
            if (np.abs(a - BROKEN).max(axis=2) == 0).any():
                raise RuntimeError("magenta confuses me")
            found = []
            for label, rgb in COLOURS.items():
                mask = np.abs(a - rgb).max(axis=2) <= 40
                regions, _ = ndimage.label(mask)
                for sl in ndimage.find_objects(regions):
                    y, x = sl
                    score = 0.9 if min(y.stop - y.start, x.stop - x.start) >= 16 else 0.3
                    if score >= min_score:
                        found.append((label, score, (x.start, y.start, x.stop, y.stop)))
            out.append(sorted(found, key=lambda d: (d[2][1], d[2][0])))
        return out


def _photos():
    from skimage import data

    return [np.ascontiguousarray(im[..., :3]) for im in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket())]


def make_frames(folder: Path, n: int = 6, seed: int = 0, size=(160, 120), prefix: str = "f") -> dict:
    """``n`` PNG frames (real photos, resized) with 0-3 pasted squares each; returns name -> ground truth
    [(label, score, (x0, y0, x1, y1))] of the squares the detector keeps at min_score 0.5."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    photos = _photos()
    for i in range(n):
        im = np.asarray(Image.fromarray(photos[i % len(photos)]).resize(size, Image.BILINEAR)).copy()
        # keep the photo's own pixels away from the square colours (a real red would be a real object here)
        for rgb in (*COLOURS.values(), BROKEN):
            near = np.abs(im.astype(np.int16) - rgb).max(axis=2) <= 60
            im[near] = (128, 128, 128)
        want = []
        taken = np.zeros(size[::-1], bool)
        for _ in range(int(rng.integers(0, 4))):
            label = str(rng.choice(list(COLOURS)))
            side = int(rng.choice([10, 20, 28]))
            x0, y0 = int(rng.integers(0, size[0] - side)), int(rng.integers(0, size[1] - side))
            if taken[max(0, y0 - 2) : y0 + side + 2, max(0, x0 - 2) : x0 + side + 2].any():
                continue  # squares never touch: one region each
            taken[y0 : y0 + side, x0 : x0 + side] = True
            im[y0 : y0 + side, x0 : x0 + side] = COLOURS[label]
            if side >= 16:
                want.append((label, 0.9, (x0, y0, x0 + side, y0 + side)))
        name = f"{prefix}{i:02d}.png"
        Image.fromarray(im).save(folder / name)
        truth[name] = sorted(want, key=lambda d: (d[2][1], d[2][0]))
    return truth


def stored(root: Path) -> list:
    """objects.parquet as sorted (video_id, frame_idx, entity, score, ymin, xmin, ymax, xmax, detector) tuples."""
    import pyarrow.parquet as pq

    t = pq.read_table(root / "objects.parquet")
    cols = ("video_id", "frame_idx", "entity", "score", "ymin", "xmin", "ymax", "xmax", "detector")
    return sorted(zip(*[t.column(c).to_pylist() for c in cols]))


def expected(root: Path, truth: dict, size=(160, 120), spec: str = PLUGIN) -> list:
    """The rows objects.parquet must hold: each frame's ground truth under its video id and frame number."""
    from mergeseek.indexing.store import IndexStore

    meta = IndexStore.open_for_read(root).read_meta().to_pylist()
    w, h = size
    rows = []
    for m in meta:
        for label, score, (x0, y0, x1, y1) in truth[Path(m["path"]).name]:
            rows.append((m["video_id"], m["frame_idx"], label, score, y0 / h, x0 / w, y1 / h, x1 / w, spec))
    return sorted(rows)


@pytest.fixture(scope="module")
def encoder():
    return build_encoder()


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    d = tmp_path_factory.mktemp("frames") / "shots"
    return d, make_frames(d)


def _index(paths, root, encoder, **kw):
    kw.setdefault("detect", PLUGIN)
    return index_paths(paths, root, encoder, IndexOptions(dedup=Dedup(enabled=False), **kw))


def _file_ids(root: Path) -> list:
    """The live ids of every shard that has an objects file, once per file (a frame without objects has
    no row in it: the file's presence says its shard was detected); each file's ids are its shard's."""
    import pyarrow.parquet as pq

    from mergeseek.indexing.store import IndexStore

    store = IndexStore.open_for_read(root)
    ids = []
    for shard in store.shard_names():
        p = root / "text" / f"{shard}.objects.parquet"
        if p.is_file():
            mine = store.read_shard(shard, columns=["id"], live=False).column("id").to_pylist()
            assert set(pq.read_table(p).column("id").to_pylist()) <= set(mine)
            ids += store.read_shard(shard, columns=["id"]).column("id").to_pylist()
    return sorted(ids)


def _live_ids(root: Path) -> list:
    from mergeseek.indexing.store import IndexStore

    return sorted(IndexStore.open_for_read(root).read_vectors()[0].tolist())


def test_plugin_objects_are_the_ground_truth_and_search_object_keeps_exactly_their_frames(tmp_path, frames, encoder,
                                                                                           monkeypatch):
    import json

    from typer.testing import CliRunner

    from mergeseek import encoders
    from mergeseek.cli import app
    from mergeseek.indexing.aic import objects_in_frames

    folder, truth = frames
    root = tmp_path / "ix"
    report = _index([folder], root, encoder)
    assert report.objects["frames"] == len(truth) and report.objects["failed_frames"] == 0
    assert stored(root) == expected(root, truth) != []
    assert any(line.startswith("objects (") for line in report.summary_lines())
    cats = {(v, f) for v, f, e, *_ in expected(root, truth) if e == "cat"}
    assert objects_in_frames(root, "CAT") == cats != set()
    monkeypatch.setattr(encoders, "Encoder", lambda **kw: encoder)
    res = CliRunner().invoke(app, ["search", "a cat", "--index", str(root), "--object", "cat", "-k", "50", "--json"])
    assert res.exit_code == 0, res.stderr
    assert {(h["video_id"], h["frame_idx"]) for h in json.loads(res.stdout)} == cats
    again = _index([folder], root, encoder)  # nothing new: the same rows, none twice
    assert again.frames_encoded == 0 and again.objects["detected_again"] == 0 and stored(root) == expected(root, truth)

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    client = TestClient(create_app(Engine(CachedSearcher(root, encoder, ngpu=0))))
    assert client.get("/api/health").json()["objects"] == sorted({e for _, _, e, *_ in expected(root, truth)})
    hits = client.post("/api/search", json={"events": ["x"], "object": "dog", "k": 50}).json()["hits"]
    assert {(h["video_id"], h["frame_idx"]) for h in hits} == {(v, f) for v, f, e, *_ in expected(root, truth) if e == "dog"}


def test_cli_index_detect_reports_the_objects_in_its_json(tmp_path, frames, encoder, monkeypatch):
    import json

    from typer.testing import CliRunner

    from mergeseek import encoders
    from mergeseek.cli import app

    folder, truth = frames
    monkeypatch.setattr(encoders, "Encoder", lambda **kw: encoder)
    root = tmp_path / "ix"
    res = CliRunner().invoke(app, ["index", str(folder), "--index", str(root), "--no-dedup", "--detect", PLUGIN,
                                   "--detect-min-score", "0.2", "--detect-workers", "2", "--json"])
    assert res.exit_code == 0, res.stderr
    objects = json.loads(res.stdout)["objects"]
    assert objects["detector"] == PLUGIN and objects["frames"] == len(truth)
    low = {n: [o for o in SquareDetector().detect([Image.open(folder / n)], 0.2)[0]] for n in truth}
    assert objects["rows"] == sum(map(len, low.values())) > sum(map(len, truth.values()))  # the 0.3 squares too
    assert stored(root) == expected(root, low)


def test_video_frames_take_their_real_frame_number(tmp_path, encoder):
    """Videos: the rows name the sampled frame's number (what search and submissions use), n is -1."""
    from test_indexing_support import write_video

    from mergeseek.indexing.aic import objects_in_frames

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "rg.mp4", [("red", 10), ("green", 10)])  # solid red (220, 30, 30) reads as "cat"
    write_video(videos / "bk.mp4", [("blue", 10), ("black", 10)])  # solid blue (30, 40, 220) as "dog"
    root = tmp_path / "ix"
    _index([videos], root, encoder, sampling="fps=1")
    assert objects_in_frames(root, "cat") == {("rg", 0)} and objects_in_frames(root, "dog") == {("bk", 0)}
    import pyarrow.parquet as pq

    rows = pq.read_table(root / "objects.parquet").to_pylist()
    assert len(rows) == 2 and {r["n"] for r in rows} == {-1}
    assert all(np.allclose([r["ymin"], r["xmin"], r["ymax"], r["xmax"]], [0, 0, 1, 1]) for r in rows)  # the whole frame


def test_a_detector_that_finds_nothing_leaves_an_empty_objects_file_and_search_says_so(tmp_path, frames, encoder):
    from mergeseek.errors import InputError
    from mergeseek.indexing.aic import objects_in_frames
    from mergeseek.retrieval.search import run_search

    folder, truth = frames
    root = tmp_path / "ix"
    report = _index([folder], root, encoder, detect_min_score=1.0)  # every square scores below 1
    assert report.objects["rows"] == 0 and stored(root) == [] and objects_in_frames(root, "cat") == set()
    with pytest.raises(InputError, match="no keyframe .* has a detection of 'cat'"):
        run_search(root, "a cat", object_name="cat")


def test_an_index_built_without_detect_gets_its_objects_later_without_encoding_again(tmp_path, frames, encoder):
    from mergeseek.indexing.aic import objects_in_frames
    from mergeseek.errors import InputError

    folder, truth = frames
    root = tmp_path / "ix"
    _index([folder], root, encoder, detect=None)
    with pytest.raises(InputError, match="--detect SPEC"):
        objects_in_frames(root, "cat")
    report = _index([folder], root, encoder)
    assert report.frames_encoded == 0 and report.objects["detected_again"] == len(truth)
    assert stored(root) == expected(root, truth)


def test_the_module_form_and_the_file_form_give_the_same_detector(frames):
    from PIL import Image

    from mergeseek.indexing.detect import get_detector

    folder, truth = frames
    images = [Image.open(folder / name) for name in sorted(truth)]
    by_module = get_detector("test_detect_index:SquareDetector").read(images)
    by_file = get_detector(PLUGIN).read(images)
    assert by_module == by_file
    assert [list(f.objects) for f in by_file] == [truth[n] for n in sorted(truth)]  # min score 0.5 by default
    low = get_detector(PLUGIN, min_score=0.2).read(images)
    assert sum(len(f.objects) for f in low) > sum(len(f.objects) for f in by_file)  # the 10-pixel squares, at 0.3


def test_a_frame_the_detector_fails_on_is_reported_once_and_the_others_kept(tmp_path, frames, encoder):
    import shutil

    from PIL import Image

    folder, truth = frames
    mine = tmp_path / "shots"
    shutil.copytree(folder, mine)
    bad = sorted(truth)[1]
    im = np.asarray(Image.open(mine / bad)).copy()
    im[0, 0] = BROKEN
    Image.fromarray(im).save(mine / bad)
    root = tmp_path / "ix"
    report = _index([mine], root, encoder)
    failed = [b for b in report.failed if "--detect" in b.reason]
    assert len(failed) == 1 and "magenta confuses me" in failed[0].reason and len(report.indexed) == 1
    assert report.objects["failed_frames"] == 1
    assert stored(root) == expected(root, {**truth, bad: []})  # every other frame's objects, exactly


def test_torchvision_model_with_random_weights_stores_what_the_model_finds(tmp_path, frames, encoder, one_torch_thread):
    """A torchvision detector through its spec: the stored rows are the model's own output on the
    same frames (built again here from the same seed), boxes as fractions of the frame."""
    import torch
    import torchvision
    from PIL import Image
    from torchvision.models import get_model_weights
    from torchvision.transforms.functional import pil_to_tensor

    folder, truth = frames
    spec = "torchvision:ssdlite320_mobilenet_v3_large:random,score_thresh=0.0105"
    root = tmp_path / "ix"
    report = _index([folder], root, encoder, detect=spec, detect_min_score=0.0)
    assert report.objects["failed_frames"] == 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=91, score_thresh=0.0105).eval()
    names = get_model_weights("ssdlite320_mobilenet_v3_large").DEFAULT.meta["categories"]
    from mergeseek.indexing.store import IndexStore

    meta = IndexStore.open_for_read(root).read_meta().to_pylist()
    want = []
    with torch.inference_mode():
        for m in meta:
            im = Image.open(m["path"]).convert("RGB")
            (o,) = model([pil_to_tensor(im).float() / 255.0])
            w, h = im.size
            for (x0, y0, x1, y1), s, c in zip(o["boxes"].tolist(), o["scores"].tolist(), o["labels"].tolist()):
                want.append((m["video_id"], m["frame_idx"], names[c], s, y0 / h, x0 / w, y1 / h, x1 / w, spec))
    got = stored(root)
    assert len(got) == len(want) > 0
    for g, w in zip(got, sorted(want)):
        assert g[:3] == w[:3] and g[8] == spec and np.allclose(g[3:8], w[3:8], atol=1e-5)


@pytest.mark.parametrize("spec, code, words", [
    ("bogus", 2, "unknown detector"),
    ("torchvision:no_such_model:x.pt", 2, "not a torchvision detection model"),
    ("torchvision:fasterrcnn_mobilenet_v3_large_fpn", 2, "give the weights file"),
    ("torchvision:fasterrcnn_mobilenet_v3_large_fpn:{tmp}/missing.pt", 3, "no such weights file"),
    ("torchvision:fasterrcnn_mobilenet_v3_large_fpn:random,merge=r=8", 2, "not merge"),
    ("torchvision:fasterrcnn_mobilenet_v3_large_fpn:random,min_size=big", 2, "take numbers"),
    ("no_such_package_xyz.detectors:make", 7, "pip install"),
    ("{tmp}/missing.py:make", 3, "does not exist"),
    ("{here}:NoSuchThing", 2, "no callable 'NoSuchThing'"),
    ("{here}:COLOURS", 2, "no callable"),
    ("{here}:make_frames", 2, "make_frames() failed (TypeError"),
    ("{here}:SquareDetector,weights=x.pt", 2, "takes no options"),
    ("reference,weights={tmp}/none.pt", 6, "not present"),
    ("reference,colour=red", 2, "unknown detect option"),
    ("reference,device=tpu", 2, "device=tpu is not available here"),
])
def test_a_bad_spec_is_one_line_before_any_work(tmp_path, spec, code, words, frames):
    from typer.testing import CliRunner

    from mergeseek.cli import app

    folder, _ = frames
    spec = spec.format(tmp=tmp_path, here=Path(__file__).resolve())
    res = CliRunner().invoke(app, ["index", str(folder), "--index", str(tmp_path / "ix"), "--detect", spec,
                                   "--model", "no-such-model-the-run-never-loads"])
    assert res.exit_code == code, (res.exit_code, res.stderr, res.stdout)
    assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "ix").exists()  # nothing written: the spec failed first


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_indexing_support import build_encoder
from mergeseek.indexing import Dedup, IndexOptions, index_paths
from mergeseek.indexing import detect

real, calls = detect.write_objects, []

def dying(*a, **k):  # the second shard is committed, then the process dies before its objects are written
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)

detect.write_objects = dying
index_paths({folders!r}, {root!r}, build_encoder(), IndexOptions(dedup=Dedup(enabled=False), detect={spec!r}, shard_size=1))
"""


@pytest.mark.slow  # starting Ray takes a while
def test_under_ray_the_driver_detects_at_the_end_and_the_objects_are_the_single_process_ones(tmp_path, encoder):
    pytest.importorskip("ray")
    from test_indexing_support import local_ray, write_video

    from mergeseek.indexing.distributed import RayOptions, index_paths_ray

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "rg.mp4", [("red", 10), ("green", 10)])
    write_video(videos / "bk.mp4", [("blue", 10), ("black", 10)])
    _index([videos], tmp_path / "one", encoder, sampling="fps=1")
    with local_ray():
        report = index_paths_ray([videos], tmp_path / "ray", encoder,
                                 IndexOptions(sampling="fps=1", dedup=Dedup(enabled=False), detect=PLUGIN), RayOptions(workers=1))
    assert report.objects["detected_again"] == report.objects["frames"] == 4  # all of them, after the encoding
    assert stored(tmp_path / "ray") == stored(tmp_path / "one") != []


@pytest.mark.slow  # a second process builds the encoder again (~25 s on this machine)
def test_kill_9_during_a_detect_run_then_resume_gives_every_row_its_objects_once(tmp_path, encoder):
    from mergeseek.indexing.store import IndexStore

    truth = {}
    folders = []
    for i in range(3):
        d = tmp_path / "media" / f"clip{i}"
        truth.update(make_frames(d, n=3, seed=10 + i, prefix=f"c{i}-"))
        folders.append(str(d))
    root = tmp_path / "ix"
    script = _KILLED_RUN.format(tests=str(Path(__file__).parent), folders=folders, root=str(root), spec=PLUGIN)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert len(IndexStore.open_for_read(root).manifest.sources) == 2  # two sources committed, one objects file
    assert len(_file_ids(root)) == 3
    report = _index([Path(f) for f in folders], root, encoder)
    assert report.frames_encoded == 3 and report.objects["detected_again"] == 3
    assert _file_ids(root) == _live_ids(root) and len(_live_ids(root)) == 9  # every row once
    assert stored(root) == expected(root, truth)


def test_compact_merge_export_and_repair_keep_the_objects(tmp_path, frames, encoder):
    import shutil

    import pyarrow.parquet as pq

    from mergeseek.indexing.export import export_index
    from mergeseek.indexing.merge import merge_indexes
    from mergeseek.indexing.repair import compact_index, repair_index

    folder, truth = frames
    mine = tmp_path / "shots"
    shutil.copytree(folder, mine)
    other = tmp_path / "more"
    more = make_frames(other, n=3, seed=5, prefix="m")
    root = tmp_path / "ix"
    _index([mine, other], root, encoder)  # one shard: both sources
    first = sorted(truth)[0]
    (mine / first).touch()  # a changed fingerprint... (same pixels): re-indexed into a new shard, dead rows left
    os.utime(mine / first, (1, 1))
    _index([mine, other], root, encoder)
    want = expected(root, {**truth, **more})
    assert stored(root) == want
    compact = compact_index(root)
    assert compact["shards_rewritten"] >= 1 and compact["after"]["dead_rows"] == 0
    assert stored(root) == want and _file_ids(root) == _live_ids(root)
    merged = tmp_path / "merged"
    merge_indexes([root], merged)
    assert stored(merged) == expected(merged, {**truth, **more}) and _file_ids(merged) == _live_ids(merged)
    out = export_index(root, tmp_path / "export")
    table = pq.read_table(Path(out.out) / "metadata" / "metadata_0.parquet").to_pylist()
    exported = sorted((r["video_id"], r["frame_idx"], o["entity"], o["score"], o["ymin"], o["xmin"], o["ymax"], o["xmax"],
                       PLUGIN) for r in table for o in r["objects"])
    assert exported == want
    repair = repair_index(root)
    assert repair.faiss == "ok" and stored(root) == want


def test_release_objects_and_detector_objects_side_by_side_and_what_force_keeps(tmp_path, encoder):
    """An AI Challenge release with the organisers' objects: --detect adds its own rows beside theirs
    (``detector`` names who found each); --force without --detect leaves only the release's, with
    --detect both again; never a row twice."""
    from test_aic_support import make_release

    from mergeseek.indexing.aic import objects_in_frames

    release = make_release(tmp_path / "release")
    kf = release / "Keyframes_L21" / "keyframes" / "L21_V002"
    from PIL import Image

    im = np.full((96, 128, 3), 128, np.uint8)
    im[20:52, 30:62] = COLOURS["cat"]
    Image.fromarray(im).save(kf / "002.jpg", quality=98)
    root = tmp_path / "ix"
    organisers = None

    def rows():
        got = stored(root)
        return [r for r in got if r[8] == ""], [r for r in got if r[8] == PLUGIN]

    _index([release], root, encoder)
    theirs, ours = rows()
    organisers = theirs
    assert {r[2] for r in theirs} == {"Person", "Dog"} and [(r[0], r[2]) for r in ours] == [("L21_V002", "cat")]
    assert objects_in_frames(root, "dog") and objects_in_frames(root, "cat") == {(ours[0][0], ours[0][1])}
    import pyarrow.parquet as pq

    n = pq.read_table(root / "objects.parquet").to_pylist()
    assert {r["n"] for r in n if r["detector"]} == {2}  # a keyframe's number, as in the organisers' rows
    _index([release], root, encoder, force=True, detect=None)
    assert rows() == (organisers, [])
    _index([release], root, encoder, force=True)
    assert rows() == (organisers, ours)
    _index([release], root, encoder)  # nothing to do: nothing twice
    assert rows() == (organisers, ours)


def test_reference_spec_with_a_weights_file_and_a_merge_stores_what_that_detector_finds(tmp_path, frames, encoder,
                                                                                       one_torch_thread):
    """``--detect reference,weights=PATH[,merge=...]`` end to end with a small randomly initialised
    detector in the reference's export format (the trained weights are not needed to test the plumbing):
    the stored rows are that detector's own output on the frames, with and without a merge."""
    import torch
    from PIL import Image

    ref = pytest.importorskip("mergeseek.eval.detector_reference")
    cfg = ref.DetectorConfig(depth=2, embed_dim=48, num_heads=3, head_dim=16, init="", freeze_blocks=0, max_detections=5)
    torch.manual_seed(0)
    path = tmp_path / "tiny-detector.pt"
    torch.save({"format": ref.EXPORT_FORMAT, "config": cfg.to_dict(), "state_dict": ref.build_detector(cfg).state_dict()},
               path)
    folder, truth = frames
    from mergeseek.indexing.store import IndexStore

    for merge in ("none", "(r=8,method=lsh)"):
        spec = f"reference,weights={path},merge={merge}"
        root = tmp_path / f"ix-{merge}"
        report = _index([folder], root, encoder, detect=spec, detect_min_score=0.0)
        assert report.objects["failed_frames"] == 0
        det = ref.load_reference_detector(path, merge=None if merge == "none" else merge.strip("()"))
        want = []
        for m in IndexStore.open_for_read(root).read_meta().to_pylist():
            im = Image.open(m["path"])
            w, h = im.size
            for label, score, (x0, y0, x1, y1) in det.detect([im], 0.0)[0]:
                want.append((m["video_id"], m["frame_idx"], label, score, y0 / h, x0 / w, y1 / h, x1 / w, spec))
        got = stored(root)
        assert len(got) == len(want) == 5 * len(truth)
        for g, w_ in zip(got, sorted(want)):
            assert g[:3] == w_[:3] and g[8] == spec and np.allclose(g[3:8], w_[3:8], atol=1e-5)


@pytest.mark.skipif(not (ROOT / "eval" / "reference" / "reference-detector.pt").is_file(),
                    reason="eval/reference/reference-detector.pt is not there yet (issue #31's reference detector)")
def test_the_reference_detector_runs_end_to_end(tmp_path, frames, encoder):
    folder, truth = frames
    root = tmp_path / "ix"
    report = _index([folder], root, encoder, detect="reference")
    assert report.objects["frames"] == len(truth) and report.objects["failed_frames"] == 0
    from mergeseek.eval.detector_reference import load_reference_detector

    labels = set(load_reference_detector().labels)
    import pyarrow.parquet as pq

    t = pq.read_table(root / "objects.parquet").to_pylist() if (root / "objects.parquet").is_file() else []
    assert all(r["entity"] in labels and r["detector"] == "reference" and 0 <= r["xmin"] <= r["xmax"] <= 1 for r in t)


def test_search_object_keeps_every_row_stored_at_a_lower_min_score_and_names_what_is_there(tmp_path, frames,
                                                                                           encoder):
    """``--detect-min-score 0.2`` stores the small squares (score 0.3) too: the filter keeps their frames
    (it does not filter again at the release's 0.5), and an absent name lists the stored ones."""
    from mergeseek.errors import InputError
    from mergeseek.indexing.aic import object_names, objects_in_frames
    from mergeseek.retrieval.search import run_search

    folder, truth = frames
    root = tmp_path / "ix"
    _index([folder], root, encoder, detect_min_score=0.2)
    rows = stored(root)
    assert any(r[3] == 0.3 for r in rows) and all(r[3] >= 0.2 for r in rows)
    for label in COLOURS:
        assert objects_in_frames(root, label) == {(v, f) for v, f, e, *_ in rows if e == label}
        assert objects_in_frames(root, label, min_score=0.5) == {(v, f) for v, f, e, s, *_ in rows
                                                                 if e == label and s >= 0.5}
    assert object_names(root) == sorted({r[2] for r in rows})
    with pytest.raises(InputError, match="its objects are: cat, dog"):
        run_search(root, "a zebra", object_name="zebra")
