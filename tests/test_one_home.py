"""One home for each rule: the CIFAR-10 pack and the class-balanced order are shared by
``eval.datasets`` (``--limit`` subsets) and ``eval.reference`` (the reference model's data); the
train-reference options are defined once (cli.py, typer)."""

from __future__ import annotations

import io
import json

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


# ---------------------------------------------------------------------------- the AI Challenge format (issue #24)
def _library_files():
    """The library's own modules (tests, bench and installed packages left out), as (relative path, AST)."""
    import ast
    from pathlib import Path

    import mergeseek.errors as errors

    root = Path(errors.__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if {"tests", "bench", ".venv", "build"} & set(rel.parts):
            continue
        yield rel.as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def test_the_submission_format_is_defined_only_in_retrieval_submission():
    """The row limit, the task list and the task aliases have one home; eval/aic_score only imports them
    (they were defined twice, and "distinct rows, at most 100" was written three times)."""
    import ast

    import mergeseek.eval.aic_score as aic
    import mergeseek.retrieval.submission as sub

    home = "retrieval/submission.py"
    tasks = set(sub.TASKS)
    found = []
    for rel, tree in _library_files():
        if rel == home:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                if names & {"MAX_ROWS", "TASKS", "_ALIASES", "ALIASES"}:
                    found.append(f"{rel}:{node.lineno} defines {sorted(names)}")
            if isinstance(node, ast.Dict) and "vqa" in {k.value for k in node.keys if isinstance(k, ast.Constant)}:
                found.append(f"{rel}:{node.lineno} has its own task aliases")
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                if tasks <= {e.value for e in node.elts if isinstance(e, ast.Constant)}:
                    found.append(f"{rel}:{node.lineno} lists the tasks")
            if isinstance(node, ast.Compare) and 100 in {c.value for c in [node.left, *node.comparators]
                                                         if isinstance(c, ast.Constant)}:
                if "row" in ast.unparse(node).lower():
                    found.append(f"{rel}:{node.lineno} compares rows with 100: {ast.unparse(node)}")
    assert found == []
    assert (aic.MAX_ROWS, aic.TASKS, aic.parse_task, aic.dedup_rows) == (sub.MAX_ROWS, sub.TASKS, sub.parse_task,
                                                                          sub.dedup_rows)


def test_the_100th_distinct_row_counts_and_the_101st_does_not(tmp_path):
    """One rule for every producer of rows (search results, a ranked gallery, TRAKE chains) and for the scorer."""
    import numpy as np

    from mergeseek.eval.aic_score import gallery_rows, score_submission_dir
    from mergeseek.retrieval.search import Hit
    from mergeseek.retrieval.submission import MAX_ROWS, submission_rows

    vids = ["V"] * 250
    frames = [i // 2 for i in range(250)]  # every row twice: 125 distinct rows
    hits = [Hit(1.0 - i / 1000, v, f, f / 25, "") for i, (v, f) in enumerate(zip(vids, frames))]
    rows = submission_rows(hits, "kis")
    assert rows == gallery_rows(np.arange(250), vids, frames) == [("V", f) for f in range(MAX_ROWS)]
    truth = tmp_path / "truth.jsonl"
    truth.write_text('{"query_id": "at100", "video_id": "V", "frame_idx": 99}\n'
                     '{"query_id": "at101", "video_id": "V", "frame_idx": 100}\n')
    sub = tmp_path / "sub"
    sub.mkdir()
    for qid in ("at100", "at101"):
        (sub / f"{qid}.csv").write_text("".join(f"V,{f}\n" for f in range(125)))
    got = score_submission_dir(sub, truth)["queries"]
    assert got == {"at100": 0.2, "at101": 0.0}


def test_user_record_files_are_parsed_only_by_the_one_reader():
    """json.load(s) / csv.reader / csv.DictReader happen in retrieval/records.py, or in a module listed
    here with its reason: a new reader of query, answer or ground-truth files must use read_records."""
    import ast

    not_records = {
        "indexing/": "the index's own files and an AI Challenge release's fixed files (maps, media-info)",
        "eval/reference.py": "the reference model's own run folder",
        "eval/zeroshot.py": "a templates file (a list of strings, not records)",
        "eval/plots.py": "the evaluator's own report.json, drawn again (replot)",
        "eval/datasets/classification.py": "a dataset's own label tables (Pets, ImageNet), fixed formats",
    }
    readers = {("json", "loads"), ("json", "load"), ("csv", "reader"), ("csv", "DictReader")}
    found = []
    for rel, tree in _library_files():
        if rel == "retrieval/records.py" or any(rel.startswith(p) for p in not_records):
            continue
        for node in ast.walk(tree):
            f = node.func if isinstance(node, ast.Call) else None
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in readers:
                found.append(f"{rel}:{node.lineno} {f.value.id}.{f.attr}")
            if isinstance(node, ast.ImportFrom) and node.module in ("json", "csv"):
                if {a.name for a in node.names} & {"loads", "load", "reader", "DictReader"}:
                    found.append(f"{rel}:{node.lineno} from {node.module} import ...")
    assert found == []


_BOM = "\ufeff"


@pytest.mark.parametrize("reader", ["read_queries", "read_answers", "read_truth", "read_rows", "score_submission_dir"])
def test_every_reader_of_user_files_takes_a_bom_and_blank_lines_and_names_a_bad_line(tmp_path, reader):
    import json

    from mergeseek.errors import InputError
    from mergeseek.eval.aic_score import read_truth
    from mergeseek.retrieval.submission import read_answers, read_queries, read_rows

    truth = [{"query_id": "q1", "task": "kis", "video_id": "V", "span": [10, 20]},
             {"query_id": "q2", "task": "vqa", "video_id": "V", "frame_idx": 5, "answer": "ba"}]
    text = {
        "read_queries": "q1\tkis\ta red car\n\n" + json.dumps({"query_id": "q2", "task": "qa", "query": "how many?"}),
        "read_answers": "q1\tba\n\n\nq2\tbốn\n",
        "read_truth": "\n".join(json.dumps(r) for r in truth) + "\n\n",
        "read_rows": "V,15\n\nV,5,ba\n",
        "score_submission_dir": "V,15\n\nV,5,ba\n",
    }[reader]
    path = tmp_path / "input.txt"
    path.write_bytes((_BOM + text).encode("utf-8"))
    want = {
        "read_queries": lambda: [(q.qid, q.task, q.text) for q in read_queries(path)] == [
            ("q1", "kis", "a red car"), ("q2", "qa", "how many?")],
        "read_answers": lambda: read_answers(path) == {"q1": "ba", "q2": "bốn"},
        "read_truth": lambda: {q: (a.truth.task, a.truth.spans[0].start) for q, a in read_truth(path).items()} == {
            "q1": ("kis", 10), "q2": ("qa", 5)},
        "read_rows": lambda: read_rows(path) == [["V", "15"], ["V", "5", "ba"]],
        "score_submission_dir": lambda: _score_with_bom(tmp_path, path, truth) == {"q1": 1.0, "q2": 0.8},
    }[reader]
    assert want()
    if reader in ("read_rows", "score_submission_dir"):
        return  # CSV has no malformed line short of a field over csv's limit (tested in test_aic_score)
    path.write_bytes((_BOM + text.rstrip("\n") + "\n\n{not json\n").encode("utf-8"))
    bad_line = len(text.rstrip("\n").split("\n")) + 2
    read = {"read_queries": read_queries, "read_answers": read_answers, "read_truth": read_truth}[reader]
    with pytest.raises(InputError, match=f"^{path}:{bad_line} is not valid JSON"):
        read(path)


def _score_with_bom(tmp_path, sub_file, truth_rows):
    import json

    from mergeseek.eval.aic_score import score_submission_dir

    folder = tmp_path / "sub"
    folder.mkdir()
    for qid in ("q1", "q2"):
        (folder / f"{qid}.csv").write_bytes(sub_file.read_bytes())
    truth = tmp_path / "truth.json"  # a JSON array with a BOM, spread over lines
    truth.write_bytes((_BOM + json.dumps(truth_rows, indent=2)).encode("utf-8"))
    return score_submission_dir(folder, truth)["queries"]


def test_a_json_array_names_the_line_of_a_bad_entry(tmp_path):
    from mergeseek.errors import InputError
    from mergeseek.eval.aic_score import read_truth

    path = tmp_path / "truth.json"
    path.write_text('[\n  {"query_id": "a", "video_id": "V", "span": [1, 2]},\n\n  {"query_id": "b", "video_id": "V"}\n]\n')
    with pytest.raises(InputError, match=f"^{path}:4: no frame range"):
        read_truth(path)
    path.write_text('[\n  {"query_id": "a", "video_id": "V", "span": [1, 2]}\n  {"query_id": "b"}\n]\n')
    with pytest.raises(InputError, match=f"^{path}:3 is not valid JSON"):
        read_truth(path)


# ---------------------------------------------------------------------------- one JSON shape for a hit (issue #24)
def test_the_cli_and_the_web_app_give_one_json_shape_for_a_hit(monkeypatch):
    """``cli.py search --json`` and ``GET /api/search`` on the same hits: the same dicts, but for the
    two URLs only the web app can give (null in the CLI) and the server's file paths only the CLI
    gives (null in the web app)."""
    import json
    import math
    from types import SimpleNamespace

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    import mergeseek.retrieval as retrieval
    from mergeseek.cli import app as cli_app
    from mergeseek.retrieval.search import Hit, TemporalHit
    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import Engine

    meta = {"title": "Thời sự", "watch_url": "https://youtube.com/watch?v=x", "video_path": "/r/L01_V001.mp4"}
    a = Hit(0.91234567, "L01_V001", 250, 10.0, "/r/L01_V001/001.jpg", 7, meta)
    b = Hit(0.5, "stills", 3, math.nan, "/r/stills/c.png", 8)
    c = Hit(0.4, "L01_V001", 400, 16.0, "/r/L01_V001/002.jpg", 9, meta)
    frames, pairs = [a, b], [TemporalHit(1.31, a, c)]

    engine = Engine.__new__(Engine)  # the web app's shaping, over stand-ins for the index
    engine.catalog = SimpleNamespace(thumbs={7, 9}, videos={"L01_V001": None}, neighbours=lambda i, n: ([b], a, [c]))
    engine.searcher = SimpleNamespace(search_text=lambda q, k, per_video: frames,
                                      search_temporal=lambda q, then, within_s, k, per_video: pairs)
    client = TestClient(create_app(engine))

    def cli_json(*args):
        monkeypatch.setattr(retrieval, "run_search", lambda *a, **k: pairs if "--then" in args else frames)
        res = CliRunner().invoke(cli_app, ["search", "x", "--json", *args])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    def no_urls(d):
        return {k: (None if k in ("thumb_url", "video_url") else no_urls(v) if isinstance(v, dict) else v)
                for k, v in d.items()}

    def cli(*args):
        res = cli_json(*args)
        blank = lambda d: {k: (None if k in ("path", "video_path") else blank(v) if isinstance(v, dict) else v)
                           for k, v in d.items()}
        assert any(h["path"] for h in res)  # the CLI says where the files are
        return [blank(h) for h in res]

    web = client.get("/api/search", params={"q": "x"}).json()["hits"]
    assert [no_urls(h) for h in web] == cli()
    assert web[0]["thumb_url"] == "/api/thumb/7" and web[0]["video_url"] == "/api/video/L01_V001"
    assert web[0]["title"] == "Thời sự" and web[0]["score"] == 0.912346
    assert web[0]["path"] is None and web[0]["video_path"] is None  # the server's file layout stays on the server
    assert web[1]["video_url"] is None and web[1]["pts_time"] is None and web[1]["timestamp"] is None
    strip = client.get("/api/neighbors/7").json()
    assert [no_urls(strip["hit"]), no_urls(strip["before"][0])] == cli()
    web = client.get("/api/search", params={"q": "x", "then": "y"}).json()["hits"]
    assert [no_urls(h) for h in web] == cli("--then", "y")
    assert web[0]["then"]["thumb_url"] == "/api/thumb/9" and web[0]["first"]["id"] == web[0]["id"] == 7
    assert (web[0]["score"], web[0]["first_score"], web[0]["then"]["frame_idx"]) == (1.31, 0.912346, 400)


@pytest.mark.parametrize("form", ["jsonl", "csv", "array"])
def test_eval_keyframe_queries_and_captions_read_through_the_one_reader(tmp_path, form):
    """The eval sets' query and caption files take what every user file takes: a BOM, blank and #
    lines, a JSON array; a bad line is named by file:line."""
    from mergeseek.errors import InputError
    from mergeseek.eval.datasets.captions import _read_jsonl
    from mergeseek.eval.datasets.keyframes import _read_queries

    rows = [{"query": "a bike", "video_id": "V1", "frame_idx": 5}, {"text": "a dog", "video_id": "V2", "frames": [1, 2]}]
    path = tmp_path / f"q.{'csv' if form == 'csv' else 'jsonl'}"
    if form == "csv":
        body = "query,video_id,frame_idx\n\na bike,V1,5\na dog,V2,7\n"
    elif form == "array":
        body = json.dumps(rows, indent=1)
    else:
        body = "# queries\n\n" + "\n".join(json.dumps(r) for r in rows) + "\n\n"
    path.write_text(_BOM + body, encoding="utf-8")
    got = _read_queries(path)
    assert [(t.text, t.video_id) for t in got] == [("a bike", "V1"), ("a dog", "V2")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_BOM + json.dumps(rows[0]) + "\n\n{oops\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"{bad}:3 "):
        _read_queries(bad)
    caps = tmp_path / "caps.jsonl"
    caps.write_text(_BOM + "\n" + json.dumps({"file": "a.jpg", "captions": ["x", "y"]}) + "\n", encoding="utf-8")
    assert [(p.name, c) for p, c, _, _ in _read_jsonl(caps, tmp_path)] == [("a.jpg", ["x", "y"])]


# ---------------------------------------------------------------------------- one ingest writer, one index format (issue #24)
def _strings(tree):
    """The string constants of ``tree``, docstrings left out."""
    import ast

    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if id(node) in docs:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node
        elif isinstance(node, ast.JoinedStr):
            yield from (v for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))


def test_only_the_index_format_module_names_shard_files():
    """Shard paths are made by indexing/layout.shard_files (and named by the store that writes them):
    no other module of indexing/, retrieval/ or serve/ spells ``emb``/``meta`` or a shard file's name
    (thumbnail packs share the shard's name, not its files)."""
    owners = {"indexing/layout.py", "indexing/store.py"}
    found = []
    for rel, tree in _library_files():
        if rel in owners or not rel.startswith(("indexing/", "retrieval/", "serve/")):
            continue
        for node in _strings(tree):
            if node.value in ("emb", "meta", "emb/", "meta/") or "part-" in node.value and (
                    ".npy" in node.value or ".parquet" in node.value):
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert found == []


def test_index_writes_go_through_the_writer_and_the_store_s_public_api():
    """The store's private members stay in store.py; FAISS is refreshed only by indexing/writer.py; a
    store is committed to only by the writer (index, Ray, import-features, merge-index all use it)."""
    import ast

    private = {"_read_table", "_load_vectors", "_live_mask", "_write_shard", "_journal", "_lock", "_recover",
               "_adopt", "_staged", "_retrying", "_by_id"}
    found = []
    for rel, tree in _library_files():
        for node in ast.walk(tree):
            if rel != "indexing/store.py" and isinstance(node, ast.Attribute) and node.attr in private \
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                found.append(f"{rel}:{node.lineno} .{node.attr}")
            if rel != "indexing/writer.py" and isinstance(node, ast.Name) and node.id in ("refresh_faiss", "_refresh_faiss"):
                found.append(f"{rel}:{node.lineno} {node.id}")
            if rel not in ("indexing/writer.py", "indexing/store.py") and isinstance(node, ast.Call) \
                    and isinstance(node.func, ast.Attribute) and node.func.attr == "commit" \
                    and isinstance(node.func.value, (ast.Name, ast.Attribute)):
                found.append(f"{rel}:{node.lineno} .commit(...)")
    assert found == []


def test_the_release_layout_does_not_import_the_sources_or_the_pipeline():
    """indexing/aic.py (the release layout) sits below indexing/sources.py and the pipeline: no circle."""
    import ast

    trees = dict(_library_files())
    for rel, banned in (("indexing/aic.py", ("mergeseek.indexing.sources", "mergeseek.indexing.pipeline",
                                             "mergeseek.indexing.features", "mergeseek.indexing.writer")),
                        ("indexing/layout.py", ("mergeseek.indexing.store", "mergeseek.indexing.writer"))):
        mods = {n.module for n in ast.walk(trees[rel]) if isinstance(n, ast.ImportFrom)}
        mods |= {a.name for n in ast.walk(trees[rel]) if isinstance(n, ast.Import) for a in n.names}
        assert not mods & set(banned), (rel, mods & set(banned))


def test_one_key_value_parser():
    """Only options.py splits ``key=value`` items (sampling's single ``mode=value`` aside)."""
    import ast

    found = []
    for rel, tree in _library_files():
        if rel in ("options.py", "indexing/sampling.py"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("partition", "split", "rpartition") and node.args \
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value == "=":
                found.append(f"{rel}:{node.lineno} .{node.func.attr}('=')")
    assert found == []


def test_every_exit_code_is_in_the_docs_table():
    import inspect
    import re
    from pathlib import Path

    import mergeseek.errors as errors

    table = (Path(errors.__file__).resolve().parent / "docs" / "INDEXING.md").read_text(encoding="utf-8")
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    codes = {c.exit_code for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, errors.MergeseekError)}
    assert codes <= documented, sorted(codes - documented)


def test_reports_are_printed_in_one_place():
    """Every report the CLI prints goes through cli._print (reports.render): no command formats one itself."""
    import ast
    from pathlib import Path

    import mergeseek.errors as errors

    tree = ast.parse((Path(errors.__file__).resolve().parent / "cli.py").read_text(encoding="utf-8"))
    found = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name != "_print"):
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and node.attr in ("summary_lines", "to_dict", "summary"):
                found.append(f"cli.py:{node.lineno} {fn.name} .{node.attr}")
    assert found == []


def test_the_report_protocol_holds_for_every_report_a_command_prints(tmp_path):
    from mergeseek.eval.aic_score import ScoreReport
    from mergeseek.indexing.export import ExportReport
    from mergeseek.indexing.merge import MergeReport
    from mergeseek.indexing.pipeline import IndexReport
    from mergeseek.indexing.repair import CompactReport, RepairReport
    from mergeseek.indexing.thumbs import ThumbReport
    from mergeseek.reports import Report, render
    from mergeseek.retrieval.submission import SubmitReport

    counts = {"vectors": 1, "dead_rows": 0, "shards": 1}
    reports = [IndexReport(str(tmp_path)), MergeReport(str(tmp_path)), RepairReport(str(tmp_path)), ThumbReport(str(tmp_path)),
               ExportReport(str(tmp_path), "clip-retrieval", 1, 2, 0), SubmitReport(str(tmp_path)),
               CompactReport(index_dir=str(tmp_path), shards_rewritten=0, before=counts, after=counts, faiss="ok"),
               ScoreReport(AIC=0.5, queries={"q": 0.5}, missing=[], unreadable={}, n_queries=1)]
    for r in reports:
        assert isinstance(r, Report), type(r).__name__
        assert json.loads(render(r, json_out=True)) == json.loads(json.dumps(r.to_dict(), default=str))
        assert render(r).splitlines() == r.summary_lines() and r.summary_lines()


def test_no_library_module_over_600_lines_or_function_over_80_without_a_reason():
    """Issue #24's size rule over the whole library (tests and benchmarks aside): a longer module or
    function needs a ``Long by design:`` line in its module docstring saying why."""
    import ast
    from pathlib import Path

    import mergeseek.errors as errors

    root = Path(errors.__file__).resolve().parent
    found = []
    for rel, tree in _library_files():
        if "Long by design:" in (ast.get_docstring(tree) or ""):
            continue
        lines = (root / rel).read_text(encoding="utf-8").count("\n")
        if lines > 600:
            found.append(f"{rel}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                found.append(f"{rel}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert found == []


# ---------------------------------------------------------------------------- encoders (issue #24, item 2)
_VIT_CLASS_NAMES = ("VisionTransformer", "ResidualAttentionBlock", "CustomResidualAttentionBlock", "Block", "Attention",
                    "AttentionPoolLatent", "TimmModel")


def _encoders_files():
    """(path inside encoders/, AST) of every module of the encoders package."""
    return [(rel[len("encoders/"):], tree) for rel, tree in _library_files() if rel.startswith("encoders/")]


def _family_checks(rel, tree) -> list:
    """Places that tell open_clip from timm or check their model classes: imports of their ViT, block
    or attention classes, isinstance/issubclass against them, comparisons with their class names."""
    import ast

    found, theirs = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("open_clip", "timm"):
            theirs |= {a.asname or a.name for a in node.names}
            names = [a.name for a in node.names if a.name in _VIT_CLASS_NAMES]
            if names and (rel, names) != ("slab.py", ["VisionTransformer"]):  # slab.py builds one, inspects none
                found.append(f"{rel}:{node.lineno} imports {names}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass") and len(node.args) == 2:
            cls = ast.unparse(node.args[1])
            if cls.startswith(("open_clip.", "timm.")) or {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & theirs:
                found.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
        if isinstance(node, ast.Compare) and {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)} & set(_VIT_CLASS_NAMES):
            found.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    return found


def test_only_the_family_adapter_tells_vit_families_apart():
    """encoders/family.py is the one adapter per model family that merging, its removal and reuse ask;
    no other encoders module imports or tests open_clip/timm ViT, block or attention classes (patch/
    and reuse.py each did: the rule fails on the adapter's own code and on planted detections)."""
    import ast

    from mergeseek.encoders import family, patch, reuse

    files = dict(_encoders_files())
    assert {"family.py", "patch/__init__.py", "reuse/stream.py", "slab.py"} <= set(files)
    found = [f for rel, tree in files.items() if rel != "family.py" for f in _family_checks(rel, tree)]
    assert found == []
    assert len(_family_checks("elsewhere.py", files["family.py"])) >= 6  # the adapter's own checks would be caught
    planted = ("from timm.models.vision_transformer import VisionTransformer as V\nissubclass(type(m), V)\n"
               "import open_clip\nisinstance(m, open_clip.transformer.ResidualAttentionBlock)\n"
               "type(b).__name__ == 'Block'\n")
    assert len(_family_checks("patch/x.py", ast.parse(planted))) == 4
    assert patch.vit_family is family.vit_family and reuse.stream.vit_family is family.vit_family


def _lsh_branches(rel, tree) -> list:
    """lsh-specific code: a comparison with "lsh", its hyperplanes made or named, its options read
    (the user-facing MergeConfig, encoders/config.py, declares them and may read them)."""
    import ast

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and "lsh" in {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}:
            found.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
        name = getattr(node, "id", None) or getattr(node, "attr", None) or (node.name if isinstance(node, ast.alias) else "")
        if name == "simhash_planes" or (str(name).startswith("lsh_") and rel != "config.py"):
            found.append(f"{rel}:{getattr(node, 'lineno', '?')} names {name}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "_merge_planes" in node.value:
            found.append(f"{rel}:{node.lineno} names the planes buffer")
    return found


def test_lsh_state_lives_in_the_method_registry():
    """The lsh hyperplanes are the registry's MatcherSpec.state, made once per model and handed to the
    matcher like its options: no encoders module outside merging/ branches on lsh (patch/__init__.py,
    patch/common.py and reuse.py each did) and every matcher is called the same way."""
    import ast
    import inspect

    from mergeseek.encoders.config import MergeConfig
    from mergeseek.encoders.merging import REGISTRY, get_spec

    found = [f for rel, tree in _encoders_files() if not rel.startswith("merging/") for f in _lsh_branches(rel, tree)]
    assert found == []
    planted = "if cfg.method == 'lsh':\n    planes = simhash_planes(d, cfg.lsh_bits, 4)\nroot._buffers.pop('_merge_planes')\n"
    assert len(_lsh_branches("patch/x.py", ast.parse(planted))) == 4
    hashed = ["lsh", "energy_lsh", "pairs_lsh", "pairs_mix_lsh", "ward_lsh", "ward_imp_lsh"]
    assert [n for n, s in REGISTRY.items() if s.state is not None] == hashed
    assert all(get_spec(n).state.__module__.endswith("registry") for n in hashed)
    assert MergeConfig.parse("r=8,method=lsh,lsh_bits=3,lsh_tables=2").matcher_state(16)["planes"].shape == (16, 8)
    assert MergeConfig.parse("r=8").matcher_state(16) == {} and MergeConfig.parse("none").matcher_state(16) == {}
    convention = ["metric", "r", "class_token", "size", "protected", "padded", "attn", "options"]
    assert {n: list(inspect.signature(s.fn).parameters) for n, s in REGISTRY.items()} == {n: convention for n in REGISTRY}


def _oversized(rel, tree) -> list:
    import ast

    out = [f"{rel}: {tree.body[-1].end_lineno} lines"] if tree.body and tree.body[-1].end_lineno > 600 else []
    return out + [f"{rel}:{f.lineno} {f.name}: {f.end_lineno - f.lineno + 1} lines" for f in ast.walk(tree)
                  if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 80]


def test_encoders_stay_small_with_no_long_by_design_exemption():
    """In encoders/ no module runs past 600 lines and no function past 80, and none claims the
    library rule's ``Long by design:`` exemption (reuse.py was 874 lines around a 183-line
    ``_forward``; lsh_partners was 145 lines)."""
    import ast

    files = _encoders_files()
    assert len(files) >= 20
    assert [f for rel, tree in files for f in _oversized(rel, tree)] == []
    assert [rel for rel, tree in files if "Long by design:" in (ast.get_docstring(tree) or "")] == []
    assert _oversized("x.py", ast.parse("def f():\n" + "    x = 1\n" * 80)) == ["x.py:1 f: 81 lines"]
    assert _oversized("x.py", ast.parse("def f():\n" + "    x = 1\n" * 79)) == []  # 80 lines: allowed
    assert _oversized("x.py", ast.parse("x = 1\n" * 601)) == ["x.py: 601 lines"]
    assert _oversized("x.py", ast.parse("x = 1\n" * 600)) == []
