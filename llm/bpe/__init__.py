"""Byte-level BPE internals; the public entry point is `llm.bpe_tokenizer`."""
