"""The RapidOCR engine's own steps around RapidOCR's models (``indexing/ocr.py``): the detector's
input made in one pass equals RapidOCR's own preprocessing, its boxes are mapped to the frame, each
line is recognised as RapidOCR would, and a line crop of the same pixels is not read twice.
Needs ``rapidocr_onnxruntime`` (installed by the Makefile); skipped without it."""

from __future__ import annotations

import numpy as np
import pytest

from test_text_match import _caption_frame

pytest.importorskip("rapidocr_onnxruntime", reason="rapidocr_onnxruntime is not installed (pip install 'mergeseek[ocr]')")


def _rapidocr_input(rgb: np.ndarray, det_side: int) -> np.ndarray:
    """RapidOCR's own path, as the engine ran it before: the frame copied to BGR, shrunk by area to
    ``det_side``, then RapidOCR's ``DetPreProcess`` (resize to multiples of 32, float64 normalising)."""
    import cv2
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    s = min(1.0, det_side / max(bgr.shape[:2]))
    if s < 1.0:
        bgr = cv2.resize(bgr, (max(1, round(bgr.shape[1] * s)), max(1, round(bgr.shape[0] * s))), interpolation=cv2.INTER_AREA)
    return DetPreProcess(736, "max", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])(bgr)


@pytest.mark.parametrize("shape,det_side", [((720, 1280), 640), ((720, 1280), 544), ((480, 640), 640), ((37, 301), 640),
                                            ((1080, 1920), 640)])
def test_detector_input_is_rapidocrs_own_preprocessing(shape, det_side):
    from mergeseek.indexing.ocr import detector_input

    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got, want = detector_input(rgb, det_side), _rapidocr_input(rgb, det_side)
    assert got.dtype == np.float32 and got.shape == want.shape and got.shape[2] % 32 == 0 and got.shape[3] % 32 == 0
    np.testing.assert_allclose(got, want, atol=1e-6)  # the same pixels: float32 in one pass vs float64 then cast


def test_detector_input_of_a_frame_too_small_for_text_is_none():
    from mergeseek.indexing.ocr import RapidOcrEngine, detector_input

    assert detector_input(np.zeros((10, 200, 3), np.uint8), 640) is None  # 10 px rounds to 0 rows of 32
    assert RapidOcrEngine().read([np.zeros((10, 200, 3), np.uint8)])[0].words == ()


def test_lines_read_as_rapidocr_reads_its_own_crops():
    """Each line's text and confidence equal RapidOCR's recogniser on RapidOCR's own crop (BGR frame)
    of the same box: reading from the RGB frame, one line per call, changes nothing."""
    from mergeseek.indexing.ocr import RapidOcrEngine, detector_input

    frame = _caption_frame("Giá vàng tăng mạnh sáng nay", 32, "box")
    top = _caption_frame("Breaking news flood warning", 24, "outline")
    frame = np.concatenate([top[360:], frame[360:]])  # two lines: the first one moved up to the top half
    engine = RapidOcrEngine()
    model = engine._model()

    blob = detector_input(frame, engine.det_side)
    boxes, _ = model.text_det.postprocess_op(model.text_det.infer(blob)[0], frame.shape[:2])
    quads = np.asarray(model.text_det.filter_tag_det_res(boxes, frame.shape[:2]), np.float32)
    assert len(quads) >= 2
    bgr = np.ascontiguousarray(frame[:, :, ::-1])
    want = [model.text_rec([c])[0][0] for c in model.get_crop_img_list(bgr, quads.copy())]
    got = [engine._recognise(model, np.ascontiguousarray(c[:, :, ::-1])) for c in model.get_crop_img_list(frame, quads.copy())]
    assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([c for _, c in got], [c for _, c in want], rtol=1e-6)


def test_a_line_of_the_same_pixels_is_not_read_again_and_reads_the_same():
    from mergeseek.indexing.ocr import RapidOcrEngine

    ticker = _caption_frame("Stock market closes higher", 32, "box")
    engine = RapidOcrEngine()
    first = engine.read([ticker])[0]
    lines = engine.recognised
    assert lines >= 1 and engine.reused == 0 and "market" in first.text.lower()
    again = engine.read([ticker.copy()])[0]  # the next keyframe, the same ticker: nothing recognised
    assert again == first and engine.recognised == lines and engine.reused == lines
    assert RapidOcrEngine().read([ticker])[0] == first  # what is remembered is what a fresh engine reads

    changed = ticker.copy()
    changed[changed.shape[0] - 100:, 60:62] ^= 0x40  # two columns inside the caption's box differ
    engine.read([changed])
    assert engine.recognised > lines  # other pixels: read again

    engine.remember = 1
    other = _caption_frame("Weather update heavy rain", 32, "box")
    engine.read([other])  # the ticker's crop is forgotten (only the last line is kept)
    n = engine.recognised
    assert engine.read([ticker])[0] == first and engine.recognised == n + lines


def test_rec_height_is_an_option_that_round_trips_and_is_checked():
    from mergeseek.errors import ConfigError
    from mergeseek.indexing.ocr import get_engine

    assert str(get_engine("rapidocr")) == "rapidocr"
    e = get_engine("rapidocr,rec_height=40")
    assert e.rec_height == 40 and str(e) == "rapidocr,rec_height=40" and str(get_engine(str(e))) == str(e)
    assert e._model().text_rec.rec_image_shape == [3, 40, 267]  # the narrowest line scaled with it (320 at 48)
    assert get_engine("rapidocr")._model().text_rec.rec_image_shape == [3, 48, 320]
    for bad in ("rapidocr,rec_height=64", "rapidocr,rec_height=8"):
        with pytest.raises(ConfigError, match="rec_height from 16 to 48"):
            get_engine(bad)


def test_forget_makes_the_next_read_recognise_again():
    from mergeseek.indexing.ocr import RapidOcrEngine

    ticker = _caption_frame("Election results tonight", 32, "box")
    engine = RapidOcrEngine()
    first = engine.read([ticker])[0]
    n = engine.recognised
    engine.forget()
    assert engine.read([ticker])[0] == first and engine.recognised == 2 * n and engine.reused == 0
