"""Checkpoints without pickle: a checkpoint dict as a .safetensors file of its tensors and a JSON sidecar of
everything else (llm.checkpoint writes and reads the pair; this module only converts).

    step_0000100.safetensors          every tensor of the dict, named by its place in it:
                                      "model/layers.0.attn.q_proj.weight", "optimizer/state/0/exp_avg", "rng/torch"
    step_0000100.safetensors.sha256   its digest, as beside a .pt checkpoint
    step_0000100.json                 the dict with each tensor replaced by {"__tensor__": name}: the iteration,
                                      configs, optimizer hyperparameters, RNG positions; and the tensor file's sha256

JSON holds str-keyed dicts, lists, strings, numbers, booleans and None. Floats are written by repr, so they
read back bit for bit (inf and nan as Python's json writes them, Infinity and NaN). Tuples and dicts with
other keys (the optimizer's state, keyed by parameter index) are written as {"__tuple__": [...]} and
{"__items__": [[key, value], ...]} so that they read back as they were. Reading runs no code: safetensors
parses a header and copies bytes, json parses text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"
MARKERS = (TENSOR, TUPLE, ITEMS)
SIDECAR_FORMAT = "llm checkpoint: tensors in a .safetensors file, the rest here"


def sidecar_path(path: str | Path) -> Path:
    """The JSON state file of a safetensors checkpoint: X.safetensors -> X.json."""
    return Path(path).with_suffix(".json")


class _Splitter:
    """Walks a checkpoint dict, collecting its tensors under path names. A tensor met twice (tied
    embeddings) is stored once and referenced twice; one that only overlaps another's storage is copied,
    as safetensors stores no shared memory."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.names: dict[tuple, str] = {}  # the identity of a tensor view -> its stored name
        self.storages: set[tuple] = set()

    def tensor(self, t: torch.Tensor, name: str) -> dict[str, str]:
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in self.names:
            return {TENSOR: self.names[view]}
        while name in self.tensors:
            name += "'"
        shared = t.numel() > 0 and storage in self.storages
        self.storages.add(storage)
        self.names[view] = name
        self.tensors[name] = t.to("cpu").clone() if shared else t.to("cpu").contiguous()
        return {TENSOR: name}

    def split(self, obj: Any, name: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, name)
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj) and not any(m in obj for m in MARKERS):
                return {k: self.split(v, f"{name}/{k}") for k, v in obj.items()}
            bad = [k for k in obj if not (k is None or isinstance(k, (bool, int, float, str)))]
            if bad:
                raise ValueError(f"cannot save {name} in a safetensors checkpoint: key {bad[0]!r} is not a number or string")
            return {ITEMS: [[k, self.split(v, f"{name}/{k}")] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            items = [self.split(v, f"{name}/{i}") for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else {TUPLE: items}
        raise ValueError(f"cannot save {name} in a safetensors checkpoint: type {type(obj).__name__} "
                         "(use tensors, numbers, strings, lists, tuples or dicts)")


def split_tensors(payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the JSON-ready skeleton of `payload`, its tensors by name, on the CPU and contiguous)."""
    s = _Splitter()
    skeleton = {k: s.split(v, k) for k, v in payload.items()}
    return skeleton, s.tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of split_tensors; KeyError naming a tensor the skeleton refers to and `tensors` lacks."""
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if set(skeleton) == {TENSOR}:
        return tensors[skeleton[TENSOR]]
    if set(skeleton) == {TUPLE}:
        return tuple(join_tensors(v, tensors) for v in skeleton[TUPLE])
    if set(skeleton) == {ITEMS}:
        return {k: join_tensors(v, tensors) for k, v in skeleton[ITEMS]}
    return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
