#!/usr/bin/env bash
# The GPU check, run whenever a session is lent a GPU machine (no install there: the image's torch, triton and
# transformers; our code from the working tree; no network: every model is written offline). Most informative first,
# each step under its own timeout; the timeouts sum to 7.2 minutes, plus 2 s of grace each (one H100/H200 is lent for
# about 8). Every step writes its output to $OUT (or bench_results/) as it goes, and one line to summary.txt when it
# ends (rc 124 or 137: timed out). RUN_QUANT_BENCH=1 adds the int4 benchmark (4 more minutes).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# Packages the image lacks (llguidance: without it nothing imports engine.LLM; gguf; bitsandbytes), carried in
# .gpu_site (tests/gpu/site.sh, then run with carry=[".gpu_site"]).
[ -d .gpu_site ] && export PYTHONPATH=$PWD:$PWD/.gpu_site
out=${OUT:-bench_results}
mkdir -p "$out"
pytest=(python3 -m pytest -q -p no:cacheprovider -rfE --durations=15 --continue-on-collection-errors)

step() {  # step NAME SECONDS LOG COMMAND...: run under a timeout, tee to LOG, append "NAME rc seconds" to summary.txt
  local name=$1 limit=$2 log=$3 start=$SECONDS
  shift 3
  echo "=== $name (up to ${limit}s)" | tee -a "$out/$log"
  timeout --kill-after=2 "$limit" "$@" 2>&1 | tee -a "$out/$log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$out/summary.txt"
}

# 0. What runs here (20 s).
step env 20 gpu_env.txt bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
\"import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())\"; \
for m in llguidance gguf bitsandbytes jsonschema; do python3 -c \"import \$m\" 2>/dev/null || echo \"MISSING \$m (tests/gpu/site.sh)\"; done"
# 1. The engine on the GPU (130 s): every backend against transformers, CUDA graphs on and off, bf16, the profile-run
#    KV sizing within the memory fraction, no host sync in a step (sync debug mode).
step engine_gpu 130 gpu_tests.txt "${pytest[@]}" -m gpu tests/engine/test_gpu.py
# 2. The Triton kernels compiled for this GPU against the torch reference, a cache past 2^31 elements included
#    (60 s; the ahead-of-time compile test is for machines without a GPU).
step triton 60 gpu_tests.txt "${pytest[@]}" tests/triton --ignore=tests/triton/test_compile.py
# 3. Batch-1 decode against the HBM roofline, graphs against eager, 64 streams against transformers (120 s).
step benchmark 120 gpu_benchmark.txt python3 -m engine.benchmark --device cuda --quick \
  --output "$out/gpu_benchmark.json"
# 4. The other GPU-marked engine tests (60 s): every family, grammar rows, the transformers fallback, TP if 2 GPUs.
step engine_families 60 gpu_tests.txt "${pytest[@]}" -m gpu tests/engine --ignore=tests/engine/test_gpu.py
# 5. Quantized matmuls on the GPU: the Triton int kernel, GPTQ / AWQ / int4 / int8 / bitsandbytes / FP8 (40 s).
step quant 40 gpu_tests.txt "${pytest[@]}" -m gpu tests/quant
# 6. Opt-in: GPTQ / AWQ int4 on Triton against bf16 (batch 1 and 64) on a random Llama-1B.
if [[ "${RUN_QUANT_BENCH:-0}" == 1 ]]; then
  step quant_benchmark 240 quant_gpu_benchmark.txt python3 -m engine.benchmark --device cuda --quantize \
    --shape llama-1b --output "$out/quant_gpu_benchmark.json"
fi
