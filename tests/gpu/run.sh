#!/usr/bin/env bash
# The GPU check, run whenever a session is lent a GPU machine (no install there: the image's torch, triton and
# transformers; our code from the working tree). GPU-marked tests (engine, quantization), the Triton kernels on the
# GPU, then short benchmarks (against transformers; int4 against bf16). Under 12 minutes on one H100/H200. Results
# land in $OUT (or bench_results/).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# Packages the image lacks (llguidance: without it nothing imports engine.LLM; gguf; bitsandbytes), carried in
# .gpu_site (tests/gpu/site.sh, then run with carry=[".gpu_site"]).
[ -d .gpu_site ] && export PYTHONPATH=$PWD:$PWD/.gpu_site
out=${OUT:-bench_results}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__)"
  for m in llguidance gguf bitsandbytes; do python3 -c "import $m" 2>/dev/null || echo "MISSING $m (tests/gpu/site.sh)"; done
} 2>&1 | tee "$out/gpu_env.txt"
# 1. Engine tests on the GPU: every backend against transformers, graphs on/off, bf16, KV sizing, TP if 2 GPUs.
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine 2>&1 | tee "$out/gpu_tests.txt"
# 2. The Triton kernels compiled for this GPU against the torch reference (TRITON_INTERPRET unset).
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/triton 2>&1 | tee -a "$out/gpu_tests.txt"

# 2b. Quantized matmuls on the GPU: the Triton int kernel, GPTQ / AWQ / int4 / int8 / bitsandbytes / FP8 models.
timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/quant 2>&1 | tee -a "$out/gpu_tests.txt"
# 3. Batch-1 decode against the HBM roofline, graphs against eager, throughput at 64 streams against transformers.
timeout 240 python3 -m engine.benchmark --device cuda --quick --output "$out/gpu_benchmark.json" 2>&1 \
  | tee "$out/gpu_benchmark.txt"
# 4. GPTQ / AWQ int4 on Triton against bf16 (batch 1 and 64) on a random Llama-1B.
timeout 240 python3 -m engine.benchmark --device cuda --quantize --shape llama-1b \
  --output "$out/quant_gpu_benchmark.json" 2>&1 | tee "$out/quant_gpu_benchmark.txt"
