"""KV-cache decoding and left-padded batches give the same logits as plain full forwards."""

import pytest
import torch

from llm.transformer import Transformer


pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48)


@pytest.mark.parametrize("kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_incremental_decoding_matches_full_forward(kv_heads) -> None:
    model = Transformer(**CFG, num_kv_heads=kv_heads).eval()
    ids = torch.randint(0, 64, (2, 14))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2)
        steps = [model(ids[:, :5], kv_cache=cache)]  # prefill
        for t in range(5, 14):
            steps.append(model(ids[:, t : t + 1], kv_cache=cache))
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_matches_unpadded_rows() -> None:
    model = Transformer(**CFG, num_kv_heads=2).eval()
    rows = [torch.randint(0, 64, (n,)) for n in (7, 4, 1)]
    width, new = 7, 4
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, True
    extra = torch.randint(0, 64, (3, new))
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        cache = model.new_kv_cache(3)
        out = [model(ids, kv_cache=cache, attention_mask=mask)]
        for t in range(new):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)
            out.append(model(extra[:, t : t + 1], kv_cache=cache, attention_mask=mask))
        cached = torch.cat(out, 1)
        for i, r in enumerate(rows):
            want = model(torch.cat([r, extra[i]])[None])[0]
            n = len(r)
            torch.testing.assert_close(padded[i, width - n :], want[:n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cached[i, width - n :], want, rtol=1e-5, atol=1e-5)


def test_cache_errors() -> None:
    model = Transformer(**CFG)
    cache = model.new_kv_cache(1, max_len=4)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="batch size"):
            model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="attention_mask"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache, attention_mask=torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="exceeds context_length"):
        model.new_kv_cache(1, max_len=17)


def test_reorder_moves_cache_rows_with_their_beams() -> None:
    """Rows reordered (and fanned out) mid-decode continue exactly as the rows they were copied from."""
    model = Transformer(**CFG, num_kv_heads=2).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        cache = model.new_kv_cache(2)
        model(ids[:, :6], kv_cache=cache)
        order = torch.tensor([1, 1, 0])
        cache.reorder(order)
        assert cache.batch == 3 and cache.length == 6
        got = model(ids[order, 6:], kv_cache=cache)
    torch.testing.assert_close(got, model(ids[order]).detach()[:, 6:], rtol=1e-5, atol=1e-5)
