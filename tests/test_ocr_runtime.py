"""``--ocr rapidocr,runtime=...,rec_precision=...``: RapidOCR's models run by ONNX Runtime or by
OpenVINO (``indexing.ocr_openvino``). The options parse, round-trip and are checked; ``auto`` resolves
on what is installed and what the CPU computes natively; OpenVINO in fp32 reads rendered captions
as ONNX Runtime does (the same words, boxes within 1 px, confidence within 10 points: its lines are
padded to a multiple of 32 px), and its bf16 recogniser within a stated tolerance (CER against the
fp32 reading at most 0.10 per caption, the words of every caption of 20 px or more found).
"""

from __future__ import annotations

import numpy as np
import pytest

from test_text_match import _caption_frame

from mergeseek.eval.metrics import edit_distance

pytest.importorskip("rapidocr_onnxruntime", reason="rapidocr_onnxruntime is not installed (pip install 'mergeseek[ocr]')")

CAPTIONS = [("Thủ tướng thăm Hà Nội", 20, "box"), ("Breaking news flood warning", 24, "outline"),
            ("Giá vàng tăng mạnh sáng nay", 32, "box"), ("Stock market closes higher", 16, "box"),
            ("Lễ hội pháo hoa Đà Nẵng", 40, "outline")]


def _needs_openvino():
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'mergeseek[ocr]')")


def test_runtime_options_round_trip_and_bad_values_are_one_line_naming_the_choices():
    from mergeseek.errors import ConfigError
    from mergeseek.indexing.ocr import get_engine

    e = get_engine("rapidocr,runtime=onnxruntime")
    assert (e.runtime, e.rec_precision, str(e)) == ("onnxruntime", "f32", "rapidocr,runtime=onnxruntime")
    assert str(get_engine("rapidocr, runtime = ONNXRuntime")) == str(e)  # spaces and case as other options
    assert str(get_engine("rapidocr")) == "rapidocr"  # the defaults (auto) are not written out
    for bad, match in (("rapidocr,runtime=tensorrt", r"runtime one of auto, onnxruntime, openvino"),
                       ("rapidocr,rec_precision=fp16", r"rec_precision one of auto, f32, bf16"),
                       ("rapidocr,runtime=onnxruntime,rec_precision=bf16", r"rec_precision=bf16 needs runtime=openvino")):
        with pytest.raises(ConfigError, match=match) as err:
            get_engine(bad)
        assert "\n" not in str(err.value)


def test_auto_is_openvino_where_installed_and_bf16_only_on_a_cpu_that_has_it(monkeypatch):
    from mergeseek.errors import MissingDependencyError
    from mergeseek.indexing import ocr_openvino
    from mergeseek.indexing.ocr import RapidOcrEngine

    monkeypatch.setattr(ocr_openvino, "available", lambda: False)
    e = RapidOcrEngine()
    assert (e.runtime, e.rec_precision) == ("onnxruntime", "f32")
    assert "InferenceSession" in type(e._model().text_det.infer.session).__name__  # RapidOCR's own sessions
    for asked in ({"runtime": "openvino"}, {"rec_precision": "bf16"}):
        with pytest.raises(MissingDependencyError, match=r"needs the openvino package: pip install 'mergeseek\[ocr\]'"):
            RapidOcrEngine(**asked)

    monkeypatch.setattr(ocr_openvino, "available", lambda: True)
    for native, want in ((True, "bf16"), (False, "f32")):
        monkeypatch.setattr(ocr_openvino, "native_bf16", lambda native=native: native)
        e = RapidOcrEngine()
        assert (e.runtime, e.rec_precision) == ("openvino", want)
        assert RapidOcrEngine(rec_precision="f32").rec_precision == "f32"
        assert e.describe() == f"rapidocr (openvino, recogniser {want})"


def test_openvino_detector_map_equals_onnxruntime_s():
    """The detector's text probability map through OpenVINO (fp32) equals ONNX Runtime's to 1e-3."""
    _needs_openvino()
    from mergeseek.indexing.ocr import RapidOcrEngine, detector_input
    from mergeseek.indexing.ocr_openvino import CompiledModel, model_paths

    frame = _caption_frame("Giá vàng tăng mạnh sáng nay", 24, "box")
    blob = detector_input(frame, 640)
    want = RapidOcrEngine(runtime="onnxruntime")._model().text_det.infer(blob)[0]
    got = CompiledModel(model_paths()["det"], threads=1, precision="f32")(blob)[0]
    assert got.shape == want.shape == (1, 1, 352, 640)
    assert float(np.abs(got - want).max()) < 1e-3 and (want > 0.3).sum() > 500  # text was found


def test_openvino_fp32_reads_rendered_captions_as_onnxruntime_does():
    _needs_openvino()
    from mergeseek.indexing.ocr import RapidOcrEngine

    frames = [_caption_frame(*c) for c in CAPTIONS]
    want = RapidOcrEngine(runtime="onnxruntime").read(frames)
    got = RapidOcrEngine(runtime="openvino", rec_precision="f32").read(frames)
    for w, g in zip(want, got):
        assert [x.text for x in g.words] == [x.text for x in w.words] and w.words
        assert np.abs(np.array([x.box for x in g.words]) - np.array([x.box for x in w.words])).max() <= 1
        # the line's confidence moves a little: OpenVINO's lines are padded to a multiple of 32 px (REC_PAD)
        np.testing.assert_allclose([x.conf for x in g.words], [x.conf for x in w.words], atol=10.0)


def test_openvino_bf16_recogniser_reads_rendered_captions_within_tolerance():
    """bf16 changes some characters of some lines (8% of 300 rendered lines differ from fp32; the same
    error rate against the truth, docs/BENCHMARKS.md): here each caption read in bf16 is within 0.10
    CER of the fp32 reading, both find the caption's folded words, and the lines are where fp32 has them."""
    _needs_openvino()
    from mergeseek.indexing.ocr import RapidOcrEngine
    from mergeseek.indexing.text import fold

    frames = [_caption_frame(*c) for c in CAPTIONS]
    f32 = RapidOcrEngine(runtime="onnxruntime").read(frames)
    bf16 = RapidOcrEngine(runtime="openvino", rec_precision="bf16").read(frames)
    for (caption, size, _), a, b in zip(CAPTIONS, f32, bf16):
        ra, rb = fold(a.text), fold(b.text)
        assert edit_distance(ra, rb) <= 0.10 * len(ra), (caption, ra, rb)
        if size >= 20:  # what search needs: the caption's words in the reading (16 px reads loosely in both)
            assert all(w in rb.split() for w in fold(caption).split()), (caption, rb)
        top = lambda ft: min(w.box[1] for w in ft.words)  # noqa: E731 - the detector is fp32 in both
        assert abs(top(a) - top(b)) <= 1
