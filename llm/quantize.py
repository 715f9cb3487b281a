"""`python -m llm.quantize --checkpoint runs/demo --bits 8`: write a weight-only quantized checkpoint.

The block linears (q/k/v/output, w1/w2/w3) become int8 rows with one fp32 scale each, or (--bits 4) int4
packed two per byte with one fp32 scale per --group-size input columns; embeddings, norms and lm_head stay
fp32 (the math and the reasons: llm.quant). The file is an ordinary checkpoint of this project (same
keys, written atomically with its sha256, read with weights_only=True) plus a "quantization" record
{bits, group_size, format_version}, so `python -m llm.generating --checkpoint FILE` and llm.evaluate load it
as they are. Default output: quantized-int8.pt (quantized-int4-g64.pt) beside the checkpoint it read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from llm.checkpoint import (
    CheckpointError, atomic_torch_save, checkpoint_or_default_run, read_checkpoint, resolve_checkpoint,
)
from llm.cli import Parser
from llm.config import ModelConfig
from llm.quant import DEFAULT_GROUP_SIZE, GROUP_SIZES, check_format, quantization_of, quantize_model
from llm.transformer import Transformer

KEPT = ("model_config", "tokenizer_dir", "train_config", "iteration")  # keys copied from the float checkpoint


def build_parser() -> Parser:
    p = Parser(prog="python -m llm.quantize", description="Quantize a trained checkpoint's linear weights.")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or run directory (default: runs/demo)")
    p.add_argument("--bits", type=int, choices=(8, 4), default=8, help="8: per-row int8; 4: group-wise int4")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                   help="int4 only: input columns sharing one scale")
    p.add_argument("--out", alias=("--output",), default=None, help="where to write (default: beside the input)")
    return p


def default_out(src: Path, bits: int, group_size: int) -> Path:
    name = "quantized-int8.pt" if bits == 8 else f"quantized-int4-g{group_size}.pt"
    return src.parent / name


def quantize_checkpoint(src: Path, out: Path, bits: int, group_size: int) -> dict:
    """Read the float checkpoint `src`, write its quantized copy to `out`; returns the payload written."""
    ckpt = read_checkpoint(src)
    if "quantization" in ckpt:
        raise ValueError(f"{src} is already quantized ({ckpt['quantization']})")
    if "model_config" not in ckpt:
        raise ValueError(f"{src} is not a model checkpoint of this project (no 'model_config')")
    model = Transformer.from_config(ModelConfig.from_dict(dict(ckpt["model_config"])))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{src}: weights do not match its model_config ({str(e).splitlines()[-1].strip()})") from None
    check_format(bits, group_size, model.config.d_model)
    check_format(bits, group_size, model.config.d_ff)
    quantize_model(model, bits, group_size)
    payload = {k: ckpt[k] for k in KEPT if k in ckpt}
    payload.update(model=model.state_dict(), optimizer=None, quantization=quantization_of(model))
    atomic_torch_save(payload, out)
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        src = Path(resolve_checkpoint(checkpoint_or_default_run(args.checkpoint)))
        out = Path(args.out) if args.out else default_out(src, args.bits, args.group_size)
        quantize_checkpoint(src, out, args.bits, args.group_size)
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"{out}: int{args.bits}{'' if args.bits == 8 else f' group {args.group_size}'}, "
          f"{os.path.getsize(out):,} bytes (float checkpoint {os.path.getsize(src):,})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
