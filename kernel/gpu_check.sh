#!/usr/bin/env bash
# The GPU figures kernel/README.md leaves open, in one run of about 5-7 minutes on an H100/H200.
#
#   bash kernel/gpu_check.sh                # results under $OUT if set, else kernel/results/
#   GPU_CHECK_STEPS="1 5" bash kernel/gpu_check.sh   # only these steps (a rerun after a fix)
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
#   4. the `small` model, bf16 autocast: ours vs the torch.nn reference, eager, with peak memory;
#   5. the demo training run on CUDA, bf16 autocast (data, loop, eval, checkpoint, sample, plots), then
#      the same run paused at step 100 and resumed with `--resume auto`: the two final losses must match;
#   6. one-process DDP through torchrun (NCCL), 50 steps;
#   7. generation (KV cache, sampled and beam search) and perplexity of step 5's model on CUDA, and the
#      KV-cache decoding benchmark (cache vs recomputing the window).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-kernel/results}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
failed=0

STEPS=" ${GPU_CHECK_STEPS:-1 2 3 4 5 6 7} "

step() {  # step <seconds> <title starting with its number, "N/7"> <command...>
    local limit=$1 title=$2
    shift 2
    [[ $STEPS == *" ${title%%/*} "* ]] || return 0
    echo "== $title (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "== $title: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || failed=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || failed=1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

step 120 "1/7 FlashAttention tests on the GPU" \
    "$PY" -m pytest --noconftest -p no:cacheprovider -q -k "not snapshot" tests/test_flash_triton.py tests/test_flash_attention.py
step 120 "2/7 Triton launch tuning, bf16, d 64" \
    "$PY" kernel/tune_flash_triton.py --seq-lens 4096,8192,16384 --head-dim 64 --dtype bfloat16
step 120 "3/7 attention benchmark, bf16, d 64" \
    "$PY" kernel/benchmarking_attention.py --device cuda --dtype bfloat16 --head-dims 64 --batch-size 2 --num-heads 16 \
    --seq-lens 1024,4096,8192,16384 --impls flash_triton,sdpa,ours_causal --memory --out --results-dir "$OUTDIR"
step 90 "4/7 model benchmark, small, bf16" \
    "$PY" kernel/benchmarking_model.py --preset small --device cuda --dtype bfloat16 --compare torch \
    --warmup 3 --steps 10 --memory --json "$OUTDIR/model_small_cuda_bf16.json"
RUN=${TMPDIR:-/tmp}/llm_gpu_check
[[ $STEPS == *" 5 "* ]] && rm -rf "$RUN"
step 150 "5/7 demo training on CUDA, bf16, then paused at 100 and resumed" bash -c "
    $PY -m llm.training --device cuda --out-dir $RUN/full --img-dir $OUTDIR &&
    $PY -m llm.training --device cuda --out-dir $RUN/paused --stop-at 100 --no-plot --no-sample &&
    $PY -m llm.training --device cuda --out-dir $RUN/paused --resume auto --no-plot --no-sample"
if [[ $STEPS == *" 5 "* ]]; then
echo "== resumed vs uninterrupted: train losses of steps 101-200, last val loss"
"$PY" - "$RUN/full/metrics.jsonl" "$RUN/paused/metrics.jsonl" <<'EOF' || failed=1
import json, sys
runs = [[json.loads(line) for line in open(p)] for p in sys.argv[1:]]
train = [{r["step"]: r["loss"] for r in run if r["type"] == "train" and r["step"] > 100} for run in runs]
val = [[r["val_loss"] for r in run if r["type"] == "eval"][-1] for run in runs]
diff = max(abs(train[0][s] - train[1][s]) for s in train[0])
print(f"steps compared {len(train[0])}, max |loss diff| {diff:.3g}, val {val[0]:.6f} vs {val[1]:.6f}")
sys.exit(0 if train[0].keys() == train[1].keys() and diff == 0 and val[0] == val[1] else 1)
EOF
cp "$RUN/full/metrics.jsonl" "$OUTDIR/train_demo_cuda_metrics.jsonl"
fi
step 90 "6/7 torchrun DDP, 1 process, NCCL" \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m llm.training --device cuda \
    --out-dir "$RUN/ddp" --max-steps 50 --eval-interval 25 --no-plot --no-sample
step 120 "7/7 generation, evaluation and KV-cache decoding on CUDA" bash -c "
    $PY -m llm.generating --device cuda --checkpoint $RUN/full --prompt 'Once upon a time' --max-new-tokens 80 --seed 0 &&
    $PY -m llm.generating --device cuda --checkpoint $RUN/full --prompt 'The little dog' --max-new-tokens 40 --num-beams 4 &&
    $PY -m llm.evaluate --device cuda --checkpoint $RUN/full &&
    $PY kernel/benchmarking_generation.py --device cuda --json $OUTDIR/generation_cuda.json"
exit $failed
