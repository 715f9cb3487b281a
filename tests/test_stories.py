"""The built-in story generator: deterministic, TinyStories layout, varied, grammatically consistent."""

import random
import re
import time
from collections import Counter

import pytest

from llm.stories import ANIMALS, BOYS, EOT, GIRLS, PROBLEMS, generate_stories, make_story

FEMALE = set(GIRLS) | {n for _, n, p in ANIMALS if p == "she"}
MALE = set(BOYS) | {n for _, n, p in ANIMALS if p == "he"}
_NAME_RE = re.compile(r"\b(" + "|".join(sorted(FEMALE | MALE)) + r")\b")
ELDER_GENDER = {"mom": "f", "grandma": "f", "big sister": "f", "aunt": "f", "dad": "m", "grandpa": "m", "big brother": "m", "uncle": "m"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("stories") / "stories.txt"
    stats = generate_stories(path, size_mb=0.3, seed=0, progress=False)
    return path, stats, path.read_text(encoding="utf-8")


def _stories(text: str) -> list[str]:
    parts = text.split("\n" + EOT + "\n")
    assert parts[-1] == "", "the file must end with a line <|endoftext|>"
    return parts[:-1]


def test_layout_and_size(corpus):
    path, stats, text = corpus
    stories = _stories(text)
    assert len(stories) == stats["stories"]
    assert all(s.strip() == s and s for s in stories), "no empty stories, no stray whitespace"
    assert all(EOT not in s for s in stories)
    assert stats["bytes"] == path.stat().st_size == len(text.encode("utf-8"))
    longest = max(len(s) for s in stories) + len(EOT) + 2
    assert 300_000 <= stats["bytes"] < 300_000 + longest
    assert stats["distinct_words"] == len({w.lower() for w in re.findall(r"[A-Za-z']+", text.replace(EOT, ""))})


def test_deterministic_for_a_seed(tmp_path):
    a = generate_stories(tmp_path / "a.txt", size_mb=0.05, seed=3, progress=False)
    random.seed(12345)  # global state must not matter
    b = generate_stories(tmp_path / "b.txt", size_mb=0.05, seed=3, progress=False)
    c = generate_stories(tmp_path / "c.txt", size_mb=0.05, seed=4, progress=False)
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
    assert (tmp_path / "a.txt").read_bytes() != (tmp_path / "c.txt").read_bytes()
    assert a["stories"] == b["stories"]
    assert c["bytes"] > 0


def test_variety(corpus):
    _, stats, text = corpus
    stories = _stories(text)
    names = Counter(n for s in stories for n in set(_NAME_RE.findall(s)))
    assert len(names) >= 40, "dozens of named characters"
    assert stats["distinct_words"] >= 600
    assert sum('"' in s for s in stories) / len(stories) > 0.9, "dialogue in quotes"
    assert all(s.count('"') % 2 == 0 for s in stories), "quotes are balanced"
    assert all(re.search(r"learned|From that day on", s.split("\n\n")[-1]) for s in stories), "every story ends on a moral"
    openings = Counter(s.split(",")[0].split(" named")[0][:25] for s in stories)
    assert len(openings) >= 10, "varied openings"
    # Each problem type shows up (its moral sentences are distinct per type).
    assert len(PROBLEMS) >= 12


def test_pronouns_agree_with_characters(corpus):
    """In stories whose whole cast (hero, friend, elder) has one gender, no pronoun of the other appears."""
    _, _, text = corpus
    checked = 0
    for s in _stories(text):
        names = set(_NAME_RE.findall(s))
        elders = {g for e, g in ELDER_GENDER.items() if re.search(rf"\b(his|her) {e}\b", s)}
        if not names:
            continue
        if names <= FEMALE and elders <= {"f"}:
            assert not re.search(r"\b(he|him|his|himself)\b", s, re.I), s
            checked += 1
        elif names <= MALE and elders <= {"m"}:
            assert not re.search(r"\b(she|her|hers|herself)\b", s, re.I), s
            checked += 1
    assert checked >= 50


def test_sentences_are_capitalised_and_filled(corpus):
    _, _, text = corpus
    assert "{" not in text and "}" not in text, "every template slot is filled"
    for s in _stories(text)[:300]:
        for para in s.split("\n\n"):
            assert para[0].isupper() or para[0] == '"', para
            assert para.rstrip()[-1] in '.!?"', para
    assert " a a" not in text and " an a " not in text
    assert not re.search(r"\ba [aeiou]", text), "articles agree with the next word"


def test_fast(tmp_path):
    t0 = time.perf_counter()
    generate_stories(tmp_path / "s.txt", size_mb=0.5, seed=1, progress=False)
    assert time.perf_counter() - t0 < 5.0  # ~0.1 s here; 5 MB takes about a second


def test_make_story_uses_only_given_rng():
    a = make_story(random.Random(9))
    random.seed(0)
    assert make_story(random.Random(9)) == a


def test_bad_size(tmp_path):
    with pytest.raises(ValueError, match="size_mb"):
        generate_stories(tmp_path / "x.txt", size_mb=0)
