"""Weight-only quantization for inference: int8 per output row, int4 per group of input columns.

int8 (torchao's int8 weight-only scheme): per output row o, symmetric absmax,
    s_o = max_i |W[o i]| / 127,   q[o i] = round(W[o i] / s_o) ∈ [-127, 127],   Ŵ[o i] = s_o q[o i]
int4, group size g: per row o and group j of g input columns, symmetric absmax,
    s_oj = max_{i ∈ j} |W[o i]| / 7,   q[o i] = round(W[o i] / s_oj) ∈ [-7, 7],  stored as q + 8 in a nibble,
two per byte (column 2k in the low nibble, 2k+1 in the high one).
Symmetric (zero-point 0) in both: dequantization is one multiply, merged weights are concatenated rows and
scales, and the rounding error is at most s/2 per weight. Asymmetric int4 would use the one wasted level
(-8) and fit skewed groups better, at the price of a zero-point tensor and a subtract per group.

Only the linear maps inside the blocks (q/k/v/output, w1/w2/w3) are quantized. Embeddings, RMSNorm gains
and lm_head stay fp32: the embedding is a lookup (no matmul to speed up) and may be tied to lm_head;
lm_head's errors go straight into the logits, and the fused loss (`linear_cross_entropy`) reads its weight.

The matmul never dequantizes a whole matrix. int8 kernels (INT8_KERNEL says which is the default and why):
"compiled", one fused loop per output row that converts, multiplies and sums (torch.compile of
`_int8_rows`, for decode-sized fp32 inputs on CPU); "chunked", blocks of CHUNK_BYTES of output rows
converted and multiplied one at a time; "aten", `torch.ops.aten._weight_int8pack_mm` where this torch has it
(detected at run time). int4 unpacks and dequantizes per block like "chunked". Inference only.
"""

from __future__ import annotations

import logging
import sys
from typing import NamedTuple

import torch
from torch import Tensor, nn

FORMAT_VERSION = 1
BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
QUANTIZED = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")  # Linear names swapped per block
CHUNK_BYTES = 1 << 18  # fp32 bytes of one dequantized block of rows (256 KiB: stays in L2)
HAS_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")  # recent torch only
INT8_KERNELS = ("compiled", "aten", "chunked")
# The default int8 kernel: "compiled" (fp32 inputs of at most COMPILED_MAX_ROWS rows on CPU; chunked for the
# rest, and wherever Inductor cannot build it, e.g. no C compiler). Batch-1 KV-cache decode vs fp32, one
# thread on a shared 2-core AVX-512 CPU, torch 2.15, interleaved paired medians (kernel/results/quant_cpu.md):
# compiled 1.07-2.36x (tinystories) and 3.08-3.35x (small), chunked 0.72-1.13x, "aten" (_weight_int8pack_mm)
# 0.26-0.42x. Per product, chunked is 0.6-0.9x the fp32 GEMV: converting each block int8 -> fp32 is a second
# pass over 4 bytes per weight (764 of 1223 µs on 6144x768), then one small GEMM per block. The compiled
# kernel is one fused loop per row (convert, multiply, sum, scale) that reads each int8 weight once: 1.5-6.1x
# the fp32 GEMV per shape, plus 4-40 µs of Dynamo overhead per call. Its first call builds it (10-20 s here,
# once per process).
INT8_KERNEL = "compiled"
COMPILED_MAX_ROWS = 16  # its time grows with the rows: at 32 it is level with chunked (6144x768, one thread)


class QuantWeight(NamedTuple):
    """A quantized (out in) matrix: q int8 (out in) for 8 bits, uint8 (out in/2) packed for 4; scale fp32
    (out,) for 8 bits, (out in/g) for 4."""

    q: Tensor
    scale: Tensor
    bits: int
    group_size: int  # 0 for int8 (one scale per row)


def check_format(bits: int, group_size: int, in_features: int | None = None) -> None:
    """One clear ValueError for an unsupported bit width or group size (or one not dividing in_features)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if bits == 4 and in_features is not None and in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the input width {in_features}")


def _absmax_scale(w: Tensor, qmax: int) -> Tensor:
    """max |w| / qmax over the last dim, in fp32; an all-zero row gets scale 1 (its q are all 0)."""
    amax = w.detach().abs().amax(dim=-1).float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def pack_int4(q: Tensor) -> Tensor:
    """int8 values in [-8, 7], (... 2n) -> uint8 (... n): column 2k in the low nibble, 2k+1 in the high."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: Tensor) -> Tensor:
    """uint8 (... n) -> int8 (... 2n) in [-8, 7]: the inverse of pack_int4."""
    lo, hi = (p & 0xF).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def quantize(w: Tensor, bits: int = 8, group_size: int = 64) -> QuantWeight:
    """The QuantWeight of a float (out in) matrix (see the module docstring)."""
    check_format(bits, group_size, w.shape[1])
    if bits == 8:
        scale = _absmax_scale(w, 127)
        q = torch.round(w.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantWeight(q, scale, 8, 0)
    groups = w.float().unflatten(1, (-1, group_size))  # (out in/g g)
    scale = _absmax_scale(groups, 7)
    q = torch.round(groups / scale[..., None]).clamp_(-7, 7).to(torch.int8).flatten(1)
    return QuantWeight(pack_int4(q), scale, 4, group_size)


def dequantize_rows(w: QuantWeight, start: int = 0, stop: int | None = None, dtype=torch.float32) -> Tensor:
    """Ŵ[start:stop] (rows in) in `dtype`: only those rows are unpacked and scaled."""
    q, scale = w.q[start:stop], w.scale[start:stop].to(dtype)
    if w.bits == 8:
        return q.to(dtype) * scale[:, None]
    rows = unpack_int4(q).to(dtype).unflatten(1, (-1, w.group_size))
    return (rows * scale[..., None]).flatten(1)


def _chunked_matmul(x: Tensor, w: QuantWeight) -> Tensor:
    """x Ŵᵀ for x (n in), dequantizing CHUNK_BYTES of rows at a time into one block, never the whole Ŵ.
    int8: the block is q converted, unscaled; the per-row scales multiply the (n out) result once instead
    (x (s q)ᵀ = (x qᵀ) s), one pass over the block fewer."""
    out_features = w.q.shape[0]
    in_features = x.shape[1]
    rows = max(1, CHUNK_BYTES // (4 * in_features))
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        block = w.q[start:stop].to(x.dtype) if w.bits == 8 else dequantize_rows(w, start, stop, x.dtype)
        torch.mm(x, block.t(), out=out[:, start:stop])
    return out.mul_(w.scale.to(x.dtype)) if w.bits == 8 else out


def _int8_rows(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x Ŵᵀ = (Σ_i x[n i] q[o i]) s_o written as one elementwise product and a row sum, which Inductor
    fuses into a single loop over q (no fp32 copy of any block of Ŵ) for the "compiled" kernel."""
    return (x[:, None, :] * q.to(x.dtype)).sum(-1) * scale


class _Compiled:
    """The "compiled" int8 kernel: `_int8_rows` through torch.compile (Inductor's C++ backend), built on the
    first call; if that fails (no C compiler, no Inductor on this platform) it says so once and the
    chunked kernel serves instead."""

    fn = None
    failed = False

    @classmethod
    def matmul(cls, x: Tensor, w: QuantWeight) -> Tensor:
        if not cls.failed:
            try:
                if cls.fn is None:  # the build takes seconds: say why the first token waits
                    print("int8: compiling the decode kernel (torch.compile, once per process)", file=sys.stderr)
                    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU builds
                    cls.fn = torch.compile(_int8_rows, dynamic=True)
                return cls.fn(x, w.q, w.scale)
            except Exception as e:  # noqa: BLE001 - any build failure means: use the chunked kernel
                cls.failed = True
                print(f"warning: compiled int8 kernel unavailable ({type(e).__name__}); using chunked",
                      file=sys.stderr)
        return _chunked_matmul(x, w)


def _use_compiled(x: Tensor, w: QuantWeight) -> bool:
    return w.bits == 8 and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= COMPILED_MAX_ROWS


def quant_matmul(x: Tensor, w: QuantWeight, kernel: str | None = None) -> Tensor:
    """x Ŵᵀ for x (... in). int8: `kernel` "compiled" (default INT8_KERNEL: fp32 CPU inputs of at most
    COMPILED_MAX_ROWS rows, chunked otherwise), "aten" (_weight_int8pack_mm, where this torch has it) or
    "chunked"; int4: always chunked (unpacked per block)."""
    x2 = x.reshape(-1, x.shape[-1])
    kernel = kernel or INT8_KERNEL
    if kernel not in INT8_KERNELS:
        raise ValueError(f"kernel must be one of {INT8_KERNELS}, got {kernel!r}")
    if w.bits == 8 and kernel == "aten" and HAS_INT8PACK and x2.dtype in (torch.float32, torch.bfloat16):
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), w.q, w.scale.to(x2.dtype))
    elif kernel == "compiled" and _use_compiled(x2, w):
        y = _Compiled.matmul(x2, w)
    else:
        y = _chunked_matmul(x2, w)
    return y.view(*x.shape[:-1], w.q.shape[0])


class QuantLinear(nn.Module):
    """Inference-only y = x Ŵᵀ: buffers weight_q and scale (a QuantWeight), no parameters, no backward.
    Built from a float Linear by `from_linear` or empty (zeros) to load a quantized state dict into."""

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int = 64,
                 device=None) -> None:
        super().__init__()
        check_format(bits, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, (group_size if bits == 4 else 0)
        if bits == 8:
            q = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            scale = torch.ones(out_features, device=device)
        else:
            q = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
            scale = torch.ones(out_features, in_features // group_size, device=device)
        self.register_buffer("weight_q", q)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int = 8, group_size: int = 64) -> "QuantLinear":
        w = linear.weight
        m = cls(w.shape[1], w.shape[0], bits, group_size, device=w.device)
        qw = quantize(w, bits, group_size)
        m.weight_q, m.scale = qw.q, qw.scale
        return m

    @property
    def qweight(self) -> QuantWeight:
        return QuantWeight(self.weight_q, self.scale, self.bits, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("QuantLinear is inference-only: no backward through quantized weights")
        return quant_matmul(x, self.qweight)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


def prepare_decode(model: nn.Module) -> None:
    """Build the compiled int8 kernel now, while the model loads, rather than at the first generated token
    (where its message would cut into the streamed text): one 1-row product through the first int8 layer."""
    layer = next((m for m in model.modules() if isinstance(m, QuantLinear) and m.bits == 8), None)
    if layer is None or INT8_KERNEL != "compiled":
        return
    x = torch.zeros(1, layer.in_features, device=layer.weight_q.device)
    if _use_compiled(x, layer.qweight):
        with torch.no_grad():
            quant_matmul(x, layer.qweight)


def _targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every block Linear that quantization replaces."""
    return [(parent, name) for block in model.layers for parent in (block.attn, block.ffn)
            for name in QUANTIZED if hasattr(parent, name)]


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 8, group_size: int = 64) -> nn.Module:
    """Replace the block Linears of a Transformer by QuantLinears in place, one at a time (each float
    weight is freed as its quantized copy is made); returns the model, in eval mode."""
    for parent, name in _targets(model):
        setattr(parent, name, QuantLinear.from_linear(getattr(parent, name), bits, group_size))
    return model.eval()


def empty_quantized(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """`model` with empty QuantLinears in place of its block Linears: the shape a quantized state dict
    loads into."""
    for parent, name in _targets(model):
        lin = getattr(parent, name)
        w = lin.weight
        setattr(parent, name, QuantLinear(w.shape[1], w.shape[0], bits, group_size, device=w.device))
    return model.eval()


def quantization_of(model: nn.Module) -> dict | None:
    """The "quantization" record of a quantized model ({bits, group_size, format_version}), or None."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not mods:
        return None
    return {"bits": mods[0].bits, "group_size": mods[0].group_size, "format_version": FORMAT_VERSION}


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the block linear weights (and their scales, when quantized)."""
    total = 0
    for parent, name in _targets(model):
        m = getattr(parent, name)
        tensors = (m.weight_q, m.scale) if isinstance(m, QuantLinear) else (m.weight,)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


QUANTIZE_CHOICES = {"int8": 8, "int4": 4}  # --quantize NAME -> bits (int4 with DEFAULT_GROUP_SIZE)
DEFAULT_GROUP_SIZE = 64


def check_record(record: object, src: object) -> tuple[int, int]:
    """(bits, group_size) of a checkpoint's "quantization" record; one clear ValueError if it is not one
    this code reads."""
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{src}: unknown quantization record {record!r} (this code reads format_version "
                         f"{FORMAT_VERSION})")
    bits, group_size = record.get("bits"), record.get("group_size")
    check_format(bits, group_size)
    return bits, group_size


def load_quantized_state(model: nn.Module, state_dict: dict[str, Tensor], src: object) -> None:
    """Load a quantized state dict into a model built by `empty_quantized`: one clear ValueError naming the
    first tensor whose name, shape or dtype (int8 vs packed int4) does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{src}: quantized weights do not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for k, v in expected.items():
        got = state_dict[k]
        if got.shape != v.shape or got.dtype != v.dtype:
            raise ValueError(f"{src}: {k} is {got.dtype} {tuple(got.shape)}, the model needs {v.dtype} "
                             f"{tuple(v.shape)} (wrong model shape or bit width)")
    model.load_state_dict(state_dict)
