"""Inspect memmapped token arrays before spending compute on them.

    uv run inspect_data.py                           # data/demo, the default training run's data
    uv run inspect_data.py data/demo                 # a prepared directory (train.npy, val.npy, meta.json)
    uv run inspect_data.py data/demo/val.npy --tokenizer-dir data/demo/tokenizer
    uv run inspect_data.py data/demo --json          # machine-readable

Reports per array: dtype, tokens, bytes on disk; ids >= vocab size (an error); vocabulary use and
unigram entropy; the top-k tokens decoded with their share (a token holding part of a multi-byte
character, as byte-level BPE makes of CJK text, is shown as its bytes) and the share of the top 1% of the
vocabulary; the opening of the first document, decoded; special-token frequency and tokens per document (min/median/p99/max); what the training
sampler sees (distinct tokens per batch, repeated/overlapping windows over N batches, positional
coverage); and train/val n-gram overlap (leakage). Ends with a verdict line and warnings.

Arrays are never loaded whole: full passes run in chunks of 2M tokens. Up to ``--max-scan`` tokens
per array (default 1e9, ~2 GB of uint16) statistics are exact; beyond that they are computed on
evenly spread blocks and labelled "sampled". The sampler and leakage statistics are sampled by nature
and say how. Histograms go to img/ when matplotlib is installed (``uv sync --extra plot``).
"""

from __future__ import annotations

import codecs
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from llm.bpe import EOT
from llm.bpe_tokenizer import BpeTokenizer
from llm.cli import Parser, add_tokenizer_dir
from llm.data import open_tokens, read_range, unigram_entropy
from llm.train_config import TrainConfig

DEFAULT_DATA = str(Path(TrainConfig.train_data).parent)  # data/demo, what the default training run reads
CHUNK = 1 << 21
P_HASH = np.uint64(0x9E3779B97F4A7C15)  # odd, so it is invertible mod 2^64


class InspectError(ValueError):
    pass


# ----------------------------------------------------------------------------- scanning


def scan_blocks(n: int, max_scan: int) -> tuple[list[tuple[int, int]], bool]:
    """Chunks covering the whole array, or (beyond ``max_scan``) evenly spread blocks of it."""
    if n <= max_scan:
        return [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)], True
    k = max(1, max_scan // CHUNK)
    starts = np.linspace(0, n - CHUNK, k).astype(np.int64)
    return [(int(s), int(s) + CHUNK) for s in starts], False


def token_stats(arr: np.ndarray, vocab_size: int, eot_id: int | None, max_scan: int) -> dict:
    """Counts, out-of-vocab ids and document boundaries in one chunked pass."""
    blocks, exact = scan_blocks(len(arr), max_scan)
    counts = np.zeros(max(vocab_size, 1), dtype=np.int64)
    over = 0
    max_id = -1
    min_id = None
    eot_pos: list[np.ndarray] = []
    scanned = 0
    for s, e in blocks:
        c = read_range(arr, s, e)
        scanned += len(c)
        cmax, cmin = int(c.max()), int(c.min())
        max_id, min_id = max(max_id, cmax), cmin if min_id is None else min(min_id, cmin)
        c64 = c.astype(np.int64, copy=False)
        if cmax >= vocab_size or cmin < 0:
            bad = (c64 >= vocab_size) | (c64 < 0)
            over += int(bad.sum())
            c64 = c64[~bad]
        counts += np.bincount(c64, minlength=len(counts))[: len(counts)]
        if eot_id is not None and exact:
            eot_pos.append(np.flatnonzero(c == eot_id) + s)
    out = {"exact": exact, "scanned_tokens": scanned, "counts": counts, "ids_over_vocab": over, "max_id": max_id, "min_id": min_id}
    if eot_id is not None:
        out["eot_count"] = int(counts[eot_id]) if eot_id < len(counts) else 0
        if exact:
            pos = np.concatenate(eot_pos) if eot_pos else np.zeros(0, dtype=np.int64)
            # A document is a non-empty span ended by a separator (TinyStories layout: text, then
            # <|endoftext|>); what follows the last separator (often just "\n") is an unterminated tail.
            lens = np.diff(np.concatenate([[-1], pos])) - 1
            out["doc_lengths"] = lens[lens > 0] if len(pos) else None
            out["tail_tokens"] = int(len(arr) - 1 - pos[-1]) if len(pos) else None
    return out


def ngram_hash_chunk(c: np.ndarray, ns: list[int], pw: np.ndarray, ipw: np.ndarray) -> dict[int, np.ndarray]:
    """Polynomial hashes sum_k (t[i+k]+1) P^k mod 2^64 of every n-gram in ``c`` for each n, from one prefix sum."""
    v = c.astype(np.uint64) + np.uint64(1)
    m = len(v)
    s = np.zeros(m + 1, dtype=np.uint64)
    np.cumsum(v * pw[:m], out=s[1:])
    return {n: (s[n:] - s[: m - n + 1]) * ipw[: m - n + 1] for n in ns if m >= n}


def _powers(m: int) -> tuple[np.ndarray, np.ndarray]:
    inv = pow(int(P_HASH), -1, 1 << 64)
    pw = np.empty(m, dtype=np.uint64)
    ipw = np.empty(m, dtype=np.uint64)
    pw[0] = ipw[0] = 1
    # Doubling fill: pw[k:2k] = pw[:k] * P^k (uint64 arithmetic wraps mod 2^64, which is what we want).
    k = 1
    with np.errstate(over="ignore"):
        while k < m:
            step = min(k, m - k)
            pw[k : k + step] = pw[:step] * np.uint64(pow(int(P_HASH), k, 1 << 64))
            ipw[k : k + step] = ipw[:step] * np.uint64(pow(inv, k, 1 << 64))
            k += step
    return pw, ipw


def leakage(train: np.ndarray, val: np.ndarray, ns: list[int], samples: int, max_scan: int, seed: int = 0) -> dict:
    """Fraction of sampled val n-grams that also occur anywhere in (the scanned part of) train."""
    g = np.random.default_rng(seed)
    ns = [n for n in ns if len(val) >= n and len(train) >= n]
    if not ns:
        return {"skipped": "arrays shorter than the n-gram length"}
    pw, ipw = _powers(CHUNK + max(ns))
    targets = {}
    for n in ns:
        k = min(samples, len(val) - n + 1)
        pos = np.sort(g.choice(len(val) - n + 1, size=k, replace=False)) if k < len(val) - n + 1 else np.arange(len(val) - n + 1)
        w = np.asarray(val[pos[:, None] + np.arange(n)]).astype(np.uint64) + np.uint64(1)
        with np.errstate(over="ignore"):
            h = (w * pw[:n]).sum(axis=1, dtype=np.uint64)
        targets[n] = np.unique(h), len(pos)
    # A 2^22-bit prefilter keeps the exact membership test to a tiny fraction of train positions.
    masks = {}
    for n, (h, _) in targets.items():
        m = np.zeros(1 << 22, dtype=bool)
        m[(h >> np.uint64(42)).astype(np.int64)] = True
        masks[n] = m
    found = {n: np.zeros(len(targets[n][0]), dtype=bool) for n in ns}
    blocks, exact = scan_blocks(len(train), max_scan)
    with np.errstate(over="ignore"):
        for s, e in blocks:
            c = read_range(train, s, e + max(ns) - 1)  # n-1 tokens of overlap: n-grams across chunk edges
            for n, h in ngram_hash_chunk(c, ns, pw, ipw).items():
                cand = h[masks[n][(h >> np.uint64(42)).astype(np.int64)]]
                if len(cand):
                    found[n] |= np.isin(targets[n][0], cand)
    out = {"train_exact": exact, "val_samples": {n: targets[n][1] for n in ns}}
    for n in ns:
        # Share of distinct sampled val n-grams present in train (hash collisions: ~1e-19 per pair).
        out[f"{n}"] = float(found[n].mean()) if len(found[n]) else 0.0
    return out


def sampler_stats(arr: np.ndarray, batch_size: int, context_length: int, batches: int, eot_id: int | None, seed: int = 0) -> dict | None:
    """What the training sampler (uniform starts, as llm.data.get_batch) sees over ``batches`` batches."""
    n = len(arr)
    if n < context_length + 1:
        return None
    g = np.random.default_rng(seed)
    starts = g.integers(0, n - context_length, size=(batches, batch_size))
    distinct = []
    with_boundary = 0
    for b in range(batches):
        idx = starts[b][:, None] + np.arange(context_length + 1)
        w = np.asarray(arr[idx])
        distinct.append(len(np.unique(w)))
        if eot_id is not None:
            with_boundary += int((w == eot_id).any(axis=1).sum())
    flat = np.sort(starts.ravel())
    total = flat.size
    dup = total - len(np.unique(flat))
    gaps = np.diff(flat)
    overlapping = int((gaps < context_length + 1).sum())
    # Union of the windows [s, s + L] over all sampled starts: positions reached at least once.
    covered = int(np.minimum(np.diff(flat, append=flat[-1] + context_length + 1), context_length + 1).sum())
    expected = 1 - (1 - (context_length + 1) / n) ** total if n > context_length + 1 else 1.0
    return {
        "batches": batches,
        "batch_size": batch_size,
        "context_length": context_length,
        "distinct_tokens_per_batch_mean": float(np.mean(distinct)),
        "distinct_tokens_per_batch_min": int(np.min(distinct)),
        "repeated_windows": dup / total,
        "overlapping_windows": overlapping / total,
        "coverage": min(covered / n, 1.0),
        "coverage_expected_uniform": float(expected),
        "epochs": total * context_length / n,
        "windows_with_boundary": (with_boundary / total) if eot_id is not None else None,
    }


# ----------------------------------------------------------------------------- the report


def _load_tokenizer(tok_dir: Path | None):
    if tok_dir is None:
        return None, "no tokenizer given"
    if not tok_dir.is_dir():
        return None, f"tokenizer directory {tok_dir} not found"
    try:
        return BpeTokenizer.load(str(tok_dir)), None
    except Exception as e:  # report without decoded tokens rather than fail
        return None, f"cannot load tokenizer {tok_dir}: {e}"


def _resolve(target: Path, args) -> tuple[dict[str, Path], dict, Path | None]:
    """Arrays to inspect, meta (possibly empty) and the tokenizer directory."""
    if not target.exists():
        raise InspectError(f"{target}: no such file or directory")
    if target.is_dir():
        arrays = {s: target / f"{s}.npy" for s in ("train", "val") if (target / f"{s}.npy").exists()}
        if not arrays:
            raise InspectError(f"{target}: no train.npy or val.npy; prepare it with `uv run -m llm.data prepare --out {target} ...`")
        meta_dir = target
    else:
        arrays = {target.stem: target}
        meta_dir = target.parent
    meta_path = meta_dir / "meta.json"
    meta: dict = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise InspectError(f"{meta_path}: not valid JSON ({e})") from None
    elif args.vocab_size is None and args.tokenizer_dir is None:
        raise InspectError(f"{meta_path}: missing; pass --vocab-size N (and --tokenizer-dir DIR) or run `uv run -m llm.data prepare`")
    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else (meta_dir / meta["tokenizer_dir"] if "tokenizer_dir" in meta else None)
    return arrays, meta, tok_dir


def inspect(target: str | Path, args) -> dict:
    t0 = time.perf_counter()
    arrays, meta, tok_dir = _resolve(Path(target), args)
    tok, tok_note = _load_tokenizer(tok_dir)
    vocab = args.vocab_size or meta.get("vocab_size") or (tok.vocab_size if tok else None)
    if vocab is None:
        raise InspectError("unknown vocabulary size: pass --vocab-size N")
    eot_id = _eot_id(meta, tok)
    report: dict = {"target": str(target), "vocab_size": int(vocab), "eot_id": eot_id, "tokenizer": str(tok_dir) if tok_dir else None, "notes": []}
    if tok_note:
        report["notes"].append(tok_note)
    warnings: list[str] = []
    errors: list[str] = []
    opened = {}
    for split, path in arrays.items():
        arr = open_tokens(path)  # structure only: out-of-vocab ids are counted below, not raised
        opened[split] = arr
        st = token_stats(arr, vocab, eot_id, args.max_scan)
        report[split] = r = _array_report(path, arr, st, vocab, eot_id, tok, args)
        _array_findings(split, arr, st, r, vocab, eot_id, len(arrays) == 1, args, warnings, errors)
    if Path(target).is_dir() and "val" not in opened:
        warnings.append("no val split (val.npy missing)")
    _val_findings(report, opened, args, warnings)
    report["warnings"] = warnings
    report["errors"] = errors
    report["verdict"] = "ERROR" if errors else ("WARN" if warnings else "OK")
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _eot_id(meta: dict, tok) -> int | None:
    """The document separator's id: meta.json's, else the tokenizer's (None when neither has one)."""
    eot_id = meta.get("eot_id")
    if eot_id is None and tok is not None:
        try:
            eot_id = tok.token_id(EOT)
        except Exception:
            eot_id = None
    return eot_id


def _array_report(path: Path, arr: np.ndarray, st: dict, vocab: int, eot_id: int | None, tok, args) -> dict:
    """One array's section of the report, from its token_stats ``st`` (whose counts it takes)."""
    counts = st.pop("counts")
    total = int(counts.sum())
    k = max(1, math.ceil(vocab / 100))
    top_sorted = np.sort(counts)[::-1]
    order = np.argsort(counts)[::-1][: args.top_k]
    r = {
        "path": str(path),
        "dtype": str(arr.dtype),
        "tokens": int(len(arr)),
        "bytes_on_disk": path.stat().st_size,
        "stats": "exact (full pass)" if st["exact"] else f"sampled ({st['scanned_tokens'] / len(arr):.1%} of tokens in {CHUNK:,}-token blocks)",
        "max_id": st["max_id"],
        "ids_over_vocab": st["ids_over_vocab"],
        "vocab_used": int((counts > 0).sum()),
        "unigram_entropy_nats": unigram_entropy(counts) if total else None,
        "top1pct_ids": k,
        "top1pct_share": float(top_sorted[:k].sum() / total) if total else None,
        "top_tokens": [{"id": int(i), "share": float(counts[i] / total), **_token_text(tok, int(i))} for i in order if counts[i] > 0],
        "sample": _sample(arr, tok, eot_id),
    }
    if eot_id is not None:
        r["eot_count"] = st["eot_count"]
        r["eot_share"] = st["eot_count"] / total if total else 0.0
        dl = st.get("doc_lengths")
        if dl is not None and len(dl):
            r["documents"] = {
                "count": int(len(dl)),
                "min": int(dl.min()),
                "median": float(np.median(dl)),
                "p99": float(np.percentile(dl, 99)),
                "max": int(dl.max()),
                "mean": float(dl.mean()),
            }
            r["documents"]["unterminated_tail_tokens"] = st["tail_tokens"]
            r["_doc_lengths"] = dl
    r["sampler"] = sampler_stats(arr, args.batch_size, args.context_length, args.batches, eot_id)
    r["_counts"] = counts
    return r


def _array_findings(
    split: str, arr: np.ndarray, st: dict, r: dict, vocab: int, eot_id: int | None, only: bool, args,
    warnings: list[str], errors: list[str],
) -> None:
    """The warnings and errors about one array (``only``: the sole array inspected), appended to the lists."""
    if st["ids_over_vocab"] or st["min_id"] < 0:
        errors.append(f"{split}: {st['ids_over_vocab']:,} ids exceed vocab (max id {st['max_id']} >= {vocab})")
    if r["vocab_used"] < 0.5 * vocab and (split == "train" or only):  # a small val cannot cover it
        warnings.append(f"{split}: vocab mostly unused ({r['vocab_used']:,} of {vocab:,} ids appear)")
    if arr.dtype.itemsize > 2 and vocab <= 65536:
        warnings.append(f"{split}: dtype {arr.dtype} for a vocab of {vocab:,}; uint16 would halve the file")
    if eot_id is not None and st["eot_count"] == 0:
        warnings.append(f"{split}: no document separators (id {eot_id}); documents run together")
    if len(arr) < args.context_length + 1:
        errors.append(f"{split}: {len(arr)} tokens, shorter than context_length + 1 = {args.context_length + 1}")


def _val_findings(report: dict, opened: dict[str, np.ndarray], args, warnings: list[str]) -> None:
    """Val size against a few batches and against train, and train/val leakage (into report["leakage"])."""
    if "val" in report:
        vt = report["val"]["tokens"]
        need = 4 * args.batch_size * (args.context_length + 1)
        if vt < need:
            warnings.append(f"val tiny ({vt:,} tokens < 4 batches of {args.batch_size}x{args.context_length + 1})")
        elif "train" in report and vt < 0.001 * report["train"]["tokens"]:
            warnings.append(f"val tiny ({vt / report['train']['tokens']:.3%} of train)")
    if "train" in opened and "val" in opened:
        lk = leakage(opened["train"], opened["val"], args.ngram, args.leak_samples, args.max_scan)
        report["leakage"] = lk
        longest = max((n for n in args.ngram if str(n) in lk), default=None)
        if longest is not None and lk[str(longest)] > 0.1:
            warnings.append(f"train/val leakage: {lk[str(longest)]:.0%} of val {longest}-grams occur in train")


def _plots(report: dict, img_dir: Path) -> list[str] | str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "histograms skipped: matplotlib is not installed (install it with `uv sync --extra plot`)"
    img_dir.mkdir(parents=True, exist_ok=True)
    name = Path(report["target"]).resolve().name.removesuffix(".npy") or "data"
    written = []
    for split in ("train", "val"):
        r = report.get(split)
        if not r:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        c = np.sort(r["_counts"][r["_counts"] > 0])[::-1]
        axes[0].loglog(np.arange(1, len(c) + 1), c / c.sum())
        axes[0].set(title=f"{name}/{split}: token rank vs frequency", xlabel="rank", ylabel="share")
        dl = r.get("_doc_lengths")
        if dl is not None:
            axes[1].hist(dl, bins=60)
            axes[1].set(title="tokens per document", xlabel="tokens", ylabel="documents")
        else:
            axes[1].axis("off")
        fig.tight_layout()
        out = img_dir / f"data_{name}_{split}.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        written.append(str(out))
    return written


def _token_text(tok, i: int) -> dict:
    """{"text": the token decoded} when its bytes are whole UTF-8 characters; {"text": None, "bytes": hex} when
    they are part of one (decoding would show U+FFFD); {"text": None} without a tokenizer or for an unknown id."""
    b = tok.vocab.get(i) if tok else None
    if b is None:
        return {"text": None}
    try:
        return {"text": b.decode("utf-8")}
    except UnicodeDecodeError:
        return {"text": None, "bytes": b.hex()}


def _sample(arr: np.ndarray, tok, eot_id: int | None, chars: int = 80, window: int = 512) -> str | None:
    """The opening ``chars`` characters of the array's first document (after a leading separator), decoded;
    a multi-byte character cut by the window's end is left out rather than shown as U+FFFD."""
    if tok is None:
        return None
    ids = read_range(arr, 0, window).tolist()
    if eot_id is not None:
        while ids and ids[0] == eot_id:
            ids.pop(0)
        ids = ids[: ids.index(eot_id)] if eot_id in ids else ids
    data = b"".join(tok.vocab.get(int(i), b"") for i in ids)
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=False)
    return text.strip()[:chars]


def _tok_repr(t: dict) -> str:
    if t["text"] is not None:
        return repr(t["text"])
    return repr(bytes.fromhex(t["bytes"])) if "bytes" in t else f"#{t['id']}"


def format_report(rep: dict) -> str:
    L = [f"inspect_data: {rep['target']}  (vocab {rep['vocab_size']:,}, tokenizer {rep['tokenizer']}, separator id {rep['eot_id']})"]
    for split in ("train", "val") + tuple(k for k in rep if k not in ("train", "val") and isinstance(rep[k], dict) and "dtype" in rep[k]):
        r = rep.get(split)
        if not r:
            continue
        L.append(f"{Path(r['path']).name}: {r['dtype']}, {r['tokens']:,} tokens, {r['bytes_on_disk'] / 1e6:.1f} MB on disk  [counts: {r['stats']}]")
        ok = "ok" if not r["ids_over_vocab"] else f"{r['ids_over_vocab']:,} ids >= vocab: ERROR"
        ent = r["unigram_entropy_nats"]
        L.append(
            f"  ids: max {r['max_id']} vs vocab {rep['vocab_size']:,}: {ok}; vocab used {r['vocab_used']:,}/{rep['vocab_size']:,} "
            f"({r['vocab_used'] / rep['vocab_size']:.1%}); unigram entropy {ent:.3f} nats = {ent / math.log(2):.3f} bits/token"
        )
        L.append("  top tokens: " + ", ".join(f"{_tok_repr(t)} {t['share']:.1%}" for t in r["top_tokens"]))
        L.append(f"  top 1% of vocab ({r['top1pct_ids']} ids) covers {r['top1pct_share']:.1%} of tokens")
        if r.get("sample") is not None:
            L.append(f"  first document: {r['sample']!r}")
        if "eot_count" in r:
            line = f"  separator: {r['eot_count']:,} ({r['eot_share']:.2%} of tokens)"
            d = r.get("documents")
            if d:
                line += f"; tokens/document: min {d['min']}, median {d['median']:.0f}, p99 {d['p99']:.0f}, max {d['max']} (mean {d['mean']:.1f})"
            L.append(line)
        s = r.get("sampler")
        if s:
            wb = f"; windows containing a document boundary {s['windows_with_boundary']:.0%}" if s["windows_with_boundary"] is not None else ""
            L.append(
                f"  sampler ({s['batches']} batches x {s['batch_size']} x {s['context_length']}, sampled): distinct tokens/batch "
                f"mean {s['distinct_tokens_per_batch_mean']:.0f} (min {s['distinct_tokens_per_batch_min']}); repeated windows "
                f"{s['repeated_windows']:.2%}, overlapping {s['overlapping_windows']:.1%}; positional coverage {s['coverage']:.1%} "
                f"(uniform expectation {s['coverage_expected_uniform']:.1%}, {s['epochs']:.2f} epochs){wb}"
            )
    lk = rep.get("leakage")
    if lk and "skipped" not in lk:
        parts = ", ".join(f"{n}-grams {lk[str(n)]:.1%}" for n in lk["val_samples"])
        samples = ", ".join(f"{v:,}" for v in lk["val_samples"].values())
        L.append(f"leakage: val n-grams also in train: {parts}  [val: {samples} sampled positions; train: {'exact full pass' if lk['train_exact'] else 'sampled blocks'}]")
    for note in rep["notes"]:
        L.append(f"note: {note}")
    verdict = rep["verdict"]
    detail = "; ".join(rep["errors"] + rep["warnings"])
    L.append(f"verdict: {verdict}" + (f": {detail}" if detail else "") + f"  ({rep['seconds']:.1f}s)")
    return "\n".join(L)


def _target(given: str | None) -> str:
    """The target as given, or the default training run's data, which may not be prepared yet."""
    if given is not None:
        return given
    if not (Path(DEFAULT_DATA) / "meta.json").is_file():
        raise InspectError(f"no prepared data in {DEFAULT_DATA} yet: run uv run -m llm.data demo "
                           "(or uv run -m llm.training, which prepares it) first")
    return DEFAULT_DATA


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="inspect_data.py", description="Sanity-check memmapped token arrays.")
    ap.add_argument("target", nargs="?", default=None,
                    help=f"prepared directory (train.npy/val.npy/meta.json) or one .npy file (default {DEFAULT_DATA})")
    add_tokenizer_dir(ap, "tokenizer directory (default: from meta.json)")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: from meta.json or the tokenizer")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON")
    ap.add_argument("--top-k", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--batches", type=int, default=100, help="sampler batches to simulate")
    ap.add_argument("--ngram", type=int, action="append", default=None, help="n-gram lengths for leakage (default 13 and 50)")
    ap.add_argument("--leak-samples", type=int, default=10_000, help="val positions sampled for leakage")
    ap.add_argument("--max-scan", type=float, default=1e9, help="tokens per array scanned exactly; beyond: sampled blocks")
    ap.add_argument("--img-dir", default="img", help="where histograms go when matplotlib is installed")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    args.ngram = sorted(set(args.ngram or [13, 50]))
    args.max_scan = int(args.max_scan)
    for name in ("top_k", "batch_size", "context_length", "batches", "leak_samples", "max_scan"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        rep = inspect(_target(args.target), args)
    except (InspectError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.no_plot:
        plots = _plots(rep, Path(args.img_dir))
        if isinstance(plots, str):
            rep["notes"].append(plots)
        else:
            rep["plots"] = plots
    for split in ("train", "val", *rep.keys()):
        if isinstance(rep.get(split), dict):
            rep[split].pop("_counts", None)
            rep[split].pop("_doc_lengths", None)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        text = format_report(rep)
        if rep.get("plots"):
            text = text.replace("\nverdict:", "\nplots: " + ", ".join(rep["plots"]) + "\nverdict:")
        print(text)
    return 1 if rep["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
