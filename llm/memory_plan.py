"""The memory planner: bytes per GPU (rank) of a training run before it starts, so a learner sees which
presets fit on which cards before renting them.

    uv run -m llm.training plan --preset large --world-size 8 --parallel fsdp --activation-checkpointing full \\
        --batch-size 8 --context-length 1024 --gpu-memory 24GB

Per rank, with N parameters, W ranks, micro-batch B, context T (what each term counts):

    parameters      4N (fp32 master weights), /W under fsdp
    gradients       4N (fp32), /W under fsdp
    optimizer       AdamW's m and v: 8N, /W under fsdp, + one float32 step per tensor (on every rank)
    fsdp gathered   the full weights of the units in flight: the root (embedding, final norm, lm_head: kept
                    gathered through the step) and two blocks (the one computing, the next prefetched), in the
                    parameter dtype (bf16 on GPU), plus one block's unsharded fp32 gradient before its
                    reduce-scatter
    activations     what the forward keeps for backward, counted from what the autograd Functions save
                    (`activation_bytes`), at the peak of the step

Activations per token of one block (elements; d = d_model, f = d_ff, h heads, d_kv = h_kv * head_dim):
the two RMSNorm inputs and outputs 4d + 2 statistics, q k v d + 2 d_kv, attention output and its merged
copy 2d, the SwiGLU inputs and outputs 4f, the block output d, attention's row log-sum-exps h, and on the
CPU path attention's probabilities P when they are kept (`llm.fast.attention`: h * T_eff, the blocked causal
part of the T x T square; GPU flash attention keeps none). Outside the blocks: the embedding output d, the
final norm's statistics 1, the fused loss' gradient of its input d, the token ids, and per step the
lm_head weight gradient V x d computed in the forward, plus the fused loss' logits chunk. A checkpointed
block keeps only its input d; during backward one block at a time is recomputed in full: the peak is the
larger of the end of the forward and a recompute, when the blocks before that one still keep theirs. Elements are
4 bytes (fp32, the CPU) or 2 (bf16 autocast on GPU; an estimate: statistics stay fp32).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llm.config import ModelConfig
from llm.fast.attention import QUERY_BLOCK, SAVE_P_BYTES
from llm.fast.cross_entropy import FUSED_CHUNK
from llm.train_config import checkpoint_every

UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
         "TIB": 2**40}


def parse_bytes(text: str) -> float:
    """'24GB', '80 GiB', '1.5e9' -> bytes; ValueError with one line otherwise."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).upper() not in UNITS:
        raise ValueError(f"--gpu-memory must be a size like 24GB or 80GiB, got {text!r}")
    return float(m.group(1)) * UNITS[m.group(2).upper()]


def attention_p_per_token(mcfg: ModelConfig, batch: int, ctx: int, elem: int, gpu: bool) -> float:
    """Elements of attention probabilities one block keeps per token: none on GPU (flash attention); on the
    CPU path the blocked causal P when all its blocks fit in SAVE_P_BYTES, else none (recomputed)."""
    if gpu:
        return 0.0
    p_rows = sum((min(ctx, r + QUERY_BLOCK) - r) * min(ctx, r + QUERY_BLOCK) for r in range(0, ctx, QUERY_BLOCK))
    if batch * mcfg.num_heads * p_rows * elem > SAVE_P_BYTES:
        return 0.0
    return mcfg.num_heads * p_rows / ctx


def block_activation_elems(mcfg: ModelConfig, batch: int, ctx: int, elem: int, gpu: bool) -> float:
    """Elements one plain block keeps for backward per token (see the module docstring)."""
    d, f, h = mcfg.d_model, mcfg.d_ff, mcfg.num_heads
    d_kv = mcfg.head_dim * (mcfg.num_kv_heads or h)
    return 4 * d + 2 + (d + 2 * d_kv) + 2 * d + 4 * f + d + h + attention_p_per_token(mcfg, batch, ctx, elem, gpu)


def activation_bytes(mcfg: ModelConfig, batch: int, ctx: int, ac_mode: str, *, elem: int = 4,
                     gpu: bool = False) -> float:
    """Peak activation bytes of one training step of one rank (micro-batch `batch`, context `ctx`)."""
    tokens = batch * ctx
    L, d, V = mcfg.num_layers, mcfg.d_model, mcfg.vocab_size
    every = checkpoint_every(ac_mode)
    block = block_activation_elems(mcfg, batch, ctx, elem, gpu)
    kept = [d if every and i % every == 0 else block for i in range(L)]  # per block, after the forward
    # Backward walks the blocks from the last: when checkpointed block i is recomputed, the blocks after it
    # have freed everything and the blocks before it still keep theirs.
    per_token = max([sum(kept)] + [sum(kept[:i]) + block for i in range(L) if kept[i] == d and every])
    per_token += 2 * d + 1  # embedding output, final norm statistics, the loss' input gradient
    ids = tokens * 8  # int64 token ids
    head = V * d * 4 + min(tokens, FUSED_CHUNK) * V * 4  # lm_head gradient (fp32) + one logits chunk
    return tokens * per_token * elem + ids + head


@dataclass
class Plan:
    params: float
    grads: float
    optimizer: float
    gathered: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations


def plan(mcfg: ModelConfig, *, world_size: int, parallel: str, ac_mode: str, batch: int, gpu: bool = True) -> Plan:
    """Bytes per rank (see the module docstring); `gpu`: bf16 autocast and flash attention, else CPU fp32."""
    n = mcfg.num_params()
    tensors = 9 * mcfg.num_layers + 3  # parameter tensors: one AdamW step counter each
    shard = world_size if parallel == "fsdp" else 1
    elem = 2 if gpu else 4
    gathered = 0.0
    if parallel == "fsdp" and world_size > 1:
        block = (mcfg.num_params(embedding=False) - mcfg.d_model) / mcfg.num_layers
        root = n - mcfg.num_layers * block
        gathered = (root + 2 * block) * elem + block * 4
    act = activation_bytes(mcfg, batch, mcfg.context_length, ac_mode, elem=elem, gpu=gpu)
    return Plan(4 * n / shard, 4 * n / shard, 8 * n / shard + 4 * tensors, gathered, act)  # steps: not sharded


def fmt(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB" if n >= 2**30 else f"{n / 2**20:8.1f} MiB"


def plan_report(name: str, mcfg: ModelConfig, p: Plan, *, world_size: int, parallel: str, ac_mode: str, batch: int,
                gpu: bool, gpu_memory: float | None) -> str:
    """The planner's printout: one line of setting, one per term, the total against `gpu_memory`."""
    where = "GPU, bf16 autocast" if gpu else "CPU, fp32"
    rows = [("parameters", p.params), ("gradients", p.grads), ("optimizer state", p.optimizer)]
    if parallel == "fsdp" and world_size > 1:
        rows.append(("fsdp gathered", p.gathered))
    rows += [("activations", p.activations), ("total", p.total)]
    lines = [f"{name}: {mcfg.num_params() / 1e6:.1f}M params | world {world_size} x {parallel} | activation "
             f"checkpointing {ac_mode} | micro-batch {batch} x context {mcfg.context_length} | {where} | per rank:"]
    lines += [f"  {label:<16}{fmt(value)}" for label, value in rows]
    if gpu_memory is not None:
        if p.total <= gpu_memory:
            lines.append(f"  fits in {fmt(gpu_memory).strip()} ({fmt(gpu_memory - p.total).strip()} left for the "
                         "allocator, CUDA context and kernels' workspace)")
        else:
            lines.append(f"  does NOT fit in {fmt(gpu_memory).strip()} (short by {fmt(p.total - gpu_memory).strip()}): "
                         "try --activation-checkpointing full, a smaller --batch-size (with more grad_accum), or "
                         "--parallel fsdp over more ranks")
    return "\n".join(lines)
