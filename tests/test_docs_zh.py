"""Every English doc of the learning path has a Chinese counterpart with the same section structure (the same
number and levels of headings, in order) and the same commands (code block lines, comments aside); the pages'
relative links lead to files that exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# English doc -> its Chinese counterpart
PAIRS = {f"docs/{name}.md": f"docs/zh/{name}.md" for name in ("tour", "derivations", "exercises", "model", "optim", "tokenizer", "training", "generating", "data", "lora")}
PAGES = ["README.md", "README_cn.md", "docs/glossary.md", *PAIRS, *PAIRS.values()]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def headings(text: str) -> list[int]:
    """The level of every Markdown heading outside code blocks, in order."""
    return [len(m[1]) for m in re.finditer(r"^(#{1,6}) \S", FENCE.sub("", text), re.M)]


def commands(text: str) -> list[str]:
    """Every non-empty code block line with its `# comment` removed (whole-line comments drop out)."""
    lines = []
    for block in FENCE.findall(text):
        for line in block.splitlines()[1:-1]:
            line = re.sub(r"(^|\s+)#\s.*$", "", line).rstrip()
            if line:
                lines.append(line)
    return lines


@pytest.mark.parametrize("en", PAIRS)
def test_chinese_counterpart_has_the_same_sections_and_commands(en: str) -> None:
    zh = PAIRS[en]
    en_text = (ROOT / en).read_text(encoding="utf-8")
    zh_text = (ROOT / zh).read_text(encoding="utf-8")
    assert headings(zh_text) == headings(en_text), f"{zh}: headings differ in number or level from {en}"
    assert commands(zh_text) == commands(en_text), f"{zh}: commands differ from {en}"
    assert f"zh/{Path(zh).name}" in en_text and f"../{Path(en).name}" in zh_text  # each links to the other
    assert re.search(r"[\u4e00-\u9fff]", zh_text) and headings(en_text)


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page: str) -> None:
    text = FENCE.sub("", (ROOT / page).read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / page).parent.joinpath(target).exists(), f"{page}: broken link {target}"


def test_the_checks_see_a_difference() -> None:
    en = "# T\n## A\n```bash\nuv run -m llm.x  # tested\n```\n"
    assert headings(en) == [1, 2] and commands(en) == ["uv run -m llm.x"]
    assert headings("# T\n### A\n") != headings(en)
    assert commands("```bash\nuv run -m llm.y  # 测试\n```\n") != commands(en)
    assert commands("```bash\n# 注释\nuv run -m llm.x  # 已测试\n```\n") == commands(en)


@pytest.mark.parametrize("page", ["docs/derivations.md", "docs/exercises.md", "docs/tour.md"])
def test_named_tests_files_and_functions_exist(page: str) -> None:
    """Every `tests/x.py::test_y` (and `::test_y` after it), every file path and every `file`: `function` the
    learning path names exists, so the pages follow renames."""
    text = (ROOT / page).read_text(encoding="utf-8")
    current = None
    for m in re.finditer(r"`(tests/[\w/]+\.py)?::(test_\w+)`|`(tests/[\w/]+\.py)`", text):
        path = m[1] or m[3]
        if path:
            current = path
            assert (ROOT / path).is_file(), f"{page}: {path} does not exist"
        if m[2] and current:
            assert re.search(rf"^def {m[2]}\(", (ROOT / current).read_text(encoding="utf-8"), re.M), \
                f"{page}: {current}::{m[2]} does not exist"
    for path in set(re.findall(r"`(llm/[\w/]+\.py)`", text)):
        assert (ROOT / path).is_file(), f"{page}: {path} does not exist"
