"""The speed/accuracy sweep of issue #26: ``cli.py eval --sweep`` over methods x r on the trained
reference (a few hundred real test images) writes the table (top-1, delta, GFLOPs, FLOP ratio,
speed-up, cosine, top-5 agreement) and the trade-off charts; random-weight models leave the
accuracy columns out and say why. The figures themselves are benchmarks (docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mergeseek.eval.config import BASELINE
from mergeseek.eval.results import CandidateResult, DatasetResult, ModelResult
from mergeseek.eval.timing import TimingResult

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ["MERGESEEK_DATA"]) if os.environ.get("MERGESEEK_DATA") else REPO.parent / "shared" / "data"


def _timing(name: str, ips: float) -> TimingResult:
    return TimingResult(name, ips, 1000 / ips, 1.0, 1.0, 1, 1, 0.0, 0.0, "rss", (1.0,), "cpu")


def _fake_model(meaningful: bool) -> ModelResult:
    names = {BASELINE: ([145] * 9, 100.0, 0.80), "method=bipartite,r=16": ([129, 113, 97, 81, 65, 49, 33, 17, 9], 190.0, 0.75),
             "method=energy,r=16": ([129, 113, 97, 81, 65, 49, 33, 17, 9], 180.0, 0.70),
             "method=bipartite,r=8": ([137, 129, 121, 113, 105, 97, 89, 81, 73], 140.0, 0.78)}
    ds = DatasetResult("cifar10", "classification", "x", 4, 0, 10, "own 10-way head", "top1",
                       results=tuple(CandidateResult(n, {"top1": acc, "top5": 0.9}, {"cos_mean": 0.99, "pred_agree": 0.9,
                                                                                       "top5_overlap": 0.8})
                                     for n, (_, _, acc) in names.items()))
    return ModelResult(model={"model": "ref", "kind": "classifier", "width": 192, "mlp_ratio": 4.0, "tokens": 145,
                              "layers": 9, "weights_meaningful": meaningful, "pretrained": "x"},
                       timing={n: _timing(n, ips) for n, (_, ips, _) in names.items()},
                       tokens={n: t for n, (t, _, _) in names.items()}, flop_ratio={n: 1.0 for n in names},
                       merge_stats={}, datasets=(ds,))


def test_gflops_is_twice_the_block_macs_by_hand():
    m = _fake_model(True)
    n, d = 145, 192
    per_block = 4 * n * d * d + 2 * n * n * d + 8 * n * d * d  # qkv + proj, QK^T + AV, MLP (ratio 4)
    assert m.gflops(BASELINE) == pytest.approx(2 * 9 * per_block / 1e9)
    assert m.gflops("method=bipartite,r=16") < m.gflops("method=bipartite,r=8") < m.gflops(BASELINE)


def test_random_weights_leave_the_accuracy_columns_out_and_say_why():
    from mergeseek.eval.report import dataset_table

    real, fake = (dataset_table(m, m.datasets[0]) for m in (_fake_model(True), _fake_model(False)))
    assert "top1" in real[2] and "Δtop1" in real[2] and "GFLOPs" in real[2] and "FLOP ratio" in real[2]
    assert "top1 |" not in fake[2] and "Δtop1" not in fake[2] and "cos_mean" in fake[2] and "GFLOPs" in fake[2]
    assert any("left out" in line and "random weights" in line for line in fake)
    assert not any("left out" in line for line in real)


def test_chart_lines_are_sorted_by_x_and_labelled_by_r(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergeseek.eval.plots import _panel, plot_tradeoff

    m = _fake_model(True)
    for axis in ("speed", "gflops"):
        fig, ax = plt.subplots()
        _panel(ax, m, m.datasets[0], axis, "top1", "top1", 100.0)
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        bip = lines["method=bipartite"]
        xs = list(bip.get_xdata())
        assert xs == sorted(xs) and len(xs) == 2  # r=8 and r=16, the unmerged star apart
        assert list(lines["unmerged"].get_ydata()) == [80.0] and lines["unmerged"].get_marker() == "*"
        assert sorted(t.get_text() for t in ax.texts) == ["r=16", "r=16", "r=8"]
        plt.close(fig)
    path = plot_tradeoff(m, m.datasets[0], tmp_path / "t.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_top1_is_the_reference_s_own(results: dict, names: list, n: int) -> None:
    """Each config's reported top-1 equals ``evaluate_reference`` of the same merged reference on the
    first ``n`` CIFAR-10 test images (the sweep's numbers, recomputed by the reference's own loop)."""
    from mergeseek.encoders import apply_merging, remove_merging
    from mergeseek.eval.reference import evaluate_reference, load_cifar10_npz, load_reference

    net, _ = load_reference()
    split = load_cifar10_npz(DATA_ROOT / "cifar10", "test", n)
    for name in names:
        apply_merging(net, name)
        assert results[name]["metrics"]["top1"] == pytest.approx(evaluate_reference(net, split.images, split.labels)), name
        remove_merging(net)


@pytest.mark.slow
def test_sweep_on_the_trained_reference_writes_table_and_charts(tmp_path, one_torch_thread):
    """200 real test images, ``--sweep r=8|16,method=bipartite|energy``: every config's top-1
    equals the reference's own evaluation of the same merged model on the same images."""
    from mergeseek.eval import EvalConfig, evaluate
    from mergeseek.eval.plots import replot
    from mergeseek.eval.reference import reference_available

    if not reference_available() or not (DATA_ROOT / "cifar10" / "test_jpeg.npz").is_file():
        pytest.skip(f"needs eval/reference/reference-cifar10.pt and CIFAR-10 under {DATA_ROOT}")
    cfg = EvalConfig(models=("reference-cifar10",), pretrained=None, datasets=("cifar10",), data_root=str(DATA_ROOT),
                     merges=(), sweep="r=8|16,method=bipartite|energy", limit=200, batch_size=100, warmup=0, iters=1,
                     cpu_time=True)
    out = evaluate(cfg, tmp_path / "out")
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    md = (tmp_path / "out" / "report.md").read_text()
    (model,) = rep["models"]
    names = ["none", "method=bipartite,r=8", "method=energy,r=8", "method=bipartite,r=16", "method=energy,r=16"]
    assert rep["config"]["merge_configs"] == names
    assert model["tokens"]["method=energy,r=16"] == model["tokens"]["method=bipartite,r=16"]  # equal FLOPs
    assert model["gflops"]["method=energy,r=16"] < model["gflops"]["method=energy,r=8"] < model["gflops"]["none"]
    results = {r["config"]: r for r in model["datasets"][0]["results"]}
    assert_top1_is_the_reference_s_own(results, names, 200)
    assert all(f"`{name}`" in md for name in names)
    assert np.isclose(results["none"]["agreement"]["cos_mean"], 1.0)
    header = next(line for line in md.splitlines() if line.startswith("| config | img/s | speed-up | GFLOPs"))
    assert all(col in header for col in ("top1", "Δtop1", "FLOP ratio", "cos_mean", "top5_overlap"))
    pngs = {p.name for p in out.paths if p.suffix == ".png"}
    assert pngs == {"speed_reference-cifar10.png", "tradeoff_reference-cifar10_cifar10.png"}
    again = replot(tmp_path / "out" / "report.json", tmp_path / "again")  # the saved report draws the same charts
    assert {p.name for p in again} == pngs
