"""Perplexity: windows score every token once; the result equals exp(mean cross-entropy) computed here with
torch.nn.functional.cross_entropy window by window; the CLI (npy, text, the run's val split, --json, errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm.checkpoint import save_checkpoint
from llm.evaluate import evaluate_tokens, main, windows
from tests.test_generating import byte_tokenizer, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n, ctx, stride", [(2, 4, 4), (50, 8, 8), (50, 8, 3), (51, 8, 1), (9, 8, 5), (100, 16, 7)])
def test_windows_score_every_target_exactly_once_with_enough_context(n: int, ctx: int, stride: int) -> None:
    seen = []
    for begin, end, k in windows(n, ctx, stride):
        assert 0 <= begin < end <= n - 1 and end - begin <= ctx and 1 <= k <= end - begin
        for t in range(end - k + 1, end + 1):  # target indices scored by this window
            seen.append(t)
            assert begin == 0 or t - begin >= ctx - stride  # context before the target
    assert sorted(seen) == list(range(1, n))


def reference_nll(model, tokens: np.ndarray, ctx: int, stride: int) -> tuple[float, int]:
    """Hugging Face's loop, one window at a time: labels outside the new targets are ignored (-100)."""
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    n, total, count, prev_end = ids.shape[1], 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n - 1)
        if end <= begin:
            break
        x, y = ids[:, begin:end], ids[:, begin + 1 : end + 1].clone()
        y[:, : (end - begin) - (end - prev_end)] = -100
        with torch.no_grad():
            logits = model(x).double()
        total += F.cross_entropy(logits[0], y[0], ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
        prev_end = end
        if end == n - 1:
            break
    return total, count


@pytest.mark.parametrize("stride", [16, 5, 1])
def test_perplexity_equals_exp_of_mean_cross_entropy(ref_snapshot, stride: int) -> None:
    model = tiny_model(ctx=16, kv_heads=2)
    tokens = np.random.default_rng(0).integers(0, 259, size=70).astype(np.uint16)
    total, count = reference_nll(model, tokens, 16, stride)
    if stride == 1:  # the same thing stated directly: every token predicted from up to 16 previous tokens
        direct = 0.0
        for t in range(1, len(tokens)):
            x = torch.from_numpy(tokens[max(0, t - 16) : t].astype(np.int64))[None]
            with torch.no_grad():
                direct += F.cross_entropy(model(x)[0, -1:].double(), torch.tensor([int(tokens[t])])).item()
        assert math.isclose(direct, total, rel_tol=1e-6)
    stored = ref_snapshot({"loss": torch.tensor(total / count, dtype=torch.float64),
                           "count": torch.tensor(count)}, rtol=1e-6, atol=1e-9)
    out = evaluate_tokens(model, tokens, stride=stride, batch_size=3)
    assert out["tokens"] == int(stored["count"]) == len(tokens) - 1
    assert math.isclose(out["loss"], float(stored["loss"]), rel_tol=1e-5)
    assert math.isclose(out["perplexity"], math.exp(float(stored["loss"])), rel_tol=1e-5)


def test_bad_arguments_raise_one_clear_error() -> None:
    model = tiny_model(ctx=16)
    with pytest.raises(ValueError, match="stride"):
        evaluate_tokens(model, np.arange(40), stride=17)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_tokens(model, np.arange(1))
    with pytest.raises(ValueError, match="token ids must be in"):
        evaluate_tokens(model, np.array([1, 2, 300]))
    with pytest.raises(ValueError, match="context_length"):
        evaluate_tokens(model, np.arange(40), context_length=32)


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path, Path]:
    tok = byte_tokenizer()
    tok.save(tmp_path / "tokenizer")
    text = "the hello shell held the help desk. " * 8
    (tmp_path / "val.txt").write_text(text)
    np.save(tmp_path / "val.npy", np.asarray(tok.encode(text), dtype=np.uint16))
    model = tiny_model(ctx=16)
    ckpt = tmp_path / "step_0000001.pt"
    save_checkpoint(model, None, 1, ckpt, extra={"model_config": model.config.to_dict(),
                                                 "tokenizer_dir": str(tmp_path / "tokenizer"),
                                                 "train_config": {"val_data": str(tmp_path / "val.npy")}})
    return ckpt, tmp_path / "val.npy", tmp_path / "val.txt"


def test_cli_json_on_npy_text_and_the_runs_val_split(run, capsys) -> None:
    ckpt, npy, txt = run
    results = []
    for data in (["--data", str(npy)], ["--data", str(txt)], []):
        assert main(["--checkpoint", str(ckpt), *data, "--stride", "4", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    model = tiny_model(ctx=16)
    expected = evaluate_tokens(model, np.load(npy), stride=4)
    for r in results:
        assert r["tokens"] == expected["tokens"] and math.isclose(r["perplexity"], expected["perplexity"], rel_tol=1e-6)
    assert main(["--checkpoint", str(ckpt), "--data", str(npy)]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "missing.npy"], "not found"),
        (["--stride", "99"], "stride must be in"),
        (["--max-tokens", "1"], "--max-tokens must be >= 2"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_cli_errors_are_one_line(run, capsys, extra, message) -> None:
    ckpt, _, _ = run
    assert main(["--checkpoint", str(ckpt), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
