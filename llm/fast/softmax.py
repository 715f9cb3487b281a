"""The one fast softmax: exponentiate a block of rows in place and return the row statistics, so that the
caller normalises a smaller result instead of the (rows cols) block itself (one pass over it fewer).

    E[r c] = exp(S[r c] − m[r]),   m[r] = max_c S[r c],   l[r] = Σ_c E[r c]
    softmax(S) = E / l,            logsumexp(S) = m + log l
Used by the blocked causal attention (O = (E V) / l), the fused lm_head + cross-entropy and the decode
step. The reference is `llm.ops.softmax`.
"""

from __future__ import annotations

import torch


def exp_rows_(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s ← exp(s − rowmax s) in place (rows along the last dim); returns (m, l), both (... 1)."""
    m = s.amax(-1, keepdim=True)
    s.sub_(m).exp_()
    return m, s.sum(-1, keepdim=True)
