"""Talk to a fine-tuned model: a multi-turn chat REPL (`python -m llm.chat`, `python -m llm chat`).

    uv run -m llm.chat                                         # the default fine-tune (runs/demo-sft), else runs/demo
    uv run -m llm.chat --checkpoint runs/demo-sft/merged.pt    # a merged or fully fine-tuned checkpoint
    uv run -m llm.chat --adapter runs/demo-sft/adapter.safetensors            # on the base named in the adapter
    uv run -m llm.chat --adapter runs/demo-sft/adapter.safetensors --checkpoint runs/demo --quantize int8
    uv run -m llm.chat --system "Answer in one word." --greedy

Each line you type is a user turn; the conversation goes through the chat template (llm.chat_template) and
the reply streams back until the model ends its turn (<|end|>). The history is trimmed, oldest turns first,
so that the prompt leaves room for the reply inside the context window. Commands: /system TEXT (set or,
without text, clear the system message), /reset (forget the conversation), /quit, and the generation
REPL's sampler commands (/temp /topk /topp /minp /max /settings). The sampler flags are llm.generating's.

An adapter is loaded onto its base (the checkpoint it names, or --checkpoint; its sha256 must match), with
the chat tokens' rows that `llm.finetune` saved beside it (chat_rows.pt) and its chat tokenizer (tokenizer/),
then merged into plain Linears so the chat decodes at the base model's speed. A checkpoint without chat
tokens gets them added (untrained: fine-tune it first for answers that end).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import torch

from llm.bpe.tokenizer import BpeTokenizer
from llm.chat_template import CHAT_TOKENS, END, end_of_turn_id, has_chat_tokens, prepare_chat_model, render_prompt
from llm.checkpoint import checkpoint_or_default_run, load_model
from llm.cli import Parser, add_device, add_quantize, add_tokenizer_dir
from llm.decoding import GenerationOptions, check_compatible, stream_ids
from llm.generating import SlideNote, add_sampling_flags, options_from_args
from llm.hardware import THREADS_HELP, device_from_name, model_device, set_threads
from llm.lora import adapter_paths
from llm.quant import DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES, prepare_decode, quantize_model
from llm.repl import Repl
from llm.sft_train import FinetuneConfig, load_adapter_run

CHAT_HELP = """chat: type a message; /system TEXT (no text: none)  /reset (forget the conversation)  /quit
      sampler: /temp X  /topk K  /topp P  /minp P  /max N  /settings   — Ctrl-C stops the current reply"""


def build_parser() -> Parser:
    p = Parser(prog="python -m llm.chat", description="Chat with a fine-tuned model (multi-turn, streaming).")
    p.add_argument("--checkpoint", default=None,
                   help="a merged or fully fine-tuned checkpoint (or the base for --adapter); default: the default "
                   f"fine-tune ({FinetuneConfig.out_dir}), else the default training run")
    p.add_argument("--adapter", default=None, help="a LoRA adapter (llm.finetune's adapter.safetensors) to apply "
                   "on the base it names, or on --checkpoint")
    p.add_argument("--system", default="", help="system message at the start of the conversation")
    add_tokenizer_dir(p, "tokenizer directory (default: the chat tokenizer saved with the model)")
    add_sampling_flags(p)
    add_device(p)
    add_quantize(p)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return p


# ------------------------------------------------------------------------------------------ the model


def default_source() -> tuple[str | None, str | None]:
    """(checkpoint, adapter) with no flags: the newest output of the default fine-tune (a merged or full
    checkpoint, or the adapter), else the default training run; ValueError naming the command otherwise."""
    out = Path(FinetuneConfig.out_dir)
    found = [(p, kind) for p, kind in ((out / "merged.pt", "checkpoint"), (out / "model.pt", "checkpoint"),
                                       (adapter_paths(out / "adapter")[1], "adapter")) if p.is_file()]
    if found:
        path, kind = max(found, key=lambda f: f[0].stat().st_mtime)
        return (str(path), None) if kind == "checkpoint" else (None, str(adapter_paths(path)[0]))
    try:
        return str(checkpoint_or_default_run(None)), None
    except ValueError:
        raise ValueError("no model to chat with yet: run uv run -m llm.training, then uv run -m llm.finetune") from None


def load_chat_model(checkpoint: str | None, adapter: str | None, *, device=None, tokenizer_dir: str | None = None,
                    quantize: str | None = None) -> tuple[torch.nn.Module, BpeTokenizer, str]:
    """(model, chat tokenizer, what was loaded) for a checkpoint or an adapter (see the module docstring)."""
    if adapter is not None:
        model, tokenizer, path = load_adapter_run(adapter, checkpoint, device, tokenizer_dir)
        what = f"{path} + {adapter}"
        if quantize is not None:
            quantize_model(model, QUANTIZE_CHOICES[quantize], DEFAULT_GROUP_SIZE)
    else:
        model, tokenizer, path = load_model(checkpoint, device=device, tokenizer_dir=tokenizer_dir, quantize=quantize)
        what = str(path)
    if not has_chat_tokens(tokenizer):
        if quantize is not None:
            raise ValueError(f"{what} has no chat tokens; fine-tune it (uv run -m llm.finetune) before quantizing")
        tokenizer = prepare_chat_model(model, tokenizer)
        what += f" (no chat tokens: {END} and the headers added untrained; fine-tune it with uv run -m llm.finetune)"
    check_compatible(model, tokenizer)
    prepare_decode(model)
    return model.eval(), tokenizer, what


# -------------------------------------------------------------------------------------------- the REPL


def fit_history(tokenizer, system: str, turns: list[dict], budget: int) -> tuple[list[int], int]:
    """(prompt ids, turns dropped): the system message and as many of the latest turns as fit in `budget`
    tokens, dropping the oldest user/assistant pairs first; the last (new) user turn always stays."""
    head = [{"role": "system", "content": system}] if system else []
    dropped = 0
    while True:
        ids = render_prompt(tokenizer, head + turns[dropped:])
        if len(ids) <= budget:
            return ids, dropped
        if dropped + 1 >= len(turns):
            raise ValueError(f"this message needs {len(ids)} tokens with the template; the context window leaves "
                             f"{budget} for the prompt (shorten it, or /system to shorten the system message)")
        dropped += 2 if turns[dropped]["role"] == "user" else 1


class ChatRepl(Repl):
    """llm.repl's loop (input, sampler commands, Ctrl-C) with a conversation of turns and the chat template."""

    def __init__(self, model, tokenizer, options: GenerationOptions, stdin: IO[str], stdout: IO[str], system: str = ""):
        super().__init__(model, tokenizer, options, stdin, stdout, history=True)
        self.system, self.turns = system, []
        # the turn ends at <|end|>, or where the model starts another turn's header instead
        self.ends = [end_of_turn_id(tokenizer), *(tokenizer.token_id(t) for t in CHAT_TOKENS if t != END)]

    help_text = CHAT_HELP

    def command(self, line: str) -> None:
        cmd, _, arg = line.partition(" ")
        if cmd == "/reset":
            self.turns = []
            self.say("(conversation cleared)")
        elif cmd == "/system":
            self.system = arg.strip()
            self.say(f"(system message: {self.system!r})" if self.system else "(no system message)")
        else:
            super().command(line)

    def complete(self, line: str) -> None:
        turns = [*self.turns, {"role": "user", "content": line}]
        ctx = self.model.config.context_length
        reserve = min(self.options.max_new_tokens, ctx // 4)
        try:
            ids, dropped = fit_history(self.tokenizer, self.system, turns, ctx - reserve)
        except ValueError as e:
            self.say(f"error: {e}")
            return
        if dropped:
            self.say(f"(history trimmed to the context window: {dropped} oldest turns left out)")
        reply = self.echo(stream_ids(self.model, self.tokenizer, ids, self.options, self.ends))
        if reply is None:
            return
        for t in CHAT_TOKENS:  # typed by the model as text (byte by byte): not markup in the next prompt
            reply = reply.replace(t, "")
        self.turns = turns[dropped:] + [{"role": "assistant", "content": reply}]


def chat(model, tokenizer, options: GenerationOptions, *, system: str = "", stdin: IO[str] | None = None,
         stdout: IO[str] | None = None) -> int:
    """Run the chat REPL on stdin/stdout (or the streams given) until /quit or the end of input."""
    return ChatRepl(model, tokenizer, options, stdin or sys.stdin, stdout or sys.stdout, system).run()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = options_from_args(args)
        set_threads(args.threads)
        device_from_name(args.device)  # an unusable device: one line before anything is read
        checkpoint, adapter = args.checkpoint, args.adapter
        if checkpoint is None and adapter is None:
            checkpoint, adapter = default_source()
        model, tokenizer, what = load_chat_model(checkpoint, adapter, device=args.device,
                                                 tokenizer_dir=args.tokenizer_dir, quantize=args.quantize)
        opts = opts.replace(on_slide=SlideNote(model.config.context_length))
        print(f"[{what}: {sum(p.numel() for p in model.parameters()):,} parameters, {model_device(model)}]",
              file=sys.stderr, flush=True)
        return chat(model, tokenizer, opts, system=args.system)
    except (ValueError, OSError) as e:  # OSError: an unreadable checkpoint, adapter or tokenizer file
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
