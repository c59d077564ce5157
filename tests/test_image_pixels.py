"""A user's image file gives the pixels a viewer shows, the same on every path that reads one:
indexing (folder of images / keyframes), ``search --image``, the web app's upload and the
thumbnails made again from the files. Covers the EXIF orientation tag (all eight values, checked
against the tag's definition written out with numpy), transparency (over white), 16-bit files and
a damaged EXIF block."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mergeseek.indexing.formats import read_rgb
from mergeseek.indexing.sources import _load_image
from mergeseek.indexing.thumbs import iter_decoded
from mergeseek.retrieval.search import load_query_image

# How a viewer turns the stored rows into the displayed picture, per EXIF orientation (TIFF 6.0,
# tag 274): "mirror horizontal" = fliplr, "rotate 90 CW" = np.rot90(k=-1).
DISPLAY = {
    1: lambda s: s,
    2: np.fliplr,
    3: lambda s: np.rot90(s, 2),
    4: np.flipud,
    5: lambda s: np.rot90(np.fliplr(s), 1),   # mirror, then 270 CW
    6: lambda s: np.rot90(s, -1),             # 90 CW
    7: lambda s: np.rot90(np.fliplr(s), -1),  # mirror, then 90 CW
    8: lambda s: np.rot90(s, 1),              # 270 CW
}


def upload_pixels(path: Path) -> np.ndarray:
    from mergeseek.serve.app import _open_image

    return np.asarray(_open_image(path.read_bytes()))


def every_path(path: Path) -> dict:
    """The pixels each reader makes of one file."""
    indexed, why = _load_image(path)
    assert why == ""
    (thumb_source,) = list(iter_decoded("images", str(path.parent), np.zeros(1, np.int64), [str(path)], lambda a: a))
    return {
        "index": indexed,
        "query": np.asarray(load_query_image(str(path))),
        "upload": upload_pixels(path),
        "thumbs": thumb_source[0],
    }


def assert_all(path: Path, want: np.ndarray, tol: int = 0):
    for name, got in every_path(path).items():
        assert got.dtype == np.uint8 and got.shape == want.shape, (name, got.shape, want.shape)
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff <= tol, f"{name}: off by {diff}"


def with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_on_every_path(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (12, 20, 3), dtype=np.uint8)  # not square
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(stored).save(path, exif=with_orientation(orientation))
    assert Image.open(path).getexif()[0x0112] == orientation
    assert_all(path, DISPLAY[orientation](stored))


def test_a_sideways_phone_jpeg_is_read_upright(tmp_path):
    upright = np.zeros((40, 64, 3), np.uint8)
    upright[:20] = (250, 10, 10)   # red sky
    upright[20:] = (10, 10, 250)   # blue sea
    path = tmp_path / "phone.jpg"
    Image.fromarray(np.rot90(upright, 1)).save(path, exif=with_orientation(6), quality=95)  # stored turned left
    for name, got in every_path(path).items():
        assert got.shape == upright.shape, name
        away = np.r_[0:17, 23:40]  # JPEG blurs the rows along the edge
        assert np.abs(got[away].astype(int) - upright[away]).max() <= 12, name


def test_transparency_is_laid_over_white(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (10, 16, 3), dtype=np.uint8)
    alpha = np.zeros((10, 16), np.uint8)
    alpha[:, 5:11] = 128
    alpha[:, 11:] = 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    a = alpha[..., None] / 255.0
    want = np.rint(rgb * a + 255 * (1 - a))
    assert_all(tmp_path / "rgba.png", want.astype(np.uint8), tol=1)

    grey = rgb[..., 0]
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    want = np.rint(grey * a[..., 0] + 255 * (1 - a[..., 0]))
    assert_all(tmp_path / "la.png", np.repeat(want[..., None], 3, axis=2).astype(np.uint8), tol=1)

    pal = Image.new("P", (4, 2))
    pal.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    pal.save(tmp_path / "p.png", transparency=0)  # colour 0 (black) is transparent
    idx = np.array([[0, 1, 0, 1], [1, 0, 1, 0]])
    want = np.where(idx[..., None] == 0, np.uint8(255), np.array([200, 30, 40], np.uint8))
    assert_all(tmp_path / "p.png", want.astype(np.uint8))


def test_opaque_images_are_unchanged(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    assert_all(tmp_path / "plain.png", rgb)
    Image.fromarray(np.dstack([rgb, np.full((9, 13), 255, np.uint8)]), "RGBA").save(tmp_path / "opaque.png")
    assert_all(tmp_path / "opaque.png", rgb)


def test_a_16_bit_query_is_scaled_like_the_index(tmp_path):
    grey16 = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 65535 // (24 * 32 - 1)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "scan.png")
    want = np.repeat(np.rint(grey16 / 257.0)[..., None], 3, axis=2).astype(np.uint8)
    assert_all(tmp_path / "scan.png", want, tol=1)


def test_a_damaged_exif_block_keeps_the_stored_pixels(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    path = tmp_path / "bad-exif.png"
    Image.fromarray(rgb).save(path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    assert_all(path, rgb)


def test_read_rgb_takes_a_file_object():
    buf = io.BytesIO()
    Image.fromarray(np.full((3, 5, 3), 7, np.uint8)).save(buf, format="PNG", exif=with_orientation(8))
    buf.seek(0)
    assert read_rgb(buf).shape == (5, 3, 3)
