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
NEEDS_TORCHCODEC = {".ogv"}  # decord2 cannot read a Theora file's length: the error says so

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (Debian package) makes the clips")


def make_clip(path: Path) -> Path:
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=2", "-an",
           *CODECS[path.suffix].split(), str(path)]
    subprocess.run(cmd, check=True, timeout=60)
    return path


def test_every_listed_video_type_has_a_clip_recipe():
    assert set(CODECS) == set(VIDEO_EXTS)


@needs_ffmpeg
def test_every_video_type_is_found_and_decoded(tmp_path):
    for ext in VIDEO_EXTS:
        make_clip(tmp_path / f"clip{ext.replace('.', '_')}{ext}")
    sources, bad = discover([tmp_path])
    assert not bad
    assert sorted(s.path.suffix for s in sources) == sorted(VIDEO_EXTS)
    for s in sources:
        reader = SourceReader(s, Sampling.parse("fps=1"), 8)
        if s.path.suffix in NEEDS_TORCHCODEC:
            with pytest.raises(Exception, match="torchcodec"):
                list(reader.batches())
            continue
        frames = [f for b in reader.batches() for f in b]
        assert [round(f.pts_time, 2) for f in frames] == [0.0, 1.0], s.path.name
        assert frames[0].image.dtype == np.uint8 and frames[0].image.ndim == 3 and not reader.skipped


@needs_ffmpeg
def test_a_transport_stream_that_does_not_decode_names_the_remux(tmp_path):
    """H.264 with B-frames in MPEG-TS: neither decoder reads a frame of it here (a known limit,
    docs/INDEXING.md); the error says how to get an indexable file, and the remuxed file indexes."""
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


def test_media_that_is_not_read_is_reported_once_per_folder(tmp_path, monkeypatch):
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
    assert "pip install pillow-heif" in why and "ffmpeg -r 25 -i IN.h264 OUT.mp4" in why and "JPEG or PNG" in why
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
def test_the_hint_for_a_raw_stream_gives_a_file_that_indexes(tmp_path):
    """A CCTV-style raw H.264 stream (.h264, here with B-frames) is reported, not read; the command
    the report gives (re-encode at its frame rate: a plain remux of such a stream cannot place its
    frames in time) makes a file that decodes with the right times."""
    raw = tmp_path / "cam1.h264"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=2",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "h264", str(raw)], check=True, timeout=60)
    with pytest.raises(Exception, match="raw video stream"):
        discover([raw])
    fixed = tmp_path / "cam1.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-r", "25", "-i", str(raw), str(fixed)], check=True, timeout=60)
    (src,), bad = discover([fixed])
    frames = [f for b in SourceReader(src, Sampling.parse("fps=1"), 8).batches() for f in b]
    assert not bad and [(f.frame_idx, round(f.pts_time, 2)) for f in frames] == [(0, 0.0), (25, 1.0)]
