"""llm.finetune on a tiny base model: an end-to-end run through the CLI (outputs load for generation),
resume equality (N steps == N/2 + resume + N/2, bit for bit), and one-line errors."""

import json
import random

import pytest
import torch

from llm.bpe import EOT
from llm.bpe.tokenizer import BpeTokenizer
from llm.bpe.train import train_bpe
from llm.checkpoint import load_model, read_checkpoint, save_checkpoint
from llm.finetune import main, run_finetune
from llm.sft_train import FinetuneConfig, load_finetuned
from llm.stories import make_story
from llm.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained-shaped checkpoint (random weights) with its tokenizer."""
    d = tmp_path_factory.mktemp("base")
    r = random.Random(7)
    (d / "corpus.txt").write_text("".join(make_story(r) + "\n" + EOT + "\n" for _ in range(30)), encoding="utf-8")
    vocab, merges = train_bpe(d / "corpus.txt", 256 + 1 + 200, [EOT], num_workers=1)
    tok_dir = BpeTokenizer(vocab, merges, [EOT]).save(d / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(vocab_size=457, context_length=384, d_model=32, num_layers=1, num_heads=2)
    save_checkpoint(model, None, 0, d / "base.pt", extra={"model_config": model.config.to_dict(), "tokenizer_dir": str(tok_dir)})
    return d / "base.pt"


def _chat_file(path):
    rows = [{"messages": [{"role": "user", "content": f"Who is number {i}?"}, {"role": "assistant", "content": f"Tom {i}"}]}
            for i in range(12)]
    rows.append({"instruction": "Say hi.", "input": "", "output": "Hi there."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _cfg(base, tmp_path, **kw):
    tmp_path.mkdir(exist_ok=True)
    return FinetuneConfig(checkpoint=str(base), out_dir=str(tmp_path / "run"), data=_chat_file(tmp_path / "chat.jsonl"),
                          max_steps=6, batch_size=3, warmup_steps=2, log_interval=1, checkpoint_interval=2, **kw)


@pytest.mark.parametrize("rank", [0, 4])
def test_resume_equals_uninterrupted(base, tmp_path, rank) -> None:
    """With LoRA dropout on, so the restored RNG matters too."""
    straight = run_finetune(_cfg(base, tmp_path / "a", lora_rank=rank, lora_dropout=0.2), evaluate=False)
    half = run_finetune(_cfg(base, tmp_path / "b", lora_rank=rank, lora_dropout=0.2), evaluate=False, stop_at=3)
    assert half["step"] == 3
    resumed = run_finetune(_cfg(base, tmp_path / "b", lora_rank=rank, lr=1.0), resume="auto", evaluate=False)
    assert resumed["losses"] == straight["losses"]  # the saved config wins over the new lr; same batches
    a = read_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "step_0000006.pt")
    b = read_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "step_0000006.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    with pytest.raises(ValueError, match="earlier fine-tuning run"):  # a fresh start would mix two runs
        run_finetune(_cfg(base, tmp_path / "b", lora_rank=rank), evaluate=False)
    again = run_finetune(_cfg(base, tmp_path / "b", lora_rank=rank, lora_dropout=0.2), evaluate=False, overwrite=True)
    assert again["losses"] == straight["losses"]


def test_end_to_end_cli_builtin_qa(base, tmp_path, capsys) -> None:
    out = tmp_path / "qa"
    rc = main(["--checkpoint", str(base), "--out-dir", str(out), "--lora-rank", "0", "--max-steps", "2",
               "--batch-size", "2", "--train-examples", "10", "--eval-examples", "5", "--log-interval", "1"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "held-out exact match: before 0.0% -> after" in captured.out
    assert captured.out.count("  Q: ") == 3
    assert "ETA" in captured.err and "held-out exact match before fine-tuning" in captured.err
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["step"] == 2 and 0.0 <= summary["accuracy_after"] <= 1.0
    model, tok, _ = load_model(out / "model.pt")  # a full checkpoint with the chat tokenizer
    assert tok.vocab_size == model.config.vocab_size == 457 + 4 and "<|end|>" in tok.special_tokens


@pytest.mark.parametrize("argv, msg", [
    (["--data", "nope.jsonl"], "data file not found"),
    (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
    (["--lr", "0"], "lr > 0"),
    (["--resume", "auto"], "cannot resume"),
])
def test_errors_are_one_line(base, tmp_path, capsys, argv, msg) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(base), "--out-dir", str(tmp_path / "x"), "--no-eval", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_bad_jsonl_line_is_reported(base, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n{oops\n')
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(base), "--out-dir", str(tmp_path / "x"), "--data", str(bad), "--no-eval"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.jsonl:2: invalid JSON" in err and "\n" not in err


def test_adapter_and_merged_checkpoint_are_the_same_model(base, tmp_path) -> None:
    """LoRA run with --merge: base + adapter + chat rows (load_finetuned on the adapter) and merged.pt give the
    same logits; the merged one loads with llm.checkpoint.load_model like any checkpoint."""
    cfg = _cfg(base, tmp_path, lora_rank=4)
    run_finetune(cfg, evaluate=False, merge=True)
    run = tmp_path / "run"
    via_adapter, tok_a = load_finetuned(run / "adapter.safetensors")
    merged, tok_m, _ = load_model(run / "merged.pt")
    assert tok_a.vocab_size == tok_m.vocab_size == merged.config.vocab_size == 457 + 4
    ids = torch.tensor([tok_m.encode("<|user|> Who is number 3?<|end|><|assistant|>")])
    with torch.no_grad():
        torch.testing.assert_close(via_adapter(ids), merged(ids), rtol=1e-5, atol=1e-5)
    base_model, _, _ = load_model(base)
    with torch.no_grad():  # the base's rows stay bit-identical under LoRA; the chat tokens' rows trained
        assert torch.equal(merged.lm_head.weight[:457], base_model.lm_head.weight)
        assert torch.equal(merged.token_embeddings.weight[:457], base_model.token_embeddings.weight)
        assert not torch.allclose(merged.token_embeddings.weight[457:], base_model.token_embeddings.weight.mean(0))
    assert load_finetuned(run)[0].config.vocab_size == 461  # the run dir: its merged.pt
    with pytest.raises(ValueError, match="not a fine-tuning run"):
        load_finetuned(tmp_path)
