"""OpenVINO as the runtime of RapidOCR's models (``--ocr rapidocr,runtime=openvino``; the default
``runtime=auto`` picks it where it is installed).

The same ONNX files RapidOCR ships, read and compiled for the CPU by OpenVINO instead of run by ONNX
Runtime, with the same inputs. On this machine (AMD EPYC with AVX-512, one thread) the detector costs
45 ms a frame against 50, and the recogniser 24 ms a new line against 29 in fp32, or 16 in bf16.
Measured on 600 rendered lines (docs/BENCHMARKS.md, OCR): the character error rate is the same for
ONNX Runtime fp32 (0.0258 / 0.0402 on two sets of 300), OpenVINO fp32 (0.0252 / 0.0415) and OpenVINO
with a bf16 recogniser (0.0244 / 0.0401); 85-91% of the lines read to the very same string.

- The recogniser runs in bf16 where the CPU computes it natively (AVX512_BF16 or AMX, OpenVINO's
  ``BF16`` capability; ``rec_precision``). The detector always runs in fp32: in bf16 (or int8) its
  text map moves enough to lose 16 px captions.
- Text lines come in every width, and each new input shape costs OpenVINO a preparation about as
  long as reading the line: the lines are padded with zeros (what RapidOCR pads its batches with) to
  a multiple of 32 px, so a run sees a few widths (``REC_PAD``).
- Compiled models are kept in the user's cache folder (:func:`cache_dir`), so a run loads them
  (0.05 s a model) instead of compiling them (0.25-0.3 s of CPU). Nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

OPENVINO_INSTALL = "pip install 'mergeseek[ocr]' (or pip install openvino)"
PRECISIONS = ("f32", "bf16")
REC_PAD = 32  # the recogniser's lines are padded to a multiple of this width (CompiledModel.pad_width)


def available() -> bool:
    """Whether OpenVINO can be imported here."""
    return importlib.util.find_spec("openvino") is not None


def cache_dir() -> Path:
    """Where OpenVINO keeps the models it compiled (``$MERGESEEK_CACHE`` or the user's cache folder,
    ``openvino/``): the next run loads them instead of compiling again (0.05 s a model instead of
    0.25-0.3 s of CPU here). OpenVINO keys each file by the model's content, the settings and the CPU."""
    from mergeseek.runtime import cache_dir as mergeseek_cache

    return mergeseek_cache() / "openvino"


@functools.lru_cache(maxsize=1)
def _core():
    import openvino as ov

    core = ov.Core()
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(folder)})
    except OSError:  # a read-only home: compile every run
        pass
    return core


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (OpenVINO's ``BF16`` capability)."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def model_paths() -> dict:
    """{"det": path, "rec": path}: the detector and recogniser ONNX files RapidOCR uses (its config.yaml)."""
    import rapidocr_onnxruntime
    import yaml

    root = Path(rapidocr_onnxruntime.__file__).parent
    config = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))
    return {"det": root / config["Det"]["model_path"], "rec": root / config["Rec"]["model_path"]}


class CompiledModel:
    """One ONNX model compiled by OpenVINO for the CPU, called as RapidOCR calls its ONNX Runtime
    sessions (an input array -> [output array]). Not shared between threads.

    Args:
        path: the ONNX file.
        threads: CPU threads of one call (one per OCR worker by default); not pinned to cores, the
            encoder runs beside it.
        precision: ``f32``, or ``bf16`` (on a CPU without native bf16 OpenVINO emulates it: slower).
        pad_width: the input's last axis is padded with zeros to a multiple of this (0: as given).
            Each new input shape costs OpenVINO a preparation (about 12 ms for the recogniser, as
            much as reading the line), and text lines come in every width: padded to multiples of
            32 a run sees a few widths. Zeros are what RapidOCR pads its batches of lines with.
    """

    def __init__(self, path: Path, threads: int = 1, precision: str = "f32", pad_width: int = 0):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        core = _core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False, "INFERENCE_PRECISION_HINT": precision})
        self.precision, self.pad_width = precision, int(pad_width)
        self._request = compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> list:
        if self.pad_width > 1 and x.shape[-1] % self.pad_width:
            wide = np.zeros(x.shape[:-1] + (-(-x.shape[-1] // self.pad_width) * self.pad_width,), x.dtype)
            wide[..., : x.shape[-1]] = x
            x = wide
        # the output array is the request's own buffer, overwritten by the next call
        return [np.array(self._request.infer([x])[0], copy=True)]


class _Session:
    """A compiled model in place of RapidOCR's ``OrtInferSession`` (which it keeps for the rest: the
    recogniser's character list is read from the ONNX metadata when RapidOCR is built)."""

    def __init__(self, compiled: CompiledModel, original):
        self.compiled, self.original = compiled, original

    def __call__(self, x: np.ndarray) -> list:
        return self.compiled(x)

    def __getattr__(self, name):
        if name == "original":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.original, name)


def install(model, threads: int, rec_precision: str) -> None:
    """Run a RapidOCR instance's detector (fp32) and recogniser (``rec_precision``) through OpenVINO."""
    paths = model_paths()
    model.text_det.infer = _Session(CompiledModel(paths["det"], threads, "f32"), model.text_det.infer)
    model.text_rec.session = _Session(CompiledModel(paths["rec"], threads, rec_precision, pad_width=REC_PAD),
                                      model.text_rec.session)


__all__ = ["CompiledModel", "OPENVINO_INSTALL", "PRECISIONS", "REC_PAD", "available", "cache_dir", "install", "model_paths", "native_bf16"]
