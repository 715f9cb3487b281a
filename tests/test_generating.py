"""Generation (llm.decoding, llm.repl, llm.generating): KV cache vs full recomputation, left-padded batches vs
single prompts, streaming text (UTF-8 split across tokens, stop strings, <|endoftext|>), beam search on the
model, the REPL and the CLI."""

from __future__ import annotations

import io
import itertools
import sys
from pathlib import Path

import pytest
import torch

from llm.bpe_tokenizer import BpeTokenizer
from llm.checkpoint import load_model, save_checkpoint
from llm.config import ModelConfig
from llm.decoding import (
    GenerationOptions,
    TextStream,
    beam_generate,
    generate,
    generate_batch,
    iter_tokens,
    stream,
)
from llm.generating import main
from llm.repl import repl
from llm.sampling import SamplingConfig
from llm.transformer import Transformer



pytestmark = pytest.mark.usefixtures("one_thread")


def byte_tokenizer() -> BpeTokenizer:
    """256 byte tokens, two merges ("he", "hel") and <|endoftext|>: tiny, no training data needed."""
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"he", 257: b"hel"}
    return BpeTokenizer(vocab, [(b"h", b"e"), (b"he", b"l")], special_tokens=["<|endoftext|>"])


def tiny_model(vocab: int = 259, ctx: int = 16, kv_heads: int | None = None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(vocab_size=vocab, context_length=ctx, d_model=32, num_layers=2, num_heads=4,
                        num_kv_heads=kv_heads, d_ff=64)
    with torch.no_grad():  # larger logits than the default init: greedy/beam choices far from ties
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def record(model, prompts, cfg, n, *, use_cache, seed=None):
    logits, tokens = [], []
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for tok in iter_tokens(model, prompts, cfg, max_new_tokens=n, use_cache=use_cache, generator=gen,
                           on_logits=lambda x: logits.append(x.clone())):
        tokens.append(tok.clone())
    return torch.stack(logits, 1), torch.stack(tokens, 1)  # (b n v), (b n)


# ----------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_kv_cache_gives_the_logits_of_full_recomputation_at_every_step(kv_heads) -> None:
    model = tiny_model(kv_heads=kv_heads)
    prompt = [[5, 17, 256, 99, 3]]
    cfg = SamplingConfig(temperature=1.0)
    # 30 new tokens in a 16-token window: crosses two window slides, both paths slide identically
    cached, toks_c = record(model, prompt, cfg, 30, use_cache=True, seed=1)
    full, toks_f = record(model, prompt, cfg, 30, use_cache=False, seed=1)
    assert torch.equal(toks_c, toks_f)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    # independent of the generation loop: one plain forward over prompt + completion (inside the window)
    seq = torch.cat([torch.tensor(prompt), toks_c[:, :11]], 1)  # 16 tokens = the whole window
    ref = model(seq)[:, 4:]
    torch.testing.assert_close(cached[:, :12], ref, rtol=1e-5, atol=1e-5)


def test_window_slides_past_the_context_and_says_so() -> None:
    model = tiny_model(ctx=16)
    slides = []
    out = list(iter_tokens(model, [[1, 2, 3]], SamplingConfig(temperature=0), max_new_tokens=40,
                           on_slide=lambda kept, dropped: slides.append((kept, dropped))))
    assert len(out) == 40
    assert slides and slides[0] == (12, 5)  # 17 tokens > 16: keep the last 12


# ------------------------------------------------------------------------------ batching


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_each_prompt_alone(use_cache: bool) -> None:
    model = tiny_model(kv_heads=2, ctx=32)
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5, 6, 7], [42], [200, 201, 202, 203, 204]]
    cfg = SamplingConfig(temperature=0)
    logits_b, toks_b = record(model, prompts, cfg, 12, use_cache=use_cache)
    for i, p in enumerate(prompts):
        logits_1, toks_1 = record(model, [p], cfg, 12, use_cache=use_cache)
        assert torch.equal(toks_b[i], toks_1[0]), f"prompt {i}"
        torch.testing.assert_close(logits_b[i], logits_1[0], rtol=1e-5, atol=1e-5)


def test_generate_batch_equals_generate_per_prompt() -> None:
    tok, model = byte_tokenizer(), tiny_model(ctx=64)
    prompts = ["hello", "a", "the hell of it"]
    batch = generate_batch(model, tok, prompts, max_new_tokens=10, temperature=0)
    assert batch == [generate(model, tok, p, max_new_tokens=10, temperature=0) for p in prompts]


# ------------------------------------------------------------------------------ text streaming


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token script (one-hot logits), whatever the input: exercises the text layer."""

    def __init__(self, script: list[int], vocab: int = 259, ctx: int = 64) -> None:
        super().__init__()
        self.script, self.prompt_len = script, None
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = ModelConfig(vocab_size=vocab, context_length=ctx, d_model=8, num_layers=1, num_heads=2)

    def forward(self, ids, token_positions=None, kv_cache=None, attention_mask=None):
        n = ids.shape[1] if kv_cache is None else kv_cache.length + ids.shape[1]
        if self.prompt_len is None:
            self.prompt_len = n
        step = min(n - self.prompt_len, len(self.script) - 1)
        if kv_cache is not None:
            kv_cache.length += ids.shape[1]
        out = torch.full((ids.shape[0], ids.shape[1], self.config.vocab_size), -10.0)
        out[:, -1, self.script[step]] = 10.0
        return out

    def new_kv_cache(self, batch, max_len=None):
        self.prompt_len = None  # a new generation starts
        return type("Cache", (), {"length": 0})()


def script_of(text: str, then: list[int] = ()) -> list[int]:
    return list(text.encode("utf-8")) + list(then)


EOT_ID = 258


@pytest.mark.parametrize("use_cache", [True, False])
def test_stream_decodes_utf8_split_across_tokens_and_stops_at_endoftext(use_cache) -> None:
    tok = byte_tokenizer()
    assert tok.token_id("<|endoftext|>") == EOT_ID
    text = "héllo wörld — ✓"
    model = ScriptedModel(script_of(text, [EOT_ID]) + script_of("never"))
    pieces = list(stream(model, tok, "x", max_new_tokens=100, use_cache=use_cache))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # no half characters were printed
    assert len(pieces) > 5  # it really streamed


def test_stop_strings_cut_the_completion_and_are_never_half_printed() -> None:
    tok = byte_tokenizer()
    model = ScriptedModel(script_of("one two three four"))
    pieces = list(stream(model, tok, "x", max_new_tokens=100, stop=["three", "zzz"]))
    assert "".join(pieces) == "one two "
    model = ScriptedModel(script_of("abcabd"))
    assert generate(model, tok, "x", max_new_tokens=100, stop="abd") == "abc"


def test_max_new_tokens_bounds_the_completion() -> None:
    model = ScriptedModel(script_of("abcdefghij"))
    assert generate(model, byte_tokenizer(), "x", max_new_tokens=4) == "abcd"


def test_ignore_eos_goes_on_and_min_new_tokens_forbids_an_early_end() -> None:
    """--ignore-eos prints <|endoftext|> and continues to max_new_tokens; --min-new-tokens sets its logit to
    −inf for the first N steps (the scripted model wants it at step 2: greedy then takes the best other id, 0)."""
    tok = byte_tokenizer()
    model = ScriptedModel(script_of("ab", [EOT_ID]) + script_of("cd"))
    assert generate(model, tok, "x", max_new_tokens=5, temperature=0) == "ab"
    assert generate(model, tok, "x", max_new_tokens=5, temperature=0, ignore_eos=True) == "ab<|endoftext|>cd"
    assert generate(model, tok, "x", max_new_tokens=5, temperature=0, min_new_tokens=3) == "ab\x00cd"
    assert generate(model, tok, "x", max_new_tokens=5, temperature=0, min_new_tokens=2) == "ab"
    assert generate_batch(model, tok, ["x"], max_new_tokens=5, temperature=0, ignore_eos=True) == ["ab<|endoftext|>cd"]
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate(model, tok, "x", max_new_tokens=5, min_new_tokens=6)
    with pytest.raises(ValueError, match="beam search"):
        generate(model, tok, "x", max_new_tokens=5, num_beams=2, ignore_eos=True)


def test_text_stream_flushes_an_incomplete_character_at_the_end() -> None:
    s = TextStream(lambda i: bytes([i]))
    assert s.push(0xC3) == ""  # first byte of "é": held back
    assert s.finish() == "\ufffd"  # the character never completed


def test_ids_past_the_tokenizers_vocab_are_never_sampled() -> None:
    model = tiny_model(vocab=300)  # a padded embedding: ids 259..299 mean nothing to the tokenizer
    toks = torch.cat(list(iter_tokens(model, [[1, 2]], SamplingConfig(temperature=50.0), max_new_tokens=200,
                                      vocab_limit=259)))
    assert int(toks.max()) < 259
    assert isinstance(generate(model, byte_tokenizer(), "hi", max_new_tokens=20, temperature=50.0), str)


def test_same_seed_same_sample() -> None:
    tok, model = byte_tokenizer(), tiny_model(ctx=64)
    a = generate(model, tok, "hello", max_new_tokens=20, seed=3, temperature=1.0, top_k=50)
    b = generate(model, tok, "hello", max_new_tokens=20, seed=3, temperature=1.0, top_k=50)
    c = generate(model, tok, "hello", max_new_tokens=20, seed=4, temperature=1.0, top_k=50)
    assert a == b and a != c


# ------------------------------------------------------------------------------ beam search


def test_beam_search_on_the_model_uses_its_log_probs_and_the_cache_changes_nothing() -> None:
    model = tiny_model(ctx=32, kv_heads=2)
    prompt = [10, 11, 12]
    cfg = SamplingConfig(num_beams=3, length_penalty=1.0)
    with_cache = beam_generate(model, prompt, cfg, max_new_tokens=6, eos_id=258, num_return=3)
    without = beam_generate(model, prompt, cfg, max_new_tokens=6, eos_id=258, num_return=3, use_cache=False)
    assert [h.tokens for h in with_cache] == [h.tokens for h in without]
    for h in with_cache:  # the score is the model's log-likelihood of the tokens, from one plain forward
        seq = torch.tensor([prompt + h.tokens])
        logits = model(seq)[0, len(prompt) - 1 : -1].double()
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(h.tokens)[:, None]).sum()
        assert abs(h.logprob - lp.item()) < 1e-4
        assert abs(h.score - h.logprob / len(h.tokens)) < 1e-9
    # beam search finds a sequence at least as likely as greedy's
    greedy = [int(t) for t in iter_tokens(model, [prompt], SamplingConfig(temperature=0), max_new_tokens=6)]
    g_lp = torch.log_softmax(model(torch.tensor([prompt + greedy]))[0, 2:-1].double(), -1)
    g_score = g_lp.gather(1, torch.tensor(greedy)[:, None]).sum().item() / 6
    assert with_cache[0].score >= g_score - 1e-9


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_on_a_tiny_model_equals_exhaustive_search(use_cache: bool) -> None:
    """Vocabulary of 4 (eos = 0), 4 new tokens: beams wide enough to prune nothing find the best sequence."""
    model = tiny_model(vocab=4, ctx=16, kv_heads=2, seed=2)
    prompt, max_new, alpha = [1, 3, 2], 4, 0.7
    cands = []
    for length in range(1, max_new + 1):
        for seq in itertools.product(range(4), repeat=length):
            if 0 in seq[:-1] or (length < max_new and seq[-1] != 0):
                continue
            cands.append(list(seq))
    scores = []
    for seq in cands:  # independent scoring: one plain forward per candidate, log-softmax in float64
        logits = model(torch.tensor([prompt + seq]))[0, len(prompt) - 1 : -1].double()
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq)[:, None]).sum().item()
        scores.append(lp / len(seq) ** alpha)
    order = sorted(range(len(cands)), key=lambda i: -scores[i])
    hyps = beam_generate(model, prompt, SamplingConfig(num_beams=27, length_penalty=alpha), max_new_tokens=max_new,
                         eos_id=0, use_cache=use_cache, num_return=3)
    assert [h.tokens for h in hyps] == [cands[i] for i in order[:3]]
    assert all(abs(h.score - scores[i]) < 1e-4 for h, i in zip(hyps, order))


# ------------------------------------------------------------------------------ REPL


def test_repl_commands_and_completion_through_stdin() -> None:
    tok = byte_tokenizer()
    model = ScriptedModel(script_of("ok!", [EOT_ID]))
    stdin = io.StringIO("/temp 0\n/topk 5\n/topp 0.5\n/topp 2\n/bogus\nhi\n/reset\n/quit\nnever read\n")
    stdout = io.StringIO()
    assert repl(model, tok, GenerationOptions(max_new_tokens=10), stdin=stdin, stdout=stdout) == 0
    out = stdout.getvalue()
    assert "(greedy, top-k off" in out
    assert "top-k 5" in out and "top-p 0.5" in out
    assert "error: top_p must be in (0, 1], got 2.0" in out
    assert "error: unknown command /bogus" in out
    assert "ok!\n" in out
    assert "(conversation cleared)" in out


class InterruptingModel(torch.nn.Module):
    """Wraps a model; raises KeyboardInterrupt (as Ctrl-C would) on the n-th forward call."""

    def __init__(self, inner, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0
        self.config = inner.config

    def forward(self, *a, **k):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner(*a, **k)

    def new_kv_cache(self, *a, **k):
        return self.inner.new_kv_cache(*a, **k)


def test_ctrl_c_stops_only_the_current_generation() -> None:
    tok = byte_tokenizer()
    model = InterruptingModel(ScriptedModel(script_of("abcdefgh", [EOT_ID])), at=4)
    stdin, stdout = io.StringIO("first\nsecond\n"), io.StringIO()
    assert repl(model, tok, GenerationOptions(max_new_tokens=20), stdin=stdin, stdout=stdout, history=False) == 0
    out = stdout.getvalue()
    assert "abc [stopped]" in out  # three tokens, then Ctrl-C
    assert out.count("abcdefgh\n") == 1  # the REPL went on: the second prompt completed


# ------------------------------------------------------------------------------ CLI


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    tok = byte_tokenizer()
    tok.save(tmp_path / "tokenizer")
    model = tiny_model(ctx=64)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    save_checkpoint(model, None, 10, tmp_path / "run" / "checkpoints" / "step_0000010.pt",
                    extra={"model_config": model.config.to_dict(), "tokenizer_dir": str(tmp_path / "tokenizer")})
    return tmp_path / "run"


def test_cli_prints_prompt_and_completion(run_dir: Path, capsys) -> None:
    assert main(["--checkpoint", str(run_dir), "--prompt", "hello", "--greedy", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    model_out = generate(*_load(run_dir), "hello", max_new_tokens=8, temperature=0)
    assert out == "hello" + model_out + "\n"


def _load(run_dir):
    model, tok, _ = load_model(run_dir, device="cpu")
    return model, tok


def test_cli_samples_and_beams(run_dir: Path, capsys) -> None:
    assert main(["--checkpoint", str(run_dir), "--prompt", "hi", "--num-samples", "3", "--seed", "1",
                 "--top-p", "0.9", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 3
    assert main(["--checkpoint", str(run_dir), "--prompt", "hi", "--num-beams", "3", "--max-new-tokens", "5",
                 "--no-cache"]) == 0
    assert capsys.readouterr().out.startswith("hi")
    assert main(["--checkpoint", str(run_dir), "--prompt", "hi", "--num-beams", "3", "--num-samples", "2",
                 "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- beam") == 2
    assert out.split("\n")[1] == "hi" + generate(*_load(run_dir), "hi", num_beams=3, max_new_tokens=5).split("\n")[0]


def test_stream_rejects_bad_input_before_the_first_piece() -> None:
    tok, model = byte_tokenizer(), tiny_model()
    with pytest.raises(ValueError, match="empty prompt"):
        stream(model, tok, "")
    with pytest.raises(ValueError, match="top_p"):
        stream(model, tok, "x", top_p=0)
    with pytest.raises(TypeError, match="unknown sampling options"):
        stream(model, tok, "x", topk=3)
    with pytest.raises(ValueError, match="tokenizer has 259 tokens but the model only 200"):
        generate(tiny_model(vocab=200), tok, "x")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", ""], "empty prompt"),
        (["--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", "x", "--top-k", "0"], "top_k must be a positive integer"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--prompt", "x", "--threads", "0"], "--threads must be >= 1"),
        (["--prompt", "x", "--max-new-tokens", "3", "--min-new-tokens", "4"], "--min-new-tokens must be in [0, --max-new-tokens=3]"),
        (["--prompt", "x", "--num-beams", "2", "--ignore-eos"], "not beam search"),
    ],
)
def test_cli_bad_settings_one_error_line(run_dir: Path, capsys, extra, message) -> None:
    assert main(["--checkpoint", str(run_dir), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cli_bad_checkpoints_one_error_line(tmp_path: Path, run_dir: Path, capsys) -> None:
    def err_of(*argv) -> str:
        assert main(list(argv)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "not found" in err_of("--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert "garbage.pt" in err_of("--checkpoint", str(tmp_path / "garbage.pt"), "--prompt", "x")
    model = tiny_model()
    torch.save({"model": model.state_dict(), "iteration": 0}, tmp_path / "noconfig.pt")
    assert "model_config" in err_of("--checkpoint", str(tmp_path / "noconfig.pt"), "--prompt", "x")
    wrong = ModelConfig(**{**model.config.to_dict(), "d_model": 64, "num_heads": 4})
    torch.save({"model": model.state_dict(), "model_config": wrong.to_dict(), "tokenizer_dir": "x"}, tmp_path / "w.pt")
    assert "do not match" in err_of("--checkpoint", str(tmp_path / "w.pt"), "--prompt", "x")
    small = tiny_model(vocab=200)  # the tokenizer has 259 ids
    torch.save({"model": small.state_dict(), "model_config": small.config.to_dict(),
                "tokenizer_dir": str(run_dir.parent / "tokenizer")}, tmp_path / "small.pt")
    assert "tokenizer has 259 tokens but the model only 200" in err_of("--checkpoint", str(tmp_path / "small.pt"),
                                                                       "--prompt", "x")


def test_cli_interactive_reads_stdin(run_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("/topk 3\nhello\n/quit\n"))
    assert main(["--checkpoint", str(run_dir), "--interactive", "--max-new-tokens", "5", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert "top-k 3" in out
    model_out = generate(*_load(run_dir), "hello", max_new_tokens=5, temperature=0, top_k=3)
    assert f"> {model_out}\n" in out


def test_one_options_object_or_keywords_give_the_same_completion() -> None:
    tok, model = byte_tokenizer(), tiny_model(ctx=64)
    opts = GenerationOptions(max_new_tokens=6, seed=3, sampling=SamplingConfig(temperature=0.9, top_k=20))
    assert generate(model, tok, "hello", opts) == generate(model, tok, "hello", max_new_tokens=6, seed=3,
                                                           temperature=0.9, top_k=20)
    with pytest.raises(TypeError, match="not both"):
        generate(model, tok, "hello", opts, top_k=3)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        opts.replace(max_new_tokens=0)
