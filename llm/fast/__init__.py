"""Fast variants of the reference ops in `llm/ops/`, each tested against its reference op (values and
gradients); `llm.transformer.Transformer(impl="fast")` runs on them.

- `attention`: blocked causal attention (the CPU training path) and its torch.compile custom ops.
- `flash_attention`: FlashAttention-2 in PyTorch, the algorithm kept readable; `flash_attention_triton`:
  the same as Triton kernels (CUDA), the model's training attention on a GPU.
- `cross_entropy`: lm_head fused with the loss (`linear_cross_entropy`), fp32 and mixed-precision loops.
- `linears`: several weights on one input; `rope`: RoPE as one complex multiply; `softmax`: the in-place
  softmax with row statistics that the kernels share.
- `decode_step`: generation's one-token KV-cache step on merged, gain-folded weights.
- `optimizer`: torch.optim.Optimizer without its first-call torch._dynamo import (start-up time).
"""
