"""The snapshot extension itself must be able to fail."""

import numpy as np
import torch

from tests.snapshot import NpzSnapshotExtension


def _ext(rtol: float, atol: float) -> NpzSnapshotExtension:
    return type("E", (NpzSnapshotExtension,), {"rtol": rtol, "atol": atol})()


def test_matches_within_tolerance_only() -> None:
    e = _ext(1e-5, 0.0)
    a = e.serialize({"x": torch.ones(3)})
    assert e.matches(serialized_data=e.serialize({"x": torch.ones(3) * (1 + 1e-7)}), snapshot_data=a)
    assert not e.matches(serialized_data=e.serialize({"x": torch.ones(3) * 1.01}), snapshot_data=a)


def test_dtype_shape_and_keys_checked() -> None:
    e = _ext(1e-3, 1e-3)
    a = e.serialize({"x": np.zeros(3, dtype=np.float32)})
    assert not e.matches(serialized_data=e.serialize({"x": np.zeros(3, dtype=np.float64)}), snapshot_data=a)
    assert not e.matches(serialized_data=e.serialize({"x": np.zeros(4, dtype=np.float32)}), snapshot_data=a)
    assert not e.matches(serialized_data=e.serialize({"y": np.zeros(3, dtype=np.float32)}), snapshot_data=a)


def test_roundtrip_through_fixture(ref_snapshot) -> None:
    ref = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2, 3])}
    stored = ref_snapshot(ref, rtol=0, atol=0)
    torch.testing.assert_close(stored["a"], ref["a"])
    assert torch.equal(stored["b"], ref["b"])
    stored2 = ref_snapshot({"c": torch.ones(2)})
    assert torch.equal(stored2["c"], torch.ones(2))
