"""One home for each rule: the CIFAR-10 pack and the class-balanced order are shared by
``eval.datasets`` (``--limit`` subsets) and ``eval.reference`` (the reference model's data); the
train-reference options are defined once (cli.py, typer)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mergeseek.eval.datasets import load_dataset
from mergeseek.eval.datasets.base import balanced_indices, interleaved_order
from mergeseek.eval.reference import load_cifar10_npz


def _pack(folder, labels):
    rng = np.random.default_rng(0)
    blobs = []
    for _ in labels:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")  # lossless
        blobs.append(buf.getvalue())
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(folder / "test_jpeg.npz", jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
             labels=np.asarray(labels))


def test_interleaved_order_deals_class_by_class():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])  # sorted by class, like the packs
    order = interleaved_order(labels)
    assert order.tolist() == [0, 3, 5, 1, 4, 6, 2, 7, 8]
    # a class key reorders classes within a round, never images within a class
    assert interleaved_order(labels, np.array([2, 1, 0])).tolist() == [5, 3, 0, 6, 4, 1, 7, 2, 8]


def test_reference_and_eval_subsets_are_the_same_images(tmp_path):
    labels = [c for c in range(4) for _ in range(5)]  # 4 classes x 5 images, sorted by class
    _pack(tmp_path, labels)
    ref = load_cifar10_npz(tmp_path, "test", limit=8)
    ds = load_dataset(f"cifar10:{tmp_path}", limit=8)
    assert sorted(ref.labels.tolist()) == sorted(ds.labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    ours = {np.asarray(ds.images.load(i)).tobytes() for i in range(len(ds))}
    theirs = {img.tobytes() for img in ref.images}
    assert ours == theirs  # the same 8 images, decoded by the same reader
    assert balanced_indices(np.asarray(labels), 8).tolist() == [0, 1, 5, 6, 10, 11, 15, 16]


def test_python_m_train_reference_is_the_cli_command(tmp_path, capsys):
    import inspect

    import mergeseek.eval.train_reference as tr

    assert "argparse" not in inspect.getsource(tr)  # no second option parser
    assert tr.main(["--export", str(tmp_path / "missing.pt"), "--to", str(tmp_path / "x")]) == 6
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert tr.main(["--no-such-option"]) == 2
    assert tr.main(["--help"]) == 0
    assert "--time-budget" in capsys.readouterr().out


def test_bench_defaults_live_in_bench_config_and_the_cli_only_parses(monkeypatch):
    import sys

    from typer.testing import CliRunner

    import bench.throughput as bt
    from mergeseek.cli import app
    from mergeseek.errors import ConfigError

    seen = []
    fake = {"model": "m", "device": "cpu", "precision": "fp32", "batch_size": 8, "image_size": 224, "rows": []}
    monkeypatch.setattr(bt, "run_bench", lambda cfg, progress=False: seen.append(cfg) or fake)
    monkeypatch.setattr(bt, "format_report", lambda report: "table")
    res = CliRunner().invoke(app, ["bench"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == bt.BenchConfig()  # nothing given: every default comes from the config
    assert seen[-1].model == "ViT-B-16" and seen[-1].pretrained is None and seen[-1].merges == ("r=8",)
    res = CliRunner().invoke(app, ["bench", "--model", "ViT-B-32", "--merge", "r=4", "--merge", "r=8,method=lsh",
                                   "--iters", "3", "--pretrained", "none", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == bt.BenchConfig(model="ViT-B-32", merges=("r=4", "r=8,method=lsh"), iters=3, batch_size=2)
    with pytest.raises(ConfigError, match="warmup"):
        bt.BenchConfig(warmup=-1)
    res = CliRunner().invoke(app, ["bench", "--merge", "method=nope"])
    assert res.exit_code == 2 and res.stderr.startswith("error: ")
    # An installed package has no bench/: one clear line instead of a traceback.
    monkeypatch.setitem(sys.modules, "bench.throughput", None)
    res = CliRunner().invoke(app, ["bench"])
    assert res.exit_code == 7 and "checkout" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_eval_defaults_live_in_eval_config():
    from mergeseek.eval.config import EvalConfig

    cfg = EvalConfig.from_options(data_root="/d")
    assert (cfg.models, cfg.datasets, cfg.merges, cfg.pretrained) == (("ViT-B-32",), ("cifar10",), ("r=8",), "openai")
    assert EvalConfig.from_options(sweep="r=4|8", data_root="/d").merges == ()  # a sweep replaces the default r=8
    assert EvalConfig.from_options(pretrained="none", data_root="/d").pretrained is None
    assert EvalConfig.from_options(limit=None, threads=None, data_root="/d").limit is None


def test_eval_without_matplotlib_fails_before_the_work(monkeypatch, tmp_path):
    import importlib.util

    import mergeseek.eval as eval_pkg
    import mergeseek.eval.runner
    from mergeseek import eval
    from mergeseek.errors import MissingDependencyError
    from mergeseek.eval.config import EvalConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(eval.runner, "run_eval", lambda *a, **k: pytest.fail("evaluated although plots cannot be drawn"))
    with pytest.raises(MissingDependencyError, match=r"pip install '\.\[eval\]'.*--no-plots"):
        eval_pkg.evaluate(EvalConfig(data_root=str(tmp_path)), tmp_path / "out")


def test_every_error_class_lives_in_errors_py_with_its_own_exit_code():
    """One door for errors (issue #24): no class derives from MergeseekError outside errors.py, and
    no two error classes share an exit code (7 once meant both a missing package and a stopped Ray run)."""
    import ast
    import inspect
    from pathlib import Path

    import mergeseek.errors as errors

    root = Path(errors.__file__).resolve().parent
    outside = []
    for path in root.rglob("*.py"):
        if path.name == "errors.py" and path.parent == root or {"tests", "bench", ".venv", "build"} & set(path.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & {n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, errors.MergeseekError)}:
                    outside.append(f"{path.relative_to(root)}:{node.name}")
    assert outside == []
    classes = [c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, errors.MergeseekError)]
    own = [c for c in classes if "exit_code" in vars(c)]  # a subclass without its own code shares its parent's meaning
    codes = [c.exit_code for c in own]
    assert len(codes) == len(set(codes)), sorted((c.exit_code, c.__name__) for c in own)
    from mergeseek.indexing.distributed import RayRunError

    assert RayRunError is errors.RayRunError and RayRunError.exit_code == 11
