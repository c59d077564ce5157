"""``--compile-scope blocks``: every transformer block compiled alone, one program shared by the
blocks. Traced with dynamo + AOT (``aot_eager``: the graphs inductor would compile) against the
eager forward, counting graphs and graph breaks; one inductor run through ``Encoder``."""

from __future__ import annotations

import pytest
import torch

from mergeseek.encoders import apply_merging
from mergeseek.encoders.compile import CompiledTower, compile_scope
from mergeseek.errors import ConfigError
from tests.test_compile import HAS_CC, _tiny_clip


def _timm_vit(depth: int = 4):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=depth, num_heads=2, num_classes=0).eval()


def _open_clip_vit(depth: int = 4):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=4, width=32, layers=depth, heads=2, mlp_ratio=2.0,
                             output_dim=16).eval()


@pytest.mark.parametrize("given, want", [(None, None), (False, None), (True, "model"), ("model", "model"),
                                         (" Blocks ", "blocks")])
def test_compile_scope_values(given, want):
    assert compile_scope(given) == want


@pytest.mark.parametrize("bad", ["graph", "", "block", "1"])
def test_an_unknown_scope_is_refused_naming_the_valid_ones(bad):
    with pytest.raises(ConfigError, match="--compile-scope .* choose one of: model, blocks"):
        compile_scope(bad)


def _counts():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.mark.parametrize("family", ["timm", "open_clip"])
@pytest.mark.parametrize("spec, most_graphs", [
    ("none", 1),  # every block the same shape: one graph for all
    # dynamo compiles the first two token counts as they are, then one program with the count
    # dynamic that every later block reuses: 3 graphs for 6 blocks (and for 12 or 24)
    ("r=4", 3),
    # tracing lsh's tensor search with a dynamic count takes minutes: CI runs it (make test-slow)
    pytest.param("r=4,method=lsh", 3, marks=pytest.mark.slow),
    # r is a constant of the program: a per-block r list shares less (each r its own, and a block
    # that merges nothing another), but never more than one graph per block
    ("r=[2,6,0,4,4,2],method=pairs", 6),
])
def test_blocks_scope_equals_eager_with_a_few_graphs_and_no_breaks(family, spec, most_graphs):
    model = (_timm_vit if family == "timm" else _open_clip_vit)(depth=6)
    if spec != "none":
        apply_merging(model, spec)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(x)
    torch._dynamo.reset()
    graphs0, breaks0 = _counts()
    tower = CompiledTower(model, batch_size=4, scope="blocks", backend="aot_eager")
    with torch.no_grad():
        got = tower(x)  # padded to 4
        graphs1, breaks1 = _counts()
        again = tower(x[:2])  # a second call: same padded shape, nothing new
    graphs2, _ = _counts()
    assert 1 <= graphs1 - graphs0 <= most_graphs
    assert breaks1 == breaks0
    assert graphs2 == graphs1
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, eager[:2], rtol=1e-5, atol=1e-5)


def test_model_scope_still_traces_one_graph():
    model = _timm_vit()
    apply_merging(model, "r=4")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        graphs0, _ = _counts()
        got = CompiledTower(model, batch_size=2, scope="model", backend="aot_eager")(x)
    assert _counts()[0] - graphs0 == 1
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 10-30 s of C++ compilation
@pytest.mark.skipif(not HAS_CC, reason="torch.compile (inductor) needs a C compiler on CPU")
def test_encoder_compiles_by_blocks_with_inductor_and_equals_eager(one_torch_thread):
    from mergeseek.encoders import Encoder

    pixels = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    eager = Encoder("ViT-B-32", None, "cpu", merge="r=4", batch_size=4, model=_tiny_clip())
    torch._dynamo.reset()
    compiled = Encoder("ViT-B-32", None, "cpu", merge="r=4", batch_size=4, model=_tiny_clip(), compile="blocks")
    got = compiled.encode_images(list(pixels))  # batches of 4 and 1 (padded to 4)
    assert compiled._tower.scope == "blocks" and compiled.compile_s > 0
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(eager.encode_images(list(pixels))),
                               rtol=1e-4, atol=1e-4)


def test_cli_compile_scope_reaches_the_library_and_implies_compile(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import bench.throughput as throughput
    from mergeseek import cli

    got = {}
    monkeypatch.setattr(throughput, "run_bench", lambda cfg, progress=False: got.__setitem__("bench", cfg) or {})
    monkeypatch.setattr(throughput, "format_report", lambda report: "")
    runner = CliRunner()
    runner.invoke(cli.app, ["bench", "--compile-scope", "blocks", "--merge", "r=8"])
    assert got.pop("bench").compile == "blocks"
    runner.invoke(cli.app, ["bench", "--compile", "--merge", "r=8"])
    assert got.pop("bench").compile is True
    bad = runner.invoke(cli.app, ["bench", "--compile-scope", "graph"])
    assert bad.exit_code == 2 and "choose one of: model, blocks" in bad.output and "bench" not in got
    both = runner.invoke(cli.app, ["bench", "--no-compile", "--compile-scope", "blocks"])
    assert both.exit_code == 2 and "cannot go with --no-compile" in both.output


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["none", "r=4", "r=4,method=lsh"])
def test_blocks_scope_replays_cuda_graphs_and_equals_eager(spec):
    """On CUDA the blocks' programs are CUDA graphs (reduce-overhead): several graphs a forward,
    each block's output read by the next; two calls (the second a replay) equal the eager forward."""
    model = _open_clip_vit(depth=6).cuda()
    if spec != "none":
        apply_merging(model, spec)
    x = torch.randn(4, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        tower = CompiledTower(model, batch_size=4, device="cuda", scope="blocks")
        first = tower(x).clone()
        second = tower(x * 1.0)
    assert tower.mode == "reduce-overhead"
    torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, eager, rtol=1e-4, atol=1e-4)
