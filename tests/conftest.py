import os

import pytest
import torch
from syrupy.assertion import SnapshotAssertion

from llm import quant
from llm.exercises import install
from tests.snapshot import RefSnapshot


def pytest_configure(config: pytest.Config) -> None:
    """LLM_OPS=<module>: the tests grade a learner's ops instead of ours (llm/exercises.py, docs/exercises.md)."""
    if spec := os.environ.get("LLM_OPS"):
        try:
            config.llm_ops = install(spec)
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if names := getattr(config, "llm_ops", None):
        terminalreporter.write_line(f"LLM_OPS={os.environ['LLM_OPS']}: graded the learner's {', '.join(names)}")


@pytest.fixture
def ref_snapshot(snapshot: SnapshotAssertion) -> RefSnapshot:
    return RefSnapshot(snapshot)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _no_inductor_in_the_test_process():
    """The default int8 kernel builds with torch.compile; Inductor in this process breaks the tests that fork
    (DDP/FSDP workers) and Triton's interpreter. Tests run "chunked" by default; test_quant builds the
    compiled kernel in a subprocess."""
    quant.INT8_KERNEL = "chunked"
    yield


@pytest.fixture
def one_thread():
    """Tiny shapes: one torch thread avoids OpenMP barrier waits (and a collapse when another process
    holds a core); use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
