import pytest
import torch
from syrupy.assertion import SnapshotAssertion

from tests.snapshot import RefSnapshot


@pytest.fixture
def ref_snapshot(snapshot: SnapshotAssertion) -> RefSnapshot:
    return RefSnapshot(snapshot)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny shapes: one torch thread avoids OpenMP barrier waits (and a collapse when another process
    holds a core); use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
