"""Smoke tests of the GPU suite's CPU-runnable parts: the keyframe-folder maker and decoder
timing, the search-scale bench, and the suite script itself (syntax, every stage it names runs)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_keyframe_folder_is_an_ai_challenge_layout_of_distinct_real_jpegs(tmp_path):
    from PIL import Image

    from bench.keyframes import make_release, time_decoders

    files = make_release(tmp_path, videos=2, per_video=3, size=(320, 180), workers=1)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        f"keyframes/L01_V00{v}/000{n}.jpg" for v in (1, 2) for n in (1, 2, 3)]
    pixels = []
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.size == (320, 180)
            pixels.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    assert all(np.abs(a - b).mean() > 5 for i, a in enumerate(pixels) for b in pixels[i + 1:])  # no near-duplicates
    assert make_release(tmp_path, videos=2, per_video=3, workers=1) == files  # existing files are kept
    rates = time_decoders(files, "cpu", threads=1)
    assert rates["files"] == 6 and rates["pil"] > 0 and rates["pil-draft"] > 0 and "nvjpeg" not in rates


def test_search_scale_bench_recalls_its_exact_search_on_the_cpu(tmp_path):
    from bench.search_scale import run

    (row,) = run([3000], device="cpu", queries=8)
    assert row["n"] == 3000 and "torch" not in row  # exact GPU search only on CUDA
    flat, ivf = row["faiss"]["flat"], row["faiss"]["ivf"]
    assert flat["p50_ms"] > 0 and ivf["recall_at_10"] == 1.0  # auto is Flat at this size: exact


def test_the_gpu_suite_script_parses_and_every_default_stage_is_defined():
    script = (ROOT / "bench" / "gpu_suite.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_suite.sh")], check=True)
    stages = re.search(r'STAGES="\$\{STAGES:-([^}]*)\}"', script).group(1).split()
    defined = set(re.findall(r"^(?:\w+=\S+ )*(?:bench|run) (\w+) ", script, flags=re.M))
    assert stages and set(stages) <= defined, (sorted(stages), sorted(defined))
    header = script.split("set -uo pipefail")[0]
    for extra in defined - set(stages):  # a stage left out of the default run says so in the header
        assert re.search(rf"#   {extra} (.*\n#)?.*not in the default STAGES", header), extra
    for module in ("bench.keyframes", "bench.search_scale", "bench.reuse"):
        assert module in script


@pytest.mark.parametrize("module", ["bench.keyframes", "bench.search_scale", "bench.compile_time"])
def test_bench_modules_answer_help(module):
    import sys

    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage" in out.stdout.lower()
