"""Hand-written autograd primitives: each file is one concept, a `torch.autograd.Function` whose
backward is derived by hand, plus a functional wrapper (import it from its file, e.g.
`from llm.ops.linear import linear`). `llm.transformer` builds the model from them."""
