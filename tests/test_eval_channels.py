"""``cli.py eval`` scores keyframe queries with ``ocr:`` / ``asr:`` parts on the fused ranking
``submit`` gives them (``eval/channels.py``): the visual part by each merge config's image
embeddings, the text parts by the frames' text, fused by reciprocal rank (k=60).

The set is a small AI Challenge layout whose keyframes have words drawn in; RapidOCR reads them
(skipped without ``rapidocr_onnxruntime``). The expected metrics come from a naive fusion written
here: the image ranking sorted by hand, the OCR ranking the one frame holding the word."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mergeseek.errors import InputError

FRAMES = {"L01_V001": [0, 50, 100], "L01_V002": [10, 200, 300]}
WORDS = {("L01_V002", 10): "SAIGON", ("L01_V001", 100): "FLOOD WARNING"}  # drawn in; the other frames are blank
RRF_K = 60  # docs/TEXT.md: sum over channels of 1 / (60 + rank)


def _font(size: int):
    from PIL import ImageFont

    for p in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        if Path(p).is_file():
            return ImageFont.truetype(p, size)
    pytest.skip("no DejaVu font (fonts-dejavu-core)")


def write_set(root: Path, queries: list) -> Path:
    """keyframes/<vid>/<n>.jpg + map-keyframes/<vid>.csv + queries.jsonl."""
    from PIL import Image, ImageDraw

    (root / "map-keyframes").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for v, frames in FRAMES.items():
        (root / "keyframes" / v).mkdir(parents=True)
        with open(root / "map-keyframes" / f"{v}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["n", "pts_time", "fps", "frame_idx"])
            for n, f in enumerate(frames, start=1):
                w.writerow([n, f / 25.0, 25.0, f])
                im = Image.fromarray(rng.integers(200, 230, (180, 320, 3), dtype=np.uint8))
                if (v, f) in WORDS:
                    ImageDraw.Draw(im).text((16, 60), WORDS[(v, f)], font=_font(36), fill=(10, 10, 10))
                im.save(root / "keyframes" / v / f"{n:03d}.jpg", quality=95)
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in queries), encoding="utf-8")
    return root


QUERIES = [
    {"id": "A", "task": "kis", "query": "a crowd ocr: saigon", "video_id": "L01_V002", "frame_idx": 10},
    {"id": "B", "task": "kis", "query": "ocr: Sài Gòn", "video_id": "L01_V001", "frame_idx": 0},  # text alone, target has none
    {"id": "C", "task": "kis", "query": "a crowd OCR: zzqx", "video_id": "L01_V001", "frame_idx": 50},  # no frame holds it
    {"id": "D", "task": "kis", "query": "a crowd", "video_id": "L01_V001", "frame_idx": 100},  # no channel: as before
    {"id": "E", "task": "kis", "query": "a crowd ocr: flood warning", "video_id": "L01_V001", "frame_idx": 100},
]


def gallery(scores) -> np.ndarray:
    """Unit rows whose inner product with the query vector e0 is ``scores``."""
    s = np.asarray(scores, np.float64)
    g = np.zeros((len(s), len(s) + 1))
    g[:, 0] = s
    g[np.arange(len(s)), np.arange(len(s)) + 1] = np.sqrt(1 - s**2)
    return g.astype(np.float32)


class Texts:  # a "text tower": every visual part is the same description, vector e0
    def encode_texts(self, texts):
        out = np.zeros((len(texts), len(FRAMES["L01_V001"]) + len(FRAMES["L01_V002"]) + 1), np.float32)
        out[:, 0] = 1.0
        return out


def naive_rank(scores, ocr_frames: list, target: int, visual: bool) -> float:
    """1-based rank of ``target`` in the hand-made fusion of the image ranking (``scores`` sorted)
    and the OCR ranking ``ocr_frames``; inf when neither channel lists it."""
    fused: dict = {}
    if visual:
        for r, i in enumerate(sorted(range(len(scores)), key=lambda i: -scores[i]), start=1):
            fused[i] = fused.get(i, 0.0) + 1 / (RRF_K + r)
    for r, i in enumerate(ocr_frames, start=1):
        fused[i] = fused.get(i, 0.0) + 1 / (RRF_K + r)
    order = sorted(fused, key=lambda i: -fused[i])
    return order.index(target) + 1 if target in order else math.inf


def aic_of(rank: float) -> float:
    return sum(rank <= k for k in (1, 5, 20, 50, 100)) / 5


@pytest.fixture(scope="module")
def kf_set(tmp_path_factory):
    pytest.importorskip("rapidocr_onnxruntime", reason="rapidocr_onnxruntime is not installed (pip install 'mergeseek[ocr]')")
    from mergeseek.eval.config import EvalConfig
    from mergeseek.eval.datasets import load_dataset
    from mergeseek.eval.runner import with_text

    root = write_set(tmp_path_factory.mktemp("kf"), QUERIES)
    ds = load_dataset(f"keyframes:{root}", channels={"ocr"})
    cfg = EvalConfig(ocr="rapidocr", datasets=(f"keyframes:{root}",))
    import mergeseek.eval.channels as ch

    cache_file = root.parent / "cache.sqlite"
    orig = ch.TextCache
    ch.TextCache = lambda path=None: orig(cache_file)
    try:
        ds = with_text(ds, cfg)
    finally:
        ch.TextCache = orig
    return root, ds, cache_file


def test_queries_keep_their_visual_part_and_channels(kf_set):
    _, ds, _ = kf_set
    by = {q.qid: q for q in ds.queries}
    assert (by["A"].text, by["A"].channels) == ("a crowd", (("ocr", "saigon"),))
    assert (by["B"].text, by["B"].channels) == ("", (("ocr", "Sài Gòn"),))
    assert (by["D"].text, by["D"].channels) == ("a crowd", ())


def test_the_frames_text_is_read_by_the_ocr_engine(kf_set):
    _, ds, _ = kf_set
    texts = {(v, f): t.text for v, f, t in zip(ds.video_ids, ds.frame_idx, ds.text.texts["ocr"])}
    assert texts[("L01_V002", 10)].upper().replace(" ", "") == "SAIGON"
    assert "FLOOD" in texts[("L01_V001", 100)].upper()
    assert all(not t for k, t in texts.items() if k not in WORDS)
    assert ds.text.channels == ["ocr"] and any("rapidocr over the 6 keyframes" in n for n in ds.text.notes)


@pytest.mark.parametrize("configs", [{"none": [0.9, 0.5, 0.8, 0.7, 0.3, 0.1]},
                                     {"none": [0.9, 0.5, 0.8, 0.7, 0.3, 0.1], "r=8": [0.2, 0.95, 0.1, 0.3, 0.9, 0.5]}])
def test_fused_metrics_equal_a_hand_computed_fusion_for_every_merge_config(kf_set, configs):
    from mergeseek.eval.runner import _retrieval

    _, ds, _ = kf_set
    pos = {(v, f): i for i, (v, f) in enumerate(zip(ds.video_ids, ds.frame_idx))}
    saigon, flood = pos[("L01_V002", 10)], pos[("L01_V001", 100)]
    res = _retrieval(Texts(), ds, {name: gallery(s) for name, s in configs.items()}, topk=3)
    assert [r.config for r in res.results] == list(configs)
    for row in res.results:
        s = configs[row.config]
        ranks = {
            "A": naive_rank(s, [saigon], saigon, True),
            "B": naive_rank(s, [saigon], pos[("L01_V001", 0)], False),  # not listed: a miss
            "C": naive_rank(s, [], pos[("L01_V001", 50)], True),  # no OCR match: the image ranking alone
            "D": naive_rank(s, [], flood, True),
            "E": naive_rank(s, [flood], flood, True),
        }
        assert ranks["B"] == math.inf
        r = np.array(list(ranks.values()))
        m = row.metrics
        for k in (1, 5, 10, 100):
            assert m[f"R@{k}"] == pytest.approx(float(np.mean(r <= k))), (row.config, k, ranks)
        assert m["MRR"] == pytest.approx(float(np.mean(1 / r)))
        assert m["AIC"] == pytest.approx(np.mean([aic_of(x) for x in r])) and m["AIC_kis"] == pytest.approx(m["AIC"])
    first = res.results[0].metrics
    assert first["R@1"] == pytest.approx(2 / 5)  # A and E: OCR lifts their frames (image ranks 3 and 2) to the top
    assert "ocr (fused)" in res.protocol
    assert any("4 of 5 queries have ocr:/asr: parts" in n and "k=60" in n for n in res.notes)


def test_without_the_frames_text_the_query_file_is_refused_in_one_line_naming_the_flag(tmp_path):
    from mergeseek.eval.datasets import load_dataset

    write_set(tmp_path, QUERIES[:1] + [{"id": "S", "query": "asr: thủ tướng", "video_id": "L01_V001", "frame_idx": 0}])
    with pytest.raises(InputError) as err:
        load_dataset(f"keyframes:{tmp_path}")
    msg = str(err.value)
    assert "\n" not in msg and "query A has ocr:/asr: parts (2 such)" in msg
    assert "--ocr ENGINE" in msg and "--asr ENGINE" in msg and "--text-from INDEX" in msg
    with pytest.raises(InputError, match=r"query S .*\(1 such\) needing speech.*--asr ENGINE") as err:
        load_dataset(f"keyframes:{tmp_path}", channels={"ocr"})  # --ocr given, the speech query still lacks its text
    assert "--ocr ENGINE" not in str(err.value)
    assert len(load_dataset(f"keyframes:{tmp_path}", channels={"ocr", "asr"}).queries) == 2


def test_a_trake_event_with_a_channel_needs_its_text_too(tmp_path):
    from mergeseek.eval.datasets import load_dataset

    write_set(tmp_path, [{"id": "T", "task": "trake", "video_id": "L01_V001",
                          "events": [{"text": "a crowd", "frame_idx": 0}, {"text": "a car ocr: flood", "frame_idx": 100}]}])
    with pytest.raises(InputError, match=r"query T has ocr:/asr: parts \(1 such\) needing on-screen text"):
        load_dataset(f"keyframes:{tmp_path}")


def test_the_ocr_text_is_cached_by_file_content_and_engine(kf_set, monkeypatch):
    from mergeseek.eval.channels import TextCache, read_set_text
    from mergeseek.indexing import ocr

    _, ds, cache_file = kf_set
    monkeypatch.setattr(ocr.RapidOcrEngine, "read", lambda self, images, prescale=None: pytest.fail("read again"))
    cache = TextCache(cache_file)
    again = read_set_text(ds, {"ocr"}, ocr="rapidocr", cache=cache)
    assert cache.hits == len(ds.video_ids) and cache.misses == 0
    assert again.texts["ocr"] == ds.text.texts["ocr"]  # words, confidences and boxes exactly
    assert any("6 from the cache" in n for n in again.notes)
    cache.close()
    other = TextCache(cache_file)  # another engine setting is another key: read again
    monkeypatch.setattr(ocr.RapidOcrEngine, "read", lambda self, images, prescale=None: [ocr.FrameText()] * len(images))
    read_set_text(ds, {"ocr"}, ocr="rapidocr,min_conf=60", cache=other)
    assert other.misses == len(ds.video_ids)
    other.close()


def test_text_from_and_an_engine_are_not_given_together():
    from mergeseek.errors import ConfigError
    from mergeseek.eval.config import EvalConfig

    with pytest.raises(ConfigError, match="one way"):
        EvalConfig(ocr="rapidocr", text_from="ix")


def test_cli_eval_passes_the_channel_flags(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import mergeseek.eval as ev
    from mergeseek.cli import app

    seen = {}
    monkeypatch.setattr(ev, "evaluate", lambda cfg, out, progress=False: seen.setdefault("cfg", cfg) and {})
    CliRunner().invoke(app, ["eval", "--dataset", "keyframes:x", "--ocr", "rapidocr", "--asr", "pocketsphinx",
                             "--no-plots", "--out", str(tmp_path / "o"), "--videos", str(tmp_path / "vids")])
    assert (seen["cfg"].ocr, seen["cfg"].asr, seen["cfg"].text_from) == ("rapidocr", "pocketsphinx", None)
    assert seen["cfg"].videos == str(tmp_path / "vids")


def test_eval_s_videos_folder_reaches_the_reading_as_index_s_release_parts(tmp_path, monkeypatch):
    import mergeseek.eval.channels as ch
    from mergeseek.eval import runner
    from mergeseek.eval.config import EvalConfig
    from mergeseek.eval.datasets import load_dataset

    ds = load_dataset(f"keyframes:{write_set(tmp_path / 'set', QUERIES)}", channels={"ocr"})
    seen = {}

    def fake_read(ds, need, **kwargs):
        seen.update(kwargs)
        return None

    monkeypatch.setattr(ch, "read_set_text", fake_read)
    runner.with_text(ds, EvalConfig(ocr="rapidocr", videos="/data/aic/videos"))
    assert seen["release_parts"] == {"videos": "/data/aic/videos"}
    runner.with_text(ds, EvalConfig(ocr="rapidocr"))
    assert seen["release_parts"] is None  # the release's own Videos_* folders


def test_text_from_an_index_of_the_same_keyframes_gives_the_same_text_and_scores(kf_set, tmp_path):
    """``--text-from``: an index built with ``--ocr`` over the same release; its stored text is
    matched to the set's keyframes by (video id, frame index) and scores as the engine's reading."""
    from dataclasses import replace

    from test_indexing_support import build_encoder

    from mergeseek.eval.channels import index_channels, read_set_text
    from mergeseek.eval.runner import _retrieval
    from mergeseek.indexing import IndexOptions, index_paths

    root, ds, _ = kf_set
    ix = tmp_path / "ix"
    index_paths([root], ix, build_encoder(), IndexOptions(ocr="rapidocr"))
    assert index_channels(ix) == {"ocr"}
    stored = read_set_text(ds, {"ocr"}, text_from=str(ix))
    assert [t.text for t in stored.texts["ocr"]] == [t.text for t in ds.text.texts["ocr"]]
    assert any(f"stored in {ix} for 6 of the 6 keyframes" in n for n in stored.notes)
    embs = {"none": gallery([0.9, 0.5, 0.8, 0.7, 0.3, 0.1])}
    a = _retrieval(Texts(), ds, embs, topk=3).results[0].metrics
    b = _retrieval(Texts(), replace(ds, text=stored), embs, topk=3).results[0].metrics
    assert a == b


def test_asr_transcribes_the_release_s_videos_once_and_maps_them_to_the_keyframes(tmp_path, monkeypatch):
    """``--asr``: each video id's video in the release is transcribed (cached by its content), and
    its segments go to the keyframes by ``pts_time`` as indexing maps them; a video id without its
    video gives no speech (a note), and the speech query is scored fused."""
    from test_asr import SAID, _pocketsphinx, _speaking_video, needs_speech

    if needs_speech.args[0]:
        pytest.skip(needs_speech.kwargs["reason"])
    _pocketsphinx()
    from mergeseek.eval.channels import TextCache, read_set_text
    from mergeseek.eval.datasets import load_dataset
    from mergeseek.eval.runner import _retrieval
    from mergeseek.indexing import asr
    from mergeseek.indexing.audio import read_audio

    root = write_set(tmp_path / "release", [{"id": "S", "task": "kis", "query": "asr: football team", "video_id": "L01_V002",
                                             "frame_idx": 10}])
    video = _speaking_video(root / "videos", "L01_V002", SAID["football"], pad_s=0.0)  # V001 has no video
    ds = load_dataset(f"keyframes:{root}", channels={"asr"})
    cache = TextCache(tmp_path / "cache.sqlite")
    got = read_set_text(ds, {"asr"}, asr="pocketsphinx", cache=cache)
    v2 = [i for i, v in enumerate(ds.video_ids) if v == "L01_V002"]
    want = asr.segments_to_frames(asr.get_engine("pocketsphinx").transcribe(read_audio(str(video))), [ds.pts_time[i] for i in v2])
    assert [got.texts["asr"][i].text for i in v2] == [t.text for t in want] and any(t.text for t in want)
    assert all(not got.texts["asr"][i].text for i, v in enumerate(ds.video_ids) if v == "L01_V001")
    assert any("no video for 1 video id(s) (L01_V001)" in n for n in got.notes)

    monkeypatch.setattr(asr.PocketSphinxEngine, "transcribe", lambda self, samples: pytest.fail("transcribed again"))
    again = read_set_text(ds, {"asr"}, asr="pocketsphinx", cache=cache)
    assert again.texts["asr"] == got.texts["asr"] and cache.hits == 1  # segments, times and other hypotheses exactly
    cache.close()

    from dataclasses import replace

    res = _retrieval(Texts(), replace(ds, text=got), {"none": gallery([0.9, 0.5, 0.8, 0.7, 0.3, 0.1])}, topk=3)
    heard = [i for i in v2 if "football" in got.texts["asr"][i].text]
    assert "asr (fused)" in res.protocol
    assert res.results[0].metrics["R@1"] == (1.0 if ds.queries[0].relevant[0] == heard[0] else 0.0)


def test_asr_finds_a_video_where_index_finds_it(tmp_path, monkeypatch):
    """``--asr`` takes a keyframe folder's video by index's own rule (``indexing.asr.sound_path``):
    the release's ``Videos_*`` folder, or a folder outside the release given as its videos part
    (``--videos DIR``); without either, one line naming where it looked and what to pass."""
    import shutil

    import mergeseek.eval.channels as ch
    from mergeseek.eval.channels import TextCache, read_set_text
    from mergeseek.eval.datasets import load_dataset
    from mergeseek.indexing import asr, audio

    class Heard:  # an engine that hears the same words in any sound (no model needed)
        def __str__(self):
            return "heard"

        def transcribe(self, samples):
            return [asr.Segment(0.0, 60.0, "football team", 90.0)]

    opened = []
    monkeypatch.setattr(ch, "_ENGINES", {("asr", "heard"): Heard()})
    monkeypatch.setattr(audio, "read_audio", lambda path, **kw: opened.append(Path(path)) or np.zeros(16000, np.float32))
    root = write_set(tmp_path / "release", [{"id": "S", "task": "kis", "query": "asr: football", "video_id": "L01_V002",
                                             "frame_idx": 10}])
    ds = load_dataset(f"keyframes:{root}", channels={"asr"})
    v2 = [i for i, v in enumerate(ds.video_ids) if v == "L01_V002"]
    elsewhere = tmp_path / "disk2" / "clips"
    elsewhere.mkdir(parents=True)
    (elsewhere / "L01_V002.mp4").write_bytes(b"the video of L01_V002")

    with pytest.raises(InputError, match=r"looked for L01_V001\.mp4 in the release's Videos_\* folders, as index does.*--videos DIR") as err:
        read_set_text(ds, {"asr"}, asr="heard", cache=TextCache(tmp_path / "c0.sqlite"))
    assert "\n" not in str(err.value) and not opened

    got = read_set_text(ds, {"asr"}, asr="heard", cache=TextCache(tmp_path / "c1.sqlite"), release_parts={"videos": elsewhere})
    folder = Path(ds.images.paths[v2[0]]).parent
    assert opened == [Path(asr.sound_path("keyframes", folder, "L01_V002", {"videos": elsewhere}))]  # index's file
    assert opened[0].samefile(elsewhere / "L01_V002.mp4")
    assert all("football" in got.texts["asr"][i].text for i in v2)  # 0.4 s, 8 s, 12 s: inside the segment
    assert all(not t.text for i, t in enumerate(got.texts["asr"]) if i not in v2)

    (root / "Videos_L01").mkdir()
    shutil.move(elsewhere / "L01_V002.mp4", root / "Videos_L01" / "L01_V002.mp4")  # in the release: no flag needed
    again = read_set_text(ds, {"asr"}, asr="heard", cache=TextCache(tmp_path / "c2.sqlite"))
    assert opened[1].samefile(root / "Videos_L01" / "L01_V002.mp4") and again.texts["asr"] == got.texts["asr"]


def test_the_ocr_engine_is_built_once_for_every_set_of_the_run(tmp_path, monkeypatch):
    """Two keyframe sets read with ``--ocr rapidocr``: one engine built (its construction loads
    models), both sets read by it, each frame's words as before."""
    pytest.importorskip("rapidocr_onnxruntime", reason="rapidocr_onnxruntime is not installed (pip install 'mergeseek[ocr]')")
    import mergeseek.eval.channels as ch
    from mergeseek.eval.channels import TextCache, read_set_text
    from mergeseek.eval.datasets import load_dataset
    from mergeseek.indexing import ocr

    built = []
    init = ocr.RapidOcrEngine.__init__

    def counted(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(ch, "_ENGINES", {})
    monkeypatch.setattr(ocr.RapidOcrEngine, "__init__", counted)
    for name in ("one", "two"):
        ds = load_dataset(f"keyframes:{write_set(tmp_path / name, QUERIES)}", channels={"ocr"})
        got = read_set_text(ds, {"ocr"}, ocr="rapidocr", cache=TextCache(tmp_path / f"{name}.sqlite"))
        texts = {(v, f): t.text for v, f, t in zip(ds.video_ids, ds.frame_idx, got.texts["ocr"])}
        assert texts[("L01_V002", 10)].upper().replace(" ", "") == "SAIGON"
    assert len(built) == 1 and ch.text_engine("ocr", "rapidocr") is built[0]
    ch.text_engine("ocr", "rapidocr,min_conf=60")  # another setting is another engine
    assert len(built) == 2
    from mergeseek.eval.config import EvalConfig

    EvalConfig(ocr="rapidocr").text_channels()  # the check before any model loads uses the same engine
    assert len(built) == 2


def test_evaluate_end_to_end_writes_each_merge_config_s_fused_score(kf_set, tmp_path, monkeypatch):
    """``evaluate`` with ``ocr=rapidocr`` on the set (random-weight ViT-B-32, two merge configs):
    report.json records the flag and the channels, and each config's R@K / MRR / AIC equal the
    naive fusion of that config's own image ranking (``encoders.Encoder``) with the OCR ranking."""
    import mergeseek.eval.channels as ch
    import mergeseek.eval.runner  # noqa: F401 (eval.runner, patched below)
    from mergeseek import eval
    from mergeseek.encoders import Encoder
    from mergeseek.eval import EvalConfig, evaluate
    from mergeseek.eval.candidates import merged_encoders
    from mergeseek.eval.models import load_model

    root, ds, cache_file = kf_set
    model = load_model("ViT-B-32", None, "cpu")
    monkeypatch.setattr(eval.runner, "load_model", lambda *a, **k: model)
    orig = ch.TextCache
    monkeypatch.setattr(ch, "TextCache", lambda path=None: orig(cache_file))  # the fixture's readings: nothing read again
    cfg = EvalConfig(models=("ViT-B-32",), pretrained=None, datasets=(f"keyframes:{root}",), merges=("r=8",), batch_size=4,
                     warmup=0, iters=1, topk=3, device="cpu", plots=False, ocr="rapidocr")
    evaluate(cfg, tmp_path / "out")
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["config"]["ocr"] == "rapidocr" and rep["config"]["text_from"] is None
    (dres,) = rep["models"][0]["datasets"]
    assert "ocr (fused)" in dres["protocol"] and any("rapidocr over the 6 keyframes (6 from the cache" in n for n in dres["notes"])
    assert "ocr (fused)" in (tmp_path / "out" / "report.md").read_text()

    base = Encoder(model_name="ViT-B-32", pretrained=None, device="cpu", merge="none", batch_size=4,
                   model=model.clip, preprocess=model.preprocess, tokenizer=model.tokenizer)
    encoders = {"none": base, **merged_encoders(base, ("r=8",))}
    images = [ds.images.load(i) for i in range(len(ds.images))]
    q = base.encode_texts(["a crowd"])[0]
    pos = {(v, f): i for i, (v, f) in enumerate(zip(ds.video_ids, ds.frame_idx))}
    saigon, flood = pos[("L01_V002", 10)], pos[("L01_V001", 100)]
    assert len(dres["results"]) == 2
    for name, enc in encoders.items():
        s = enc.encode_images(images) @ q
        r = np.array([naive_rank(s, [saigon], saigon, True), naive_rank(s, [saigon], pos[("L01_V001", 0)], False),
                      naive_rank(s, [], pos[("L01_V001", 50)], True), naive_rank(s, [], flood, True),
                      naive_rank(s, [flood], flood, True)])
        m = next(x for x in dres["results"] if x["config"] == name)["metrics"]
        for k in (1, 5, 10):
            assert m[f"R@{k}"] == pytest.approx(float(np.mean(r <= k))), (name, r)
        assert m["MRR"] == pytest.approx(float(np.mean(1 / r)), abs=1e-6)
        assert m["AIC"] == pytest.approx(np.mean([aic_of(x) for x in r]))


def test_a_trake_query_chains_its_events_fused_rankings(kf_set, tmp_path, monkeypatch):
    """TRAKE events with channels are each ranked fused and chained (``retrieval.events``): event 1
    "a crowd ocr: saigon" starts at the SAIGON frame (image rank 3, OCR rank 1), event 2 "a crowd"
    follows in the same video. By hand: that chain (1/63 + 1/61 + 1/65) beats the best image-only
    one (V1: 1/61 + 1/62), so the first row is (L01_V002, 10, 200), the truth: score 1."""
    from dataclasses import replace

    import mergeseek.eval.channels as ch
    from mergeseek.eval.datasets import load_dataset
    from mergeseek.eval.runner import _retrieval, with_text
    from mergeseek.eval.config import EvalConfig

    _, _, cache_file = kf_set
    trake = {"id": "T", "task": "trake", "video_id": "L01_V002", "within": 60,
             "events": [{"text": "a crowd ocr: saigon", "frame_idx": 10}, {"text": "a crowd", "frame_idx": 200}]}
    root = write_set(tmp_path / "t", [trake])
    orig = ch.TextCache
    monkeypatch.setattr(ch, "TextCache", lambda path=None: orig(cache_file))  # the same pictures: read from the cache
    ds = with_text(load_dataset(f"keyframes:{root}", channels={"ocr"}), EvalConfig(ocr="rapidocr"))
    embs = {"none": gallery([0.9, 0.5, 0.8, 0.7, 0.3, 0.1])}
    res = _retrieval(Texts(), ds, embs, topk=3)
    assert res.results[0].metrics["AIC_trake"] == 1.0 and "ocr (fused)" in res.protocol
    plain = {"id": "T", "task": "trake", "video_id": "L01_V002", "within": 60,
             "events": [{"text": "a crowd", "frame_idx": 10}, {"text": "a crowd", "frame_idx": 200}]}
    (root / "queries.jsonl").write_text(json.dumps(plain))
    without = _retrieval(Texts(), replace(load_dataset(f"keyframes:{root}"), text=None), embs, topk=3)
    assert without.results[0].metrics["AIC_trake"] < 1.0  # the image channel alone starts the chain in L01_V001
