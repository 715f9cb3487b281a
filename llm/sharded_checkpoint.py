"""Sharded checkpoints of FSDP runs: torch.distributed.checkpoint (DCP) directories.

    RUN_DIR/checkpoints/step_NNNNNNN.dcp/
        __0_0.distcp, __1_0.distcp, ...   each rank's shard of the weights and of the AdamW state (DCP)
        .metadata                          DCP's index: which bytes of which file hold which slice of which tensor
        meta.pt                            iteration, configs, RNG, best_val, ... (torch.save, weights_only-loadable)
        SHA256SUMS                         sha256 of every other file (`sha256sum -c` format)

Atomic as a whole: every rank writes its shard into .tmp-step_NNNNNNN.dcp-<random>/; when all are done,
rank 0 writes meta.pt and SHA256SUMS there and renames the directory to its name. A kill at any moment leaves
at most a .tmp- directory, which no resume picks (its name is not step_N.dcp) and the next save removes.

DCP maps slices, not files, so a checkpoint saved by W ranks loads on any other world size, sharded (FSDP)
or whole (one process, DDP). Only tensors go through DCP (it reads any other value back with a full
unpickler); everything else is in meta.pt, which loads with weights_only=True.

This module is the format (names, checksums, publishing, meta.pt); the DCP calls live in llm.fsdp with the
rest of FSDP, imported on first use (`fsdp_module`).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from llm.fileio import sha256_of, write_text

DCP_SUFFIX = ".dcp"
META = "meta.pt"
MANIFEST = "SHA256SUMS"
TMP_PREFIX = ".tmp-"  # as llm.checkpoint's temp files: never a step_N name


class ShardedCheckpointError(ValueError):
    """A sharded checkpoint that cannot be used (incomplete, damaged); the message is one line."""


def fsdp_module() -> ModuleType:
    """llm.fsdp (FSDP2 and the DCP reads and writes), imported on first use: torch.distributed.fsdp and
    torch.distributed.checkpoint import DTensor and with it torch.fx's symbolic shapes, ~5 s per process,
    which only fsdp runs and sharded checkpoints need (the same reason llm.fast.optimizer avoids dynamo)."""
    return importlib.import_module("llm.fsdp")


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    with open(directory / META, "xb") as f:
        torch.save(meta, f)
        f.flush()
        os.fsync(f.fileno())


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    return Path(path).name.endswith(DCP_SUFFIX) and Path(path).is_dir()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    write_text(directory / MANIFEST, "".join(f"{sha256_of(p)}  {p.name}\n" for p in files))


def publish(tmp: Path, path: Path) -> None:
    """Rename the finished temp directory to `path`. An existing `path` (best.dcp) is first renamed aside and
    removed after, so at every moment the name holds a whole checkpoint or nothing."""
    old = path.with_name(f"{TMP_PREFIX}{path.name}-old-{os.urandom(4).hex()}") if path.exists() else None
    if old is not None:
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_sharded(path: Path) -> None:
    """Every file SHA256SUMS lists is there with its digest, and DCP's index and meta.pt are among them."""
    try:
        lines = (path / MANIFEST).read_text().splitlines()
    except OSError:
        raise ShardedCheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST}") from None
    listed = {}
    for line in lines:
        m = re.fullmatch(r"([0-9a-f]{64})  (\S+)", line)
        if m is None:
            raise ShardedCheckpointError(f"checkpoint {path} is corrupt: bad line in {MANIFEST}: {line[:60]!r}")
        listed[m.group(2)] = m.group(1)
    for name in (".metadata", META):
        if name not in listed:
            raise ShardedCheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} lists no {name}")
    for name, digest in listed.items():
        if not (path / name).is_file():
            raise ShardedCheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256_of(path / name) != digest:
            raise ShardedCheckpointError(f"checkpoint {path} is corrupt: checksum mismatch in {name}")


def read_sharded_meta(path: Path) -> dict[str, Any]:
    """meta.pt of a verified checkpoint: iteration, model_config, train_config, rng, best_val, ..."""
    verify_sharded(path)
    return torch.load(path / META, map_location="cpu", weights_only=True)
