#!/usr/bin/env bash
# Everything actprune measures on a CUDA GPU, in one command (about 6 minutes on an H100 or H200):
# kernel correctness (every Triton kernel against the PyTorch reference, remainder codes bit for
# bit), kernel speed (compress GB/s against a copy, dW with the remainder decoded tile by tile
# against cuBLAS and torch.sparse), training-step memory and time of ResMLP-S24 at 224 px
# (dense, checkpointing, the paper's method and the default, in one process), and every frontier
# configuration's peak and interleaved step time (the step-time JSON is what `actprune plan
# --step-times` reads for a GPU). (The planner predicts on the meta device: CPU work.)
#   bash benchmarks/gpu.sh [OUT]          # OUT defaults to docs/results/gpu-<GPU name>
#   bash benchmarks/gpu.sh --quick [OUT]  # at most 9 minutes (its steps' limits add to 550 s, most
#       needed first; never run on a device yet, so how long each takes is not known): kernel
#       correctness (and the compiled path's on CUDA, CUDA graphs included), dense / checkpointing / default / paper step times
#       interleaved, eager and compiled, on ResMLP-S24 b64 (and the default compiled with its
#       compression traced instead: OUT/traced) and GPT-2 124M at seq 1024 (bf16 autocast;
#       hf:gpt2, or the zoo's gpt2_small without transformers), compress GB/s against a copy.
#       Run it before a change and after. The step tables' "host s" column (until the step's
#       last call returned) beside "median step s" says whether launching limits a step.
# Works from a checkout without installing (PYTHONPATH=src) on any torch >= 2.4 with triton (the
# test suite and each quick step's CPU form pass with the GPU image's torch 2.11, triton 3.6, Py 3.12).
# Each step has a time limit and a failed step does not stop the next: whatever finished is kept.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
name=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
OUT=${1:-docs/results/gpu-$name}
mkdir -p "$OUT"
step() {  # step SECONDS LOG COMMAND...: run with a limit, keep its output, report its status
  local limit=$1 log=$2
  shift 2
  echo "+ $*" | tee -a "$OUT/$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  echo "exit status ${PIPESTATUS[0]}" | tee -a "$OUT/$log"
}
if [ "$QUICK" = 1 ]; then  # most needed first: a step cut short keeps the rounds it finished
  # -v: each test's result as it ends, so a run cut by the limit still says which passed
  step 120 tests.txt $PY -m pytest -v --tb=short -p no:cacheprovider -n 4 tests/test_kernels.py \
    tests/test_compile.py -k "not compile_for_a_gpu and (test_kernels or cuda)"
  configs="dense checkpoint actprune_all_u4_b32 actprune_global_s0.9_b32"
  step 150 steps.txt $PY benchmarks/step_time.py --device cuda --model resmlp_s24 --batch-size 64 \
    --rounds 5 --compile --configs $configs --out "$OUT"
  step 40 bench.txt $PY -m actprune bench kernels --device cuda --dtype float32 --batch-size 64 \
    --model resmlp_s24 --repeats 20 --preset recommended paper --out "$OUT"
  gpt=gpt2_small
  $PY -c "import transformers" 2>/dev/null && gpt=hf:gpt2
  step 150 steps.txt $PY benchmarks/step_time.py --device cuda --model $gpt --seq-len 1024 \
    --batch-size 8 --amp bf16 --rounds 5 --compile --configs $configs --out "$OUT"
  # The A/B of the compiled path: the default's compression traced (PyTorch ops that inductor
  # generates) instead of the Triton kernel's operator (docs/design.md, "The compiled path").
  ACTPRUNE_KERNELS=torch step 90 steps.txt $PY benchmarks/step_time.py --device cuda \
    --model resmlp_s24 --batch-size 64 --rounds 3 --compile --configs dense actprune_all_u4_b32 \
    --out "$OUT/traced"
  exit 0
fi
step 150 tests.txt $PY -m pytest -q -p no:cacheprovider -n 4 tests/test_kernels.py tests/test_layers.py \
  tests/test_scope_all.py
for dtype in float16 float32; do
  step 50 bench.txt $PY -m actprune bench kernels --device cuda --dtype "$dtype" --batch-size 64 \
    --model resmlp_s24 --repeats 50 --preset recommended blocks paper --out "$OUT"
done
step 100 bench.txt $PY -m actprune bench memory --device cuda --model resmlp_s24 --batch-size 64 \
  --timing-steps 10 --preset recommended blocks paper --out "$OUT"
step 120 bench.txt $PY -m actprune bench memory --device cuda --model resmlp_s24 --batch-size 64 \
  --frontier --timing-steps 5 --out "$OUT" --stem memory_frontier_resmlp_s24_224px_b64_cuda
step 120 bench.txt $PY benchmarks/step_time.py --frontier --device cuda --model resmlp_s24 \
  --batch-size 64 --rounds 10 --out "$OUT"
