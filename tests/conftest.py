import pytest
import torch
from syrupy.assertion import SnapshotAssertion

from tests.snapshot import RefSnapshot


@pytest.fixture
def ref_snapshot(snapshot: SnapshotAssertion) -> RefSnapshot:
    return RefSnapshot(snapshot)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
