"""The story QA task: facts read back from the story text by an independent parse, every answer stated in
its story, story texts unchanged by exposing the facts, held-out stories disjoint from fine-tuning ones."""

import random
import re

import pytest

from llm.qa_task import (
    CORPUS_SEED, HELD_OUT_SEEDS, QUESTION_KINDS, QAExample, check_held_out, exact_match, held_out_examples,
    make_examples, questions, story,
)
from llm.stories import make_story, make_story_with_facts

# the intro sentence names the hero and says what it is: "... a kind fox named Rusty.", "Mia was a shy girl who"
INTRO = re.compile(r"(?:an? \w+ (\w+) (?:named|called) ([A-Z]\w+)\b)|(?:^([A-Z]\w+) was an? \w+ (\w+) who)")


def _intro(text: str) -> tuple[str, str]:
    m = INTRO.search(text.split("\n\n")[0])
    assert m, text[:120]
    kind, name = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
    return name, kind


def test_facts_equal_the_story_text() -> None:
    for seed in range(300):
        text, f = make_story_with_facts(random.Random(seed))
        assert text == make_story(random.Random(seed))  # same draws, same text
        assert _intro(text) == (f.hero, f.kind)


def test_every_answer_is_in_its_story() -> None:
    seen = set()
    for seed in range(1000, 1400):
        text, f = story(seed)
        for kind, (q, a) in questions(text, f).items():
            seen.add(kind)
            if kind == "who":
                assert _intro(text)[0] == a
            elif kind == "animal":
                assert a in (f"a {_intro(text)[1]}", f"an {_intro(text)[1]}")
            elif kind == "where":
                assert re.search(rf"{f.hero}[^.]* (?:went|ran) to (?:play at )?{a}\b|(?:went|ran) to (?:play at )?{a}\b", text)
            elif kind == "friend":
                assert re.search(rf"friend (?:named |was )?{a}\b", text)
            else:
                assert a.removeprefix("the ") in text and a.startswith("the ")
    assert seen == set(QUESTION_KINDS)


def test_examples_cycle_kinds_and_fit() -> None:
    ex = make_examples(range(5000, 8000), 12, write_fraction=0.25, max_story_chars=700)
    assert [e.kind for e in ex if e.kind != "write"] == list(QUESTION_KINDS) + list(QUESTION_KINDS[:4])
    assert sum(e.kind == "write" for e in ex) == 3
    for e in ex:
        text = e.answer if e.kind == "write" else e.prompt.rsplit("\n\n", 1)[0]
        assert len(text) <= 700 and text == story(e.seed)[0]
        if e.kind == "write":
            name, kind = _intro(e.answer)
            assert e.prompt in (f"Write a story about a {kind} named {name}.", f"Write a story about an {kind} named {name}.")
    assert ex[1].messages() == [{"role": "user", "content": ex[1].prompt}, {"role": "assistant", "content": ex[1].answer}]
    assert ex[1].messages(with_answer=False) == ex[1].messages()[:1]


def test_held_out_is_disjoint() -> None:
    held = held_out_examples(10)
    assert all(e.seed in HELD_OUT_SEEDS and e.seed != CORPUS_SEED for e in held)
    train = make_examples(range(1_000_000, 1_100_000), 10)
    check_held_out(train, held)
    with pytest.raises(AssertionError, match="overlap"):
        check_held_out(train + held[:1], held)
    twin = QAExample(1_000_000 - 1, "who", held[0].prompt, held[0].answer)  # same story under another seed
    with pytest.raises(AssertionError, match="held-out story is in the SFT set"):
        check_held_out(train + [twin], held)


def test_exact_match() -> None:
    assert exact_match(" Tom \n", "Tom")
    assert not exact_match("Tom.", "Tom") and not exact_match("tom", "Tom") and not exact_match("the park!", "the park")
