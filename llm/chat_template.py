"""The chat template: special tokens for turns, added to a trained tokenizer, and conversations to ids.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}. Each turn is

    <|user|> content <|end|>        (one special token, the content's BPE tokens, one special token)

with no other text around the special tokens: `<|user|> Hi<|end|><|assistant|> Hello<|end|>`.
Every content is encoded on its own (segment by segment), so no BPE merge ever joins the last bytes of a
prompt with the first bytes of the answer, and the ids of a prompt are a prefix of the ids of the prompt
with its answer: what generation feeds the model is exactly what training showed it.

Each content is encoded with one leading space (`with_prefix_space`, like GPT-2's add_prefix_space), so its
first word is the token a pretrained model knows from running text; `reply_text` removes it again.

The loss is taken only on what the assistant says: its content tokens and its <|end|>, which ends the turn
(a model trained with <|end|> masked never learns to stop). The headers, the system and user turns carry no
loss. `encode_chat` returns the mask aligned with the ids: mask[i] says whether ids[i] is to be predicted.

The special tokens are new ids appended after the tokenizer's vocabulary (BpeTokenizer keeps special
tokens whole and gives unknown ones the next free id), so the BPE merges and every earlier id are
unchanged; `grow_vocab` gives the model's embedding and lm_head the matching new rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llm.bpe import EOT
from llm.bpe.tokenizer import BpeTokenizer

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def add_chat_tokens(tokenizer: BpeTokenizer) -> BpeTokenizer:
    """The tokenizer with the chat tokens as special tokens (new ids after its vocabulary; every existing id
    and merge unchanged). Returns `tokenizer` itself when it has them already."""
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    if not missing:
        return tokenizer
    return BpeTokenizer(tokenizer.vocab, tokenizer.merges, [*tokenizer.special_tokens, *missing])


def has_chat_tokens(tokenizer: BpeTokenizer) -> bool:
    return all(t in tokenizer.special_tokens for t in CHAT_TOKENS)


def end_of_turn_id(tokenizer: BpeTokenizer) -> int:
    """The id that ends a turn: generation stops when the assistant produces it."""
    return tokenizer.token_id(END)


@torch.no_grad()
def grow_vocab(model: nn.Module, new_vocab_size: int) -> nn.Module:
    """Give `model` (a llm.transformer.Transformer) `new_vocab_size` ids: token_embeddings and lm_head get new
    rows, each the mean of the existing rows (a new token starts as an average token: its logit is the mean
    logit, its input vector a typical one, not noise the rest of the network has never seen). The old rows
    are copied bit for bit, so logits on old ids are unchanged. Tied weights stay tied. In place; returns it."""
    old = model.config.vocab_size
    if new_vocab_size < old:
        raise ValueError(f"grow_vocab cannot shrink the vocabulary ({old} -> {new_vocab_size})")
    if new_vocab_size == old:
        return model
    tied = model.lm_head.weight is model.token_embeddings.weight
    for module in (model.token_embeddings, model.lm_head) if not tied else (model.token_embeddings,):
        w = module.weight
        grown = torch.empty(new_vocab_size, w.shape[1], dtype=w.dtype, device=w.device)
        grown[:old] = w
        grown[old:] = w.mean(0, dtype=torch.float32).to(w.dtype)
        module.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
    if tied:
        model.lm_head.weight = model.token_embeddings.weight
    model.token_embeddings.num_embeddings = model.lm_head.out_features = new_vocab_size
    model.config.vocab_size = model.vocab_size = new_vocab_size
    return model


def prepare_chat_model(model: nn.Module, tokenizer: BpeTokenizer) -> BpeTokenizer:
    """Add the chat tokens to `tokenizer` and grow `model` to fit them (grow_vocab); returns the chat
    tokenizer. When the tokenizer has <|endoftext|>, <|end|>'s lm_head row starts as a copy of its row: the
    pretrained model already predicts the end of a document there, so ending a turn starts from a learned
    "stop" rather than from the mean row (whose logit is the mean logit: never the largest). Its input
    embedding stays the mean: as a copy of <|endoftext|>'s the model would read every turn's end as the
    start of an unrelated document and stop looking back at the story. Nothing changes for a pair that has
    the chat tokens already (a chat checkpoint)."""
    if has_chat_tokens(tokenizer) and tokenizer.vocab_size <= model.config.vocab_size:
        return tokenizer
    chat_tok = add_chat_tokens(tokenizer)
    if chat_tok.vocab_size > model.config.vocab_size:
        grow_vocab(model, chat_tok.vocab_size)
    if EOT in tokenizer.special_tokens:
        eot, end = tokenizer.token_id(EOT), chat_tok.token_id(END)
        if model.lm_head.weight is not model.token_embeddings.weight:  # tied: one row for both, keep the mean
            with torch.no_grad():
                model.lm_head.weight[end] = model.lm_head.weight[eot]
    return chat_tok


def _check_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i + 1}: expected {{'role': str, 'content': str}}, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i + 1}: unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
        inside = [t for t in CHAT_TOKENS if t in m["content"]]
        if inside:
            raise ValueError(f"message {i + 1}: content contains the chat token {inside[0]}")


def with_prefix_space(content: str) -> str:
    """The content as it is encoded: with one leading space unless it starts with whitespace (GPT-2's
    add_prefix_space, SentencePiece's dummy prefix). Byte-level BPE gives a word after a space other ids
    than the same word at the start of a text ("Max" vs " Max"; "the" even splits into "t" "he"), and a
    pretrained model has read nearly every word after a space: so the first word of a turn is the token the
    model knows, and a name it copies from the story is the very token it saw there."""
    return content if content[:1].isspace() else " " + content


def reply_text(tokenizer: BpeTokenizer, ids: Sequence[int]) -> str:
    """The text of a generated assistant turn (ids after <|assistant|>, without <|end|>): decoded, and the
    prefix space with_prefix_space put before it removed."""
    text = tokenizer.decode(ids)
    return text[1:] if text.startswith(" ") else text


def encode_chat(tokenizer: BpeTokenizer, messages: Sequence[dict], add_generation_prompt: bool = False
                ) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask) of a conversation. loss_mask[i] is True for the assistant's content tokens and the
    <|end|> closing its turn, False elsewhere. add_generation_prompt: end with an open <|assistant|> header
    (what generation continues from; it carries no loss)."""
    _check_messages(messages)
    end = tokenizer.token_id(END)
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        body = tokenizer.encode(with_prefix_space(m["content"])) if m["content"] else []
        learn = m["role"] == "assistant"
        ids += [tokenizer.token_id(ROLES[m["role"]]), *body, end]
        mask += [False, *([learn] * len(body)), learn]
    if add_generation_prompt:
        ids.append(tokenizer.token_id(ASSISTANT))
        mask.append(False)
    return ids, mask


def render_prompt(tokenizer: BpeTokenizer, messages: Sequence[dict]) -> list[int]:
    """The ids generation starts from: the conversation so far, then the <|assistant|> header."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
