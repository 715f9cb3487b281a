"""llm.export against transformers itself: exported models load there and compute our logits; Llama models
saved there import into ours with the same logits and greedy text; tokenizer.json encodes as we do.
Offline, with tiny random models (transformers is slow to import: every such test lives in this module). transformers is
imported by the `tf` fixture, when the first test here runs, not at collection: it imports Triton, whose
interpreted mode test_flash_triton.py switches on must come first (TRITON_INTERPRET is read at Triton's
import), and this module is named to run after that one."""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

import pytest
import torch

from kernel import benchmarking_hf
from llm.bpe.gpt2_bytes import token_to_str
from llm.bpe.tokenizer import BpeTokenizer
from llm.bpe.train import train_bpe
from llm.checkpoint import load_model, save_checkpoint
from llm.config import ModelConfig
from llm.export import export_checkpoint, import_hf, main, tokenizer_from_json
from llm.generating import main as generating_main
from llm.transformer import Transformer

EOT = "<|endoftext|>"
CONFIGS = {
    "mha": ModelConfig(vocab_size=300, context_length=64, d_model=32, num_layers=2, num_heads=4, d_ff=64),
    "gqa": ModelConfig(vocab_size=300, context_length=64, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                       num_kv_heads=2),
    "tied": ModelConfig(vocab_size=300, context_length=64, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                        tie_embeddings=True, rope_theta=500.0),
}


@pytest.fixture(scope="module")
def tf():
    return importlib.import_module("transformers")


def _our_checkpoint(tmp_path, cfg: ModelConfig, tokenizer_dir=None):
    torch.manual_seed(0)
    model = Transformer.from_config(cfg, impl="reference")
    for p in model.parameters():  # norms away from 1 so their mapping matters
        p.data.add_(0.1 * torch.randn_like(p))
    extra = {"model_config": cfg.to_dict()}
    if tokenizer_dir is not None:
        extra["tokenizer_dir"] = str(tokenizer_dir)
    save_checkpoint(model, None, 7, tmp_path / "ckpt.pt", extra=extra)
    return model.eval(), tmp_path / "ckpt.pt"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers_with_our_logits(tf, tmp_path, name):
    """RoPE permutation, key names, GQA and tying are right: transformers computes our logits."""
    model, ckpt = _our_checkpoint(tmp_path, CONFIGS[name])
    out = export_checkpoint(ckpt, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "generation_config.json"}
    hf = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)


def _hf_model(tf, tmp_path, **kw):
    kw = {"rms_norm_eps": 1e-5, **kw}
    cfg = tf.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=1000.0, **kw)
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(cfg).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.3)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # sharded: the index path is read
    return hf, tmp_path / "hf"


def _greedy(forward, ids: torch.Tensor, n: int) -> list[int]:
    for _ in range(n):
        ids = torch.cat((ids, forward(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids[0].tolist()


def test_import_matches_transformers_logits_and_greedy_text(tf, tmp_path):
    hf, src = _hf_model(tf, tmp_path)
    assert (src / "model.safetensors.index.json").is_file()
    path = import_hf(src, tmp_path / "run", tokenizer_dir=None)
    model = Transformer.from_config(ModelConfig.from_dict(torch.load(path, weights_only=True)["model_config"]))
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    model.eval()
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
        assert _greedy(model, ids, 20) == _greedy(lambda x: hf(x).logits, ids, 20)


def test_import_carries_rms_norm_eps(tf, tmp_path):
    """A Llama with rms_norm_eps 1e-6 imports with that eps: logits within 1e-4. Embeddings are scaled so
    that mean(x²) is near eps, where the default 1e-5 would give clearly different logits."""
    hf, src = _hf_model(tf, tmp_path, rms_norm_eps=1e-6)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(0.01)
    hf.save_pretrained(src)
    path = import_hf(src, tmp_path / "run")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model_config"]["rms_norm_eps"] == 1e-6
    model = Transformer.from_config(ModelConfig.from_dict(ckpt["model_config"])).eval()
    model.load_state_dict(ckpt["model"])
    default_eps = Transformer.from_config(ModelConfig.from_dict({**ckpt["model_config"], "rms_norm_eps": 1e-5}))
    default_eps.load_state_dict(ckpt["model"])
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(model(ids), want, atol=1e-4, rtol=0)
        assert (default_eps.eval()(ids) - want).abs().max() > 1e-2  # the eps is what the test checks
    export_checkpoint(path, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["rms_norm_eps"] == 1e-6


def test_checkpoint_without_rms_norm_eps_loads_with_the_default(tmp_path, tokenizer_dir):
    """model_config written before the field existed: the default eps, 1e-5."""
    cfg = ModelConfig(vocab_size=300, context_length=64, d_model=32, num_layers=1, num_heads=4, d_ff=64)
    old = {k: v for k, v in cfg.to_dict().items() if k != "rms_norm_eps"}
    save_checkpoint(Transformer.from_config(cfg), None, 1, tmp_path / "old.pt",
                    extra={"model_config": old, "tokenizer_dir": str(tokenizer_dir)})
    model, _, _ = load_model(tmp_path / "old.pt", device="cpu")
    assert model.config.rms_norm_eps == 1e-5 and model.ln_final.eps == 1e-5 and model.layers[0].ln2.eps == 1e-5


def test_export_then_import_is_bit_identical(tmp_path):
    model, ckpt = _our_checkpoint(tmp_path, CONFIGS["tied"])
    export_checkpoint(ckpt, tmp_path / "hf")
    back = torch.load(import_hf(tmp_path / "hf", tmp_path / "run"), weights_only=True)
    assert back["model_config"] == CONFIGS["tied"].to_dict()
    ours = model.state_dict()
    assert back["model"].keys() == ours.keys()
    for k, v in ours.items():
        assert torch.equal(back["model"][k], v), k


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    text = "".join(f"Once upon a time, {n} cats sat. It's 3.14! Ünïcode — ok {EOT}" for n in range(60))
    (d / "corpus.txt").write_text(text, encoding="utf-8")
    vocab, merges = train_bpe(d / "corpus.txt", 256 + 1 + 43, [EOT], num_workers=1)
    BpeTokenizer(vocab, merges, [EOT]).save(d)
    return d


def test_tokenizer_json_encodes_as_we_do(tf, tmp_path, tokenizer_dir):
    """Merges in rank order, the GPT-2 pre-tokenizer and the special token as an added token: AutoTokenizer
    gives our ids on the corpus and on random Unicode, and decodes them back."""
    cfg = ModelConfig(vocab_size=300, context_length=64, d_model=32, num_layers=1, num_heads=4, d_ff=64)
    _, ckpt = _our_checkpoint(tmp_path, cfg, tokenizer_dir)
    out = export_checkpoint(ckpt, tmp_path / "hf")
    ours = BpeTokenizer.load(tokenizer_dir)
    hf = tf.AutoTokenizer.from_pretrained(out, local_files_only=True)
    rng = random.Random(0)
    texts = [(tokenizer_dir / "corpus.txt").read_text(encoding="utf-8")[:3000], f"a{EOT}b {EOT}\n\n  x"]
    texts += ["".join(chr(rng.choice([rng.randrange(32, 0x250), rng.randrange(0x250, 0x3000), 10, 32]))
                      for _ in range(200)) for _ in range(20)]
    for t in texts:
        ids = ours.encode(t)
        assert hf(t, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == t
    assert hf.eos_token_id == ours.token_id(EOT)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == ours.token_id(EOT)


def test_imported_checkpoint_loads_for_generation(tf, tmp_path, tokenizer_dir):
    _, src = _hf_model(tf, tmp_path)
    import_hf(src, tmp_path / "run", tokenizer_dir=str(tokenizer_dir))
    model, tok, _ = load_model(tmp_path / "run", device="cpu")
    assert model.config.num_kv_heads == 2 and tok.vocab_size == 300


@pytest.mark.parametrize("field, value", [("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                          ("attention_bias", True), ("mlp_bias", True),
                                          ("model_type", "mistral"), ("hidden_act", "gelu")])
def test_unsupported_config_is_one_line_naming_the_field(tf, tmp_path, capsys, field, value):
    _, src = _hf_model(tf, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["--import", str(src), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and err.startswith("error: ")


def _texts(tokenizer_dir) -> list[str]:
    """The tokenizer's corpus, special tokens in odd places, and random Unicode."""
    rng = random.Random(0)
    texts = [(tokenizer_dir / "corpus.txt").read_text(encoding="utf-8")[:3000], f"a{EOT}b {EOT}\n\n  x{EOT}{EOT}"]
    return texts + ["".join(chr(rng.choice([rng.randrange(32, 0x250), rng.randrange(0x250, 0x3000), 10, 32]))
                            for _ in range(200)) for _ in range(20)]


def test_tokenizer_export_then_import_encodes_the_same(tmp_path, tokenizer_dir, capsys):
    """tokenizer.json back into our format: same ids on the corpus, random Unicode and special tokens, and
    the imported run generates from a text prompt with no --tokenizer-dir."""
    cfg = ModelConfig(vocab_size=300, context_length=64, d_model=32, num_layers=1, num_heads=4, d_ff=64)
    _, ckpt = _our_checkpoint(tmp_path, cfg, tokenizer_dir)
    export_checkpoint(ckpt, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    ours, back = BpeTokenizer.load(tokenizer_dir), BpeTokenizer.load(tmp_path / "run" / "tokenizer")
    assert back.special_tokens == [EOT] and back.token_id(EOT) == ours.token_id(EOT)
    assert back.vocab == ours.vocab and back.merges == ours.merges
    for t in _texts(tokenizer_dir):
        assert back.encode(t) == ours.encode(t)
        assert back.decode(back.encode(t)) == t
    capsys.readouterr()
    assert generating_main(["--checkpoint", str(tmp_path / "run"), "--prompt", "Once upon", "--max-new-tokens", "5",
                            "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Once upon")


def test_gpt2_tokenizer_json_from_tokenizers_imports(tmp_path, tokenizer_dir):
    """GPT-2's own vocabulary and merges as `tokenizers` writes tokenizer.json (merges as "a b" strings,
    <|endoftext|> an added token inside the vocabulary): imported, it encodes as `tokenizers` does."""
    tokenizers = importlib.import_module("tokenizers")
    gpt2 = Path(__file__).parent / "fixtures" / "gpt2"
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(gpt2 / "vocab.json"), str(gpt2 / "merges.txt")))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    hf.save(str(tmp_path / "tokenizer.json"))
    imported = tokenizer_from_json(json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8")), tmp_path)
    assert imported.token_id(EOT) == 50256 and imported.vocab_size == 50257
    for t in _texts(tokenizer_dir):
        assert imported.encode(t) == hf.encode(t).ids


@pytest.mark.parametrize("change, named", [
    ({"model": {"type": "Unigram", "vocab": []}}, "Unigram"),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, "Metaspace"),
    ({"normalizer": {"type": "NFC"}}, "NFC"),
    ({"decoder": {"type": "WordPiece"}}, "WordPiece"),
])
def test_other_tokenizer_types_are_one_line_saying_pass_tokenizer_dir(tmp_path, capsys, tokenizer_dir, change, named):
    cfg = ModelConfig(vocab_size=300, context_length=64, d_model=32, num_layers=1, num_heads=4, d_ff=64)
    _, ckpt = _our_checkpoint(tmp_path, cfg, tokenizer_dir)
    src = export_checkpoint(ckpt, tmp_path / "hf")
    tj = json.loads((src / "tokenizer.json").read_text())
    (src / "tokenizer.json").write_text(json.dumps({**tj, **change}))
    assert main(["--import", str(src), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "--tokenizer-dir" in err
    assert not (tmp_path / "run").exists()  # nothing written
    assert main(["--import", str(src), "--out", str(tmp_path / "run"), "--tokenizer-dir", str(tokenizer_dir)]) == 0


def test_benchmark_runs_and_reports_equal_perplexities(tf, tmp_path, capsys, monkeypatch):
    """kernel/benchmarking_hf.py end to end on a short run of a tiny model standing in for the demo shape:
    a table row per shape, perplexities agreeing."""
    monkeypatch.setattr(benchmarking_hf, "model_preset", lambda name: ModelConfig(**CONFIGS["gqa"].to_dict()))
    out = tmp_path / "hf.md"
    argv = ["--shapes", "demo", "--prompt", "4", "--new-tokens", "6", "--repeats", "1", "--ppl-tokens", "200",
            "--threads", str(torch.get_num_threads()), "--out", str(out)]
    assert benchmarking_hf.main(argv) == 0
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith("| demo |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[5].strip("*x")) > 0 and float(cells[-1]) < 1e-4
    assert "ETA" in capsys.readouterr().err


def test_benchmark_without_transformers_is_one_line(monkeypatch, capsys):
    real = importlib.import_module

    def missing(name, *a):
        if name == "transformers":
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", missing)
    assert benchmarking_hf.main(["--shapes", "demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformers is not installed" in err and "development dependency" in err
