"""Chat / minimind / Alpaca files to conversations, one-line file:line errors for bad records, overflow
counting (drop or truncate), batches padded by position, and the stateless batch order."""

import json
import random

import numpy as np
import pytest
import torch

from llm.bpe import EOT
from llm.bpe.tokenizer import BpeTokenizer
from llm.bpe.train import train_bpe
from llm.chat_template import add_chat_tokens, encode_chat
from llm.sft_data import SftDataError, batch_indices, collate, encode_conversations, read_conversations
from llm.stories import make_story

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"},
                     {"role": "assistant", "content": "Tom"}]}
MINIMIND = {"conversations": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Tom"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Who?"}, {"from": "gpt", "value": "Tom"}]}
ALPACA = {"instruction": "Who?", "input": "", "output": "Tom"}
ALPACA_INPUT = {"instruction": "Name the hero.", "input": "Tom ran.", "output": "Tom"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> BpeTokenizer:
    r = random.Random(2)
    p = tmp_path_factory.mktemp("tok") / "corpus.txt"
    p.write_text("".join(make_story(r) + "\n" + EOT + "\n" for _ in range(10)), encoding="utf-8")
    vocab, merges = train_bpe(p, 256 + 1 + 100, [EOT], num_workers=1)
    return add_chat_tokens(BpeTokenizer(vocab, merges, [EOT]))


def _jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_formats(tmp_path) -> None:
    who_tom = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Tom"}]
    got = read_conversations(_jsonl(tmp_path / "a.jsonl", [CHAT, MINIMIND, SHAREGPT, ALPACA, "", ALPACA_INPUT]))
    assert got[0] == [{"role": "system", "content": "Be brief."}, *who_tom]
    assert got[1] == got[2] == got[3] == who_tom
    assert got[4] == [{"role": "user", "content": "Name the hero.\n\nTom ran."}, {"role": "assistant", "content": "Tom"}]
    (tmp_path / "b.json").write_text(json.dumps([ALPACA, CHAT]), encoding="utf-8")
    assert read_conversations(tmp_path / "b.json") == [who_tom, got[0]]


@pytest.mark.parametrize("record, msg", [
    ('{"messages": [', r"a\.jsonl:2: invalid JSON"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"a\.jsonl:2: turn 1: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
     r"a\.jsonl:2: turn 2: empty assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"a\.jsonl:2: no assistant turn"),
    ({"text": "hello"}, r"a\.jsonl:2: unknown record format"),
    ({"messages": [{"role": "user", "content": 3}]}, r"a\.jsonl:2: turn 1: the user turn's content must be a string"),
    ([1, 2], r"a\.jsonl:2: expected a JSON object"),
])
def test_malformed_lines_are_one_line_errors(tmp_path, record, msg) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [CHAT, record, CHAT])
    with pytest.raises(SftDataError, match=msg) as e:
        read_conversations(path)
    assert "\n" not in str(e.value)


def test_file_errors(tmp_path) -> None:
    with pytest.raises(SftDataError, match="not found"):
        read_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "d.json").write_text(json.dumps({"messages": []}), encoding="utf-8")
    with pytest.raises(SftDataError, match="must hold a list"):
        read_conversations(tmp_path / "d.json")
    (tmp_path / "e.json").write_text(json.dumps([CHAT, {"instruction": "x", "output": ""}]), encoding="utf-8")
    with pytest.raises(SftDataError, match=r"e\.json: record 2: turn 2: empty assistant turn"):
        read_conversations(tmp_path / "e.json")
    (tmp_path / "f.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(SftDataError, match="no records"):
        read_conversations(tmp_path / "f.jsonl")


def test_overflow_drop_and_truncate(tok) -> None:
    short = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Tom"}]
    long_answer = [{"role": "user", "content": "Tell."}, {"role": "assistant", "content": "Tom ran to the park. " * 20}]
    long_prompt = [{"role": "user", "content": "Tom ran to the park. " * 20}, {"role": "assistant", "content": "Tom"}]
    ctx = 24
    rep = encode_conversations(tok, [short, long_answer, long_prompt], ctx, "drop")
    assert (rep.conversations, rep.kept, rep.dropped, rep.truncated) == (3, 1, 2, 0)
    assert "2 dropped" in rep.line() and "context (24 tokens" in rep.line()
    rep = encode_conversations(tok, [short, long_answer, long_prompt], ctx, "truncate")
    # the long answer is cut to ctx + 1 ids; the long prompt leaves no answer: dropped
    assert (rep.kept, rep.truncated, rep.dropped) == (2, 1, 1)
    cut = rep.examples[1]
    full_ids, full_mask = encode_chat(tok, long_answer)
    assert cut.ids == full_ids[: ctx + 1] and cut.mask == full_mask[: ctx + 1]
    with pytest.raises(ValueError, match="overflow"):
        encode_conversations(tok, [short], ctx, "squeeze")


def test_collate_pads_by_position(tok) -> None:
    a = encode_conversations(tok, [[{"role": "user", "content": "Who is it?"}, {"role": "assistant", "content": "Tom"}],
                                   [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]],
                             64).examples
    x, y, m = collate(a)
    width = max(len(e.ids) for e in a) - 1
    assert x.shape == y.shape == m.shape == (2, width) and m.dtype == torch.bool
    for r, e in enumerate(a):
        n = len(e.ids) - 1
        assert x[r, :n].tolist() == e.ids[:-1] and y[r, :n].tolist() == e.ids[1:]
        assert m[r, :n].tolist() == e.mask[1:] and not m[r, n:].any()
        # the counted targets are exactly the assistant's tokens and its <|end|>
        assert [t for t, keep in zip(y[r].tolist(), m[r].tolist()) if keep] == [i for i, k in zip(e.ids, e.mask) if k]


def test_batch_indices_are_stateless_epochs() -> None:
    n, b = 10, 4
    seen = np.concatenate([batch_indices(n, b, seed=3, step=s) for s in range(5)])  # 20 draws = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert (batch_indices(n, b, 3, 2) == seen[8:12]).all()  # recomputed from (seed, step) alone
    assert not (batch_indices(n, b, 4, 0) == seen[:4]).all()


def test_conversation_weighting_is_a_mean_over_conversations(tok) -> None:
    """weighting="conversation": the masked loss equals the mean over rows of each row's mean answer loss
    (F.cross_entropy per position), however long each answer is."""
    import torch.nn.functional as F
    from llm.transformer import Transformer
    convos = [[{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Tom"}],
              [{"role": "user", "content": "Tell."}, {"role": "assistant", "content": "Tom ran to the park and sat."}]]
    ex = encode_conversations(tok, convos, 64).examples
    x, y, w = collate(ex, weighting="conversation")
    assert w.dtype == torch.float32 and torch.allclose(w.sum(1), torch.ones(2))
    model = Transformer(vocab_size=tok.vocab_size, context_length=64, d_model=16, num_layers=1, num_heads=2).double()
    per = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")  # (b s)
    _, _, m = collate(ex)
    want = torch.stack([per[r][m[r]].mean() for r in range(2)]).mean()
    torch.testing.assert_close(model.loss(x, y, w.double()), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="weighting"):
        collate(ex, weighting="sample")
