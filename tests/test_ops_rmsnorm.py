"""RMSNorm: gradcheck, forward/grads against F.rms_norm, fp32 compute for low-precision inputs."""

import pytest
import torch
import torch.nn.functional as F

from llm.ops.rmsnorm import rms_norm
from llm.transformer import RmsNorm


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradcheck() -> None:
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g: rms_norm(x, g, 1e-5), (x, g))


def test_matches_f_rms_norm(ref_snapshot) -> None:
    x = torch.randn(4, 5, 16, requires_grad=True)
    g = (1 + 0.1 * torch.randn(16)).requires_grad_()
    dy = torch.randn(4, 5, 16)
    y_ref = F.rms_norm(x, (16,), g, 1e-5)
    dx_ref, dg_ref = torch.autograd.grad(y_ref, (x, g), dy)
    stored = ref_snapshot({"y": y_ref, "dx": dx_ref, "dg": dg_ref}, rtol=1e-5, atol=1e-5)
    y = rms_norm(x, g, 1e-5)
    dx, dg = torch.autograd.grad(y, (x, g), dy)
    for name, ours in (("y", y), ("dx", dx), ("dg", dg)):
        torch.testing.assert_close(ours, stored[name], rtol=1e-5, atol=1e-5)


def test_bf16_computes_in_fp32_and_casts_back() -> None:
    norm = RmsNorm(8)
    x = torch.randn(3, 8).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = F.rms_norm(x.float(), (8,), eps=1e-5).to(torch.bfloat16)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert torch.equal(norm.weight.detach(), torch.ones(8))
