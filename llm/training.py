"""Train the language model: `uv run -m llm.training` (the `demo` preset, end to end on a laptop CPU).

    uv run -m llm.training                                  # demo: data -> train -> eval -> checkpoint -> sample
    uv run -m llm.training --preset tinystories --max-steps 2000
    uv run -m llm.training --config my.toml --lr 3e-4       # TOML file, then flags on top
    uv run -m llm.training --resume auto --out-dir runs/demo  # continue bit-exactly after Ctrl-C
    torchrun --nproc_per_node=2 -m llm.training ...         # DDP: gloo on CPU, nccl on CUDA
    torchrun --nproc_per_node=2 -m llm.training --parallel fsdp ...   # FSDP2: sharded weights/grads/AdamW, DCP checkpoints
    uv run -m llm.training plot runs/demo                   # loss.png / lr.png from metrics.jsonl
    uv run -m llm.training export runs/x/checkpoints/step_0001000.dcp --out x.pt   # sharded -> one file
    uv run -m llm.training plan --preset large --world-size 8 --parallel fsdp      # memory per GPU, before renting

This module is the command line: flags, config, calling `train`, and the report at the end (val loss
against the corpus' unigram entropy, plots, a sample). The run itself is in parts:

    llm/train_loop.py    train(cfg) and the loop, one function that reads top to bottom
    llm/train_setup.py   device, precision, data, model, optimizer, resume: everything fixed before step 1
    llm/run_dir.py       the run directory: lock, which checkpoint to resume, retiring, saving, divergence
    llm/metrics.py       progress lines, metrics.jsonl, tokens/s
    llm/distributed.py   torchrun's process group (a no-op at world size 1)

The loop overhead benchmark is kernel/benchmarking_overhead.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from llm.bpe_tokenizer import BpeTokenizer
from llm.checkpoint import CheckpointError, atomic_torch_save, read_checkpoint, resolve_checkpoint
from llm.cli import Parser
from llm.config import ModelConfig
from llm.data import open_tokens, token_counts
from llm.data import unigram_entropy as entropy_of_counts
from llm.decoding import generate
from llm.fileio import check_writable
from llm.memory_plan import parse_bytes, plan, plan_report
from llm.metrics import log
from llm.plotting import plot_run
from llm.run_dir import resolve_resume
from llm.sharded_checkpoint import is_sharded_checkpoint, read_sharded_meta
from llm.train_config import (
    CHECKPOINT_FORMATS, DTYPES, PARALLEL_MODES, TrainConfig, _train_fields, checkpoint_every, load_toml, merge,
    train_preset,
)
from llm.train_loop import TrainingError, TrainResult, batch_rng, evaluate, global_micro_index, train
from llm.train_setup import (
    LossModule, build_model, lr_at, resolve_device, single_file_from_sharded, tokenizer_dir_for, uses_demo_data_paths,
)

# What scripts and tests import from here: the CLI's own names, and the training API re-exported from
# llm.train_loop / llm.train_setup, where it is defined.
__all__ = [
    "LossModule", "TrainConfig", "TrainResult", "TrainingError", "batch_rng", "build_model", "build_parser",
    "config_from_args", "corpus_entropy", "evaluate", "global_micro_index", "lr_at", "main", "sample_text", "train",
    "unigram_entropy",
]

WARMUP_SHARE = 10  # a preset's warmup is at most max_steps // WARMUP_SHARE when max_steps is changed


# -------------------------------------------------------------------------------------- the corpus' bar
def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the corpus' unigram distribution: the loss of a model that ignores context,
    the bar a trained model must get well below. One chunked pass over the memmap (bounded memory)."""
    return entropy_of_counts(token_counts(tokens, minlength=vocab_size))


def corpus_entropy(cfg: TrainConfig, max_tokens: int = 200_000_000) -> float:
    """Unigram entropy of the training tokens: from the data dir's meta.json when `llm.data prepare` recorded
    it for this very array, else counted (over the first `max_tokens` on huge corpora)."""
    meta = Path(cfg.train_data).parent / "meta.json"
    try:
        m = json.loads(meta.read_text())
        if m.get("train") == Path(cfg.train_data).name and m.get("train_tokens") == len(np.load(cfg.train_data, mmap_mode="r")):
            return float(m["unigram_entropy"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tokens = open_tokens(cfg.train_data, vocab_size=cfg.model.vocab_size)
    return unigram_entropy(tokens[:max_tokens], cfg.model.vocab_size)


def _entropy_or_none(cfg: TrainConfig) -> float | None:
    try:
        return corpus_entropy(cfg)
    except (OSError, ValueError):  # data moved or gone: the plot goes on without the line
        return None


# --------------------------------------------------------------------------------------------- sampling
def sample_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, *, temperature: float = 0.8,
                top_k: int = 20, seed: int = 0) -> str:
    """`prompt` and its sampled continuation (top-k, KV-cached: llm.generating), stopping at end-of-text."""
    model.eval()
    return prompt + generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, seed=seed)


def _load_tokenizer(tok_dir: str | None) -> Any:
    if tok_dir is None or not Path(tok_dir).is_dir():
        return None
    return BpeTokenizer.load(tok_dir)


# -------------------------------------------------------------------------------------------------- CLI
CHOICES = {"dtype": DTYPES, "checkpoint_format": CHECKPOINT_FORMATS, "parallel": PARALLEL_MODES}  # fields whose flag takes one of these


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field_flags(p: argparse.ArgumentParser, cls: type, dest_prefix: str, skip: set[str],
                     example: Any, title: str) -> None:
    """One flag per dataclass field, typed from its annotation, its help from the field's metadata
    (llm.train_config's `_help`); default SUPPRESS so only given flags override."""
    group = p.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        ann = str(f.type)
        kw: dict[str, Any] = {"dest": dest_prefix + f.name, "default": argparse.SUPPRESS}
        if ann == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            base = ann.split("|")[0].strip()
            kw["type"] = {"int": int, "float": float, "str": str}[base]
            kw["metavar"] = base.upper()
            if "None" in ann:
                kw["type"] = _optional(kw["type"])
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
            kw.pop("metavar")
        help_text = f.metadata.get("help", "")
        kw["help"] = f"{help_text} (demo: {getattr(example, f.name)!r})".strip().replace("%", "%%")
        group.add_argument(_flag(f.name), **kw)


def _optional(t: type) -> Callable[[str], Any]:
    def parse(s: str) -> Any:
        return None if s.lower() in ("none", "null", "") else t(s)

    parse.__name__ = t.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m llm.training",
        description="Train the decoder-only LM. Subcommands: `plot RUN_DIR`, `export CHECKPOINT --out FILE`, `plan ...`. Config precedence: preset < --config "
        "TOML < flags. The loop overhead benchmark is `uv run kernel/benchmarking_overhead.py`.",
    )
    p.add_argument("--preset", default=None, help="training preset: demo (default), tinystories, tiny, small, medium, large, xl, 2.7B")
    p.add_argument("--config", default=None, help="TOML file with training keys and a [model] table")
    p.add_argument("--resume", default=None, metavar="PATH|auto", help="checkpoint file, run dir, or auto (newest in --out-dir)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir that holds an earlier run's checkpoints")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP", help="pause after STEP (checkpoint), keeping max_steps' schedule")
    p.add_argument("--no-sample", action="store_true", help="skip the sample continuation at the end")
    p.add_argument("--no-plot", action="store_true", help="skip writing loss.png / lr.png at the end")
    p.add_argument("--img-dir", default=None, help="also copy the plots here (the demo preset defaults to img/)")
    demo = train_preset("demo")
    _add_field_flags(p, TrainConfig, "", {"model", "preset"}, demo, "training (defaults come from the preset)")
    _add_field_flags(p, ModelConfig, "model.", set(), demo.model, "model (defaults come from the preset)")
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """preset (or the checkpoint's config on --resume) < TOML < flags; validated."""
    toml: dict[str, Any] = load_toml(ns.config) if ns.config else {}
    preset = ns.preset or toml.pop("preset", None)
    toml.pop("preset", None)
    base = _resumed_config(ns, toml) if ns.resume and preset is None else None
    from_preset = base is None
    if base is None:
        base = train_preset(preset or "demo")
    overrides: dict[str, Any] = {"model": {}, **({"preset": preset} if preset else {})}
    for k, v in toml.items():
        if k == "model":
            overrides["model"].update(v)
        else:
            overrides[k] = v
    for k, v in vars(ns).items():
        if k.startswith("model."):
            overrides["model"][k[len("model."):]] = v
        elif k in _train_fields() and k != "preset":
            overrides[k] = v
    if {"train_data", "val_data"} & set(overrides) and "prepare_demo_data" not in overrides:
        overrides["prepare_demo_data"] = False  # the user named data: never build the demo corpus in its place
    if from_preset and "warmup_steps" not in overrides and "max_steps" in overrides:
        overrides["warmup_steps"] = scaled_warmup(base.warmup_steps, overrides["max_steps"])
    cfg = merge(base, overrides)
    if overrides.get("prepare_demo_data") and not uses_demo_data_paths(cfg):
        raise ValueError(
            f"prepare_demo_data builds data/demo only, not train_data {cfg.train_data!r} / val_data {cfg.val_data!r}: "
            "drop --prepare-demo-data, or prepare that data with `uv run -m llm.data prepare`"
        )
    return cfg


def scaled_warmup(preset_warmup: int, max_steps: Any) -> Any:
    """The warmup of a preset run whose max_steps was changed and whose warmup was not: the preset's, but at
    most a tenth of the run (`--max-steps 20` on the demo's 20-step warmup warms up for 2 steps, then decays).
    A max_steps that is not a positive int is left for TrainConfig.validate to name."""
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps <= 0:
        return preset_warmup
    return min(preset_warmup, max_steps // WARMUP_SHARE)


def _resumed_config(ns: argparse.Namespace, toml: dict[str, Any]) -> TrainConfig | None:
    """--resume without a preset: the config saved in that checkpoint (None when there is none yet)."""
    out_dir = vars(ns).get("out_dir") or toml.get("out_dir") or train_preset("demo").out_dir
    path = resolve_resume(ns.resume, out_dir)
    if path is None:
        return None
    # a sharded checkpoint's config is in its meta.pt: no need to gather its tensors
    saved = (read_sharded_meta(path) if is_sharded_checkpoint(path) else read_checkpoint(path)).get("train_config")
    return TrainConfig.from_dict(saved) if saved else None


def _finish_demo_report(cfg: TrainConfig, result: TrainResult, model_loader: Callable[[], nn.Module | None],
                        no_sample: bool) -> None:
    """Rank 0, after training: val loss vs unigram entropy, and a sample continuation."""
    h = corpus_entropy(cfg)
    final_val = result.val_losses[max(result.val_losses)] if result.val_losses else math.nan
    print(f"final val loss {final_val:.4f} nats/token (ppl {math.exp(final_val):.2f}) vs unigram entropy of the "
          f"training corpus {h:.4f} nats/token (ppl {math.exp(h):.1f}); best val {result.best_val:.4f}", flush=True)
    print(f"tokens/s {result.tokens_per_s:,.0f} | MFU {100 * result.mfu:.1f}% | checkpoint {result.checkpoint}", flush=True)
    if no_sample or cfg.sample_tokens == 0:
        return
    tok = _load_tokenizer(tokenizer_dir_for(cfg))
    if tok is None:
        print("(no tokenizer found next to the training data: pass --tokenizer-dir to print a sample)", flush=True)
        return
    text = sample_text(model_loader(), tok, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed)
    print(f"\nsample:\n{text}\n", flush=True)


def _img_dir(cfg: TrainConfig, ns: argparse.Namespace) -> str | None:
    """Where the plots are copied besides the run directory: --img-dir, else img/ for the demo preset."""
    return ns.img_dir if ns.img_dir is not None else ("img" if cfg.preset == "demo" else None)


def _check_arguments(cfg: TrainConfig, ns: argparse.Namespace) -> None:
    """What TrainConfig.validate cannot see (paths on this machine, the sample printed at the end), checked
    before any work: a run must not train for hours and then fail on an argument it could have checked."""
    if ns.stop_at is not None and ns.stop_at <= 0:
        raise ValueError(f"--stop-at must be positive, got {ns.stop_at}")
    resolve_device(cfg)
    check_writable(cfg.out_dir, what="--out-dir", is_dir=True)
    if not ns.no_plot and _img_dir(cfg, ns) is not None:
        check_writable(_img_dir(cfg, ns), what="--img-dir", is_dir=True)
    if ns.no_sample or cfg.sample_tokens == 0:
        return
    if not cfg.sample_prompt:
        raise ValueError("--sample-prompt must not be empty (or pass --no-sample)")
    tok = _load_tokenizer(tokenizer_dir_for(cfg))  # None until the demo data is built: checked at the end then
    if tok is not None and tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir_for(cfg)} has {tok.vocab_size} tokens but the model's vocab_size "
                         f"is {cfg.model.vocab_size}, so the sample at the end could not use it (pass --tokenizer-dir "
                         "of the tokenizer that encoded the data, or --no-sample)")


def _main_train(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(ns)
        _check_arguments(cfg, ns)  # every argument, before any work
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(cfg, resume=ns.resume, stop_at=ns.stop_at, overwrite=ns.overwrite)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not is_main:
        return 0
    if result.interrupted:
        return 130
    if not ns.no_plot:
        written = plot_run(cfg.out_dir, _img_dir(cfg, ns), unigram_entropy=_entropy_or_none(cfg))
        if written:
            log("plots: " + ", ".join(str(p) for p in written))
    if result.step >= cfg.max_steps:
        _finish_demo_report(cfg, result, lambda: _load_trained(cfg, result.checkpoint), ns.no_sample)
    return 0


def _load_trained(cfg: TrainConfig, checkpoint: Path) -> nn.Module:
    model = build_model(cfg.model, resolve_device(cfg), cfg.impl)
    model.load_state_dict(read_checkpoint(checkpoint)["model"])
    return model


def _main_plot(argv: list[str]) -> int:
    p = Parser(prog="python -m llm.training plot", description="Write loss.png and lr.png from RUN_DIR/metrics.jsonl.")
    p.add_argument("run_dir")
    p.add_argument("--img-dir", default=None, help="also write the plots here (e.g. img)")
    ns = p.parse_args(argv)
    h = None
    config = Path(ns.run_dir) / "config.json"
    if config.is_file():
        try:
            h = _entropy_or_none(TrainConfig.from_dict(json.loads(config.read_text())))
        except (ValueError, TypeError):
            h = None
    try:
        written = plot_run(ns.run_dir, ns.img_dir, unigram_entropy=h)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0


def _main_export(argv: list[str]) -> int:
    p = Parser(prog="python -m llm.training export",
               description="Write a sharded (DCP) checkpoint of an fsdp run as one ordinary checkpoint file (weights, "
               "configs, AdamW state, RNG): what generation, evaluation and fine-tuning load, and a --parallel ddp "
               "run resumes from.")
    p.add_argument("checkpoint", help="a step_N.dcp or best.dcp directory, or a run directory (its best, else newest)")
    p.add_argument("--out", required=True, help="the .pt file to write (atomically, with its .sha256)")
    ns = p.parse_args(argv)
    try:
        src = resolve_checkpoint(ns.checkpoint)
        check_writable(ns.out, what="--out", is_dir=False)
        if not is_sharded_checkpoint(src):
            raise ValueError(f"{src} is already a single-file checkpoint")
        ckpt = single_file_from_sharded(src)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_torch_save(ckpt, ns.out)
    print(f"{src} -> {ns.out} (step {ckpt.get('iteration')})")
    return 0


def _main_plan(argv: list[str]) -> int:
    p = Parser(prog="python -m llm.training plan", description="Memory per rank (GPU) of a training run before "
               "it starts: parameters, gradients, optimizer state, activations, and whether they fit (llm.memory_plan).")
    p.add_argument("--preset", default="demo", help="training preset whose model is planned (small ... 2.7B)")
    p.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) in all")
    p.add_argument("--parallel", choices=PARALLEL_MODES, default="ddp")
    p.add_argument("--activation-checkpointing", default="none", metavar="none|full|every-K")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch per rank (default: preset's)")
    p.add_argument("--context-length", type=int, default=None, help="default: the preset's")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="memory of one GPU, e.g. 24GB or 80GiB")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda: bf16, flash attention; cpu: fp32")
    ns = p.parse_args(argv)
    try:
        cfg = train_preset(ns.preset)
        mcfg = ModelConfig(**{**cfg.model.to_dict(), "context_length": ns.context_length or cfg.model.context_length})
        batch = ns.batch_size or cfg.batch_size
        if ns.world_size <= 0 or batch <= 0:
            raise ValueError("--world-size and --batch-size must be positive")
        checkpoint_every(ns.activation_checkpointing)
        gpu_memory = parse_bytes(ns.gpu_memory) if ns.gpu_memory is not None else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpu = ns.device == "cuda"
    result = plan(mcfg, world_size=ns.world_size, parallel=ns.parallel, ac_mode=ns.activation_checkpointing,
                  batch=batch, gpu=gpu)
    print(plan_report(ns.preset, mcfg, result, world_size=ns.world_size, parallel=ns.parallel,
                      ac_mode=ns.activation_checkpointing, batch=batch, gpu=gpu, gpu_memory=gpu_memory))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "plot":
            return _main_plot(argv[1:])
        if argv and argv[0] == "export":
            return _main_export(argv[1:])
        if argv and argv[0] == "plan":
            return _main_plan(argv[1:])
        return _main_train(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error already printed as one line (2)
        return e.code if isinstance(e.code, int) else 2
    except OSError as e:  # a full disk (NoSpaceError names the file), a read-only or vanished directory
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
