"""Supervised fine-tuning runs: set a run up from a base checkpoint, step it, checkpoint it, resume it exactly.

The pieces of pretraining are reused: the checkpoint files (llm.checkpoint: atomic writes with checksums,
weights_only loads, RNG capture), AdamW, the cosine schedule and gradient clipping (llm.optim), the stop
flag for Ctrl-C (llm.train_loop). What differs is the data: chat examples of unequal length with a loss mask
(llm.sft_data), and which weights train: LoRA adapters (llm.lora) with the base frozen, or every weight
(lora_rank 0). With LoRA the chat tokens' new rows of token_embeddings and lm_head train too (only those
rows: a gradient hook zeroes the others): a frozen lm_head row initialised to the mean of the others gives
a logit equal to the mean logit, which can never be the largest, so <|end|> could never be produced.

Exact resume: batch k is a pure function of (seed, k) (llm.sft_data.batch_indices), the learning rate a pure
function of the step, and a step checkpoint holds the trainable tensors, the optimizer state and every RNG
state, so N steps == N/2 steps + resume + N/2 steps bit for bit. The frozen base is reloaded from its
checkpoint, whose sha256 must equal the one recorded.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llm.bpe.tokenizer import BpeTokenizer
from llm.chat_template import grow_vocab, has_chat_tokens, prepare_chat_model
from llm.checkpoint import (
    atomic_torch_save, capture_rng_state, load_model, prune_checkpoints, read_checkpoint,
    resolve_checkpoint, restore_rng_state,
)
from llm.fileio import sha256_of
from llm.hardware import autocast_context
from llm.lora import LoraConfig, adapter_paths, apply_lora, attach_adapter, load_adapter, merge_and_unload
from llm.metrics import fmt_time
from llm.optim import AdamW, cos_lr_scheduler, gradient_clip
from llm.sft_data import Encoded, batch_indices, collate
from llm.train_loop import StopFlag, TrainingError

CKPT_KIND = "sft"


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run is (saved in its checkpoints; a resume continues with the saved one)."""

    checkpoint: str = "runs/demo"  # the base model: a checkpoint file or a run directory
    out_dir: str = "runs/demo-sft"
    data: str | None = None  # a chat/Alpaca .jsonl/.json; None: the built-in story QA set (llm.qa_task)
    train_examples: int = 4000  # size of the built-in set
    eval_examples: int = 200  # held-out questions graded before and after
    overflow: str = "drop"  # conversations longer than the context: "drop" | "truncate"
    weighting: str = "conversation"  # the loss: mean over conversations, or over answer tokens ("token")
    max_steps: int = 1000  # held-out QA: 74% after 600 steps, 93-95% after 1000 (the copying forms late)
    batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    lora_rank: int = 6  # 2.75% of demo's weights trainable (rank 8: 3.6%); same held-out QA score
    lora_alpha: float = 12.0  # scale alpha/rank = 2, as with rank 8 alpha 16
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # None: llm.lora's default (every attention and FFN projection)
    log_interval: int = 10
    checkpoint_interval: int = 200
    keep_last: int = 2

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "log_interval", "train_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lora_rank", "warmup_steps", "checkpoint_interval", "eval_examples", "weight_decay", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min-lr <= lr, got lr {self.lr}, min-lr {self.min_lr}")
        self.lora()  # LoRA's own checks: alpha, dropout, target names

    def lora(self) -> LoraConfig:
        kw = {"targets": ",".join(self.lora_targets)} if self.lora_targets else {}
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, **kw)


@dataclass
class SftRun:
    cfg: FinetuneConfig
    model: nn.Module
    tokenizer: BpeTokenizer  # with the chat tokens
    base_path: Path  # the base checkpoint file
    base_sha256: str
    base_vocab: int  # the base model's vocabulary: ids from here on are the chat tokens
    device: torch.device
    params: list[nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    losses: dict[int, float] = field(default_factory=dict)

    def autocast(self):
        return autocast_context(self.device, torch.bfloat16 if self.device.type == "cuda" else torch.float32)

    def named_trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}


def load_base(cfg: FinetuneConfig, device: torch.device, tokenizer_dir: str | None = None) -> SftRun:
    """The base model with the chat tokens added (vocabulary grown), in training mode, nothing trainable yet."""
    model, tokenizer, path = load_model(cfg.checkpoint, device=device, tokenizer_dir=tokenizer_dir)
    base_vocab = model.config.vocab_size
    chat_tok = prepare_chat_model(model, tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    return SftRun(cfg, model, chat_tok, Path(path), sha256_of(path), base_vocab, device)


def _only_rows_from(first: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:first] = 0
        return grad
    return hook


def make_trainable(run: SftRun) -> int:
    """LoRA adapters (or, rank 0, every weight) become trainable, plus with LoRA the chat tokens' rows of
    token_embeddings and lm_head. Builds the optimizer; returns the number of trainable weights."""
    cfg, model = run.cfg, run.model
    params = list(apply_lora(model, cfg.lora()))
    for p in params:
        p.requires_grad_(True)
    n_trainable = sum(p.numel() for p in params)
    rows: list[nn.Parameter] = []
    new = model.config.vocab_size - run.base_vocab
    if cfg.lora_rank > 0 and new > 0:
        for w in dict.fromkeys((model.token_embeddings.weight, model.lm_head.weight)):  # once when tied
            w.requires_grad_(True)
            w.register_hook(_only_rows_from(run.base_vocab))
            rows.append(w)
            n_trainable += new * w.shape[1]
    run.params = params + rows
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2] + rows  # rows: no decay, so the old rows stay bit-identical
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    run.optimizer = AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    model.train()
    return n_trainable


def save_step(run: SftRun) -> Path:
    """checkpoints/step_N.pt: what an exact resume needs (trainable tensors, optimizer, RNG, config, base)."""
    d = Path(run.cfg.out_dir) / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{run.step:07d}.pt"
    atomic_torch_save({
        "model": run.named_trainable(), "optimizer": run.optimizer.state_dict(), "iteration": run.step,
        "kind": CKPT_KIND, "finetune_config": dataclasses.asdict(run.cfg), "rng": capture_rng_state(),
        "base_checkpoint": str(run.base_path), "base_sha256": run.base_sha256, "losses": dict(run.losses),
    }, path)
    prune_checkpoints(d, max(1, run.cfg.keep_last))
    return path


def read_resume(resume: str, out_dir: str) -> tuple[Path, dict]:
    """The checkpoint `resume` names ("auto": the newest in out_dir) and its contents; one line if unusable."""
    src = Path(out_dir) if resume == "auto" else Path(resume)
    try:
        path = Path(resolve_checkpoint(src))
        ckpt = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"cannot resume from {src}: {str(e).splitlines()[0]}") from None
    if ckpt.get("kind") != CKPT_KIND:
        raise ValueError(f"{path} is not a fine-tuning checkpoint (resume pretraining with llm.training)")
    return path, ckpt


def restore(run: SftRun, ckpt: dict, path: Path) -> None:
    """Load a step checkpoint's trainable tensors, optimizer state, RNG and step into a freshly set-up run."""
    if ckpt["base_sha256"] != run.base_sha256:
        raise ValueError(f"{path} was trained on a base with sha256 {ckpt['base_sha256'][:16]}..., but "
                         f"{run.base_path} has {run.base_sha256[:16]}... (the base changed)")
    saved, params = ckpt["model"], dict(run.model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != want:
        raise ValueError(f"{path}: its trainable tensors do not match this run's ({sorted(set(saved) ^ want)[:3]} ...)")
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng_state(ckpt["rng"])
    run.step = int(ckpt["iteration"])
    run.losses = {int(k): float(v) for k, v in ckpt.get("losses", {}).items()}


def train_steps(run: SftRun, examples: list[Encoded], end_step: int, log) -> bool:
    """Optimizer steps from run.step to end_step (or to Ctrl-C: False); progress lines with ETA; step
    checkpoints every checkpoint_interval steps and at the end."""
    cfg, model = run.cfg, run.model
    t0, first, tokens = time.perf_counter(), run.step, 0
    with StopFlag() as stop:
        while run.step < end_step:
            lr = cos_lr_scheduler(run.step, cfg.lr, cfg.min_lr, min(cfg.warmup_steps, cfg.max_steps), cfg.max_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            batch = [examples[i] for i in batch_indices(len(examples), cfg.batch_size, cfg.seed, run.step)]
            x, y, mask = collate(batch, run.device, cfg.weighting)
            with run.autocast():
                loss = model.loss(x, y, mask)
            loss.backward()
            norm = gradient_clip(run.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"non-finite loss ({value}) at step {run.step + 1}; try a lower --lr")
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            run.losses[run.step] = value
            tokens += x.numel()
            if run.step % cfg.log_interval == 0 or run.step == end_step:
                el = time.perf_counter() - t0
                eta = el / (run.step - first) * (cfg.max_steps - run.step)
                log(f"step {run.step}/{cfg.max_steps} | loss {value:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | "
                    f"{tokens / el:,.0f} tok/s | elapsed {fmt_time(el)} | ETA {fmt_time(eta)}")
            stopping = stop.signum is not None or run.step == end_step
            if (cfg.checkpoint_interval and run.step % cfg.checkpoint_interval == 0) or stopping:
                save_step(run)
            if stop.signum is not None:
                return False
    return True


@torch.no_grad()
def add_chat_rows(model: torch.nn.Module, rows_path: Path) -> None:
    """Grow the model to the fine-tune's chat vocabulary and put in the rows it trained (chat_rows.pt)."""
    saved = read_checkpoint(rows_path)
    first, rows = int(saved["first_id"]), saved["model"]
    if first != model.config.vocab_size:
        raise ValueError(f"{rows_path} extends a vocabulary of {first} ids; the base has {model.config.vocab_size}")
    grow_vocab(model, first + rows["token_embeddings.weight"].shape[0])
    model.token_embeddings.weight[first:] = rows["token_embeddings.weight"]
    model.lm_head.weight[first:] = rows["lm_head.weight"]


def load_adapter_run(adapter: str | Path, checkpoint: str | None = None, device=None, tokenizer_dir: str | None = None
                     ) -> tuple[nn.Module, BpeTokenizer, Path]:
    """(model, tokenizer, base path): the base the adapter names (or `checkpoint`) with the fine-tune's chat rows
    (chat_rows.pt), its tokenizer and the adapter beside it, merged."""
    meta = load_adapter(adapter)[2]
    where = adapter_paths(adapter)[0].parent
    base = checkpoint or meta.get("base_checkpoint")
    if not base:
        raise ValueError(f"{adapter} names no base checkpoint; pass --checkpoint BASE")
    model, tokenizer, path = load_model(base, device=device)  # with the base's own tokenizer
    if (where / "chat_rows.pt").is_file():
        add_chat_rows(model, where / "chat_rows.pt")
    chat_tok = Path(tokenizer_dir) if tokenizer_dir else where / "tokenizer"
    if tokenizer_dir or (chat_tok / "vocab.json").is_file():
        try:
            tokenizer = BpeTokenizer.load(chat_tok)
        except Exception as e:  # a damaged file: torch-free loaders raise many types
            raise ValueError(f"cannot load tokenizer from {chat_tok}: {e}") from None
    attach_adapter(model, adapter, base_sha256=sha256_of(path))
    merge_and_unload(model)
    return model, tokenizer, path


def load_finetuned(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, BpeTokenizer]:
    """(model, chat tokenizer) of a fine-tuning run, in eval mode with any adapter merged: `path` is a run
    directory (its merged.pt or model.pt, else its adapter over the base it names), a full checkpoint file,
    or an adapter file (its run's chat_rows.pt beside it). ValueError (one line) if it is none of these."""
    p = Path(path)
    run_dir = p if p.is_dir() else p.parent
    full = next((f for f in (run_dir / "merged.pt", run_dir / "model.pt") if f.is_file()), None) if p.is_dir() else None
    if p.is_file() and p.suffix == ".pt" and p.name != "chat_rows.pt":
        full = p
    if full is not None:
        model, tok, _ = load_model(full, device=device)
        if not has_chat_tokens(tok):
            raise ValueError(f"{full} has no chat tokens: fine-tune it first (uv run -m llm.finetune)")
        return model, tok
    adapter = run_dir / "adapter" if p.is_dir() else p
    missing = [f.name for f in (run_dir / "chat_rows.pt", adapter_paths(adapter)[1]) if not f.is_file()]
    if missing:
        raise ValueError(f"{p} is not a fine-tuning run or checkpoint (no {' or '.join(missing)})")
    model, tok, _ = load_adapter_run(adapter, device=device)
    return model.eval(), tok
