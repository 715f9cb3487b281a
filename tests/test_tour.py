"""docs/tour.md cannot rot: every command line in it is marked `# tested` or `# by hand`, and the tested ones
run here with exactly the page's arguments, in order, in an empty directory (a tiny model)."""

import json
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
    for module in ("llm.finetune", "llm.chat"):  # steps 8-9: the default run by hand, a tiny one tested
        assert any(c.split()[:4] == ["uv", "run", "-m", module] and m.startswith("by hand") for c, m in commands)
        assert any(c.startswith(f"uv run -m {module} ") and m == "tested" for c, m in commands)


# Runs the tested commands one after another in one fresh interpreter (one torch import instead of one per
# command): `-m` modules and scripts through runpy with their argv, `-c` code through exec, each as __main__.
DRIVER = """
import json, runpy, sys, traceback
for argv in json.loads(sys.argv[1]):
    print("\\n=== " + " ".join(argv[1:]), flush=True)
    sys.argv = argv[2:] if argv[1] == "-m" else argv[1:]
    try:
        if argv[1] == "-m":
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        elif argv[1] == "-c":
            exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__"})
        else:
            runpy.run_path(argv[1], run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            print(f"=== exit {e.code}", flush=True)
            sys.exit(1)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
"""
# What the test types into step 9's chat (the page says so): one user turn, then the REPL's /quit.
CHAT_STDIN = "Once upon a time, there was a girl named Mia. One day, Mia went to the park. Where did Mia go?\n/quit\n"


def test_tour_commands_run(tmp_path) -> None:
    text = TOUR.read_text(encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    env.pop("LLM_OPS", None)
    tested = [argv(command) for command, mark in tour_commands(text) if mark == "tested"]
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(tested)], cwd=tmp_path, env=env,
                          input=CHAT_STDIN, capture_output=True, text=True, timeout=900)
    every = done.stdout + done.stderr
    assert done.returncode == 0, every[-6000:]
    assert every.count("\n=== ") == len(tested)
    # what the page tells the reader to look at is what the commands print
    count = re.search(r"parameter count \(([\d,]+) for the `demo` preset\)", text)[1]
    assert f"\n{count.replace(',', '')}\n" in every
    assert "'Once', ' up', 'on', ' a', ' time'" in every  # step 2's pieces, as the page quotes them
    assert "final val loss" in every and "unigram entropy" in every and "perplexity" in every
    assert (tmp_path / "runs/tour/loss.png").is_file()
    assert (tmp_path / "runs/tour/checkpoints/quantized-int8.pt").is_file()
    assert (tmp_path / "runs/tour-sft/adapter.safetensors").is_file()
    assert "held-out exact match: before" in every  # step 8
    loaded = " ".join(re.search(r"first line, which says what was loaded \(`(.*?)`\)", text, re.S)[1].split())
    assert "Who is Hoot's friend?" in every  # the held-out question step 9 prints for pasting
    assert loaded in every and "\n> " in every  # step 9: the adapter on its base, and the REPL's prompt
