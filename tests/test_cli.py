"""One command-line convention: `python -m llm <verb>`, the same flag names everywhere (old names still
accepted), one-line argparse errors, and the design's commands run bare on the default run's data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import inspect_data
from llm import __main__ as llm_main
from llm import bpe_tokenizer, data, download, evaluate, generating
from llm.bpe_tokenizer import BpeTokenizer
from llm.checkpoint import save_checkpoint
from tests.test_generating import byte_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PARSED_MAINS = [generating.main, evaluate.main, data.main, download.main, bpe_tokenizer.main, inspect_data.main]


def only_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------- verbs


def test_no_verb_lists_the_verbs_one_line_each(capsys) -> None:
    assert llm_main.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    verbs = [line.split()[0] for line in out[1:]]
    assert verbs == ["train", "generate", "evaluate", "quantize", "export", "finetune", "chat", "data", "tokenizer", "inspect",
                     "bench"]


def test_an_unknown_verb_is_one_line(capsys) -> None:
    assert llm_main.main(["fly"]) == 2
    assert "unknown verb 'fly'" in only_line(capsys)


def test_verbs_hand_their_arguments_to_the_commands(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat.\n<|endoftext|>\nthe dog sat.\n" * 20)
    assert llm_main.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "270",
                          "--special-token", "<|endoftext|>", "--out", str(tmp_path / "tok")]) == 0
    assert BpeTokenizer.load(tmp_path / "tok").vocab_size == 270
    capsys.readouterr()
    assert llm_main.main(["inspect", str(tmp_path / "missing")]) == 2  # a repository script, loaded by path
    assert "no such file or directory" in only_line(capsys)
    assert llm_main.main(["bench", "--device", "cpu", "--json", str(tmp_path)]) == 2  # kernel/benchmarking_model.py
    assert "is a directory, not a file" in only_line(capsys)


# ------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("main", PARSED_MAINS, ids=lambda m: m.__module__)
def test_argparse_errors_are_one_line_with_exit_status_2(main, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--no-such-flag"])
    assert e.value.code == 2
    line = only_line(capsys)
    assert line.endswith("--help)"), line  # argparse's message (unknown flag, a missing argument) and the hint


def test_missing_required_flags_name_the_flags_in_one_line(capsys) -> None:
    with pytest.raises(SystemExit):
        bpe_tokenizer.main(["encode"])
    assert "required: --tokenizer-dir, --input, --out" in only_line(capsys)


def test_old_flag_names_are_accepted_but_not_shown(tmp_path: Path, capsys) -> None:
    tok = byte_tokenizer()
    tok.save(tmp_path / "tok")
    (tmp_path / "in.txt").write_text("hello there\n")
    for flags in (["--tokenizer", "--output", "--workers"], ["--tokenizer-dir", "--out", "--num-workers"]):
        out = tmp_path / f"{flags[1]}.npy"
        assert bpe_tokenizer.main(["encode", flags[0], str(tmp_path / "tok"), "--input", str(tmp_path / "in.txt"),
                                   flags[1], str(out), flags[2], "1"]) == 0
        assert np.load(out).tolist() == tok.encode("hello there\n")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        bpe_tokenizer.main(["encode", "--help"])
    shown = capsys.readouterr().out
    assert "--tokenizer-dir" in shown and "--num-workers" in shown and "--workers" not in shown
    assert "--output" not in shown and "--tokenizer " not in shown


def test_generation_and_evaluation_share_the_flag_names() -> None:
    args = generating.build_parser().parse_args(["--tokenizer", "T"])
    assert args.tokenizer_dir == "T" and args.device == "auto"


# ------------------------------------------------------------------------------------------- bare commands


def test_bare_generating_without_a_trained_run_is_a_one_line_hint(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert generating.main([]) == 2
    assert only_line(capsys) == "error: no trained model in runs/demo yet: run uv run -m llm.training first"
    assert evaluate.main([]) == 2
    assert "no trained model in runs/demo yet" in only_line(capsys)


def test_bare_generating_streams_a_story_from_the_default_run(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    byte_tokenizer().save("data/demo/tokenizer")
    model = tiny_model(ctx=64)
    Path("runs/demo/checkpoints").mkdir(parents=True)
    save_checkpoint(model, None, 3, "runs/demo/checkpoints/step_0000003.pt",
                    extra={"model_config": model.config.to_dict(), "tokenizer_dir": "data/demo/tokenizer"})
    assert generating.main(["--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Once upon a time") and "runs/demo/checkpoints/step_0000003.pt" in out.err


def test_bare_inspect_reports_on_data_demo_or_says_how_to_make_it(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert inspect_data.main([]) == 2
    assert only_line(capsys).startswith("error: no prepared data in data/demo yet: run uv run -m llm.data demo")
    data.ensure_demo_data("data/demo", vocab_size=300, size_mb=0.05, quiet=True)
    assert inspect_data.main(["--no-plot"]) in (0, 1)  # 1: warnings about a corpus this small are fine
    assert capsys.readouterr().out.startswith("inspect_data: data/demo  (vocab 300")


def test_bare_tokenizer_trains_on_the_built_in_stories(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert bpe_tokenizer.main([]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("training a 2,048-token BPE on the built-in stories (data/demo/stories.txt)")
    assert "-> data/demo-tokenizer" in first
    tok = BpeTokenizer.load("data/demo-tokenizer")
    assert tok.vocab_size == 2048 and tok.decode(tok.encode("Once upon a time")) == "Once upon a time"
