"""The chat REPL (llm.chat) driven through stdin: the prompts the model sees (chat template, multi-turn
history, /system, /reset, trimming to the context window), and the CLI on a tiny model with a LoRA adapter
(reply equal to greedy decoding of the unmerged adapter model), a checkpoint without chat tokens, and
one-line errors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from llm.bpe import EOT
from llm.bpe.tokenizer import BpeTokenizer
from llm.chat import chat, fit_history, main
from llm.chat_template import CHAT_TOKENS, END, end_of_turn_id, prepare_chat_model, render_prompt
from llm.checkpoint import atomic_torch_save, save_checkpoint
from llm.config import ModelConfig
from llm.decoding import GenerationOptions, iter_tokens
from llm.fileio import sha256_of
from llm.lora import LoraConfig, apply_lora, lora_modules, save_adapter
from llm.sampling import SamplingConfig
from llm.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def byte_tokenizer(chat: bool = True) -> BpeTokenizer:
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"he", 257: b"hel"}
    return BpeTokenizer(vocab, [(b"h", b"e"), (b"he", b"l")], [EOT, *(CHAT_TOKENS if chat else ())])


class RecordingChatModel(torch.nn.Module):
    """Replies `reply` then <|end|> (one-hot logits) whatever it is asked; records every prompt (prefill)."""

    def __init__(self, tok: BpeTokenizer, reply: str, ctx: int = 512) -> None:
        super().__init__()
        self.script = [*tok.encode(reply), end_of_turn_id(tok)]
        self.prompts: list[list[int]] = []
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = ModelConfig(vocab_size=tok.vocab_size, context_length=ctx, d_model=8, num_layers=1, num_heads=2)

    def forward(self, ids, token_positions=None, kv_cache=None, attention_mask=None):
        if kv_cache.length == 0:
            self.prompts.append(ids[0].tolist())
        step = min(kv_cache.length + ids.shape[1] - len(self.prompts[-1]), len(self.script) - 1)
        kv_cache.length += ids.shape[1]
        out = torch.full((ids.shape[0], ids.shape[1], self.config.vocab_size), -10.0)
        out[:, -1, self.script[step]] = 10.0
        return out

    def new_kv_cache(self, batch, max_len=None):
        return type("Cache", (), {"length": 0})()


def _run(model, tok, lines: str, system: str = "", max_new: int = 20) -> str:
    stdout = io.StringIO()
    assert chat(model, tok, GenerationOptions(max_new_tokens=max_new), system=system,
                stdin=io.StringIO(lines), stdout=stdout) == 0
    return stdout.getvalue()


def test_turns_system_and_reset_reach_the_model_through_the_template() -> None:
    tok = byte_tokenizer()
    model = RecordingChatModel(tok, "Mia.")
    out = _run(model, tok, "Who?\nWhere?\n/system Be brief.\nWhy?\n/reset\n/system\nHi\n/temp 0\n/quit\nnever\n",
               system="You answer.")
    assert out.count("Mia.\n") == 4 and "(system message: 'Be brief.')" in out and "(conversation cleared)" in out
    assert "(no system message)" in out and "(greedy" in out  # the generation REPL's sampler commands work too
    s, u1, u2, u3 = ({"role": "system", "content": "You answer."}, {"role": "user", "content": "Who?"},
                     {"role": "user", "content": "Where?"}, {"role": "user", "content": "Why?"})
    a = {"role": "assistant", "content": "Mia."}
    assert model.prompts == [
        render_prompt(tok, [s, u1]),
        render_prompt(tok, [s, u1, a, u2]),
        render_prompt(tok, [{"role": "system", "content": "Be brief."}, u1, a, u2, a, u3]),
        render_prompt(tok, [{"role": "user", "content": "Hi"}]),
    ]
    assert len(model.prompts) == 4  # nothing after /quit


def test_history_is_trimmed_oldest_turns_first() -> None:
    tok = byte_tokenizer()
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    turns.append({"role": "user", "content": "last"})
    full = render_prompt(tok, turns)
    ids, dropped = fit_history(tok, "", turns, len(full))
    assert (ids, dropped) == (full, 0)
    ids, dropped = fit_history(tok, "sys", turns, len(full) - 1)
    assert dropped == 2 and ids == render_prompt(tok, [{"role": "system", "content": "sys"}, *turns[2:]])  # one pair
    with pytest.raises(ValueError, match="this message needs"):
        fit_history(tok, "", turns, 3)
    model = RecordingChatModel(tok, "ok", ctx=64)  # the REPL trims and says so; the model sees what fits
    out = _run(model, tok, "".join(f"a long question number {i}\n" for i in range(4)), max_new=8)
    assert "(history trimmed to the context window" in out
    assert all(len(p) <= 64 - 8 for p in model.prompts)
    assert model.prompts[-1][-len(render_prompt(tok, [{"role": "user", "content": "a long question number 3"}])):] \
        == render_prompt(tok, [{"role": "user", "content": "a long question number 3"}])


def test_too_long_message_is_one_error_line_and_the_repl_goes_on() -> None:
    tok = byte_tokenizer()
    model = RecordingChatModel(tok, "ok", ctx=32)
    out = _run(model, tok, "x" * 100 + "\nhi\n", max_new=4)
    assert "error: this message needs" in out and "ok\n" in out
    assert len(model.prompts) == 1  # the long message never reached the model; the next one did


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def adapter_run(tmp_path: Path) -> dict:
    """What llm.finetune leaves for a LoRA run, made by hand on a tiny base: base.pt (+ its tokenizer), and
    RUN/adapter.*, RUN/chat_rows.pt, RUN/tokenizer (the chat tokenizer)."""
    base_tok_dir = byte_tokenizer(chat=False).save(tmp_path / "base_tok")
    torch.manual_seed(0)
    base = Transformer(vocab_size=259, context_length=64, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    with torch.no_grad():
        base.lm_head.weight.mul_(8.0)  # decisive logits: greedy choices far from ties
    save_checkpoint(base, None, 1, tmp_path / "base.pt",
                    extra={"model_config": base.config.to_dict(), "tokenizer_dir": str(base_tok_dir)})
    model = Transformer(**base.config.to_dict())
    model.load_state_dict(base.state_dict())
    chat_tok = prepare_chat_model(model, byte_tokenizer(chat=False))
    cfg = LoraConfig(rank=4, targets="q,v,w2")
    apply_lora(model, cfg)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0.0, 0.3)
        model.lm_head.weight[259:] = torch.randn(4, 32) * 8
    run = tmp_path / "run"
    chat_tok.save(run / "tokenizer")
    save_adapter(run / "adapter.safetensors", model, cfg, str(tmp_path / "base.pt"), sha256_of(tmp_path / "base.pt"))
    rows = {"token_embeddings.weight": model.token_embeddings.weight[259:].detach().clone(),
            "lm_head.weight": model.lm_head.weight[259:].detach().clone()}
    atomic_torch_save({"model": rows, "first_id": 259}, run / "chat_rows.pt")
    return {"tmp": tmp_path, "model": model.eval(), "tok": chat_tok, "adapter": run / "adapter.safetensors"}


def _cli(argv: list[str], stdin: str, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _greedy_reply(model, tok, messages, n: int) -> str:
    """Greedy decoding of the unmerged adapter model through the general path, up to a chat token."""
    ends, out = {tok.token_id(t) for t in CHAT_TOKENS}, []
    for t in iter_tokens(model, [render_prompt(tok, messages)], SamplingConfig(temperature=0.0), max_new_tokens=n):
        if int(t) in ends:
            break
        out.append(int(t))
    return tok.decode(out)


def test_cli_with_an_adapter_replies_as_the_unmerged_model(adapter_run, monkeypatch, capsys) -> None:
    argv = ["--adapter", str(adapter_run["adapter"]), "--greedy", "--max-new-tokens", "6", "--device", "cpu"]
    rc, out, err = _cli(argv, "hello\nmore\n/quit\n", monkeypatch, capsys)
    assert rc == 0, err
    m, tok = adapter_run["model"], adapter_run["tok"]
    first = _greedy_reply(m, tok, [{"role": "user", "content": "hello"}], 6)
    second = _greedy_reply(m, tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                                    {"role": "user", "content": "more"}], 6)
    assert f"> {first}\n> {second}\n> \n" in out
    assert "base.pt + " in err and "adapter.safetensors" in err


def test_cli_checkpoint_without_chat_tokens_and_errors(adapter_run, monkeypatch, capsys) -> None:
    tmp = adapter_run["tmp"]
    rc, out, err = _cli(["--checkpoint", str(tmp / "base.pt"), "--max-new-tokens", "3", "--seed", "1"], "hi\n",
                        monkeypatch, capsys)
    assert rc == 0 and "no chat tokens" in err and out.count("> ") == 2
    other = tmp / "other.pt"  # same shapes, other weights: the adapter's base hash does not match
    torch.manual_seed(1)
    m = Transformer(vocab_size=259, context_length=64, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    save_checkpoint(m, None, 1, other, extra={"model_config": m.config.to_dict(), "tokenizer_dir": str(tmp / "base_tok")})
    for argv, msg in (
        (["--adapter", str(adapter_run["adapter"]), "--checkpoint", str(other)], "not on this base"),
        (["--adapter", str(tmp / "nope.safetensors")], "no LoRA adapter at"),
        (["--checkpoint", str(tmp / "missing.pt")], "checkpoint not found"),
        (["--checkpoint", str(tmp / "base.pt"), "--top-p", "2"], "top_p"),
    ):
        rc, out, err = _cli(argv, "hi\n", monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], err


def test_no_flags_uses_the_default_fine_tune_else_says_what_to_run(adapter_run, tmp_path, monkeypatch, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    rc, out, err = _cli([], "", monkeypatch, capsys)
    assert rc == 2 and err.strip() == "error: no model to chat with yet: run uv run -m llm.training, then uv run -m llm.finetune"
    sft = empty / "runs" / "demo-sft"
    sft.parent.mkdir()
    os.symlink(adapter_run["adapter"].parent, sft)
    rc, out, err = _cli(["--greedy", "--max-new-tokens", "4"], "hello\n", monkeypatch, capsys)
    assert rc == 0 and "demo-sft/adapter.safetensors" in err, err
    assert _greedy_reply(adapter_run["model"], adapter_run["tok"], [{"role": "user", "content": "hello"}], 4) in out
    assert END not in out


def test_chat_takes_generations_sampler_flags_and_beams(adapter_run, monkeypatch, capsys) -> None:
    from llm import chat as chat_cli, generating

    gen = {a.dest: a.default for a in generating.build_parser()._actions}
    ours = {a.dest: a.default for a in chat_cli.build_parser()._actions}
    shared = ("max_new_tokens", "stop", "ignore_eos", "min_new_tokens", "seed", "temperature", "greedy", "top_k",
              "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "num_beams",
              "length_penalty", "no_cache", "device", "quantize", "threads", "tokenizer_dir")
    assert {k: ours[k] for k in shared} == {k: gen[k] for k in shared}
    rc, out, err = _cli(["--adapter", str(adapter_run["adapter"]), "--num-beams", "3", "--max-new-tokens", "4",
                         "--quantize", "int8"], "hello\n", monkeypatch, capsys)
    assert rc == 0 and out.count("> ") == 2, err


def test_chat_loads_what_llm_finetune_writes(tmp_path, monkeypatch, capsys) -> None:
    """The real outputs of a (one-step) LoRA fine-tune: the adapter, chat rows and chat tokenizer it writes
    load onto its base, and the merged checkpoint it writes chats the same."""
    from llm.finetune import run_finetune
    from llm.sft_train import FinetuneConfig as Cfg
    from tests.test_finetune import _chat_file

    base_tok_dir = byte_tokenizer(chat=False).save(tmp_path / "tok")
    torch.manual_seed(0)
    base = Transformer(vocab_size=259, context_length=64, d_model=32, num_layers=1, num_heads=2, d_ff=64)
    save_checkpoint(base, None, 0, tmp_path / "base.pt",
                    extra={"model_config": base.config.to_dict(), "tokenizer_dir": str(base_tok_dir)})
    cfg = Cfg(checkpoint=str(tmp_path / "base.pt"), out_dir=str(tmp_path / "run"), data=_chat_file(tmp_path / "c.jsonl"),
              max_steps=1, batch_size=2, warmup_steps=0, log_interval=1, checkpoint_interval=1, lora_rank=4)
    run_finetune(cfg, evaluate=False, merge=True)
    capsys.readouterr()
    replies = []
    for argv in (["--adapter", str(tmp_path / "run" / "adapter.safetensors")], ["--checkpoint", str(tmp_path / "run" / "merged.pt")]):
        rc, out, err = _cli([*argv, "--greedy", "--max-new-tokens", "5"], "Who is number 3?\n", monkeypatch, capsys)
        assert rc == 0, err
        replies.append(out)
    assert replies[0] == replies[1]
