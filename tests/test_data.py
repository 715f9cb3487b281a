"""get_batch and open_tokens: windows, uniform reachable starts, memmaps, and clear errors for bad arrays."""

import resource
import sys

import numpy as np
import pytest
import torch

import llm.data as data
from llm.data import get_batch, open_tokens, token_counts, unigram_entropy


def _dataset(n: int = 1000) -> np.ndarray:
    return ((np.arange(n, dtype=np.int64) * 7919) % 5003).astype(np.uint16)


def test_windows_match_reference(ref_snapshot):
    ds = _dataset()
    b, L = 8, 16
    # Independent reference: torch's unfold gives every window of L+1 tokens; pick the same starts.
    starts = np.random.default_rng(123).integers(0, len(ds) - L, size=b)
    windows = torch.from_numpy(ds.astype(np.int64)).unfold(0, L + 1, 1)[torch.from_numpy(starts)]
    stored = ref_snapshot({"x": windows[:, :-1], "y": windows[:, 1:]})
    x, y = get_batch(ds, b, L, "cpu", rng=np.random.default_rng(123))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (b, L)
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x, stored["x"])
    assert torch.equal(y, stored["y"])
    assert torch.equal(x[:, 1:], y[:, :-1]), "y is x shifted by one"


def test_every_start_reachable_and_uniform():
    n, L = 20, 8  # starts 0..11 (the last one, 11, ends exactly at the final token)
    ds = np.arange(n, dtype=np.uint16)
    x, _ = get_batch(ds, 12_000, L, "cpu", rng=np.random.default_rng(0))
    starts = x[:, 0].numpy()
    counts = np.bincount(starts, minlength=n)
    assert set(np.flatnonzero(counts)) == set(range(n - L)), "all starts, and only valid ones"
    assert counts.max() / counts[counts > 0].min() < 1.25, "roughly uniform"


def test_exactly_context_plus_one_tokens():
    ds = np.arange(9, dtype=np.uint16)
    x, y = get_batch(ds, 3, 8, "cpu", rng=np.random.default_rng(0))
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3


def test_too_short_is_a_clear_error():
    with pytest.raises(ValueError, match=r"8 tokens .* context_length \+ 1 = 9"):
        get_batch(np.arange(8, dtype=np.uint16), 2, 8, "cpu")


def test_bad_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        get_batch(_dataset(), 0, 4, "cpu")


def test_rng_determinism():
    ds = _dataset()
    a = get_batch(ds, 4, 8, "cpu", rng=np.random.default_rng(5))
    b = get_batch(ds, 4, 8, torch.device("cpu"), rng=np.random.default_rng(5))
    assert torch.equal(a[0], b[0])
    np.random.seed(1)
    c = get_batch(ds, 4, 8, "cpu")
    np.random.seed(1)
    d = get_batch(ds, 4, 8, "cpu")
    assert torch.equal(c[0], d[0]), "rng=None follows np.random.seed"


def test_torch_tensor_input():
    ds = _dataset()
    x, y = get_batch(torch.from_numpy(ds.astype(np.int64)), 2, 4, "cpu", rng=np.random.default_rng(0))
    x2, y2 = get_batch(ds, 2, 4, "cpu", rng=np.random.default_rng(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_memmap_is_not_loaded_whole(tmp_path):
    """A 2 GB (sparse) memmapped array: batches read a few pages; resident memory stays small."""
    path = tmp_path / "big.npy"
    n = 1_000_000_000
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(n,))
    mm[-100:] = np.arange(100, dtype=np.uint16)
    mm.flush()
    del mm
    arr = open_tokens(path, vocab_size=65536)
    assert isinstance(arr, np.memmap) and len(arr) == n
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(5):
        x, y = get_batch(arr, 16, 64, "cpu", rng=np.random.default_rng(0))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    assert (after - before) * scale < 200e6
    assert x.shape == (16, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: runs on a GPU machine")
def test_cuda_batches():
    x, y = get_batch(_dataset(), 4, 8, "cuda", rng=np.random.default_rng(0))
    assert x.device.type == "cuda" and y.dtype == torch.int64
    x2, _ = get_batch(_dataset(), 4, 8, "cpu", rng=np.random.default_rng(0))
    assert torch.equal(x.cpu(), x2)


# ----------------------------------------------------------------------------- open_tokens


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.int64])
def test_open_tokens_valid(tmp_path, dtype):
    p = tmp_path / "t.npy"
    np.save(p, np.arange(100, dtype=dtype))
    arr = open_tokens(p, vocab_size=100)
    assert isinstance(arr, np.memmap) and arr.dtype == dtype and len(arr) == 100
    assert not arr.flags.writeable


def test_open_tokens_ids_out_of_range(tmp_path):
    p = tmp_path / "t.npy"
    a = np.arange(100, dtype=np.uint16)
    a[57] = 100
    np.save(p, a)
    with pytest.raises(ValueError, match=r"token id 100 \(near position 57\) is outside \[0, 100\)"):
        open_tokens(p, vocab_size=100)
    open_tokens(p)  # without a vocab size only the structure is checked
    np.save(p, np.array([3, -1, 2], dtype=np.int32))
    with pytest.raises(ValueError, match="token id -1"):
        open_tokens(p, vocab_size=10)


def test_open_tokens_sampled_check_on_large_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_FULL_CHECK_MAX", 1000)
    p = tmp_path / "t.npy"
    a = np.zeros(200_000, dtype=np.uint16)
    a[5] = 999  # in the first block, which the sample always includes
    np.save(p, a)
    with pytest.raises(ValueError, match="token id 999"):
        open_tokens(p, vocab_size=500)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: np.save(p, np.zeros(10, dtype=np.float32)), "dtype float32"),
        (lambda p: np.save(p, np.zeros((2, 5), dtype=np.uint16)), r"1-D .* shape \(2, 5\)"),
        (lambda p: np.save(p, np.zeros(0, dtype=np.uint16)), "empty"),
        (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "not a valid .npy"),
        (lambda p: p.write_bytes(b"this is not numpy" * 10), "not a valid .npy"),
        (lambda p: p.write_bytes(b""), "not a valid .npy"),
    ],
)
def test_open_tokens_bad_files(tmp_path, make, match):
    p = tmp_path / "bad.npy"
    make(p)
    with pytest.raises(ValueError, match=match):
        open_tokens(p, vocab_size=10)


def test_open_tokens_truncated(tmp_path):
    p = tmp_path / "t.npy"
    np.save(p, np.arange(1000, dtype=np.uint16))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        open_tokens(p)


def test_open_tokens_missing_and_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such token file"):
        open_tokens(tmp_path / "nope.npy")
    with pytest.raises(ValueError, match="is a directory"):
        open_tokens(tmp_path)


def test_token_counts_and_entropy():
    a = np.array([0, 1, 1, 2, 2, 2, 2, 7], dtype=np.uint16)
    counts = token_counts(a, 4)
    assert counts.tolist() == [1, 2, 4, 0, 0, 0, 0, 1]
    p = np.array([1, 2, 4, 1]) / 8
    assert unigram_entropy(counts) == pytest.approx(float(-(p * np.log(p)).sum()))


def test_read_range_matches_slicing(tmp_path):
    p = tmp_path / "t.npy"
    a = _dataset(10_000)
    np.save(p, a)
    mm = open_tokens(p)
    for s, e in [(0, 10), (123, 4567), (9_990, 20_000), (5, 5)]:
        assert np.array_equal(data.read_range(mm, s, e), a[s:e])
        view = mm[100:]  # a view of the memmap: falls back to slicing, still correct
        assert np.array_equal(data.read_range(view, s, e), a[100:][s:e])
        assert np.array_equal(data.read_range(a, s, e), a[s:e])
