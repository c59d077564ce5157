"""The on-screen text channel (issue #28): folding, query escaping, the FTS5 index, fusion against a
hand computation, Tesseract's TSV, and ``index --ocr`` end to end on rendered captions (kill and resume
included). The end-to-end cases need the ``tesseract`` command (``.ci/run`` installs it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mergeseek.errors import InputError, MissingDependencyError
from mergeseek.indexing.ocr import FrameText, Word, parse_tsv
from mergeseek.indexing.text import TextIndex, fold, fts_query, highlight, words, write_text
from mergeseek.retrieval.hybrid import RRF_K, fuse

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract is not installed")
OCR = "tesseract,passes=1"  # the captions here sit on solid boxes: one pass reads them at half the cost


@pytest.mark.parametrize("a,b", [("ha noi", "Hà Nội"), ("HA NOI", "hà nội"), ("đà nẵng", "da nang"), ("ĐÀ NẴNG", "Da Nang"),
                                 ("thủ tướng", "THU TUONG"), ("Huế", "hue"), ("Nguyễn Ánh", "nguyen anh"), ("ÐÀ NẴNG", "da nang")])
def test_folding_matches_with_and_without_accents_and_case(a, b):
    assert fold(a) == fold(b)
    assert words(a) == words(b)


def test_folding_keeps_positions_so_highlights_land_on_the_original_text():
    text = "Bão số 3 đổ bộ Đà Nẵng"
    assert len(fold(text)) == len(text)
    assert highlight(text, "da nang") == "Bão số 3 đổ bộ [Đà] [Nẵng]"
    assert highlight(text, "nothing here") == text
    assert highlight("Hà Nội, Hà Nam", "ha") == "[Hà] Nội, [Hà] Nam"  # every occurrence, punctuation kept


@pytest.mark.parametrize("query", ['"', 'a" OR "b', "*", "ha*", "AND", "NOT noi", "(ha", "ha) OR (noi",
                                   "'); DROP TABLE frames; --", "NEAR(ha noi, 1)", "col:ha", "^ha", "ha + noi", "\\"])
def test_user_queries_are_words_never_fts5_syntax(tmp_path, query):
    ix = _tiny_index(tmp_path)
    got = ix.search(query, k=5)  # no error, whatever the text
    assert all(isinstance(m.id, int) for m in got)
    assert [m.id for m in ix.search("ha noi", k=1)] == [10]  # the table is intact
    assert ix.db.execute("SELECT count(*) FROM frames").fetchone() == (3,)
    q = fts_query(query)
    assert q is None or all(part.startswith('"') and part.endswith('"') for part in q.split(" "))


def _tiny_index(tmp_path) -> TextIndex:
    texts = {10: "Thủ tướng thăm Hà Nội", 11: "Bão đổ bộ Đà Nẵng", 12: "Hà Nam mưa lớn", 13: ""}
    frames = [FrameText(tuple(Word(w, 90.0, (0, 0, 1, 1)) for w in t.split())) for t in texts.values()]
    write_text(tmp_path, "part-00000", "ocr", np.asarray(list(texts), np.int64), frames)
    ix = TextIndex(tmp_path)
    ix.sync(["part-00000"])
    return ix


def test_every_word_is_required_first_then_any_word_fills_k(tmp_path):
    ix = _tiny_index(tmp_path)
    assert [m.id for m in ix.search("ha noi", k=1)] == [10]
    both_then_any = [m.id for m in ix.search("ha noi", k=5)]
    assert both_then_any[0] == 10 and set(both_then_any) == {10, 12}  # 12 has "ha" only: after the full match
    assert ix.search("", k=5) == [] and ix.search("!!!", k=5) == []
    assert [m.text for m in ix.search("DA NANG", k=5)] == ["Bão đổ bộ Đà Nẵng"]


def test_sync_follows_the_shards_and_rebuilds_when_a_file_changes(tmp_path):
    ix = _tiny_index(tmp_path)
    write_text(tmp_path, "part-00001", "ocr", np.asarray([20]), [FrameText((Word("Huế", 95.0, (0, 0, 1, 1)),))])
    assert ix.sync(["part-00000", "part-00001"])["frames_added"] == 1
    assert [m.id for m in ix.search("hue")] == [20]
    got = ix.sync(["part-00001"])  # part-00000 left the index: its rows go
    assert got["rebuilt"] and ix.search("ha noi") == [] and [m.id for m in ix.search("hue")] == [20]
    assert ix.sync(["part-00001"]) == {"frames_added": 0, "shards_loaded": 0, "rebuilt": False}


def test_reciprocal_rank_fusion_equals_the_hand_computation():
    image, ocr = [1, 2, 3, 4], [3, 5, 1]
    got = fuse({"image": image, "ocr": ocr})
    k = RRF_K
    hand = {1: 1 / (k + 1) + 1 / (k + 3), 2: 1 / (k + 2), 3: 1 / (k + 3) + 1 / (k + 1), 4: 1 / (k + 4), 5: 1 / (k + 2)}
    assert [i for i, _, _ in got] == [1, 3, 2, 5, 4]  # 1 and 3 tie: 1 wins on id; 2 and 5 tie on score and best rank
    for i, s, ranks in got:
        assert s == pytest.approx(hand[i], abs=1e-12)
    assert dict((i, r) for i, _, r in got)[3] == {"image": 3, "ocr": 1}
    assert fuse({"image": [7, 7, 8]}) == fuse({"image": [7, 8]})[:1] + [(8, 1 / (k + 3), {"image": 3})]


def test_tesseract_tsv_keeps_confident_words_of_each_page_in_original_pixels():
    header = "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext"
    rows = ["5\t1\t1\t1\t1\t1\t10\t20\t30\t40\t96.5\tHà",
            "5\t1\t1\t1\t1\t2\t50\t20\t30\t40\t59.9\tNội",  # under 60: dropped
            "5\t2\t1\t1\t1\t1\t0\t0\t8\t8\t90\t--",  # no letter or digit: dropped
            "5\t2\t1\t1\t1\t2\t4\t6\t8\t10\t91\tHuế",
            "4\t2\t1\t1\t1\t0\t0\t0\t100\t100\t-1\t",  # a line, not a word
            "5\t3\t1\t1\t1\t1\t0\t0\t8\t8\t99\tout-of-range page"]
    got = parse_tsv("\n".join([header] + rows), frames=2, scales=[1.0, 0.5], min_conf=60.0)
    assert [f.text for f in got] == ["Hà", "Huế"]
    assert got[1].words[0].box == (8, 12, 16, 20)  # read at half size: boxes in the frame's own pixels
    assert got[0].conf == pytest.approx(96.5)


def test_a_second_pass_adds_only_words_the_first_did_not_read():
    from mergeseek.indexing.ocr import merge_passes

    first = FrameText((Word("Hà", 90, (10, 100, 30, 20)), Word("Nội", 90, (50, 100, 40, 20))))
    second = FrameText((Word("Ha", 80, (12, 101, 28, 19)),  # the same word again: dropped
                        Word("Huế", 85, (100, 100, 40, 20)),  # new, on the same line: after the others
                        Word("TIN", 95, (5, 10, 30, 20))))  # new, a line above: first
    assert merge_passes(first, second).text == "TIN Hà Nội Huế"
    assert merge_passes(first, FrameText()) is first


def test_engine_specs_take_languages_and_options(monkeypatch):
    from mergeseek.errors import ConfigError
    from mergeseek.indexing import ocr

    monkeypatch.setattr(ocr.TesseractEngine, "__init__", lambda self, **kw: setattr(self, "kw", kw))
    assert ocr.get_engine("tesseract").kw == {}
    assert ocr.get_engine("tesseract:vie,passes=1,min_conf=50").kw == {"langs": "vie", "passes": 1, "min_conf": 50.0}
    with pytest.raises(ConfigError, match="unknown ocr option 'psm'"):
        ocr.get_engine("tesseract,psm=3")
    with pytest.raises(ConfigError, match="not a number"):
        ocr.get_engine("tesseract,passes=two")


def test_a_missing_engine_names_what_to_install(monkeypatch):
    from mergeseek.indexing import ocr

    monkeypatch.setattr(ocr.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match="apt-get install tesseract-ocr tesseract-ocr-vie"):
        ocr.get_engine("tesseract")
    assert ocr.get_engine(None) is None and ocr.get_engine("none") is None
    from mergeseek.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown engine"):
        ocr.get_engine("easyocr")


# ---------------------------------------------------------------------------- end to end
CAPTIONS = ["Thủ tướng thăm Hà Nội", "Bão số 3 đổ bộ Đà Nẵng", "Giá vàng tăng mạnh", "Breaking news flood in Hue"]


def _render(folder: Path, captions, size=(480, 270)) -> Path:
    from PIL import Image, ImageDraw, ImageFont
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    font = ImageFont.truetype(_font(), 26)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for i, cap in enumerate(captions):
        im = Image.fromarray(np.ascontiguousarray(photos[i % 4][..., :3])).resize(size)
        d = ImageDraw.Draw(im)
        d.rectangle([0, size[1] - 50, size[0], size[1] - 8], fill=(20, 40, 120))
        d.text((10, size[1] - 46), cap, font=font, fill=(255, 255, 255))
        im.save(folder / f"f{i:02d}.png")
    return folder


def _font() -> str:
    for p in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        if Path(p).is_file():
            return p
    pytest.skip("no DejaVu font (fonts-dejavu-core)")


@pytest.fixture(scope="module")
def encoder():
    from test_indexing_support import build_encoder

    return build_encoder()


def _text_ids(root: Path) -> list:
    import pyarrow.parquet as pq

    return sorted(i for p in sorted((root / "text").glob("*.ocr.parquet")) for i in pq.read_table(p).column("id").to_pylist())


@needs_tesseract
def test_index_ocr_finds_each_caption_and_a_kill_before_the_text_is_resumed(tmp_path, encoder, monkeypatch):
    from mergeseek.indexing import IndexOptions, index_paths
    from mergeseek.indexing import text as text_mod
    from mergeseek.indexing.store import IndexStore
    from mergeseek.retrieval.hybrid import search_hybrid
    from mergeseek.retrieval.search import Searcher

    imgs = _render(tmp_path / "news", CAPTIONS)
    root = tmp_path / "ix"
    real = text_mod.write_text

    def killed(*a, **k):  # the shard is committed, then the process dies before its text is written
        raise KeyboardInterrupt

    monkeypatch.setattr(text_mod, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        index_paths([imgs], root, encoder, IndexOptions(ocr=OCR))
    monkeypatch.setattr(text_mod, "write_text", real)
    ids_committed = sorted(IndexStore.open_for_read(root).read_vectors()[0].tolist())
    assert ids_committed and not (root / "text").exists() or _text_ids(root) == []
    report = index_paths([imgs], root, encoder, IndexOptions(ocr=OCR))  # resume: nothing to encode, text read
    assert report.frames_encoded == 0 and report.text["ocr"]["read_again"] == len(CAPTIONS)
    assert _text_ids(root) == ids_committed  # the same frames, once each
    s = Searcher(root)
    for i, cap in enumerate(CAPTIONS):
        hits = search_hybrid(s, ocr=fold(cap), k=3)  # typed without accents
        assert hits and hits[0].path.endswith(f"f{i:02d}.png"), (cap, [h.path for h in hits])
        assert "[" in hits[0].channels["ocr"]["text"]
    rows = s._text_ix.db.execute("SELECT id, count(*) FROM frames GROUP BY id HAVING count(*) > 1").fetchall()
    assert rows == []  # no frame twice in the text index

    # The web app takes the same channel as an "ocr:" prefix in its search box, fused with a description.
    from fastapi.testclient import TestClient

    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    client = TestClient(create_app(Engine(CachedSearcher(root, encoder))))
    web = client.get("/api/search", params={"q": "ocr: gia vang"}).json()["hits"]
    want = search_hybrid(s, ocr="gia vang", k=20)
    assert [h["id"] for h in web] == [h.id for h in want] and "[Giá] [vàng]" in web[0]["channels"]["ocr"]["text"]
    fused = client.get("/api/search", params={"q": "a photo OCR: gia vang"}).json()["hits"]
    assert set(fused[0]["channels"]) == {"image", "ocr"} and fused[0]["id"] == want[0].id
    refused = client.get("/api/search", params={"q": "ocr: x", "then": "y"})
    assert refused.status_code == 422 and "not with a then" in refused.text


def test_a_search_box_splits_into_channels():
    from mergeseek.retrieval.hybrid import split_channels

    assert split_channels("a crowd ocr: HÀ NỘI") == ("a crowd", {"ocr": "HÀ NỘI"})
    assert split_channels("OCR:ha noi") == (None, {"ocr": "ha noi"})
    assert split_channels("a man riding a bike") == ("a man riding a bike", {})
    assert split_channels("protocr: x") == ("protocr: x", {})  # only where a word starts


@needs_tesseract
def test_compact_carries_the_text_and_a_reindexed_frame_is_found_once(tmp_path, encoder):
    from mergeseek.indexing import IndexOptions, index_paths
    from mergeseek.indexing.repair import compact_index
    from mergeseek.retrieval.hybrid import text_hits
    from mergeseek.retrieval.search import Searcher

    imgs = _render(tmp_path / "news", CAPTIONS[:2])
    root = tmp_path / "ix"
    index_paths([imgs], root, encoder, IndexOptions(ocr=OCR))
    _render(tmp_path / "news", ["Giá vàng tăng mạnh", CAPTIONS[1]])  # the folder changes: re-indexed, old rows dead
    index_paths([imgs], root, encoder, IndexOptions(ocr=OCR))
    assert [h.path.endswith("f00.png") for h in text_hits(Searcher(root), "gia vang")] == [True]
    assert text_hits(Searcher(root), "ha noi") == []  # the dead row's text is never a hit
    compact_index(root)
    live = sorted(Searcher(root)._ids.tolist())
    assert _text_ids(root) == live
    assert [h.path.endswith("f01.png") for h in text_hits(Searcher(root), "da nang")] == [True]

    # merge-index and export carry the text, read nothing again
    import pyarrow.parquet as pq

    from mergeseek.indexing.export import META_FILE, export_index
    from mergeseek.indexing.merge import merge_indexes

    merge_indexes([root], tmp_path / "merged")
    assert len(_text_ids(tmp_path / "merged")) == len(live)
    assert [h.path.endswith("f01.png") for h in text_hits(Searcher(tmp_path / "merged"), "da nang")] == [True]
    export_index(root, tmp_path / "out")
    table = pq.read_table(tmp_path / "out" / META_FILE)
    by_path = dict(zip([Path(p).name for p in table.column("path").to_pylist()], table.column("ocr_text").to_pylist()))
    assert "vang" in fold(by_path["f00.png"]) and "nang" in fold(by_path["f01.png"])


def test_ocr_alone_needs_an_index_with_text(tmp_path, encoder):
    from mergeseek.indexing import IndexOptions, index_paths
    from mergeseek.retrieval.hybrid import search_hybrid
    from mergeseek.retrieval.search import Searcher, check_query

    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "imgs" / "a.png")
    index_paths([tmp_path / "imgs"], tmp_path / "ix", encoder, IndexOptions())
    with pytest.raises(InputError, match="has no on-screen text; index it with --ocr"):
        search_hybrid(Searcher(tmp_path / "ix"), ocr="ha noi")
    with pytest.raises(InputError, match="empty --ocr"):
        check_query(None, None, None, 5, ocr="  ")
    with pytest.raises(InputError, match="not with --image or --then"):
        check_query("x", None, "y", 5, ocr="ha noi")
