#!/usr/bin/env bash
# The GPU table of issue #12 in one run (about 7 minutes on one H100/H200; every stage has its
# own time limit, so the whole script stays under 8 minutes and what finished is kept).
#
#   OUT=/tmp/gpu_out bash bench/gpu_suite.sh          # from the repository root, with .venv or $PYTHON
#
# Writes under $OUT (default ./gpu_out):
#   env.txt                  GPU, driver, torch / open_clip versions
#   gpu_tests.txt            the GPU-marked tests (FlashAttention fp16 with merging, CUDA LSH, CUDA reuse)
#   reuse.json, reuse.log    bench/reuse.py on CUDA (frames/s with and without reuse, static clips)
#   eager.jsonl, compiled.jsonl   one bench report per line (python -m bench.throughput's JSON):
#                            images/s, speed-up vs the model as shipped, FLOP ratio, wall p50,
#                            CUDA-event device ms, kernels per forward, attention kernel, compile s
#   tables.md                the same reports as markdown tables, in the order they ran
#   *.log                    stderr of each stage
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MERGES=("none" "r=8" "r=16" "r=8,method=lsh")
start=$(date +%s)

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi unavailable"
  "$PY" -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# stage <name> <seconds> <model> <batch sizes> <precisions> <compile 0|1> <iters>
stage() {
  local name=$1 limit=$2 model=$3 batches=$4 precisions=$5 compiled=$6 iters=$7
  echo "== $name: $model batch [$batches] [$precisions] compile=$compiled (limit ${limit}s, $(( $(date +%s) - start ))s elapsed)"
  timeout --signal=INT "$limit" "$PY" - "$OUT" "$model" "$batches" "$precisions" "$compiled" "$iters" "${MERGES[@]}" \
    >>"$OUT/$name.log" 2>&1 <<'PYEOF'
import json, logging, sys
out, model, batches, precisions, compiled, iters, *merges = sys.argv[1:]
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from bench.throughput import format_report, run_throughput
from mergeseek.encoders import Encoder

base = Encoder(model, None, "cuda", "fp32", "none", 8)
kind = "compiled" if compiled == "1" else "eager"
for precision in precisions.split(","):
    for bs in (int(b) for b in batches.split(",")):
        rep = run_throughput(model, None, [m for m in merges if m != "none"], bs, int(iters), 3, None, "cuda",
                             precision, compile=compiled == "1", base=base)
        with open(f"{out}/{kind}.jsonl", "a") as f:  # appended per report: a stage cut short keeps its rows
            f.write(json.dumps(rep) + "\n")
        with open(f"{out}/tables.md", "a") as f:
            f.write(format_report(rep) + "\n\n")
        print(format_report(rep), flush=True)
PYEOF
  local rc=$?
  [ $rc -ne 0 ] && echo "   stage $name ended with code $rc (124/130: time limit; see $OUT/$name.log)"
  tail -n 8 "$OUT/$name.log"
}

echo "== GPU tests"
timeout 120 "$PY" -m pytest -q -m gpu tests/test_compile.py tests/test_lsh.py tests/test_lsh_native.py tests/test_reuse.py \
  -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
tail -n 3 "$OUT/gpu_tests.txt"

# Reuse across frames (issue #17) on CUDA: static clips at 5 fps, fp16, batch 64, wall clock.
echo "== reuse ($(( $(date +%s) - start ))s elapsed)"
timeout 60 "$PY" -m bench.reuse --device cuda --clock wall --threads 4 --precision fp16 --model ViT-B-16 --model ViT-B-32 \
  --fps 5 --rounds 5 --seconds 12 --sets synthetic --kinds static --batch-size 64 --out "$OUT/reuse.json" \
  > "$OUT/reuse.log" 2>&1 || echo "   reuse stage ended with code $? (see $OUT/reuse.log)"
tail -n 4 "$OUT/reuse.log"
# Eager: the three models, fp16 and bf16, batch 8 / 64 / 256 (ViT-B-16 first: the issue's target).
stage eager_b16 70 ViT-B-16 8,64,256 fp16,bf16 0 20
stage eager_b32 45 ViT-B-32 8,64,256 fp16,bf16 0 20
stage eager_l14 90 ViT-L-14 8,64,256 fp16,bf16 0 10
# Compiled (CUDA graphs): one compile per candidate and batch size; ViT-B-16 fp16 at 64 and 256
# first, then bf16 and ViT-L-14 as long as time is left.
stage compiled_b16_fp16 150 ViT-B-16 64,256 fp16 1 20
left=$(( 450 - ($(date +%s) - start) ))
[ $left -gt 60 ] && stage compiled_b16_bf16 "$left" ViT-B-16 256 bf16 1 20
left=$(( 465 - ($(date +%s) - start) ))
[ $left -gt 60 ] && stage compiled_l14 "$left" ViT-L-14 64 fp16 1 10
echo "== done in $(( $(date +%s) - start ))s; results under $OUT"
