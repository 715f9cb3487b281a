"""A syrupy extension that stores reference tensors as `.npz` and compares them with tolerances.

Snapshots hold outputs of *independent* references (torch built-ins, float64 math, tiktoken), never
our own code's output. A test hands the live reference to `ref_snapshot(...)`, which asserts that the
stored snapshot still equals it (or stores it under `--snapshot-update`) and returns the stored arrays
so that the test compares our output against what is on disk.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from syrupy.assertion import SnapshotAssertion
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

ArrayLike = torch.Tensor | np.ndarray | float | int


def _to_numpy(value: ArrayLike) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


class NpzSnapshotExtension(SingleFileSnapshotExtension):
    """One `.npz` file per snapshot; `matches` checks names, dtypes, shapes and values within rtol/atol."""

    file_extension = "npz"
    _write_mode = WriteMode.BINARY
    rtol: float = 1e-6
    atol: float = 1e-6

    def serialize(self, data: Mapping[str, ArrayLike], **_: Any) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **{k: _to_numpy(v) for k, v in sorted(data.items())})
        return buf.getvalue()

    @staticmethod
    def load(blob: bytes) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(blob), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def matches(self, *, serialized_data: bytes, snapshot_data: bytes) -> bool:
        new, old = self.load(serialized_data), self.load(snapshot_data)
        if new.keys() != old.keys():
            return False
        for k in new:
            a, b = new[k], old[k]
            if a.dtype != b.dtype or a.shape != b.shape:
                return False
            if a.dtype.kind in "fc":
                if not np.allclose(a, b, rtol=self.rtol, atol=self.atol, equal_nan=True):
                    return False
            elif not np.array_equal(a, b):
                return False
        return True


class RefSnapshot:
    """Callable fixture: `stored = ref_snapshot({"y": reference_y}, rtol=..., atol=...)`."""

    def __init__(self, snapshot: SnapshotAssertion) -> None:
        self.snapshot = snapshot
        self.calls = 0

    def __call__(
        self,
        reference: Mapping[str, ArrayLike],
        *,
        rtol: float = 1e-6,
        atol: float = 1e-6,
        name: str | None = None,
    ) -> dict[str, torch.Tensor]:
        name = name or ("ref" if self.calls == 0 else f"ref{self.calls}")
        self.calls += 1
        ext = type("NpzSnapshot", (NpzSnapshotExtension,), {"rtol": rtol, "atol": atol})
        snap = self.snapshot(extension_class=ext, name=name)
        extension, location = snap.extension, snap.test_location
        assert snap == dict(reference), f"snapshot {name!r} no longer equals the live reference"
        if snap.update_snapshots:
            stored = {k: _to_numpy(v) for k, v in reference.items()}
        else:
            stored = NpzSnapshotExtension.load(snap.session.recall_snapshot(extension, location, name))
        return {k: torch.from_numpy(np.array(v)) for k, v in stored.items()}
