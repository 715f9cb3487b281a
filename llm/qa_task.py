"""A question-answering task the model can be graded on, built offline from the story generator.

Each example is one story from `llm.stories.make_story_with_facts(random.Random(seed))` in the user turn,
followed by a question whose answer the story states; the assistant turn is that exact answer:

    who      "Who is the story about?"              -> "Mia"             (the hero)
    where    "Where did Mia go?"                    -> "the park"        (the story says "went/ran to the park")
    friend   "Who is Mia's friend?"                 -> "Tom"             ("her friend Tom", "a friend named Tom")
    animal   "What kind of animal is Pip?"          -> "a bunny"         (animal heroes)
    object   "What did Mia lose?" / "What got stuck?" -> "the kite"      (the plots about a lost / stuck thing)

A question is asked only when the story's text says its answer in one of those phrasings, so every answer
can be read off the story (tests check each answer against the text). Besides the questions, some examples
are instructions "Write a story about a bunny named Pip." whose reference answer is the story itself.

Seeds: the pretraining corpus is one stream, random.Random(CORPUS_SEED); each example here is its own
random.Random(seed) with seeds from SFT_SEEDS (training) and HELD_OUT_SEEDS (evaluation): disjoint ranges
that exclude the corpus seed (`check_held_out` asserts it), so held-out stories were never trained on.
Grading is exact match after stripping surrounding whitespace.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from llm.stories import StoryFacts, make_story_with_facts

CORPUS_SEED = 0  # llm.data.ensure_demo_data's default: the demo corpus is random.Random(0)'s stream
SFT_SEEDS = range(1_000_000, 2_000_000)
HELD_OUT_SEEDS = range(2_000_000, 3_000_000)
MAX_STORY_CHARS = 600  # about 140 demo tokens: short stories, so a CPU fine-tune sees many of them
QUESTION_KINDS = ("who", "where", "friend", "animal", "object")
HUMAN_KINDS = ("girl", "boy", "child")


@dataclass(frozen=True)
class QAExample:
    seed: int
    kind: str  # one of QUESTION_KINDS, or "write" (a story instruction)
    prompt: str  # the user turn
    answer: str  # the exact assistant turn

    def messages(self, with_answer: bool = True) -> list[dict]:
        turns = [{"role": "user", "content": self.prompt}]
        return turns + [{"role": "assistant", "content": self.answer}] if with_answer else turns


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def questions(text: str, f: StoryFacts) -> dict[str, tuple[str, str]]:
    """{kind: (question, answer)} for every question the story's text answers."""
    qs = {"who": ("Who is the story about?", f.hero)}
    if re.search(rf"\b(?:went|ran) to (?:play at )?the {re.escape(f.place)}\b", text):
        qs["where"] = (f"Where did {f.hero} go?", f"the {f.place}")
    if re.search(rf"\b(?:friend|friend named|friend was) {re.escape(f.friend)}\b", text):
        qs["friend"] = (f"Who is {f.hero}'s friend?", f.friend)
    if f.kind not in HUMAN_KINDS:
        qs["animal"] = (f"What kind of animal is {f.hero}?", _a(f.kind))
    if f.problem == "lost" and f" {f.obj}" in text:
        qs["object"] = (f"What did {f.hero} lose?", f"the {f.obj}")
    elif f.problem == "stuck" and re.search(rf"\bthe {re.escape(f.obj)} (?:got stuck|landed on top)", text):
        qs["object"] = ("What got stuck?", f"the {f.obj}")
    return qs


def story(seed: int) -> tuple[str, StoryFacts]:
    return make_story_with_facts(random.Random(seed))


def make_examples(seeds: range, n: int, *, write_fraction: float = 0.0, max_story_chars: int = MAX_STORY_CHARS
                  ) -> list[QAExample]:
    """`n` examples from the stories of `seeds` no longer than max_story_chars, the question kinds in turn
    (who, where, friend, animal, object, who, ...; a story that does not answer the kind due is skipped), so
    each kind is a fifth of the questions. A write_fraction share of the examples, spread evenly, are
    "Write a story about ..." instructions instead."""
    out: list[QAExample] = []
    asked = 0  # questions so far: QUESTION_KINDS[asked % 5] is due
    for seed in seeds:
        if len(out) == n:
            return out
        text, f = story(seed)
        if len(text) > max_story_chars:
            continue
        if len(out) - asked < write_fraction * (len(out) + 1):  # the instructions' share, spread evenly
            out.append(QAExample(seed, "write", f"Write a story about {_a(f.kind)} named {f.hero}.", text))
            continue
        kind = QUESTION_KINDS[asked % len(QUESTION_KINDS)]
        qs = questions(text, f)
        if kind in qs:
            q, a = qs[kind]
            out.append(QAExample(seed, kind, f"{text}\n\n{q}", a))
            asked += 1
    raise ValueError(f"only {len(out)} of {n} examples from the stories of seeds {seeds}")


def sft_examples(n: int = 4000, write_fraction: float = 0.025) -> list[QAExample]:
    """The fine-tuning set: questions (and a few story instructions) about stories from SFT_SEEDS."""
    return make_examples(SFT_SEEDS, n, write_fraction=write_fraction)


def held_out_examples(n: int = 200) -> list[QAExample]:
    """The evaluation set: questions about stories from HELD_OUT_SEEDS only (never in SFT or pretraining)."""
    return make_examples(HELD_OUT_SEEDS, n)


def check_held_out(train: list[QAExample], held_out: list[QAExample]) -> None:
    """Assert that no held-out story was seen in fine-tuning or pretraining: seeds from disjoint ranges that
    exclude the corpus seed, and no held-out story text among the fine-tuning prompts."""
    train_seeds = {e.seed for e in train}
    held_seeds = {e.seed for e in held_out}
    assert not train_seeds & held_seeds, "held-out seeds overlap the fine-tuning seeds"
    assert CORPUS_SEED not in held_seeds | train_seeds, "a QA story would be the corpus' first story"
    assert all(s in HELD_OUT_SEEDS for s in held_seeds), "held-out examples must come from HELD_OUT_SEEDS"
    train_stories = {e.prompt.rsplit("\n\n", 1)[0] for e in train} | {e.answer for e in train if e.kind == "write"}
    assert not any(e.prompt.rsplit("\n\n", 1)[0] in train_stories for e in held_out), "a held-out story is in the SFT set"


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()
