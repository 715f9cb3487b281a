"""Byte-level BPE internals; the public entry point is `llm.bpe_tokenizer`."""

# The document separator: the corpus writer puts it between stories, data preparation makes it a special
# token, generation stops at it and inspect_data counts documents by it. Defined once, here.
EOT = "<|endoftext|>"
