"""`python -m llm.export`: our checkpoints to and from the Hugging Face Llama layout.

    --checkpoint runs/demo --out exports/demo    config.json, model.safetensors, generation_config.json (and,
                                                 with a tokenizer, tokenizer.json + tokenizer_config.json),
                                                 which transformers' AutoModelForCausalLM / AutoTokenizer load
    --import DIR --out runs/imported             a Llama directory (model.safetensors, sharded or not, and
                                                 config.json) into a checkpoint of ours (load_model reads it);
                                                 a byte-level BPE tokenizer.json into runs/imported/tokenizer

The model is a Llama (pre-norm RMSNorm, SwiGLU, RoPE, optional GQA, no biases), so the conversion is a
renaming of the weights plus one permutation. RoPE: we rotate adjacent pairs (x[2k], x[2k+1]), Llama in
transformers rotates halves (x[k], x[k+d/2]), both pair k by the angle pos·theta^(-2k/d). So a head vector
y = x[P], P = [0, 2, ..., d-2, 1, 3, ..., d-1], puts our pair k at Llama's (k, k+d/2): reordering the rows
of q_proj and k_proj by P within each head gives Llama the same rotated q, k up to that common reordering,
and q·k (a sum over the head dimension) does not see the order. v, the output and everything else is unchanged.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llm.bpe import EOT
from llm.bpe.gpt2_bytes import str_to_token, token_to_str
from llm.bpe.tokenizer import BpeTokenizer
from llm.checkpoint import (
    CheckpointError, checkpoint_or_default_run, find_tokenizer_dir, read_checkpoint, resolve_checkpoint,
    save_checkpoint,
)
from llm.cli import Parser, add_tokenizer_dir
from llm.config import RMS_NORM_EPS, ModelConfig
from llm.fileio import replacing, write_json, write_text
from llm.run_dir import step_checkpoint_path
from llm.transformer import Transformer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # a sharded checkpoint: {"weight_map": {name: shard file}}
# (ours, Hugging Face) names of one block's weights, "{i}" the layer; w1 = gate (silu), w3 = up, w2 = down
LAYER_KEYS = (
    ("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"), ("attn.v_proj", "self_attn.v_proj"),
    ("attn.output_proj", "self_attn.o_proj"), ("ffn.w1", "mlp.gate_proj"), ("ffn.w2", "mlp.down_proj"),
    ("ffn.w3", "mlp.up_proj"), ("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm"),
)


def key_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(our state-dict key, its Hugging Face name) for every weight, lm_head included."""
    pairs = [("token_embeddings.weight", "model.embed_tokens.weight")]
    for i in range(num_layers):
        pairs += [(f"layers.{i}.{a}.weight", f"model.layers.{i}.{b}.weight") for a, b in LAYER_KEYS]
    return pairs + [("ln_final.weight", "model.norm.weight"), ("lm_head.weight", "lm_head.weight")]


def halves_order(head_dim: int) -> torch.Tensor:
    """P: the rows of one head in Llama's order, our adjacent pair k going to (k, k + d/2)."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def permute_heads(w: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    """w (heads·d, in) with each head's d rows reordered by `order`."""
    return w.reshape(-1, head_dim, w.shape[-1])[:, order].reshape(w.shape).contiguous()


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict as Llama weights; lm_head left out when tied (transformers ties it on load)."""
    order = halves_order(cfg.head_dim)
    out = {}
    for ours, hf in key_pairs(cfg.num_layers):
        w = state[ours].detach().to("cpu", torch.float32)
        if ours.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_heads(w, cfg.head_dim, order)
        out[hf] = w.contiguous()
    if cfg.tie_embeddings:
        del out["lm_head.weight"]  # one tensor, stored once: safetensors refuses shared storage
    return out


def from_hf_state(hf: dict[str, torch.Tensor], cfg: ModelConfig, src: Path) -> dict[str, torch.Tensor]:
    """Llama weights as our state dict (the inverse of to_hf_state); one line naming a missing weight."""
    if cfg.tie_embeddings or "lm_head.weight" not in hf:
        hf = {**hf, "lm_head.weight": hf.get("model.embed_tokens.weight")}
    inverse = torch.argsort(halves_order(cfg.head_dim))
    state = {}
    for ours, name in key_pairs(cfg.num_layers):
        w = hf.get(name)
        if w is None:
            raise ValueError(f"{src}: weight {name} missing")
        w = w.to(torch.float32)
        if ours.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_heads(w, cfg.head_dim, inverse)
        state[ours] = w
    return state


def hf_config(cfg: ModelConfig, tokenizer: BpeTokenizer | None) -> dict:
    """config.json of LlamaForCausalLM for `cfg` (rope theta written both ways: transformers 4 and 5)."""
    eos = tokenizer.token_id(EOT) if tokenizer is not None and EOT in tokenizer.special_tokens else None
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "torch_dtype": "float32",
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": None,
    }


def _unsupported(src: Path, field: str, value, want: str) -> ValueError:
    return ValueError(f"{src}: unsupported config {field}={value!r} (this model needs {want})")


def check_hf_config(hf: dict, src: Path) -> None:
    """One line naming the first field of a Llama config.json this model cannot reproduce."""
    checks = (("model_type", "llama"), ("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
              ("rope_scaling", None))
    for field, want in checks:
        if hf.get(field, want) != want:
            raise _unsupported(src, field, hf[field], repr(want))
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise _unsupported(src, "rope_parameters.rope_type", rope["rope_type"], "'default'")
    heads = hf.get("num_attention_heads", 0)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // max(heads, 1)
    if head_dim * heads != hf["hidden_size"]:
        raise _unsupported(src, "head_dim", head_dim, "hidden_size / num_attention_heads")
    eps = hf.get("rms_norm_eps", RMS_NORM_EPS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise _unsupported(src, "rms_norm_eps", eps, "a positive number")


def model_config_from_hf(hf: dict, src: Path) -> ModelConfig:
    """Our ModelConfig for a Llama config.json, after check_hf_config."""
    check_hf_config(hf, src)
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10_000.0))
    kv = hf.get("num_key_value_heads")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"], d_model=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
            rope_theta=float(theta), num_kv_heads=None if kv == hf["num_attention_heads"] else kv,  # None: plain MHA, as ours
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rms_norm_eps=float(hf.get("rms_norm_eps", RMS_NORM_EPS)),
        )
    except KeyError as e:
        raise ValueError(f"{src}: config.json has no {e.args[0]}") from None


def tokenizer_json(tok: BpeTokenizer) -> dict:
    """tokenizer.json (Hugging Face `tokenizers`): byte-level BPE with our merges in rank order, the GPT-2
    pre-tokenizer, our special tokens as added tokens with their ids."""
    ids = {s: tok.token_id(s) for s in tok.special_tokens}
    special = set(ids.values())
    vocab = {token_to_str(b): i for i, b in sorted(tok.vocab.items()) if i not in special}
    # each special also in the model's vocab under its own text: `tokenizers` gives an added token the id
    # the model has for it, and a new id past the vocabulary (not the one written) when it has none
    vocab.update({s: i for s, i in ids.items() if s not in vocab})
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for s, i in ids.items()]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [[token_to_str(a), token_to_str(b)] for a, b in tok.merges]},
    }


def write_tokenizer(tok: BpeTokenizer, out: Path, context_length: int) -> None:
    """tokenizer.json and the tokenizer_config.json that makes AutoTokenizer use it."""
    eos = EOT if EOT in tok.special_tokens else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
              "bos_token": eos, "eos_token": eos, "add_bos_token": False, "clean_up_tokenization_spaces": False}
    write_text(out / "tokenizer.json", json.dumps(tokenizer_json(tok), ensure_ascii=False))
    write_json(out / "tokenizer_config.json", config, indent=1)


def _not_byte_level(src: Path, what: str) -> ValueError:
    return ValueError(f"{src / 'tokenizer.json'}: {what}, not GPT-2 style byte-level BPE; "
                      "pass --tokenizer-dir DIR with a tokenizer of ours")


def check_byte_level(tj: dict, src: Path) -> None:
    """One line naming what makes a tokenizer.json other than the byte-level BPE we encode exactly as
    `tokenizers` does: a BPE model on the GPT-2 regex pre-tokenizer (ByteLevel, no prefix space), a
    ByteLevel decoder, no normalizer, no byte fallback or word affixes."""
    model, pre, dec = tj.get("model") or {}, tj.get("pre_tokenizer") or {}, tj.get("decoder") or {}
    checks = (
        (model.get("type") == "BPE", f"its model is {model.get('type')!r}"),
        (tj.get("normalizer") is None, f"it has a {(tj.get('normalizer') or {}).get('type')!r} normalizer"),
        (pre.get("type") == "ByteLevel", f"its pre_tokenizer is {pre.get('type')!r}"),
        (pre.get("use_regex", True) and not pre.get("add_prefix_space", False),
         "its ByteLevel pre_tokenizer has use_regex off or add_prefix_space on"),
        (dec.get("type") == "ByteLevel", f"its decoder is {dec.get('type')!r}"),
        (not model.get("byte_fallback") and not model.get("continuing_subword_prefix")
         and not model.get("end_of_word_suffix"), "its BPE model uses byte_fallback or word affixes"),
    )
    for ok, what in checks:
        if not ok:
            raise _not_byte_level(src, what)
    for t in tj.get("added_tokens") or []:
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise _not_byte_level(src, f"added token {t.get('content')!r} strips spaces or matches single words")


def tokenizer_from_json(tj: dict, src: Path) -> BpeTokenizer:
    """Our tokenizer for a byte-level BPE tokenizer.json (the inverse of tokenizer_json): its vocabulary and
    merges, its added tokens as our special tokens with their ids."""
    check_byte_level(tj, src)
    try:
        vocab = {int(i): str_to_token(t) for t, i in tj["model"]["vocab"].items()}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tj["model"]["merges"]]
        if any(len(m) != 2 for m in merges):
            raise ValueError("a merge is not a pair of tokens")
        merges = [(str_to_token(a), str_to_token(b)) for a, b in merges]
        added = {t["content"]: int(t["id"]) for t in tj.get("added_tokens") or []}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{src / 'tokenizer.json'}: unreadable BPE model ({type(e).__name__}: {e})") from None
    for s, i in added.items():
        vocab[i] = s.encode("utf-8")
    tok = BpeTokenizer(vocab, merges, list(added))
    moved = [s for s, i in added.items() if tok.token_id(s) != i]
    if moved:
        raise _not_byte_level(src, f"added token {moved[0]!r} shares its id with a regular token")
    return tok


def import_tokenizer(src: Path, out: Path, vocab_size: int) -> str | None:
    """SRC/tokenizer.json as our tokenizer directory OUT/tokenizer (its path); None when SRC has none."""
    if not (src / "tokenizer.json").is_file():
        return None
    tok = tokenizer_from_json(_json(src / "tokenizer.json"), src)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"{src}: tokenizer.json has {tok.vocab_size} tokens but the model only {vocab_size}")
    return str(tok.save(out / "tokenizer"))


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def export_checkpoint(checkpoint: Path, out: Path, tokenizer_dir: str | None = None) -> Path:
    """Write the Hugging Face directory `out` for our checkpoint (file or run directory); returns `out`."""
    path = Path(resolve_checkpoint(checkpoint))
    ckpt = read_checkpoint(path)
    if "quantization" in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a float model checkpoint of this project (export the unquantized one)")
    cfg = ModelConfig.from_dict(dict(ckpt["model_config"]))
    tok = None
    if tokenizer_dir or ckpt.get("tokenizer_dir"):
        tok = BpeTokenizer.load(find_tokenizer_dir(tokenizer_dir or ckpt["tokenizer_dir"], path))
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / WEIGHTS) as tmp:  # all or nothing, like every file this project writes
        save_file(to_hf_state(ckpt["model"], cfg), str(tmp), metadata={"format": "pt"})
    config = hf_config(cfg, tok)
    write_json(out / "config.json", config, indent=1)
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False}
    write_json(out / "generation_config.json", gen, indent=1)
    if tok is not None:
        write_tokenizer(tok, out, cfg.context_length)
    return out


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory: model.safetensors, or the shards its index names."""
    if (src / WEIGHTS).is_file():
        return load_file(src / WEIGHTS)
    if not (src / INDEX).is_file():
        raise ValueError(f"{src} holds neither {WEIGHTS} nor {INDEX}")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(_json(src / INDEX)["weight_map"].values())):
        state.update(load_file(src / shard))
    return state


def import_hf(src: Path, out: Path, tokenizer_dir: str | None = None) -> Path:
    """Our checkpoint (OUT/checkpoints/step_0000000.pt) from the Llama directory `src`; returns its path.
    The tokenizer it records: `tokenizer_dir` when given, else SRC/tokenizer.json imported into OUT/tokenizer
    (byte-level BPE only), else none."""
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a Hugging Face model directory (no config.json)")
    cfg = model_config_from_hf(_json(src / "config.json"), src)
    model = Transformer.from_config(cfg)
    model.load_state_dict(from_hf_state(read_hf_weights(src), cfg, src))  # shapes checked here
    if tokenizer_dir is None:
        tokenizer_dir = import_tokenizer(src, out, cfg.vocab_size)
    path = step_checkpoint_path(out, 0)
    extra = {"model_config": cfg.to_dict(), "imported_from": str(src)}
    if tokenizer_dir is not None:
        extra["tokenizer_dir"] = tokenizer_dir
    save_checkpoint(model, None, 0, path, extra=extra)
    return path


def build_parser() -> Parser:
    p = Parser(prog="python -m llm.export",
               description="Export a checkpoint to the Hugging Face Llama layout, or --import one.")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or run directory (default: runs/demo)")
    p.add_argument("--import", dest="src", default=None, metavar="DIR",
                   help="read this Hugging Face Llama directory into a checkpoint of ours instead")
    p.add_argument("--out", alias=("--output",), required=True,
                   help="the directory to write (export) or the run directory (import)")
    add_tokenizer_dir(p, "tokenizer to export (default: the checkpoint's), or to record in the import "
                         "(default: the directory's tokenizer.json, converted into OUT/tokenizer)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.src is not None:
            if args.checkpoint is not None:
                raise ValueError("give --checkpoint (export) or --import (import), not both")
            written = import_hf(Path(args.src), Path(args.out), args.tokenizer_dir)
        else:
            written = export_checkpoint(checkpoint_or_default_run(args.checkpoint), Path(args.out), args.tokenizer_dir)
    except (ValueError, OSError, CheckpointError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
