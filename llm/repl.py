"""The interactive loop of `python -m llm.generating --interactive`: each line is a prompt, the completion
streams back; slash-commands change the sampler; Ctrl-C stops only the current generation."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO

import torch

from llm.decoding import GenerationOptions, stream

REPL_HELP = """commands: /temp X  /topk K (0 = off)  /topp P (1 = off)  /minp P (0 = off)  /max N  /settings
          /reset (forget the conversation)  /quit   — Ctrl-C stops the current generation"""
SETTINGS = ("/temp", "/topk", "/topp", "/minp", "/max")


def repl(
    model: torch.nn.Module,
    tokenizer,
    options: GenerationOptions,
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    history: bool = True,
) -> int:
    """Interactive loop: each line is a prompt (appended to the conversation so far when `history`), the
    completion streams back. Slash-commands change the sampler; Ctrl-C stops only the current generation."""
    return Repl(model, tokenizer, options, stdin or sys.stdin, stdout or sys.stdout, history).run()


class Repl:
    help_text = REPL_HELP  # what the loop prints first and on /help

    def __init__(self, model, tokenizer, options: GenerationOptions, stdin: IO[str], stdout: IO[str],
                 history: bool) -> None:
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.stdin, self.stdout, self.history = stdin, stdout, history
        self.interactive = stdin is sys.stdin and stdin.isatty()
        self.conversation = ""

    def say(self, msg: str = "", end: str = "\n") -> None:
        self.stdout.write(msg + end)
        self.stdout.flush()

    def read(self) -> str | None:
        """The next line, None at end of input. A terminal gets input() (line editing); a pipe gets a prompt."""
        if self.interactive:
            try:
                return input("> ")
            except EOFError:
                return None
        self.say("> ", end="")
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def run(self) -> int:
        self.say(self.help_text)
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, like Python's REPL
                self.say()
                continue
            if line is None or line.strip() in ("/quit", "/exit"):
                self.say()
                return 0
            if line.startswith("/"):
                self.command(line.strip())
            elif line.strip():
                self.complete(line)

    def command(self, line: str) -> None:
        cmd, _, arg = line.partition(" ")
        try:
            if cmd == "/reset":
                self.conversation = ""
                self.say("(conversation cleared)")
            elif cmd == "/settings":
                self.say(f"({self.options.describe()})")
            elif cmd == "/help":
                self.say(self.help_text)
            elif cmd in SETTINGS:
                self.options = changed(self.options, cmd, arg)
                self.say(f"({self.options.describe()})")
            else:
                self.say(f"error: unknown command {cmd}; /help lists them")
        except ValueError as e:
            self.say(f"error: {e}")

    def echo(self, pieces: Iterable[str]) -> str | None:
        """Write the pieces as they come and return their text: all of it, or what came before Ctrl-C;
        None (with one error line) when generation refused the input."""
        written: list[str] = []
        try:
            for piece in pieces:
                written.append(piece)
                self.stdout.write(piece)
                self.stdout.flush()
            self.say()
        except KeyboardInterrupt:
            self.say(" [stopped]")
        except ValueError as e:
            self.say(f"error: {e}")
            return None
        return "".join(written)

    def complete(self, line: str) -> None:
        prompt = self.conversation + line
        text = self.echo(stream(self.model, self.tokenizer, prompt, self.options))
        if text is not None and self.history:
            self.conversation = prompt + text + "\n"


def changed(options: GenerationOptions, cmd: str, arg: str) -> GenerationOptions:
    """`options` with one REPL setting changed (/temp 0.8, /topk 0, ...); ValueError for a bad value."""
    try:
        value = float(arg) if cmd in ("/temp", "/topp", "/minp") else int(arg)
    except ValueError:
        raise ValueError(f"{cmd} needs a number, got {arg!r}") from None
    cfg = options.sampling
    if cmd == "/temp":
        return options.replace(sampling=cfg.replace(temperature=value))
    if cmd == "/topk":
        return options.replace(sampling=cfg.replace(top_k=value or None))
    if cmd == "/topp":
        return options.replace(sampling=cfg.replace(top_p=None if value == 1.0 else value))
    if cmd == "/minp":
        return options.replace(sampling=cfg.replace(min_p=value or None))
    if value < 1:
        raise ValueError(f"/max needs a positive integer, got {arg}")
    return options.replace(max_new_tokens=value)
