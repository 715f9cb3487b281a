"""llm: a decoder-only language model written from scratch."""
