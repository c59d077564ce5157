"""Every media type the indexer lists is found and decoded (files made here by ffmpeg and PIL),
a TypeScript ``.ts`` is not taken for a video, and media types that are not read (camera raw,
Photoshop, HEIC without pillow-heif, ...) are reported in one line per folder, never passed over
in silence."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features
from test_indexing_support import frame_means, shown_frame

from mergeseek.indexing import formats
from mergeseek.indexing.formats import HEIF_EXTS, IMAGE_EXTS, VIDEO_EXTS, is_video
from mergeseek.indexing.sources import Sampling, SourceReader, discover

# ffmpeg arguments per container (a codec it can carry); 2 s at 25 frames/s of 64x48 test pattern.
CODECS = {
    ".mp4": "-c:v libx264 -pix_fmt yuv420p", ".mkv": "-c:v libx264", ".webm": "-c:v libvpx", ".avi": "-c:v mpeg4",
    ".mov": "-c:v libx264", ".m4v": "-c:v libx264 -pix_fmt yuv420p", ".mpg": "-c:v mpeg2video",
    ".mpeg": "-c:v mpeg2video", ".ts": "-c:v mpeg2video", ".m2ts": "-c:v libx264 -pix_fmt yuv420p -bf 0",
    ".mts": "-c:v libx264 -pix_fmt yuv420p -bf 0",
    ".flv": "-c:v flv1", ".f4v": "-c:v libx264 -f mp4", ".wmv": "-c:v wmv2", ".asf": "-c:v wmv2",
    ".3gp": "-c:v h263 -s 128x96", ".vob": "-c:v mpeg2video -f vob", ".mxf": "-c:v mpeg2video",
    ".divx": "-c:v mpeg4 -f avi", ".ogv": "-c:v libtheora",
}
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (Debian package) makes the clips")


def make_clip(path: Path) -> Path:
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=2", "-an",
           *CODECS[path.suffix].split(), str(path)]
    subprocess.run(cmd, check=True, timeout=60)
    return path


def test_every_listed_video_type_has_a_clip_recipe():
    assert set(CODECS) == set(VIDEO_EXTS)


# Frame n of this source is flat grey at luma 20 + 4n: a decoded frame says which frame it is.
NUMBERED = "nullsrc=s=64x48:r=25:d=2,geq=lum='20+4*N':cb=128:cr=128"


@pytest.fixture
def no_ffmpeg(monkeypatch):
    """As on a machine without FFmpeg's command-line tools."""
    monkeypatch.setattr(formats, "_FFMPEG", [False])


@needs_ffmpeg
def test_every_video_type_is_found_and_decodes_the_frames_asked_for(tmp_path):
    """Every container, read the default way, gives the frame each index names at its time. decord2
    alone returns other frames of MPEG program and transport streams, with no error (the reason
    those are read through FFmpeg's command when it is on PATH, decoders.WRONG_FRAMES)."""
    for ext in VIDEO_EXTS:
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", NUMBERED, "-an",
                        *CODECS[ext].split(), str(tmp_path / f"clip{ext.replace('.', '_')}{ext}")], check=True, timeout=60)
    want = frame_means(NUMBERED)
    sources, bad = discover([tmp_path])
    assert not bad
    assert sorted(s.path.suffix for s in sources) == sorted(VIDEO_EXTS)
    for s in sources:
        reader = SourceReader(s, Sampling.parse("fps=3"), 8)
        frames = [f for b in reader.batches() for f in b]
        assert [f.frame_idx for f in frames] == [0, 8, 17, 25, 33, 42], s.path.name
        assert [round(f.pts_time, 2) for f in frames] == [round(f.frame_idx / 25, 2) for f in frames], s.path.name
        shown = [shown_frame(want, f.image) for f in frames]
        assert shown == [f.frame_idx for f in frames], (s.path.name, shown)
        assert frames[0].image.dtype == np.uint8 and frames[0].image.ndim == 3 and not reader.skipped


@needs_ffmpeg
def test_without_ffmpeg_the_library_decoders_read_alone(tmp_path, no_ffmpeg, caplog):
    """Without FFmpeg's command: a Theora file that decord2 cannot read fails alone naming
    torchcodec, and an MPEG program stream is read by decord2 with a warning about its frames."""
    ogv = make_clip(tmp_path / "a.ogv")
    (src,), _ = discover([ogv])
    with pytest.raises(Exception, match="torchcodec"):
        list(SourceReader(src, Sampling.parse("fps=1"), 8).batches())
    mpg = make_clip(tmp_path / "b.mpg")
    (src,), _ = discover([mpg])
    with caplog.at_level("WARNING"):
        frames = [f for b in SourceReader(src, Sampling.parse("fps=1"), 8).batches() for f in b]
    assert len(frames) == 2 and "wrong frames" in caplog.text and "install FFmpeg" in caplog.text


@needs_ffmpeg
def test_a_transport_stream_with_b_frames_is_read_through_ffmpeg(tmp_path):
    """H.264 with B-frames in MPEG-TS, which decord2 decodes to other frames and torchcodec cannot
    seek in: read through FFmpeg's command, every frame the one asked for."""
    ts = tmp_path / "broadcast.ts"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", NUMBERED, "-c:v", "libx264", "-bf", "3",
                    "-pix_fmt", "yuv420p", str(ts)], check=True, timeout=60)
    (src,), _ = discover([ts])
    reader = SourceReader(src, Sampling.parse("every=5"), 4)
    frames = [f for b in reader.batches() for f in b]
    want = frame_means(NUMBERED)
    assert [f.frame_idx for f in frames] == list(range(0, 50, 5)) and not reader.skipped
    assert [shown_frame(want, f.image) for f in frames] == list(range(0, 50, 5))
    assert [round(f.pts_time, 2) for f in frames] == [round(i / 25, 2) for i in range(0, 50, 5)]


@needs_ffmpeg
def test_a_transport_stream_that_does_not_decode_names_the_remux(tmp_path, no_ffmpeg):
    """Without FFmpeg's command, H.264 with B-frames in MPEG-TS reads no frame here (docs/INDEXING.md);
    the error says how to get an indexable file, and the remuxed file indexes."""
    ts = tmp_path / "broadcast.ts"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=2",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(ts)], check=True, timeout=60)
    (src,), _ = discover([ts])
    try:
        frames = [f for b in SourceReader(src, Sampling.parse("fps=1"), 8).batches() for f in b]
    except Exception as exc:
        assert "ffmpeg -i IN -c copy OUT.mkv" in str(exc)
    else:  # a decoder that reads it is fine too
        assert len(frames) == 2
    mkv = tmp_path / "broadcast.mkv"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(ts), "-c", "copy", str(mkv)], check=True, timeout=60)
    (src,), _ = discover([mkv])
    assert [round(f.pts_time, 2) for b in SourceReader(src, Sampling.parse("fps=1"), 8).batches() for f in b] == [0.0, 1.0]


@needs_ffmpeg
def test_typescript_is_not_a_video_but_mpeg_ts_is(tmp_path):
    (tmp_path / "app.ts").write_text("import { x } from './x';\nexport const y = x + 1;\n")
    (tmp_path / "Game.ts").write_text("G" * 400)  # starts with 0x47, but no packet structure
    real = make_clip(tmp_path / "broadcast.ts")
    assert not is_video(tmp_path / "app.ts") and not is_video(tmp_path / "Game.ts") and is_video(real)
    sources, bad = discover([tmp_path])
    assert [s.path.name for s in sources] == ["broadcast.ts"] and not bad


def test_image_types_are_read(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP",
           ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".avif": "AVIF", ".jp2": "JPEG2000"}
    assert set(fmt) == set(IMAGE_EXTS)
    for ext, name in fmt.items():
        if name == "AVIF" and not features.check("avif") or name == "JPEG2000" and not features.check("jpg_2000"):
            continue
        Image.fromarray(rgb).save(tmp_path / f"a{ext.replace('.', '_')}{ext}", format=name)
    (src,), bad = discover([tmp_path])
    assert not bad
    frames = [f for b in SourceReader(src, Sampling.parse("all"), 32).batches() for f in b]
    assert len(frames) == len(list(tmp_path.iterdir()))
    for f in frames:
        assert f.image.shape == (16, 24, 3), f.path


def test_media_that_is_not_read_is_reported_once_per_folder(tmp_path, monkeypatch, no_ffmpeg):
    monkeypatch.setattr(formats, "_HEIF", [False])  # as on a machine without pillow-heif
    shoot = tmp_path / "shoot"
    shoot.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(shoot / "ok.jpg")
    for name in ("IMG_1.CR2", "IMG_2.cr2", "cover.psd", "IMG_3.HEIC", "notes.txt", "clip.srt", "cam1.h264"):
        (shoot / name).write_bytes(b"\0" * 16)
    (src,), bad = discover([tmp_path])
    assert [Path(f.path).name for b in SourceReader(src, Sampling.parse("all"), 8).batches() for f in b] == ["ok.jpg"]
    assert len(bad) == 1 and bad[0].path == str(shoot)
    why = bad[0].reason
    assert "5 file(s) skipped" in why and "2 .cr2 (camera raw)" in why and "1 .heic (HEIC/HEIF)" in why
    assert "1 .psd (Photoshop)" in why and "1 .h264 (raw video stream)" in why and "\n" not in why
    assert "pip install pillow-heif" in why and "apt-get install ffmpeg" in why and "JPEG or PNG" in why
    with pytest.raises(Exception, match="pillow-heif"):  # a lone HEIC names the fix too
        discover([shoot / "IMG_3.HEIC"])


def test_heic_photos_are_read_with_pillow_heif(tmp_path):
    pytest.importorskip("pillow_heif")
    assert formats.heif_ready()
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (200, 40, 40)
    Image.fromarray(rgb).save(tmp_path / "phone.heic")
    (src,), bad = discover([tmp_path])
    (frame,) = [f for b in SourceReader(src, Sampling.parse("all"), 4).batches() for f in b]
    assert not bad and Path(frame.path).name == "phone.heic"
    assert frame.image.shape == (32, 48, 3)
    assert np.abs(frame.image[4:-4, 4:20].astype(int) - (200, 40, 40)).max() < 20


def test_heif_extensions_are_not_also_plain_image_types():
    assert not set(HEIF_EXTS) & set(IMAGE_EXTS) and not set(formats.UNREAD_EXTS) & set(IMAGE_EXTS + VIDEO_EXTS)


def test_hidden_entries_and_system_folders_are_passed_over(tmp_path):
    """What a NAS, a Mac, a Windows drive or a git checkout leaves beside the media is not indexed
    (and not reported: it is not the user's), while a folder given by name is indexed whatever its name."""
    def jpg(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)
        return path

    root = tmp_path / "archive"
    jpg(root / "trip" / "a.jpg")
    (root / "trip" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\0" * 60)  # AppleDouble: not an image
    jpg(root / "trip" / "@eaDir" / "a.jpg" / "SYNOPHOTO_THUMB_XL.jpg")
    jpg(root / "__MACOSX" / "trip" / "b.jpg")
    jpg(root / ".git" / "x.jpg")
    jpg(root / "$RECYCLE.BIN" / "c.jpg")
    jpg(root / ".hidden.jpg")
    sources, bad = discover([root])
    assert not bad
    assert [(s.path.name, [Path(f.path).name for b in SourceReader(s, Sampling.parse("all"), 8).batches() for f in b])
            for s in sources] == [("trip", ["a.jpg"])]
    (named,), bad = discover([root / ".git"])
    assert named.path.name == ".git" and not bad


def test_the_rotation_reader_shrugs_at_odd_files(tmp_path):
    """Not an MP4, cut short, or endless tiny boxes: no rotation is read, nothing raises."""
    import struct

    from mergeseek.indexing.formats import video_rotation

    odd = {
        "empty.mp4": b"",
        "zeros.mp4": b"\0" * 64,
        "noise.mp4": np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes(),
        "tiny-boxes.mp4": struct.pack(">I4s", 8, b"free") * 200_000,
        "cut-tkhd.mov": struct.pack(">I4s", 40, b"moov") + struct.pack(">I4s", 32, b"trak")
        + struct.pack(">I4s", 24, b"tkhd") + b"\0" * 4,
        "huge-size.mp4": struct.pack(">I4sQ", 1, b"moov", 2**62) + b"\0" * 32,
    }
    for name, data in odd.items():
        (tmp_path / name).write_bytes(data)
        assert video_rotation(tmp_path / name) == 0, name
    assert video_rotation(tmp_path / "missing.mp4") == 0


@needs_ffmpeg
@pytest.mark.parametrize("name,args", [("cam1.h264", "-c:v libx264 -pix_fmt yuv420p -f h264"),
                                       ("cam2.h265", "-c:v libx265 -pix_fmt yuv420p -f hevc"),
                                       ("old.rm", "-c:v rv20")])
def test_raw_streams_and_realmedia_are_read_through_ffmpeg(tmp_path, name, args):
    """A CCTV-style raw stream (no container: B-frames, no times) and RealMedia, which neither library
    decoder reads: with FFmpeg's command on PATH they index, every frame the one asked for, timed at
    the rate the stream states (10 frames/s here)."""
    path = tmp_path / name
    src10 = NUMBERED.replace("r=25:d=2", "r=10:d=5")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", src10, *args.split(), str(path)],
                   check=True, timeout=60)
    (src,), bad = discover([path])
    reader = SourceReader(src, Sampling.parse("fps=1"), 4)
    frames = [f for b in reader.batches() for f in b]
    want = frame_means(src10)
    assert not bad and not reader.skipped
    assert [(f.frame_idx, round(f.pts_time, 2)) for f in frames] == [(10 * k, float(k)) for k in range(5)]
    assert [shown_frame(want, f.image) for f in frames] == [10 * k for k in range(5)]


@needs_ffmpeg
def test_without_ffmpeg_a_raw_stream_is_reported_with_the_fix(tmp_path, no_ffmpeg):
    raw = tmp_path / "cam1.h264"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=2",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "h264", str(raw)], check=True, timeout=60)
    with pytest.raises(Exception, match="raw video stream.*apt-get install ffmpeg"):
        discover([raw])
    with pytest.raises(Exception, match="FFmpeg"):  # asked for by name, it fails alone saying what it needs
        from mergeseek.indexing.decoders import open_video

        open_video(raw)


@needs_ffmpeg
def test_a_video_trimmed_without_re_encoding_shows_its_edit(tmp_path, monkeypatch, caplog, request):
    """An MP4 cut with ``-c copy`` keeps the frames from the keyframe before the cut, to be decoded but
    not shown (an edit list). decord2 counts them and gives them and the frames after them wrong
    times; such a file is read with torchcodec or FFmpeg's command, so frame i is the i-th frame
    shown, at i / 25 s."""
    numbered = "nullsrc=s=64x48:r=25:d=4,geq=lum='20+2*N':cb=128:cr=128"
    whole, cut = tmp_path / "whole.mp4", tmp_path / "cut.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", numbered, "-c:v", "libx264", "-g", "100",
                    "-pix_fmt", "yuv420p", str(whole)], check=True, timeout=60)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-ss", "2", "-i", str(whole), "-c", "copy", str(cut)], check=True,
                   timeout=60)
    want = frame_means(numbered)
    from mergeseek.indexing.decoders import DecordReader

    assert DecordReader(cut).before_edit > 0  # the case: decord2 sees frames before the edit point
    (src,), _ = discover([cut])
    frames = [f for b in SourceReader(src, Sampling.parse("every=10"), 4).batches() for f in b]
    assert [f.frame_idx for f in frames] == [0, 10, 20, 30, 40]
    assert [round(f.pts_time, 2) for f in frames] == [0.0, 0.4, 0.8, 1.2, 1.6]
    assert [shown_frame(want, f.image) for f in frames] == [50, 60, 70, 80, 90]
    # with neither torchcodec nor FFmpeg's command: decord2 reads it, with a warning naming both
    from mergeseek.indexing import decoders

    request.getfixturevalue("no_torchcodec")
    monkeypatch.setattr(formats, "_FFMPEG", [False])
    with caplog.at_level("WARNING"):
        assert decoders.open_video(cut).backend == "decord"
    assert "trimmed without re-encoding" in caplog.text and "pip install torchcodec" in caplog.text


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are a POSIX thing")
def test_a_named_pipe_named_like_media_is_reported_not_opened(tmp_path):
    """A FIFO named clip.mp4 (or a socket, a device) in a folder, or given by name: one line each, and
    nothing blocks on opening it; a real image beside it still indexes."""
    import os

    os.mkfifo(tmp_path / "clip.mp4")
    os.mkfifo(tmp_path / "notes")  # not named like media: passed over, as other files are
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    sources, bad = discover([tmp_path, tmp_path / "clip.mp4"])
    assert [s.kind for s in sources] == ["images"]
    assert [(Path(b.path).name, "not a regular file" in b.reason) for b in bad] == [("clip.mp4", True)] * 2


@needs_ffmpeg
def test_a_source_read_by_decord_is_read_again_once_ffmpeg_is_there(tmp_path, monkeypatch, request):
    """An index built where decord2 read an MPEG program stream (no FFmpeg then: its frames are wrong)
    reads that source again on its next run once FFmpeg's command is on PATH, and its frames are then
    the ones asked for; an MP4 beside it is not read again."""
    from test_indexing_support import build_encoder

    from mergeseek.indexing import IndexOptions, index_paths
    from mergeseek.indexing.store import IndexStore

    media = tmp_path / "media"
    media.mkdir()
    for name, codec in (("dvd.mpg", "-c:v mpeg2video"), ("phone.mp4", "-c:v libx264 -pix_fmt yuv420p")):
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", NUMBERED, "-an", *codec.split(),
                        str(media / name)], check=True, timeout=60)
    options = IndexOptions(sampling=Sampling.parse("every=10"))
    enc = build_encoder()
    monkeypatch.setattr(formats, "_FFMPEG", [False])  # built without FFmpeg
    first = index_paths([media], tmp_path / "ix", enc, options)
    monkeypatch.setattr(formats, "_FFMPEG", [True])  # FFmpeg installed since
    second = index_paths([media], tmp_path / "ix", enc, options)
    third = index_paths([media], tmp_path / "ix", enc, options)
    assert (len(first.indexed), first.up_to_date) == (2, 0)
    assert (second.indexed, second.up_to_date) == (["dvd"], 1)
    assert (len(third.indexed), third.up_to_date) == (0, 2)
    recipes = {Path(k).name: e.recipe for k, e in IndexStore.open_for_read(tmp_path / "ix").manifest.sources.items()}
    assert recipes["dvd.mpg"].endswith(";reader=ffmpeg") and "reader" not in recipes["phone.mp4"]
