"""The reference: hand-written autograd primitives, one per file, each a `torch.autograd.Function` whose
backward is derived by hand (math in the docstring), plus a functional wrapper (import it from its file,
e.g. `from llm.ops.linear import linear`). `llm.transformer.Transformer(impl="reference")` runs on these
alone; `llm/fast/` holds the faster variants, each tested against its op here."""
