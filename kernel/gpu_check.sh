#!/usr/bin/env bash
# The GPU figures kernel/README.md leaves open, in one run of about 6-9 minutes on an H100/H200.
#
#   bash kernel/gpu_check.sh                # results under $OUT if set, else kernel/results/
#
# Made for a machine without network access that already has torch and triton (it uses `python3`, or
# $PYTHON): no uv, no syrupy (the snapshot tests are left to CI). Each step has its own time limit, so
# one that hangs cannot take the others with it; the script goes on after a failed step and exits
# non-zero at the end if any failed.
#   1. the Triton FlashAttention-2 kernels' tests, compiled for the GPU instead of interpreted;
#   2. the Triton launch tuned: block sizes x warps x stages vs F.scaled_dot_product_attention, bf16,
#      head dim 64, causal, 4k-16k (kernel/tune_flash_triton.py; its last line is the best config);
#   3. attention, bf16, head dim 64, causal, 1k-16k, default launch: flash_triton vs F.sdpa
#      (target >= 1.0x fwd+bwd at 4k-16k), with peak memory;
#   4. the `small` model, bf16 autocast: ours vs the torch.nn reference, eager, with peak memory.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-kernel/results}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
failed=0

step() {  # step <seconds> <title> <command...>
    local limit=$1 title=$2
    shift 2
    echo "== $title (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "== $title: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || failed=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || failed=1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

step 120 "1/4 FlashAttention tests on the GPU" \
    "$PY" -m pytest --noconftest -p no:cacheprovider -q -k "not snapshot" tests/test_flash_triton.py tests/test_flash_attention.py
step 150 "2/4 Triton launch tuning, bf16, d 64" \
    "$PY" kernel/tune_flash_triton.py --seq-lens 4096,8192,16384 --head-dim 64 --dtype bfloat16
step 180 "3/4 attention benchmark, bf16, d 64" \
    "$PY" kernel/benchmarking_attention.py --device cuda --dtype bfloat16 --head-dims 64 --batch-size 2 --num-heads 16 \
    --seq-lens 1024,4096,8192,16384 --impls flash_triton,sdpa,ours_causal --memory --out --results-dir "$OUTDIR"
step 120 "4/4 model benchmark, small, bf16" \
    "$PY" kernel/benchmarking_model.py --preset small --device cuda --dtype bfloat16 --compare torch \
    --warmup 3 --steps 10 --memory --json "$OUTDIR/model_small_cuda_bf16.json"
exit $failed
