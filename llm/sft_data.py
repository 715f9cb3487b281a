"""Instruction / chat data for fine-tuning: files in the formats people have, to padded, masked batches.

Formats (one record per line of a .jsonl, or a .json holding a list of records):
    chat       {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    minimind   {"conversations": [...same turns...]}   (ShareGPT turns {"from": "human" | "gpt" | "system",
               "value": "..."} are read too)
    Alpaca     {"instruction": "...", "input": "..." (optional), "output": "..."}: user = instruction, a blank
               line and the input when there is one; assistant = output
A malformed line, an unknown role, an empty assistant turn or a conversation without one is one error line
naming the file and line (the record's index for a .json list).

Encoding (llm.chat_template.encode_chat) gives ids and a loss mask per conversation. A model sees at most
context_length tokens and a conversation of L ids gives L - 1 (input, target) pairs, so it fits when
L <= context_length + 1; longer ones are dropped (overflow="drop", the default: a cut answer would teach the
model to stop mid-sentence without its <|end|>) or cut to the first context_length + 1 ids
(overflow="truncate"; dropped anyway when nothing the assistant says is left). Both are counted and
reported. Batches pad each row at its end to the longest row; padding is excluded from the loss by
position (mask False), never by its token id; causal attention means real tokens never see the padding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llm.bpe.tokenizer import BpeTokenizer
from llm.chat_template import ROLES, encode_chat

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
OVERFLOW = ("drop", "truncate")
WEIGHTING = ("token", "conversation")


class SftDataError(ValueError):
    """A record that cannot be read; the message is one line naming the file and line."""


@dataclass
class Encoded:
    ids: list[int]
    mask: list[bool]  # mask[i]: ids[i] is a target the loss counts (assistant content and its <|end|>)


@dataclass
class EncodeReport:
    conversations: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    longest: int = 0  # ids of the longest conversation before any cut
    overflow: str = "drop"
    context_length: int = 0
    examples: list[Encoded] = field(default_factory=list, repr=False)

    def line(self) -> str:
        over = (f"{self.dropped:,} dropped" if self.overflow == "drop" else
                f"{self.truncated:,} truncated, {self.dropped:,} dropped (nothing left to learn)")
        return (f"{self.conversations:,} conversations: {self.kept:,} used, {over} as longer than the context "
                f"({self.context_length} tokens; longest {self.longest:,} ids)")


def _turn(turn: object, where: str) -> dict:
    if not isinstance(turn, dict):
        raise SftDataError(f"{where}: a turn must be an object, got {type(turn).__name__}")
    if "role" in turn:
        role, content = turn["role"], turn.get("content")
    elif "from" in turn:
        role, content = SHAREGPT_ROLES.get(turn["from"], turn["from"]), turn.get("value")
    else:
        raise SftDataError(f"{where}: a turn needs 'role' and 'content' (or 'from' and 'value'), got keys {sorted(turn)}")
    if role not in ROLES:
        raise SftDataError(f"{where}: unknown role {role!r} (roles: {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise SftDataError(f"{where}: the {role} turn's content must be a string, got {type(content).__name__}")
    return {"role": role, "content": content}


def to_messages(record: object, where: str) -> list[dict]:
    """One record in any of the formats as a list of {"role", "content"} turns; SftDataError otherwise."""
    if not isinstance(record, dict):
        raise SftDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record or "conversations" in record:
        turns = record.get("messages", record.get("conversations"))
        if not isinstance(turns, list) or not turns:
            raise SftDataError(f"{where}: 'messages'/'conversations' must be a non-empty list")
        messages = [_turn(t, f"{where}: turn {i + 1}") for i, t in enumerate(turns)]
    elif "instruction" in record and "output" in record:
        parts = (record["instruction"], record.get("input") or "", record["output"])
        if not all(isinstance(p, str) for p in parts):
            raise SftDataError(f"{where}: Alpaca fields instruction, input, output must be strings")
        user = parts[0] + ("\n\n" + parts[1] if parts[1] else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": parts[2]}]
    else:
        raise SftDataError(f"{where}: unknown record format (keys {sorted(record)}); expected 'messages', "
                           "'conversations' or Alpaca's 'instruction'/'output'")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise SftDataError(f"{where}: turn {i + 1}: empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise SftDataError(f"{where}: no assistant turn (nothing to learn)")
    return messages


def _records(path: Path) -> Iterator[tuple[object, str]]:
    """(parsed record, "file:line") for each record of a .jsonl, or (record, "file: record i") of a .json list."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SftDataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise SftDataError(f"{path}: a .json file must hold a list of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield rec, f"{path}: record {i + 1}"
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line), f"{path}:{n}"
            except json.JSONDecodeError as e:
                raise SftDataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Every conversation of a .jsonl/.json file in any supported format; SftDataError (one line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SftDataError(f"data file not found: {path}")
    try:
        out = [to_messages(rec, where) for rec, where in _records(path)]
    except UnicodeDecodeError as e:
        raise SftDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not out:
        raise SftDataError(f"{path}: no records")
    return out


def encode_conversations(tokenizer: BpeTokenizer, conversations: Sequence[Sequence[dict]], context_length: int,
                         overflow: str = "drop") -> EncodeReport:
    """Encode each conversation (ids + loss mask), dropping or truncating those longer than the context;
    returns the report with the kept examples in .examples."""
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")
    rep = EncodeReport(overflow=overflow, context_length=context_length)
    limit = context_length + 1  # L ids give L - 1 (input, target) positions
    for messages in conversations:
        ids, mask = encode_chat(tokenizer, messages)
        rep.conversations += 1
        rep.longest = max(rep.longest, len(ids))
        if len(ids) > limit:
            if overflow == "drop" or not any(mask[1:limit]):
                rep.dropped += 1
                continue
            ids, mask = ids[:limit], mask[:limit]
            rep.truncated += 1
        rep.examples.append(Encoded(ids, mask))
    rep.kept = len(rep.examples)
    return rep


def collate(examples: Sequence[Encoded], device: torch.device | str = "cpu", weighting: str = "token"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, loss_mask), each (b, longest - 1): x = ids[:-1], y = ids[1:], loss_mask = mask[1:] (whether
    y is counted), rows padded at the end with id 0 and mask False. weighting "token": the bool mask (the
    loss is the mean over every counted token of the batch); "conversation": float weights 1/(counted tokens
    of the row), so each conversation weighs the same whatever its answer's length (a 150-token story does
    not outweigh fifty 3-token answers)."""
    if weighting not in WEIGHTING:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTING)}, got {weighting!r}")
    width = max(len(e.ids) for e in examples) - 1
    x = np.zeros((len(examples), width), dtype=np.int64)
    y = np.zeros_like(x)
    m = np.zeros(x.shape, dtype=bool)
    for r, e in enumerate(examples):
        n = len(e.ids) - 1
        x[r, :n], y[r, :n], m[r, :n] = e.ids[:-1], e.ids[1:], e.mask[1:]
    if weighting == "conversation":
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        m = m.astype(np.float32)
    return tuple(torch.from_numpy(a).to(device) for a in (x, y, m))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The examples of one step: a pure function of (seed, step), so a resumed run draws the same batches as
    an uninterrupted one. Epochs are permutations (seeded by (seed, epoch)): every example once per epoch."""
    perms: dict[int, np.ndarray] = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(perms[epoch][k])
    return np.asarray(out, dtype=np.int64)
