"""Fine-tune a pretrained checkpoint on chat / instruction data: `uv run -m llm.finetune` (`python -m llm finetune`).

    uv run -m llm.finetune                                  # LoRA on the built-in story QA set, from runs/demo
    uv run -m llm.finetune --data my_chats.jsonl            # any chat / minimind / Alpaca .jsonl or .json
    uv run -m llm.finetune --lora-rank 0                    # full fine-tuning, same command
    uv run -m llm.finetune --merge                          # also a merged full checkpoint (llm.generating loads it)
    uv run -m llm.finetune --resume auto                    # continue an interrupted run exactly

With no flags it fine-tunes runs/demo (the default training run) with LoRA on questions about stories
(llm.qa_task) for a few CPU minutes, printing a progress line with ETA, and grades exact-match accuracy on
held-out questions before and after, with 3 example answers. Out: RUN/tokenizer (the chat tokenizer),
RUN/checkpoints/step_N.pt (resume), RUN/adapter.* + RUN/chat_rows.pt (LoRA) or RUN/model.pt (rank 0,
a full checkpoint), RUN/merged.pt with --merge, RUN/finetune.json (the numbers).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from llm.checkpoint import atomic_torch_save, checkpoint_or_default_run, prune_checkpoints, save_checkpoint
from llm.chat_template import end_of_turn_id, render_prompt, reply_text
from llm.cli import Parser, add_device, add_tokenizer_dir
from llm.decoding import iter_tokens
from llm.fileio import write_json
from llm.hardware import THREADS_HELP, device_from_name, set_threads
from llm.lora import merge_and_unload, save_adapter
from llm.metrics import log
from llm.qa_task import QAExample, check_held_out, exact_match, held_out_examples, sft_examples
from llm.sampling import SamplingConfig
from llm.sft_data import SftDataError, encode_conversations, read_conversations
from llm.sft_train import FinetuneConfig, SftRun, load_base, make_trainable, read_resume, restore, train_steps
from llm.train_loop import TrainingError

EVAL_BATCH = 20
MAX_ANSWER_TOKENS = 12


def build_parser() -> Parser:
    d = FinetuneConfig()
    p = Parser(prog="python -m llm.finetune", description="Fine-tune a checkpoint (LoRA or full) on chat data.")
    p.add_argument("--checkpoint", default=None, help="base checkpoint or run dir (default: runs/demo)")
    add_tokenizer_dir(p, "the base's tokenizer directory (default: the one recorded in the checkpoint)")
    p.add_argument("--data", default=None, help="chat/minimind/Alpaca .jsonl or .json (default: built-in story QA)")
    p.add_argument("--out-dir", default=d.out_dir)
    p.add_argument("--overflow", choices=("drop", "truncate"), default=d.overflow,
                   help="conversations longer than the context")
    p.add_argument("--weighting", choices=("token", "conversation"), default=d.weighting,
                   help="loss: mean over answer tokens, or over conversations (each weighs the same)")
    for name in ("max_steps", "batch_size", "warmup_steps", "seed", "log_interval", "checkpoint_interval",
                 "train_examples", "eval_examples"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="0 = full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--lora-targets", default=None, help="comma-separated projections, e.g. q_proj,v_proj")
    p.add_argument("--merge", action="store_true", help="also write RUN/merged.pt, a full checkpoint")
    p.add_argument("--resume", default=None, metavar="PATH|auto", help="continue a run from its checkpoint")
    p.add_argument("--stop-at", type=int, default=None, help="pause after this step (checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir holding an earlier run")
    p.add_argument("--no-eval", action="store_true", help="skip grading before and after")
    add_device(p)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return p


def config_from_args(args) -> FinetuneConfig:
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields and k not in ("checkpoint", "lora_targets")}
    kw["checkpoint"] = str(checkpoint_or_default_run(args.checkpoint))
    if args.lora_targets:
        kw["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    cfg = FinetuneConfig(**kw)
    cfg.validate()
    return cfg


def training_examples(run: SftRun, held_out: list[QAExample]):
    """The encoded training set: the built-in QA set (checked disjoint from held_out) or cfg.data."""
    cfg = run.cfg
    if cfg.data is None:
        built_in = sft_examples(cfg.train_examples)
        check_held_out(built_in, held_out)
        conversations = [e.messages() for e in built_in]
    else:
        conversations = read_conversations(cfg.data)
    report = encode_conversations(run.tokenizer, conversations, run.model.config.context_length, cfg.overflow)
    log(f"data: {cfg.data or 'built-in story QA'}: {report.line()}")
    if not report.examples:
        raise ValueError("no conversation fits the context: nothing to train on")
    return report.examples


@torch.no_grad()
def answer(run: SftRun, prompts: Sequence[list[dict]], max_new_tokens: int = MAX_ANSWER_TOKENS) -> list[str]:
    """Greedy answers to conversations (each ending with a user turn), up to the <|end|> that closes them."""
    model, tok, end = run.model, run.tokenizer, end_of_turn_id(run.tokenizer)
    was_training = model.training
    out: list[str] = []
    for i in range(0, len(prompts), EVAL_BATCH):
        ids = [render_prompt(tok, m) for m in prompts[i: i + EVAL_BATCH]]
        rows: list[list[int]] = [[] for _ in ids]
        for nxt in iter_tokens(model, ids, SamplingConfig(temperature=0.0), max_new_tokens=max_new_tokens):
            for r, t in enumerate(nxt.tolist()):
                if not rows[r] or rows[r][-1] != end:
                    rows[r].append(t)
            if all(r and r[-1] == end for r in rows):
                break
        out += [reply_text(tok, [t for t in r if t != end]) for r in rows]
    model.train(was_training)
    return out


def grade(run: SftRun, held_out: list[QAExample]) -> tuple[float, dict[str, float], list[str]]:
    """(exact-match accuracy, accuracy per question kind, the answers) on the held-out questions."""
    preds = answer(run, [e.messages(with_answer=False) for e in held_out])
    hits = [exact_match(p, e.answer) for p, e in zip(preds, held_out)]
    total, right = Counter(e.kind for e in held_out), Counter(e.kind for e, h in zip(held_out, hits) if h)
    return sum(hits) / max(1, len(hits)), {k: right[k] / total[k] for k in total}, preds


def _describe(acc: float, per_kind: dict[str, float]) -> str:
    return f"{100 * acc:.1f}% (" + ", ".join(f"{k} {100 * v:.0f}%" for k, v in per_kind.items()) + ")"


def write_outputs(run: SftRun, merge: bool) -> list[Path]:
    """The chat tokenizer, the adapter (LoRA: adapter file + the chat tokens' rows) or the full model
    (rank 0), and with `merge` a merged full checkpoint. Returns the paths written. Leaves the model
    merged (LoRA folded into plain Linears)."""
    out, model = Path(run.cfg.out_dir), run.model
    tok_dir = run.tokenizer.save(out / "tokenizer")
    extra = {"model_config": model.config.to_dict(), "tokenizer_dir": str(tok_dir),
             "finetune_config": dataclasses.asdict(run.cfg), "base_checkpoint": str(run.base_path),
             "base_sha256": run.base_sha256}
    if run.cfg.lora_rank == 0:
        save_checkpoint(model, None, run.step, out / "model.pt", extra=extra)
        return [tok_dir, out / "model.pt"]
    adapter = out / "adapter.safetensors"
    save_adapter(adapter, model, run.cfg.lora(), str(run.base_path), run.base_sha256)
    rows = {"token_embeddings.weight": model.token_embeddings.weight[run.base_vocab:].detach().clone(),
            "lm_head.weight": model.lm_head.weight[run.base_vocab:].detach().clone()}
    atomic_torch_save({"model": rows, "first_id": run.base_vocab, "iteration": run.step, **extra}, out / "chat_rows.pt")
    paths = [tok_dir, adapter, out / "chat_rows.pt"]
    merge_and_unload(model)  # training is over: plain Linears, the base's speed (and the grading's)
    if merge:
        save_checkpoint(model, None, run.step, out / "merged.pt", extra=extra)
        paths.append(out / "merged.pt")
    return paths


def run_finetune(cfg: FinetuneConfig, *, resume: str | None = None, stop_at: int | None = None,
                 evaluate: bool = True, merge: bool = False, tokenizer_dir: str | None = None,
                 device: str | None = None, overwrite: bool = False) -> dict:
    """Fine-tune as cfg says (or continue the run `resume` names); returns the summary written to finetune.json."""
    ckpt = None
    earlier = sorted((Path(cfg.out_dir) / "checkpoints").glob("step_*.pt"))
    if resume is None and earlier:
        if not overwrite:
            raise ValueError(f"{cfg.out_dir} holds an earlier fine-tuning run ({earlier[-1].name}): pass "
                             "--resume auto to continue it, --overwrite to start afresh, or another --out-dir")
        prune_checkpoints(Path(cfg.out_dir) / "checkpoints", 0)
    if resume is not None:
        ckpt_path, ckpt = read_resume(resume, cfg.out_dir)
        cfg = FinetuneConfig(**{**ckpt["finetune_config"], "out_dir": cfg.out_dir})
        log(f"resuming {ckpt_path} at step {ckpt['iteration']} (its saved configuration)")
    run = load_base(cfg, device_from_name(device), tokenizer_dir)
    held_out = held_out_examples(cfg.eval_examples) if cfg.eval_examples and cfg.data is None else []
    examples = training_examples(run, held_out)
    summary: dict = {"base_checkpoint": str(run.base_path), "config": dataclasses.asdict(cfg)}
    if evaluate and held_out and ckpt is None:
        acc, per_kind, _ = grade(run, held_out)
        summary["accuracy_before"], summary["per_kind_before"] = acc, per_kind
        log(f"held-out exact match before fine-tuning: {_describe(acc, per_kind)} of {len(held_out)} questions")
    torch.manual_seed(cfg.seed)  # LoRA's initial A and dropout: the same run from the same seed
    n_trainable = make_trainable(run)
    n_all = sum(p.numel() for p in run.model.parameters())
    log(f"trainable: {n_trainable:,} of {n_all:,} weights ({100 * n_trainable / n_all:.2f}%), "
        f"{'full fine-tuning' if cfg.lora_rank == 0 else f'LoRA rank {cfg.lora_rank}'}; "
        f"{len(examples):,} examples, {cfg.max_steps} steps of {cfg.batch_size}")
    if ckpt is not None:
        restore(run, ckpt, ckpt_path)
    end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
    finished = train_steps(run, examples, end, log) and run.step == cfg.max_steps
    summary.update(step=run.step, losses=run.losses)
    if not finished:
        log(f"paused at step {run.step}/{cfg.max_steps}; resume with: uv run -m llm.finetune --resume auto "
            f"--out-dir {cfg.out_dir}")
        return summary
    paths = write_outputs(run, merge)
    log("wrote " + ", ".join(str(p) for p in paths))
    if evaluate and held_out:
        acc, per_kind, preds = grade(run, held_out)
        summary["accuracy_after"], summary["per_kind_after"] = acc, per_kind
        summary["examples"] = [{"question": e.prompt.rsplit("\n\n", 1)[-1], "answer": e.answer, "model": p}
                               for e, p in list(zip(held_out, preds))[:: max(1, len(held_out) // 3)][:3]]
    write_json(Path(cfg.out_dir) / "finetune.json", summary)
    return summary


def report(summary: dict) -> None:
    """The results on stdout: accuracy before and after, and 3 example answers."""
    if "accuracy_after" not in summary:
        return
    before = summary.get("accuracy_before")
    print(f"held-out exact match: before {'-' if before is None else f'{100 * before:.1f}%'} -> "
          f"after {_describe(summary['accuracy_after'], summary['per_kind_after'])}")
    for ex in summary["examples"]:
        mark = "ok" if exact_match(ex["model"], ex["answer"]) else "wrong"
        print(f"  Q: {ex['question']}  expected: {ex['answer']!r}  model: {ex['model']!r}  [{mark}]")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        set_threads(args.threads)
        cfg = config_from_args(args)
        summary = run_finetune(cfg, resume=args.resume, stop_at=args.stop_at, evaluate=not args.no_eval,
                               merge=args.merge, tokenizer_dir=args.tokenizer_dir, device=args.device,
                               overwrite=args.overwrite)
    except (ValueError, SftDataError, TrainingError, OSError) as e:
        parser.exit(2, f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
    report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
