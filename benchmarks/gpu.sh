#!/usr/bin/env bash
# Everything actprune measures on a CUDA GPU, in one command (about 5 minutes on an H100):
# kernel correctness (Triton vs the PyTorch reference), kernel speed against cuBLAS and
# torch.sparse._triton_ops, training-step memory for ResMLP-S12/S24 at 224 px (scope linear), the
# scope comparison on ResMLP-S24 at batch 32 (issue 5's setting), and the planner.
#   bash benchmarks/gpu.sh [OUT]        # OUT defaults to docs/results/gpu-<GPU name>
# Works from a checkout without installing (PYTHONPATH=src) on any torch >= 2.4 with triton.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
name=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
OUT=${1:-docs/results/gpu-$name}
mkdir -p "$OUT"
set -x
$PY -m pytest -q tests/test_kernels.py tests/test_layers.py tests/test_scope_all.py 2>&1 | tee "$OUT/tests.txt"
for dtype in float16 float32; do
  $PY -m actprune bench kernels --device cuda --dtype "$dtype" --batch-size 64 --repeats 50 \
    --preset recommended paper --out "$OUT"
done
for model in resmlp_s12 resmlp_s24; do
  $PY -m actprune bench memory --device cuda --model "$model" --batch-size 64 --timing-steps 10 \
    --preset paper --sparsity 0.5 0.8 0.9 0.95 --block-size 8 16 32 64 --out "$OUT"
done
$PY -m actprune bench memory --device cuda --model resmlp_s24 --batch-size 32 \
  --scope linear all --remainder-bits 0 2 4 --int8 false true --timing-steps 10 --out "$OUT" \
  --stem memory_scopes_resmlp_s24_224px_b32_cuda
$PY -m actprune plan --model resmlp_b24 --batch-size 256 --memory 80GB --scope linear all | tee "$OUT/plan_resmlp_b24.md"
