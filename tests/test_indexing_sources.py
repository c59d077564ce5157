"""Frame sources without a model: sampling counts and timestamps, scene cuts, near-duplicates,
keyframe/image folder layouts and bad inputs (real files in, frames or one clear error out)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_indexing_support import sample_videos, write_video  # noqa: F401  (fixture)

from mergeseek.errors import ConfigError, InputError
from mergeseek.indexing.dedup import Dedup, DuplicateFilter, phash
from mergeseek.indexing.sampling import Sampling, fps_indices
from mergeseek.indexing.sources import MediaSource, SourceReader, discover


def _video(path: Path) -> MediaSource:
    return MediaSource("video", path, path.stem, "x")


def _frames(source: MediaSource, sampling: str, batch_size: int = 8):
    return [f for b in SourceReader(source, Sampling.parse(sampling), batch_size).batches() for f in b]


def _length(path: Path) -> tuple[int, float]:
    import decord

    vr = decord.VideoReader(str(path))
    return len(vr), float(vr.get_avg_fps())


# ---------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("spec", ["fps=1", "fps=2.5", "every=10", "uniform=16", "scene=0.2", "all"])
def test_sampling_round_trips(spec):
    assert str(Sampling.parse(spec)) == spec
    assert Sampling.parse(str(Sampling.parse(spec))) == Sampling.parse(spec)


@pytest.mark.parametrize("spec", ["fps=0", "every=0", "every=2.5", "uniform=-1", "scene=1.5", "sometimes", "fps=x"])
def test_bad_sampling_is_a_config_error(spec):
    with pytest.raises(ConfigError):
        Sampling.parse(spec)


def test_only_one_sampling_option_at_a_time():
    assert Sampling.from_options() == Sampling("fps", 1.0)
    assert Sampling.from_options(every=5) == Sampling("every", 5)
    with pytest.raises(ConfigError, match="--fps and --every"):
        Sampling.from_options(fps=1, every=5)


@pytest.mark.parametrize("name", ["bikes", "bigbuckbunny"])
@pytest.mark.parametrize("spec", ["fps=1", "fps=3", "every=7", "uniform=5", "all"])
def test_sampled_counts_match_length_and_rate(sample_videos, name, spec):  # noqa: F811
    path = sample_videos[name]
    n, video_fps = _length(path)
    idx, _ = SourceReader(_video(path), Sampling.parse(spec)).frame_indices()
    mode, _, value = spec.partition("=")
    expected = {
        "fps": lambda: math.ceil(n / video_fps * float(value or 0) - 1e-9),
        "every": lambda: math.ceil(n / int(value or 1)),
        "uniform": lambda: min(n, int(value or 0)),
        "all": lambda: n,
    }[mode]()
    assert len(idx) == expected
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < n


def test_fps_sampling_timestamps_of_bikes(sample_videos):  # noqa: F811
    # bikes.mp4: 250 frames at 25 fps = 10 s, so 1 fps gives t = 0..9 s at frames 0, 25, ..., 225.
    frames = _frames(_video(sample_videos["bikes"]), "fps=1", batch_size=4)
    assert [f.frame_idx for f in frames] == list(range(0, 250, 25))
    assert [f.pts_time for f in frames] == pytest.approx(list(range(10)), abs=1e-3)
    assert all(f.video_id == "bikes" and f.image.shape == (272, 640, 3) for f in frames)


def test_synthetic_timestamps_follow_the_written_rate(tmp_path):
    p = write_video(tmp_path / "v.mp4", [("red", 12), ("blue", 12), ("green", 6)], fps=12.0)
    frames = _frames(_video(p), "fps=2")
    assert [f.frame_idx for f in frames] == [0, 6, 12, 18, 24]
    assert [f.pts_time for f in frames] == pytest.approx([0, 0.5, 1.0, 1.5, 2.0], abs=1e-3)
    assert fps_indices(30, 12.0, 2.0).tolist() == [0, 6, 12, 18, 24]


def test_scene_sampling_finds_the_cuts_of_a_synthetic_video(tmp_path):
    p = write_video(tmp_path / "v.mp4", [("red", 9), ("blue", 7), ("yellow", 11)])
    idx, _ = SourceReader(_video(p), Sampling.parse("scene=0.15")).frame_indices()
    assert idx.tolist() == [0, 9, 16]


def test_scene_sampling_finds_several_shots_in_bikes(sample_videos):  # noqa: F811
    idx, _ = SourceReader(_video(sample_videos["bikes"]), Sampling.parse("scene")).frame_indices()
    assert len(idx) > 1 and idx[0] == 0
    # bikes.mp4 has hard cuts at frames 30, 137 and 187 (seen by eye); each must open a shot.
    for cut in (30, 137, 187):
        assert cut in idx.tolist()


# ---------------------------------------------------------------------------- near-duplicates
def test_phash_ignores_noise_but_not_content_or_colour():
    rng = np.random.default_rng(0)
    from skimage import data

    photo = np.ascontiguousarray(data.astronaut()[..., :3])
    noisy = np.clip(photo.astype(int) + rng.integers(-6, 7, photo.shape), 0, 255).astype(np.uint8)
    rule = Dedup()
    assert rule.is_duplicate(phash(noisy), phash(photo))
    assert not rule.is_duplicate(phash(np.ascontiguousarray(data.coffee()[..., :3])), phash(photo))
    red = np.full((48, 64, 3), (220, 30, 30), np.uint8)
    blue = np.full((48, 64, 3), (30, 40, 220), np.uint8)
    assert not rule.is_duplicate(phash(red), phash(blue))  # dHash alone would call these equal
    assert not Dedup(enabled=False).is_duplicate(phash(photo), phash(photo))


def test_static_shot_is_deduplicated(tmp_path):
    p = write_video(tmp_path / "news.mp4", [("white", 30), ("red", 10)])
    # The moving square repeats every 8 frames; fps=1 samples frames 0, 10, 20, 30: the first three
    # differ only by that square's position, a near-duplicate of a static shot.
    frames = _frames(_video(p), "fps=1")
    filt = DuplicateFilter(Dedup())
    kept = [f.frame_idx for f in frames if filt.keep(phash(f.image))]
    assert kept == [0, 30] and filt.skipped == 2


# ---------------------------------------------------------------------------- folder layouts
def _jpg(path: Path, colour) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 40, 3), colour, np.uint8)).save(path)


def test_hcmc_keyframe_layout_uses_the_map_csv(tmp_path):
    root = tmp_path / "aic"
    for n, c in ((1, 10), (2, 120), (10, 240)):
        _jpg(root / "keyframes" / "L01_V001" / f"{n:03d}.jpg", (c, c, c))
    _jpg(root / "keyframes" / "L01_V002" / "1.jpg", (50, 90, 10))
    (root / "map-keyframes").mkdir()
    (root / "map-keyframes" / "L01_V001.csv").write_text("n,pts_time,fps,frame_idx\n1,0.0,25.0,0\n2,4.2,25.0,105\n10,61.36,25.0,1534\n")
    sources, bad = discover([root])
    assert not bad
    assert [(s.kind, s.video_id) for s in sources] == [("keyframes", "L01_V001"), ("keyframes", "L01_V002")]
    frames = _frames(sources[0], "fps=1")
    assert [(f.frame_idx, f.pts_time) for f in frames] == [(0, 0.0), (105, 4.2), (1534, 61.36)]
    assert frames[2].path.endswith("010.jpg")
    # No map for V002: the keyframe number stands in for the frame index, the time is unknown.
    (f,) = _frames(sources[1], "fps=1")
    assert f.frame_idx == 1 and math.isnan(f.pts_time)


def test_image_folder_skips_unreadable_images(tmp_path):
    d = tmp_path / "photos"
    _jpg(d / "a.jpg", (200, 0, 0))
    _jpg(d / "c.png", (0, 0, 200))
    (d / "b.jpg").write_bytes(b"this is not a jpeg")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("ignored")
    (src,) = discover([d])[0]
    assert (src.kind, src.video_id) == ("images", "photos")
    reader = SourceReader(src, Sampling())
    frames = [f for b in reader.batches() for f in b]
    assert [Path(f.path).name for f in frames] == ["a.jpg", "c.png"]
    assert sorted(Path(b.path).name for b in reader.skipped) == ["b.jpg", "empty.png"]
    assert all("unreadable image" in b.reason for b in reader.skipped)


def test_missing_and_empty_folders_are_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no media here")
    with pytest.raises(InputError, match="no videos"):
        discover([tmp_path / "empty"])


def test_same_stem_in_two_folders_gets_distinct_ids(tmp_path):
    for sub, colour in (("a", "red"), ("b", "blue")):
        (tmp_path / sub).mkdir()
        write_video(tmp_path / sub / "clip.mp4", [(colour, 3)])
    ids = sorted(s.video_id for s in discover([tmp_path])[0])
    assert ids == ["a/clip", "b/clip"]


# ---------------------------------------------------------------------------- bad video files
def _bad_videos(tmp_path: Path, bikes: Path) -> dict:
    raw = bikes.read_bytes()
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "truncated.mp4").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "notes.mp4").write_text("not a video at all")
    mj = write_video(tmp_path / "mj.avi", [("red", 5)], fourcc="MJPG").read_bytes()
    assert mj.count(b"MJPG") >= 1
    (tmp_path / "codec.avi").write_bytes(mj.replace(b"MJPG", b"QQQQ"))  # a codec tag no decoder knows
    (tmp_path / "mj.avi").unlink()
    return {
        "zero.mp4": "empty file",
        "truncated.mp4": "cannot be decoded",
        "notes.mp4": "cannot be decoded",
        "codec.avi": "unsupported codec",
    }


def test_bad_video_files_raise_one_clear_input_error(tmp_path, sample_videos):  # noqa: F811
    expected = _bad_videos(tmp_path, sample_videos["bikes"])
    for name, words in expected.items():
        with pytest.raises(InputError, match=words) as info:
            _frames(_video(tmp_path / name), "fps=1")
        assert name in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- one reader per format
def test_indexing_and_eval_share_one_reader_per_format(tmp_path):
    import mergeseek.eval.datasets.base as eval_base
    import mergeseek.eval.datasets.keyframes as eval_keyframes
    import mergeseek.indexing.formats as formats
    import mergeseek.indexing.sources as sources

    assert eval_base.IMAGE_EXTS is formats.IMAGE_EXTS is sources.IMAGE_EXTS
    assert eval_base.list_images is formats.list_images and eval_base.natural_key is formats.natural_key
    assert eval_keyframes.read_keyframe_map is sources.read_keyframe_map is formats.read_keyframe_map
    # the same folder lists the same files in the same order on both sides (.tif included)
    d = tmp_path / "mixed"
    for name in ("10.jpg", "2.png", "1.tif", "b10.jpg", "b9.webp", "notes.txt"):
        if name.endswith(".txt"):
            (d / name).write_text("x")
        else:
            _jpg(d / name, (20, 20, 20))
    (src,) = discover([d])[0]
    names = [Path(f.path).name for f in _frames(src, "all")]
    assert names == [p.name for p in eval_base.list_images(d)] == ["1.tif", "2.png", "10.jpg", "b9.webp", "b10.jpg"]


def test_image_folder_decodes_in_parallel_with_the_serial_frames_and_skips(tmp_path, photos):
    """Keyframes decode batch by batch on a thread pool: the same frames, pixels, batches and
    skipped files (in file order) as one thread, bad files mixed in."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    folder = tmp_path / "keyframes" / "L01_V001"
    folder.mkdir(parents=True)
    bad = {3: b"", 6: b"not a jpeg at all", 7: b"\xff\xd8\xff\xe0 truncated"}
    for n in range(1, 12):
        path = folder / f"{n:03d}.jpg"
        if n in bad:
            path.write_bytes(bad[n])
        else:
            Image.fromarray(photos[n % len(photos)][: 64 + n, :80]).save(path, quality=90)
    src = MediaSource("keyframes", folder, "L01_V001", "x")
    serial = SourceReader(src, Sampling(), 3)
    want = list(serial.batches())
    with ThreadPoolExecutor(4) as pool:
        threaded = SourceReader(src, Sampling(), 3, map_fn=pool.map)
        got = list(threaded.batches())
    assert [len(b) for b in got] == [len(b) for b in want] == [3, 3, 2]  # full batches of good frames
    assert [f.frame_idx for b in got for f in b] == [1, 2, 4, 5, 8, 9, 10, 11]
    for bg, bw in zip(got, want):
        for fg, fw in zip(bg, bw):
            assert fg.path == fw.path and np.array_equal(fg.image, fw.image)
    assert [s.path for s in threaded.skipped] == [s.path for s in serial.skipped] == [str(folder / f"{n:03d}.jpg") for n in (3, 6, 7)]
    assert "empty file" in threaded.skipped[0].reason and all("unreadable" in s.reason for s in threaded.skipped[1:])
