"""Fast variants of the reference ops in `llm/ops/`, each tested against its reference op.

- `flash_attention_triton`: FlashAttention-2 forward and backward as Triton kernels (CUDA), the model's
  training attention on a GPU; the same contract as `llm.fast.flash_attention.flash_attention`.
"""
