"""docs/tour.md cannot rot: every command line in it is marked `# tested` or `# by hand`, and the tested ones
run here, exactly as written and in order, in an empty directory (a tiny model: about a minute)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "docs" / "tour.md"
MARKED = re.compile(r"^(?P<cmd>uv run .*?)\s+#\s*(?P<mark>tested|by hand\b.*)$")


def code_lines(text: str) -> list[str]:
    """The lines inside the page's ```bash blocks."""
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines() if line.strip()]


def tour_commands(text: str) -> list[tuple[str, str]]:
    """(command, mark) for every code line; a line without a mark fails the test that reads it."""
    found = []
    for line in code_lines(text):
        m = MARKED.match(line)
        assert m, f"tour command without a '# tested' / '# by hand' mark: {line}"
        found.append((m["cmd"], m["mark"]))
    return found


def argv(command: str) -> list[str]:
    """`uv run -m X ...`, `uv run python ...`, `uv run script.py ...` as this interpreter's argv."""
    words = shlex.split(command)
    assert words[:2] == ["uv", "run"], command
    rest = words[2:]
    if rest[0] == "python":
        return [sys.executable, *rest[1:]]
    if rest[0].endswith(".py"):
        return [sys.executable, str(ROOT / rest[0]), *rest[1:]]
    return [sys.executable, *rest]


def test_every_command_is_marked_and_the_closing_note_counts_them() -> None:
    text = TOUR.read_text(encoding="utf-8")
    commands = tour_commands(text)
    tested = [c for c, mark in commands if mark == "tested"]
    assert f"runs the {len(tested)} lines marked `# tested`" in text
    assert any(c == "uv run -m llm.finetune" for c, _ in commands) and any(c == "uv run -m llm.chat" for c, _ in commands)


def test_tour_commands_run(tmp_path) -> None:
    text = TOUR.read_text(encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    env.pop("LLM_OPS", None)
    outputs = []
    for command, mark in tour_commands(text):
        if mark != "tested":
            continue
        done = subprocess.run(argv(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout + done.stderr)
    every = "\n".join(outputs)
    # what the page tells the reader to look at is what the commands print
    count = re.search(r"parameter count \(([\d,]+) for the `demo` preset\)", text)[1]
    assert f"\n{count.replace(',', '')}\n" in every
    assert "final val loss" in every and "unigram entropy" in every and "perplexity" in every
    assert (tmp_path / "runs/tour/loss.png").is_file()
    assert (tmp_path / "runs/tour/checkpoints/quantized-int8.pt").is_file()
