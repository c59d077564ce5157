"""The merged forward on the GPU's terms: one graph, no host reads, no attention mask.

ViT-B-16 (open_clip, random weights) is traced by ``torch._dynamo.explain`` for each method
(0 graph breaks), its eager forward is recorded op by op (no device-synchronising op), the
mask-free proportional attention is checked against the masked one, and compiled towers against
eager ones (``Encoder(compile=True)`` included, with a padded last batch).
"""

from __future__ import annotations

import copy
import os
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mergeseek.encoders import apply_merging, token_counts
from mergeseek.encoders.patch.common import channel_sdpa

COMPILE_SPECS = ["r=8", "r=16", "r=8,method=lsh", "r=8,method=importance"]
HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None

# aten ops that read a device value back to the host (or whose output shape depends on data)
BOOL_INDEX = "index(bool mask)"
SYNC_ATEN = ("_local_scalar_dense", "nonzero", "item", "masked_select", "_unique", "unique_consecutive", "equal", BOOL_INDEX)
# Python-level tensor reads that sync a GPU (on CPU they are cheap, which is why they must be
# caught here and not by a GPU timeline)
SYNC_PY = {"tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu"}


class AtenRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()  # aten op name -> calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.ops[name] += 1
        # a boolean mask as an index is a nonzero inside the kernel, where no mode sees it
        if name in ("index", "index_put", "index_put_") and len(args) > 1:
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] or ())):
                self.ops[BOOL_INDEX] += 1
        return func(*args, **(kwargs or {}))


class PyRecorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()  # torch function / method name -> calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


def _syncs(fn):
    aten, py = AtenRecorder(), PyRecorder()
    with py, aten:
        fn()
    return sorted(o for o in aten.ops if o.lstrip("_") in {s.lstrip("_") for s in SYNC_ATEN}), sorted(c for c in py.calls if c in SYNC_PY)


@pytest.fixture(scope="module")
def b16():
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()


@pytest.fixture
def device_like_lsh(monkeypatch):
    """The LSH search as it runs on CUDA / under compile: tensor code, torch.argsort."""
    from mergeseek.encoders.merging import lsh

    monkeypatch.setenv("MERGESEEK_LSH_NATIVE", "0")
    monkeypatch.setattr(lsh, "_argsort_rows", lambda keys: torch.argsort(keys, dim=-1, stable=True))


def test_the_recorders_do_see_host_reads():
    t = torch.arange(4.0)
    assert _syncs(lambda: (t.tolist(), t.sum().item(), t.nonzero())) == (["_local_scalar_dense", "nonzero"], ["item", "nonzero", "tolist"])
    assert _syncs(lambda: t[t > 1]) == ([BOOL_INDEX], [])  # the nonzero inside the kernel
    assert _syncs(lambda: t.index_put_((t > 1,), torch.tensor(0.0))) == ([BOOL_INDEX], [])
    assert _syncs(lambda: t[torch.tensor([0, 2])]) == ([], [])  # an integer index reads nothing


ENERGY_SPECS = ["r=8,method=energy", "r=16,method=energy_lsh", "r=8,method=energy,merge=mlerp",
                "r=16,metric=heads,merge=mlerp", "r=8,method=lsh,metric=heads"]
# issue #26's one-to-one greedy merging (method=pairs / pairs_lsh): the greedy loop is r static steps
PAIRS_SPECS = ["r=8,method=pairs", "r=16,method=pairs_lsh", "r=16,method=pairs,merge=mlerp",
               # pairs_mix: ToMe in blocks 0-5 (4 of 196 free tokens, under the threshold), pairs in 6-11
               "r=[4,4,4,4,4,4,20,20,20,20,20,20],method=pairs_mix", "r=[4,4,4,4,4,4,20,20,20,20,20,20],method=pairs_mix_lsh",
               # ward / ward_lsh: the same greedy loop over edges scored on the block's tokens
               "r=16,method=ward", "r=16,method=ward_lsh",
               # ward_imp / ward_imp_lsh: the class token's attention row weighs the sizes in the cost
               "r=16,method=ward_imp", "r=16,method=ward_imp_lsh"]


# dynamo traces ViT-B-16 in 15-60 s per config: two run in `make test`, the rest are marked slow (CI runs them).
TRACED_FAST = ("r=16", "r=8,method=energy")


@pytest.mark.parametrize("spec", [s if s in TRACED_FAST else pytest.param(s, marks=pytest.mark.slow)
                                  for s in COMPILE_SPECS + ["r=8,method=zerotprune"] + ENERGY_SPECS + PAIRS_SPECS])
def test_merged_vit_b16_traces_into_one_graph_without_attention_masks(b16, spec, one_torch_thread):
    apply_merging(b16, spec)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(b16)(torch.randn(1, 3, 224, 224))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    sdpa_calls = [
        node for gm in explained.graphs for node in gm.graph.nodes
        if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target)
    ]
    assert len(sdpa_calls) == 12
    assert all(node.kwargs.get("attn_mask") is None and len(node.args) <= 3 for node in sdpa_calls)


@pytest.mark.parametrize("spec", COMPILE_SPECS + ["r=8,method=zerotprune", "r=8,method=lsh,lsh_bits=8"] + ENERGY_SPECS
                         + PAIRS_SPECS)
def test_merged_forward_reads_nothing_back_from_the_device(b16, spec, device_like_lsh, one_torch_thread):
    apply_merging(b16, spec)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _syncs(lambda: b16(x)) == ([], [])
    n = token_counts(b16)
    assert n[-1] < 197 and n == sorted(n, reverse=True)


def test_default_cpu_forward_has_no_aten_sync_either(b16, one_torch_thread):
    """Eager CPU keeps the C kernel and NumPy's sort (host code, no device there): no aten sync."""
    for spec in ("r=8", "r=8,method=lsh"):
        apply_merging(b16, spec)
        with torch.no_grad():
            aten, _ = _syncs(lambda: b16(torch.randn(1, 3, 224, 224)))
        assert aten == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_attention_equals_masked_attention_with_padding(dtype):
    g = torch.Generator().manual_seed(0)
    for d in (32, 64, 72):
        q, k, v = (torch.randn(2, 3, 11, d, generator=g, dtype=dtype) for _ in range(3))
        size = torch.rand(2, 11, generator=g, dtype=dtype) * 9 + 1
        size[1, 8:] = 0  # padding keys: log(0) = -inf in the key channel
        bias = size.log()[:, None, None, :]
        scale = d ** -0.5
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        channel = channel_sdpa(q, k, v, bias, scale)
        assert torch.isfinite(channel).all()
        torch.testing.assert_close(channel, masked, rtol=0, atol=1e-5)
        ref = ((q @ k.transpose(-1, -2)) * scale + bias).softmax(-1) @ v
        torch.testing.assert_close(channel, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_attention_is_finite_in_half_precision(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 9, 64, generator=g).to(dtype) for _ in range(3))
    size = torch.tensor([[1.0] * 9, [1.0, 200, 3, 1, 1, 5, 0, 0, 0]])
    bias = size.log()[:, None, None, :].to(dtype)
    out = channel_sdpa(q, k, v, bias, 64 ** -0.5)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.05)


def _timm_tiny(**kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, **kw).eval()


@pytest.mark.parametrize("spec", ["r=4", "r=4,method=lsh", "r=4,method=importance", "r=4,method=zerotprune"])
def test_mask_free_model_equals_masked_model_and_passes_no_mask(spec, monkeypatch):
    model = _timm_tiny(depth=4)
    apply_merging(model, spec)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    outs = {}
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return real_sdpa(*args, **kwargs)

    for mode in ("mask", "channel"):
        monkeypatch.setenv("MERGESEEK_PROP_ATTN", mode)
        seen.clear()
        monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
        with torch.no_grad():
            outs[mode] = model(x)
        monkeypatch.setattr(F, "scaled_dot_product_attention", real_sdpa)
        masks = [m for m in seen if m is not None]
        assert (len(masks) > 0) == (mode == "mask"), (mode, len(masks))
    torch.testing.assert_close(outs["channel"], outs["mask"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["r=4,method=lsh", "r=4,method=importance", "r=4,method=zerotprune",
                                  "r=4,method=energy,merge=mlerp", "r=4,method=energy_lsh", "r=4,method=pairs",
                                  "r=4,method=pairs_lsh", "r=4,method=pairs_mix_lsh"])
def test_compiled_graph_equals_eager(spec):
    """Dynamo + AOT tracing (the graph inductor would compile), whole graph, against eager."""
    model = _timm_tiny(depth=2)
    apply_merging(model, spec)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def _tiny_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=64)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


@pytest.mark.skipif(not HAS_CC, reason="torch.compile (inductor) needs a C compiler on CPU")
def test_encoder_compile_pads_the_last_batch_and_equals_eager(one_torch_thread):
    from mergeseek.encoders import Encoder

    pixels = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    eager = Encoder("ViT-B-32", None, "cpu", merge="r=4", batch_size=4, model=_tiny_clip())
    torch._dynamo.reset()
    compiled = Encoder("ViT-B-32", None, "cpu", merge="r=4", batch_size=4, model=_tiny_clip(), compile=True)
    want = eager.encode_images(list(pixels))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = compiled.encode_images(list(pixels))  # batches of 4 and 2 (padded to 4)
    assert compiled.compile_s is not None and compiled.compile_s > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1  # the padded batch did not recompile
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-4)
    assert token_counts(compiled.model)[-1] == 17 - 8


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["r=8", "r=16", "r=8,method=lsh", "r=8,method=importance"])
def test_merged_model_runs_under_flash_attention_in_fp16(spec):
    import open_clip
    from torch.nn.attention import SDPBackend, sdpa_kernel

    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval().cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        want = visual(x).float()
        apply_merging(visual, spec)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if any block needs another kernel
            got = visual(x).float()
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.9
    assert os.environ.get("MERGESEEK_PROP_ATTN", "auto") == "auto"


def test_cli_compile_flags_reach_the_library(monkeypatch, tmp_path):
    """``--compile`` on bench, eval and index is parsed and handed on (the heavy calls mocked)."""
    from typer.testing import CliRunner

    import bench.throughput as throughput
    from mergeseek import cli
    from mergeseek import encoders
    import mergeseek.eval as eval_pkg
    from mergeseek import indexing
    got = {}
    monkeypatch.setattr(throughput, "run_bench", lambda cfg, progress=False: got.__setitem__("bench", cfg) or {})
    monkeypatch.setattr(throughput, "format_report", lambda report: "")

    def fake_evaluate(cfg, out, progress=True):
        got["eval"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(eval_pkg, "evaluate", fake_evaluate)

    class FakeEncoder:
        def __init__(self, **kwargs):
            got["encoder"] = kwargs

    def fake_index(paths, index_dir, make_encoder, options, *args, **kwargs):
        make_encoder()
        raise SystemExit(0)

    monkeypatch.setattr(encoders, "Encoder", FakeEncoder)
    monkeypatch.setattr(indexing, "index_paths", fake_index)
    runner = CliRunner()
    runner.invoke(cli.app, ["bench", "--compile", "--merge", "r=8"])
    runner.invoke(cli.app, ["eval", "--compile", "--out", str(tmp_path / "ev")])
    (tmp_path / "imgs").mkdir()
    runner.invoke(cli.app, ["index", str(tmp_path / "imgs"), "--index", str(tmp_path / "ix"), "--compile"])
    assert got["bench"].compile is True
    assert got["eval"].compile is True
    assert got["encoder"]["compile"] is True
    runner.invoke(cli.app, ["bench", "--merge", "r=8"])
    assert got["bench"].compile is False and got["bench"].cpu_time is False  # off unless asked for
    runner.invoke(cli.app, ["bench", "--cpu-time"])
    assert got["bench"].cpu_time is True
    assert got["bench"].cuda_graph is False
    runner.invoke(cli.app, ["bench", "--cuda-graph"])
    assert got["bench"].cuda_graph is True
    runner.invoke(cli.app, ["index", str(tmp_path / "imgs"), "--index", str(tmp_path / "ix"), "--cuda-graph"])
    assert got["encoder"]["cuda_graph"] is True and "compile" not in got["encoder"]
    runner.invoke(cli.app, ["index", str(tmp_path / "imgs"), "--index", str(tmp_path / "ix"), "--cuda-graph", "--compile"])
    assert got["encoder"]["compile"] is True and "cuda_graph" not in got["encoder"]  # compile already replays graphs


def test_cuda_graph_is_a_pass_through_off_cuda(one_torch_thread):
    from mergeseek.encoders import Encoder
    from mergeseek.encoders.compile import GraphedTower

    model = _tiny_clip()
    apply_merging(model.visual, "r=4")
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    tower = GraphedTower(model.visual, 4, "cpu")
    with torch.inference_mode():
        torch.testing.assert_close(tower(pixels), model.visual(pixels), rtol=0, atol=0)
    assert tower.compile_s is None  # nothing captured
    enc = Encoder("ViT-B-32", None, "cpu", merge="r=4", batch_size=4, model=_tiny_clip(), cuda_graph=True)
    assert enc._tower is None  # CPU: the plain eager forward


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["none", "r=8", "r=16,method=lsh"])
def test_cuda_graph_replay_equals_the_eager_forward(spec):
    """The eager merged forward captured once and replayed: the same embeddings as eager (fp16
    autocast), for a full batch, a short (padded) one and fresh inputs after the capture."""
    import open_clip

    from mergeseek.encoders.compile import GraphedTower

    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval().cuda()
    if spec != "none":
        apply_merging(visual, spec)
    tower = GraphedTower(visual, 8, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(7)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        for n in (8, 5, 8):
            x = torch.randn(n, 3, 224, 224, device="cuda", generator=gen)
            want = visual(x).float()
            got = tower(x).float()
            assert got.shape == want.shape
            cos = torch.nn.functional.cosine_similarity(got, want)
            assert cos.min() > 0.999, (n, cos.min().item())
    assert tower.compile_s is not None and tower._graph is not None


@pytest.mark.skipif(not HAS_CC, reason="torch.compile (inductor) needs a C compiler on CPU")
def test_eval_times_compiled_candidates_compiled_before_the_clock(one_torch_thread):
    import contextlib
    import types

    from mergeseek.eval.config import EvalConfig
    from mergeseek.eval.runner import _compiled

    model = _timm_tiny(depth=1)
    apply_merging(model, "r=2")
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    mut = types.SimpleNamespace(autocast=contextlib.nullcontext)
    assert _compiled(model, EvalConfig(compile=False), "cpu", pixels, mut) is model
    torch._dynamo.reset()
    tower = _compiled(model, EvalConfig(compile=True), "cpu", pixels, mut)
    assert tower.compile_s is not None and tower.compile_s > 0  # the compiling call happened here, untimed
    with torch.inference_mode():
        torch.testing.assert_close(tower(pixels), model(pixels), rtol=1e-4, atol=1e-4)
