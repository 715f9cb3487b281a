"""`python -m llm <verb> [args]`: one entry point for every command of the project, like litgpt's verbs.

Each verb hands the rest of the command line to the `main(argv)` of the command it names, unchanged, so
`python -m llm generate --prompt Hi` is `python -m llm.generating --prompt Hi`. Those module commands (and
`uv run inspect_data.py`, `uv run python kernel/benchmarking_model.py`) work as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# verb -> (module, or a script path relative to the repository root; what it does)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("llm.training", "train a model (default: the demo preset into runs/demo)"),
    "generate": ("llm.generating", "generate text from a checkpoint (default: runs/demo), or --interactive"),
    "evaluate": ("llm.evaluate", "perplexity of a checkpoint on a token file (default: runs/demo's validation split)"),
    "quantize": ("llm.quantize", "write an int8 / int4 weight-only quantized copy of a checkpoint"),
    "export": ("llm.export", "write a checkpoint as a Hugging Face Llama directory, or --import one"),
    "finetune": ("llm.finetune", "fine-tune a checkpoint on chat data, LoRA or full (default: runs/demo on story QA)"),
    "chat": ("llm.chat", "chat with a fine-tuned model: multi-turn REPL (default: the default fine-tune's output)"),
    "data": ("llm.data", "generate, prepare or download training data: generate | prepare | demo | download"),
    "tokenizer": ("llm.bpe_tokenizer", "train or apply a BPE tokenizer: train | encode (bare: on the built-in stories)"),
    "inspect": ("inspect_data.py", "sanity report on prepared token arrays (default: data/demo)"),
    "bench": ("kernel/benchmarking_model.py", "time the model's forward/backward/optimizer step"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: python -m llm <verb> [args]   (python -m llm <verb> --help for its options)"]
    lines += [f"  {verb:<{width}}  {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join(lines)


def load_script(relpath: str):
    """A script of the repository (inspect_data.py, kernel/...) as a module. kernel/ is not a package and
    the scripts are not installed with llm/, so they are loaded from the checkout llm/ sits in."""
    path = REPO / relpath
    if not path.is_file():
        raise FileNotFoundError(f"{relpath} not found beside llm/ ({REPO}): this verb needs the repository checkout")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered before it runs, as an import would (dataclasses look it up)
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}; one of {', '.join(VERBS)} (see python -m llm)", file=sys.stderr)
        return 2
    target = VERBS[verb][0]
    try:  # imported here, when its verb runs: one verb does not load the others (training loads the most)
        module = load_script(target) if target.endswith(".py") else importlib.import_module(target)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
