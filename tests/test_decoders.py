"""Decoding behind one interface: decord2 and torchcodec agree on frames and timestamps, common
codecs decode (files made by ffmpeg here), variable-frame-rate video is sampled by time, and a
failed random access falls back to sequential decoding."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_indexing_support import COLOURS, encoder, index_contents, sample_videos, write_video  # noqa: F401

from mergeseek.errors import ConfigError, InputError
from mergeseek.indexing import Dedup, IndexOptions, formats, index_paths
from mergeseek.indexing.decoders import BACKENDS, DecodeError, open_video
from mergeseek.indexing.sampling import Sampling, fps_indices
from mergeseek.indexing.sources import MediaSource, SourceReader

# torchcodec must load its FFmpeg before decord does (see indexing.decoders._import): at collection.
if importlib.util.find_spec("torchcodec") is not None:
    try:
        import torchcodec.decoders  # noqa: F401

        TORCHCODEC_WHY = ""
    except Exception as exc:  # pragma: no cover - depends on the machine
        TORCHCODEC_WHY = f"torchcodec does not load here: {exc}"
else:  # pragma: no cover
    TORCHCODEC_WHY = "torchcodec is not installed (pip install torchcodec)"

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg is not installed (apt-get install ffmpeg)")
BACKEND_PARAMS = [
    "decord",
    pytest.param("torchcodec", marks=pytest.mark.skipif(bool(TORCHCODEC_WHY), reason=TORCHCODEC_WHY or "-")),
]


def _encoders() -> str:
    if FFMPEG is None:
        return ""
    return subprocess.run([FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True).stdout


def _ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-v", "error", "-y", *args], check=True, capture_output=True)


@needs_ffmpeg
@pytest.mark.skipif(bool(TORCHCODEC_WHY), reason=TORCHCODEC_WHY or "-")
@pytest.mark.parametrize("name, args", [
    ("offset.mp4", ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-output_ts_offset", "2"]),
    ("offset.mkv", ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-output_ts_offset", "2"]),
    ("broadcast.ts", ["-c:v", "mpeg2video"]),  # MPEG-TS starts at 1.4 s
])
def test_backends_agree_on_times_of_a_stream_that_does_not_start_at_zero(tmp_path, name, args):
    """Times count from the first frame with either decoder: indexing a file again with the other
    decoder gives the same pts_time (and so the same submissions)."""
    path = tmp_path / name
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=2", *args, str(path))
    a, b = open_video(path, "decord"), open_video(path, "torchcodec")
    assert len(a) == len(b) == 50
    want = np.arange(50) / 25
    assert np.abs(a.timestamps - want).max() < 1e-4 and np.abs(b.timestamps - want).max() < 1e-4


# ---------------------------------------------------------------------------- sample videos
@pytest.mark.skipif(bool(TORCHCODEC_WHY), reason=TORCHCODEC_WHY or "-")
@pytest.mark.parametrize("name", ["bikes", "bigbuckbunny"])
def test_backends_agree_on_timestamps_and_frames_of_the_sample_videos(sample_videos, name):  # noqa: F811
    a, b = open_video(sample_videos[name], "decord"), open_video(sample_videos[name], "torchcodec")
    assert len(a) == len(b) > 100
    # decord keeps times as float32: equal to the float64 of torchcodec after rounding to 1 us
    assert np.array_equal(np.round(a.timestamps, 6), np.round(b.timestamps, 6))
    assert np.all(np.diff(a.timestamps) > 0)
    idx = [0, 1, len(a) // 3, len(a) // 2, len(a) - 1]
    fa, fb = a.get_batch(idx), b.get_batch(idx)
    assert fa.shape == fb.shape and fa.dtype == fb.dtype == np.uint8
    assert np.abs(fa.astype(int) - fb.astype(int)).mean() < 0.5  # same FFmpeg colour conversion, near bit-exact
    # the sampled indices, and so the index rows, are the same whichever backend decodes (scene
    # cuts are found on thumbnails each backend scales itself, so they may move by a frame)
    for spec in ("fps=1", "fps=3", "uniform=7", "every=9"):
        ia, _ = SourceReader(MediaSource("video", sample_videos[name], name, "x"), Sampling.parse(spec)).frame_indices()
        ib, _ = SourceReader(MediaSource("video", sample_videos[name], name, "x"), Sampling.parse(spec),
                             decoder="torchcodec").frame_indices()
        assert ia.tolist() == ib.tolist(), spec


# ---------------------------------------------------------------------------- codecs
CODECS = {  # name: (encoder needed, file, ffmpeg output arguments)
    "av1-aom": ("libaom-av1", "av1.mp4", ["-c:v", "libaom-av1", "-cpu-used", "8", "-crf", "30"]),
    "av1-svt": ("libsvtav1", "av1svt.mkv", ["-c:v", "libsvtav1", "-preset", "12", "-svtav1-params", "fast-decode=1"]),
    "vp9": ("libvpx-vp9", "vp9.webm", ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "500k"]),
    "hevc": ("libx265", "hevc.mp4", ["-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error"]),
    "h264-10bit": ("libx264", "h264_10.mp4", ["-c:v", "libx264", "-pix_fmt", "yuv420p10le", "-profile:v", "high10"]),
}


@pytest.fixture(scope="module")
def codec_files(tmp_path_factory):
    """Each codec from one source clip: 1 s red, 1 s blue at 10 fps, 64x64."""
    d = tmp_path_factory.mktemp("codecs")
    src = write_video(d / "src.avi", [("red", 10), ("blue", 10)], fps=10.0, size=(64, 64), fourcc="MJPG")
    have = _encoders()
    out = {}
    for name, (enc, fname, args) in CODECS.items():
        if f" {enc} " in have:
            _ffmpeg("-i", str(src), *args, str(d / fname))
            out[name] = d / fname
    return out


@needs_ffmpeg
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("codec", list(CODECS))
def test_common_codecs_decode(codec_files, codec, backend):
    if codec not in codec_files:
        pytest.skip(f"ffmpeg here has no {CODECS[codec][0]} encoder")
    vr = open_video(codec_files[codec], backend)
    assert len(vr) == 20
    assert vr.timestamps == pytest.approx(np.arange(20) / 10.0, abs=1e-3)
    frames = vr.get_batch([0, 9, 10, 19])
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    red, blue = np.array(COLOURS["red"]), np.array(COLOURS["blue"])
    means = frames[:, 16:, 16:].reshape(4, -1, 3).mean(1)  # away from the moving grey square
    for m, want in zip(means, (red, red, blue, blue)):
        assert np.abs(m - want).max() < 16, (codec, backend, m)
    # indexing reads it whole through the same reader
    got = [f for b in SourceReader(MediaSource("video", codec_files[codec], codec, "x"), Sampling.parse("fps=2"),
                                   decoder=backend).batches() for f in b]
    assert [f.frame_idx for f in got] == [0, 5, 10, 15]


# ---------------------------------------------------------------------------- variable frame rate
@pytest.fixture(scope="module")
def vfr_video(tmp_path_factory):
    """2 s at 5 fps, then 2 s at 30 fps, in one H.264 file with the real (variable) timestamps."""
    if FFMPEG is None or " libx264 " not in _encoders():
        pytest.skip("needs ffmpeg with libx264")
    d = tmp_path_factory.mktemp("vfr")
    path = d / "vfr.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=5:duration=2",
            "-f", "lavfi", "-i", "testsrc=size=64x48:rate=30:duration=2",
            "-filter_complex", "[0:v]settb=1/90000[a];[1:v]settb=1/90000[b];[a][b]concat=n=2:v=1:a=0[v]",
            "-map", "[v]", "-fps_mode", "vfr", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path))
    probe = subprocess.run([shutil.which("ffprobe") or "ffprobe", "-v", "error", "-select_streams", "v:0",
                            "-show_entries", "frame=pts_time", "-of", "csv=p=0", str(path)],
                           capture_output=True, text=True, check=True).stdout
    pts = np.array(sorted(float(x.strip().strip(",")) for x in probe.split() if x.strip()))
    assert len(pts) == 70
    return path, pts


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("fps", [1.0, 3.0, 4.0])
def test_fps_sampling_of_a_vfr_video_follows_the_timestamps(vfr_video, backend, fps):
    path, pts = vfr_video  # pts as ffprobe sees them: an independent reading of the file
    vr = open_video(path, backend)
    assert np.allclose(vr.timestamps, pts, atol=1e-5)
    frames = [f for b in SourceReader(MediaSource("video", path, "vfr", "x"), Sampling.parse(f"fps={fps:g}"),
                                      decoder=backend).batches() for f in b]
    duration = pts[-1] + np.median(np.diff(pts))
    targets = np.arange(int(np.ceil(duration * fps - 1e-4))) / fps
    # naive reference: for each requested time, the frame with the nearest pts (the first on a tie)
    want = sorted({int(np.flatnonzero(np.isclose(np.abs(pts - t), np.abs(pts - t).min(), atol=1e-9))[0]) for t in targets})
    assert [f.frame_idx for f in frames] == want
    for f in frames:
        assert f.pts_time == pytest.approx(pts[f.frame_idx], abs=1e-5)
    # the average rate would have sampled other frames (so this test tells the two apart)
    if fps == 1.0:
        assert [f.frame_idx for f in frames] == [0, 5, 10, 40]
        assert fps_indices(len(pts), vr.avg_fps, fps).tolist() != [0, 5, 10, 40]


def test_constant_rate_sampling_by_time_equals_sampling_by_rate(sample_videos):  # noqa: F811
    vr = open_video(sample_videos["bikes"])
    for fps in (0.5, 1, 2.5, 3, 7, 25):
        assert Sampling.parse(f"fps={fps:g}").select(vr.timestamps, vr.avg_fps).tolist() == \
            fps_indices(len(vr), vr.avg_fps, fps).tolist(), fps


# ---------------------------------------------------------------------------- fallback and errors
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_sequential_fallback_gives_the_same_frames_as_random_access(sample_videos, backend, monkeypatch):  # noqa: F811
    path = sample_videos["bikes"]
    want = [0, 7, 30, 31, 100, 249]
    ref = open_video(path, backend).get_batch(want)
    vr = open_video(path, backend)
    # open_video decodes the first frame when FFmpeg is on PATH (to know whether to fall back to it)
    probe = [] if vr._shape is not None else [[0]]
    calls = []

    def refuse(indices):  # random access broken, as on a WebM without Cues
        calls.append(indices)
        raise DecodeError("seek failed")

    monkeypatch.setattr(vr, "_get_batch", refuse)
    got = [(chunk, imgs) for chunk, imgs in vr.read(want, batch_size=4)]
    # the frame-size probe (frame_shape: the first wanted frame) unless done, the batch, then each frame alone
    assert vr.fell_back and not vr.failed and calls[: len(probe)] == probe
    assert calls[len(probe)] == want[:4] and len(calls) == len(probe) + 1 + len(want)
    assert [i for c, _ in got for i in c] == want
    assert np.array_equal(np.concatenate([imgs for _, imgs in got]), ref)


def test_unknown_decoder_is_a_config_error_before_the_model_loads(tmp_path):
    write_video(tmp_path / "v.mp4", [("red", 5)])

    def no_model():
        raise AssertionError("the model must not load for a bad --decoder")

    with pytest.raises(ConfigError, match="decoder 'pyav' is not valid; choose one of: decord, torchcodec"):
        index_paths([tmp_path], tmp_path / "idx", no_model, IndexOptions(decoder="pyav"))
    with pytest.raises(ConfigError, match="choose one of"):
        open_video(tmp_path / "v.mp4", "opencv")
    assert BACKENDS == ("decord", "torchcodec", "ffmpeg")


def test_empty_and_missing_files_are_one_line(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        open_video(tmp_path / "zero.mp4")
    with pytest.raises(InputError, match="does not exist"):
        open_video(tmp_path / "gone.mp4")


@pytest.mark.skipif(bool(TORCHCODEC_WHY), reason=TORCHCODEC_WHY or "-")
def test_index_with_torchcodec_gives_the_rows_of_decord(tmp_path, encoder):  # noqa: F811
    d = tmp_path / "v"
    d.mkdir()
    write_video(d / "a.mp4", [("red", 12), ("green", 12)], fps=12.0)
    write_video(d / "b.mp4", [("blue", 10), ("yellow", 10)])
    ra = index_paths([d], tmp_path / "i1", encoder, IndexOptions())
    rb = index_paths([d], tmp_path / "i2", encoder, IndexOptions(decoder="torchcodec"))
    assert ra.indexed == rb.indexed == ["a", "b"]
    rows_a, vecs_a = index_contents(tmp_path / "i1")
    rows_b, vecs_b = index_contents(tmp_path / "i2")
    assert [r[1:4] for r in rows_a] == [r[1:4] for r in rows_b]  # video_id, frame_idx, pts_time
    assert np.allclose(vecs_a, vecs_b, atol=2e-2)


@needs_ffmpeg
def test_a_live_webm_without_duration_names_the_way_out(tmp_path, sample_videos):  # noqa: F811
    live = tmp_path / "live.webm"  # a live-mode WebM: no duration, no frame count in the header
    _ffmpeg("-i", str(sample_videos["bikes"]), "-t", "2", "-an", "-c:v", "libvpx-vp9", "-deadline", "realtime",
            "-cpu-used", "8", "-b:v", "200k", "-live", "1", str(live))
    try:
        vr = open_video(live, "decord")
    except InputError as exc:  # decord2 cannot size it: one line that names the other decoder
        assert "try --decoder torchcodec" in str(exc) and str(live) in str(exc) and "\n" not in str(exc)
    else:  # a decord2 that can read it must read it whole
        assert len(vr) == 50
    if not TORCHCODEC_WHY:
        tc = open_video(live, "torchcodec")
        assert len(tc) == 50 and tc.timestamps == pytest.approx(np.arange(50) * 0.04, abs=1e-3)
        assert tc.get_batch([0, 49]).shape == (2, 272, 640, 3)


def test_decord_loaded_first_breaks_neither_torch_nor_faiss_nor_torchcodec(sample_videos):  # noqa: F811
    # decord2 loads FFmpeg and the nvidia-* libraries with RTLD_GLOBAL. Through open_video, torch
    # (and FAISS, torchcodec) load first and keep working. A fresh interpreter: the import order is the point.
    import sys

    root = Path(__file__).resolve().parents[1]
    script = f"""
import sys; sys.path.insert(0, {str(root)!r})
from mergeseek.indexing.decoders import open_video
vr = open_video({str(sample_videos["bikes"])!r}, "decord")
assert vr.get_batch([0, 100]).shape == (2, 272, 640, 3)
import torch
a = torch.randn(512, 512)
assert torch.isfinite(a @ a).all() and torch.isfinite(torch.nn.functional.linear(a, a)).all()
import faiss, numpy as np  # FAISS's k-means (an IVF index trained after decoding) crashed in NVBLAS
x = np.random.default_rng(0).standard_normal((4000, 64)).astype(np.float32)
ivf = faiss.index_factory(64, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
ivf.train(x)
ivf.add(x)
ivf.nprobe = 16  # every list: the exact answer
flat = faiss.IndexFlatIP(64)
flat.add(x)
assert (ivf.search(x[:50], 3)[1] == flat.search(x[:50], 3)[1]).all()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@needs_ffmpeg
def test_an_av1_file_is_indexed(codec_files, tmp_path, encoder):  # noqa: F811
    av1 = codec_files.get("av1-aom") or codec_files.get("av1-svt")
    if av1 is None:
        pytest.skip("ffmpeg here has no AV1 encoder (libaom-av1 or libsvtav1)")
    report = index_paths([av1], tmp_path / "idx", encoder, IndexOptions(sampling=Sampling.parse("fps=2"),
                                                                             dedup=Dedup(enabled=False)))
    assert report.indexed == [av1.stem] and not report.failed
    rows, vecs = index_contents(tmp_path / "idx")
    assert [(r[2], r[3]) for r in rows] == [(0, 0.0), (5, 0.5), (10, 1.0), (15, 1.5)] and vecs.shape == (4, 512)


@pytest.mark.skipif(bool(TORCHCODEC_WHY), reason=TORCHCODEC_WHY or "-")
def test_torchcodec_after_a_bare_decord_import_is_refused_in_one_line(sample_videos, monkeypatch):  # noqa: F811
    import sys

    import decord  # noqa: F401  (safe here: torchcodec was loaded at collection)

    # what a process that imported decord itself, and torchcodec not yet, looks like to open_video
    monkeypatch.delitem(sys.modules, "torchcodec.decoders")
    with pytest.raises(InputError, match="torchcodec cannot start in a process that already loaded decord"):
        open_video(sample_videos["bikes"], "torchcodec")


# ---------------------------------------------------------------------------- videos stored turned (phones)
@pytest.fixture(scope="module")
def turned_videos(tmp_path_factory):
    """The same 64x48 clip, as stored and with a display rotation of 90 / 180 / 270 in MP4 and MOV."""
    if FFMPEG is None:
        pytest.skip("ffmpeg is not installed (apt-get install ffmpeg)")
    root = tmp_path_factory.mktemp("turned")
    plain = root / "plain.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            str(plain))
    out = {(0, ".mp4"): plain}
    for quarter, degrees in ((1, 90), (2, 180), (3, 270)):
        for ext in (".mp4", ".mov"):
            path = root / f"turned{degrees}{ext}"
            _ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", str(path))
            out[(quarter, ext)] = path
    return out


@needs_ffmpeg
@pytest.mark.skipif(bool(TORCHCODEC_WHY), reason=TORCHCODEC_WHY or "-")
def test_a_video_stored_turned_is_read_upright(turned_videos):
    from mergeseek.indexing.formats import video_rotation

    upright = open_video(turned_videos[(0, ".mp4")], "decord").get_batch([0, 12, 24])
    for (quarter, ext), path in turned_videos.items():
        assert video_rotation(path) == quarter, path.name
        source = MediaSource("video", path, path.stem, "x")
        frames = [f for b in SourceReader(source, Sampling.parse("every=12")).batches() for f in b]
        assert [f.frame_idx for f in frames] == [0, 12, 24], path.name
        for f, want in zip(frames, upright):
            want = np.rot90(want, quarter)
            assert f.image.shape == want.shape, path.name
            assert np.abs(f.image.astype(int) - want).mean() < 2, path.name


@needs_ffmpeg
def test_a_portrait_video_without_torchcodec_names_the_ways_out(turned_videos, monkeypatch, no_torchcodec):
    # FFmpeg's command on PATH: it reads the file, upright (64x48 turned by 90 degrees is 48 wide)
    vr = open_video(turned_videos[(1, ".mp4")], "decord")
    assert vr.backend == "ffmpeg" and vr.get_batch([0]).shape == (1, 64, 48, 3)
    monkeypatch.setattr(formats, "_FFMPEG", [False])  # and without it, the error names the ways out
    with pytest.raises(InputError, match="portrait.*pip install torchcodec.*ffmpeg -i IN"):
        open_video(turned_videos[(1, ".mp4")], "decord")
    assert len(open_video(turned_videos[(2, ".mp4")], "decord")) == 25  # upside down: decord2 turns it itself


@needs_ffmpeg
def test_decords_garbage_for_a_turned_video_it_was_not_told_about_is_refused(turned_videos, monkeypatch):
    """A container whose rotation we cannot read (the guard): decord2's 4-channel frames never reach
    the encoder; the file fails alone with a line that names the way out."""
    from mergeseek.indexing import decoders

    monkeypatch.setattr(decoders, "video_rotation", lambda path: 0)
    path = turned_videos[(1, ".mp4")]
    source = MediaSource("video", path, path.stem, "x")
    # FFmpeg's command on PATH: decord2's first frame fails the check, and FFmpeg reads the file upright
    frames = [f for b in SourceReader(source, Sampling.parse("fps=2")).batches() for f in b]
    assert [f.image.shape for f in frames] == [(64, 48, 3)] * 2
    monkeypatch.setattr(formats, "_FFMPEG", [False])  # without it, the line names the way out
    with pytest.raises(InputError, match="not H x W x 3.*--decoder torchcodec"):
        [f for b in SourceReader(source, Sampling.parse("fps=2")).batches() for f in b]


@needs_ffmpeg
@pytest.mark.skipif(bool(TORCHCODEC_WHY), reason=TORCHCODEC_WHY or "-")
def test_thumbnails_of_a_turned_video_are_upright(turned_videos):
    from mergeseek.indexing.thumbs import iter_decoded

    path = turned_videos[(3, ".mov")]
    (chunk,) = list(iter_decoded("video", str(path), np.array([0, 24]), [str(path)] * 2, lambda f: f))
    assert [f.shape for f in chunk] == [(64, 48, 3), (64, 48, 3)]


# ---------------------------------------------------------------------------- memory: large frames
def test_decode_size_and_read_size_are_bounded():
    from mergeseek.indexing.decoders import READ_BYTES, VideoReader, bounded_size

    assert bounded_size((1080, 1920, 3)) is None and bounded_size((720, 1280, 3)) is None and bounded_size(None) is None
    assert bounded_size((2160, 3840, 3)) == (1920, 1080) == bounded_size((4320, 7680, 3))
    assert bounded_size((3840, 2160, 3)) == (1080, 1920)  # portrait
    assert bounded_size((1441, 2561, 3)) == (1920, 1080) and bounded_size((1200, 1601, 3)) == (1440, 1080)  # even

    class Sized(VideoReader):
        def __init__(self, shape):
            super().__init__("x.mp4")
            self._shape = shape

    assert Sized((4320, 7680, 3)).frames_per_read(0, 32) == READ_BYTES // (4320 * 7680 * 3) == 2
    assert Sized((1080, 1920, 3)).frames_per_read(0, 32) == 32 and Sized((8000, 8000, 3)).frames_per_read(0, 32) == 1


@needs_ffmpeg
def test_video_above_1080p_is_decoded_at_1080p_with_the_same_frames(tmp_path):
    """decord2's queue of full-size 8K frames held 5.2 GB; scaled in the decoder it held 1.1 GB. The
    frames, times and sampled indices are those of the full-size decode, and what reaches the model
    differs from it by the rescaling only."""
    from PIL import Image
    from torchvision import transforms as T

    path = tmp_path / "qhd.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=2560x1440:rate=5:duration=2", "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv420p", str(path))
    source = MediaSource("video", path, path.stem, "x")
    reader = SourceReader(source, Sampling.parse("fps=2"))
    frames = [f for b in reader.batches() for f in b]
    full = open_video(path, "decord")
    want = Sampling.parse("fps=2").select(full.timestamps, full.avg_fps)
    assert [f.frame_idx for f in frames] == want.tolist() and len(frames) == 4
    assert [f.pts_time for f in frames] == [float(full.timestamps[i]) for i in want]
    assert {f.image.shape for f in frames} == {(1080, 1920, 3)}
    clip = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])
    for f, ref in zip(frames, full.get_batch(want.tolist())):
        assert (clip(Image.fromarray(f.image)) - clip(Image.fromarray(ref))).abs().mean() < 0.01
    from mergeseek.indexing.thumbs import iter_decoded  # read again later (thumbs, --ocr): the same pixels

    (again,) = list(iter_decoded("video", str(path), want, [str(path)] * len(want), lambda f: f))
    assert all(np.array_equal(a, f.image) for a, f in zip(again, frames))


@pytest.mark.parametrize("backend", ["decord", "torchcodec", "ffmpeg"])
def test_a_playlist_named_like_a_video_is_refused_not_followed(tmp_path, sample_videos, backend):  # noqa: F811
    """An HLS playlist or an ffconcat list named .mp4 (FFmpeg reads them and opens the files they
    name; torchcodec did): refused as text by every decoder, for video and for sound."""
    from mergeseek.indexing.audio import read_audio

    if backend == "torchcodec" and TORCHCODEC_WHY:
        pytest.skip(TORCHCODEC_WHY)
    if backend == "ffmpeg" and FFMPEG is None:
        pytest.skip("ffmpeg is not installed")
    target = sample_videos["bikes"]
    lists = {"hls.mp4": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{target}\n#EXT-X-ENDLIST\n",
             "concat.mkv": f"ffconcat version 1.0\nfile '{target}'\n"}
    for name, text in lists.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match="it holds text"):
            open_video(tmp_path / name, backend)
        with pytest.raises(InputError, match="it holds text"):
            read_audio(tmp_path / name, backend=backend)
