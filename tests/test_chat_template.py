"""The chat template: special tokens appended to a trained tokenizer, label masks on hand-written
conversations, the prompt-prefix property, and a grown vocabulary that leaves old logits unchanged."""

import random

import pytest
import torch
import torch.nn.functional as F

from llm.bpe import EOT
from llm.bpe.tokenizer import BpeTokenizer
from llm.bpe.train import train_bpe
from llm.chat_template import (
    ASSISTANT, CHAT_TOKENS, END, SYSTEM, USER, add_chat_tokens, encode_chat, end_of_turn_id, grow_vocab,
    prepare_chat_model, render_prompt, reply_text,
)
from llm.stories import make_story
from llm.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_tok(tmp_path_factory) -> BpeTokenizer:
    r = random.Random(5)
    p = tmp_path_factory.mktemp("tok") / "corpus.txt"
    p.write_text("".join(make_story(r) + "\n" + EOT + "\n" for _ in range(20)), encoding="utf-8")
    vocab, merges = train_bpe(p, 256 + 1 + 150, [EOT], num_workers=1)
    return BpeTokenizer(vocab, merges, [EOT])


def test_chat_tokens_are_appended_and_saved(base_tok, tmp_path) -> None:
    tok = add_chat_tokens(base_tok)
    n = base_tok.vocab_size
    assert [tok.token_id(t) for t in CHAT_TOKENS] == list(range(n, n + 4))
    assert tok.vocab_size == n + 4
    text = "Once upon a time, Mia went to the park."
    assert tok.encode(text) == base_tok.encode(text)  # the old ids and merges are untouched
    assert add_chat_tokens(tok) is tok
    loaded = BpeTokenizer.load(tok.save(tmp_path / "chat-tok"))
    assert [loaded.token_id(t) for t in CHAT_TOKENS] == list(range(n, n + 4))
    assert loaded.encode(USER + "hi" + END) == [n + 1, *base_tok.encode("hi"), n + 3]


def test_label_mask_on_hand_written_conversation(base_tok) -> None:
    tok = add_chat_tokens(base_tok)
    s, u, a, e = (tok.token_id(t) for t in (SYSTEM, USER, ASSISTANT, END))
    # each content is encoded with its prefix space
    sys_ids, q_ids, ans_ids = tok.encode(" Be kind."), tok.encode(" Who is it?"), tok.encode(" Tom")
    q2_ids, ans2_ids = tok.encode(" Where?"), tok.encode(" the park")
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Who is it?"},
        {"role": "assistant", "content": "Tom"},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "the park"},
    ]
    ids, mask = encode_chat(tok, messages)
    expected = ([s, *sys_ids, e], [u, *q_ids, e], [a, *ans_ids, e], [u, *q2_ids, e], [a, *ans2_ids, e])
    learn = (False, False, True, False, True)
    assert ids == [i for seg in expected for i in seg]
    want_mask = []
    for seg, on in zip(expected, learn):  # header never, content and the closing <|end|> when assistant
        want_mask += [False] + [on] * (len(seg) - 1)
    assert mask == want_mask
    assert [i for i, m in zip(ids, mask) if m] == [*ans_ids, e, *ans2_ids, e]
    assert end_of_turn_id(tok) == e
    assert tok.decode(ids) == f"{SYSTEM} Be kind.{END}{USER} Who is it?{END}{ASSISTANT} Tom{END}{USER} Where?{END}{ASSISTANT} the park{END}"
    assert reply_text(tok, ans2_ids) == "the park"
    # content that starts with whitespace keeps it as is
    assert encode_chat(tok, [{"role": "user", "content": "\nHi"}])[0] == [u, *tok.encode("\nHi"), e]


def test_prompt_is_a_prefix_of_prompt_and_answer(base_tok) -> None:
    """Segment-by-segment encoding: the generation prompt's ids are a prefix of the trained ids, even when
    encoding the joined text would merge across the seam."""
    tok = add_chat_tokens(base_tok)
    r = random.Random(1)
    for _ in range(20):
        story = make_story(r)
        cut = r.randrange(1, len(story) - 1)
        convo = [{"role": "user", "content": story[:cut]}]
        prompt = render_prompt(tok, convo)
        full, mask = encode_chat(tok, convo + [{"role": "assistant", "content": story[cut:]}])
        assert full[: len(prompt)] == prompt
        assert prompt[-1] == tok.token_id(ASSISTANT) and not any(mask[: len(prompt)])
        assert all(mask[len(prompt):])


@pytest.mark.parametrize("bad, msg", [
    ([], "at least one message"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user"}], "expected"),
    ([{"role": "user", "content": "a <|end|> b"}], "chat token <|end|>"),
])
def test_bad_messages(base_tok, bad, msg) -> None:
    with pytest.raises(ValueError, match=msg.replace("|", r"\|")):
        encode_chat(add_chat_tokens(base_tok), bad)


@pytest.mark.parametrize("tie", [False, True])
def test_grown_vocab_keeps_old_logits(tie) -> None:
    model = Transformer(vocab_size=50, context_length=16, d_model=16, num_layers=1, num_heads=2, tie_embeddings=tie)
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids).detach()
    old_w = model.lm_head.weight.detach().clone()
    grow_vocab(model, 54)
    assert model.config.vocab_size == 54 and model.token_embeddings.weight.shape == (54, 16)
    assert (model.lm_head.weight is model.token_embeddings.weight) == tie
    after = model(ids).detach()
    assert torch.equal(after[..., :50], before)  # same computation on the old rows: bit-identical
    torch.testing.assert_close(model.lm_head.weight[50:], old_w.mean(0).expand(4, 16))
    # a new row's logit is the mean of the old logits (x · mean(W) = mean(x · W))
    torch.testing.assert_close(after[..., 50], before.mean(-1), rtol=1e-5, atol=1e-5)
    y = torch.randint(0, 54, (2, 7))
    y[0, 0] = 53
    torch.testing.assert_close(model.loss(ids, y), F.cross_entropy(after.reshape(-1, 54), y.reshape(-1)),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shrink"):
        grow_vocab(model, 10)


def test_prepare_chat_model(base_tok) -> None:
    model = Transformer(vocab_size=base_tok.vocab_size, context_length=16, d_model=16, num_layers=1, num_heads=2)
    head, emb = model.lm_head.weight.detach().clone(), model.token_embeddings.weight.detach().clone()
    tok = prepare_chat_model(model, base_tok)
    assert model.config.vocab_size == tok.vocab_size == base_tok.vocab_size + 4
    end, eot = tok.token_id(END), base_tok.token_id(EOT)
    # <|end|> is predicted like <|endoftext|>; as an input it is an average token, like the other headers
    assert torch.equal(model.lm_head.weight[end], head[eot])
    torch.testing.assert_close(model.token_embeddings.weight[end], emb.mean(0))
    torch.testing.assert_close(model.lm_head.weight[tok.token_id(USER)], head.mean(0))
    assert prepare_chat_model(model, tok) is tok and model.config.vocab_size == tok.vocab_size
