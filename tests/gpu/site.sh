#!/usr/bin/env bash
# Python packages the GPU image lacks (its package list: torch, triton, transformers, ... but no llguidance, gguf or
# bitsandbytes), copied from this machine's environment into .gpu_site/ for a device run to carry:
#   tests/gpu/site.sh, then run(carry=[".gpu_site"], command="tests/gpu/run.sh"); run.sh puts it on PYTHONPATH.
# Without llguidance nothing imports `engine.LLM` there. All three import on the image's Python 3.12: pure Python,
# an abi3 library (llguidance) and ctypes libraries (bitsandbytes, whose CUDA 13 builds alone are kept: the image's
# torch is cu130, and all of them would not travel).
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.gpu_site
rm -rf "$dest"
mkdir -p "$dest"
for pkg in llguidance gguf bitsandbytes; do
  dir=$(python3 -c "import importlib.util, os, sys; print(os.path.dirname(importlib.util.find_spec(sys.argv[1]).origin))" \
    "$pkg" 2>/dev/null) || { echo "site.sh: $pkg is not installed here; skipped" >&2; continue; }
  cp -r "$dir" "$dest/"
  cp -r "$(dirname "$dir")/$pkg"-*.dist-info "$dest/" 2>/dev/null || true
done
# jsonschema (the grammar tests validate with it) has a compiled dependency (rpds-py): fetch the image's Python 3.12
# wheels rather than copy this machine's build.
wheels=$(mktemp -d)
if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d "$wheels" jsonschema referencing jsonschema-specifications rpds-py >/dev/null 2>&1; then
  for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$dest"; done
else
  echo "site.sh: could not fetch jsonschema's wheels; the GPU grammar test will fail to import it" >&2
fi
rm -rf "$wheels"
find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$dest" -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda13*' ! -name 'libbitsandbytes_cpu*' -delete
du -sh "$dest"
