"""Exercises graded by the project's own tests (docs/exercises.md).

`uv run -m llm.exercises --out my_ops` writes `my_ops.py`: one class per autograd Function of llm/ops and the
BPE merge loop of llm/bpe/train.py, each with the real signature and the math of the real file as its
docstring, every body `raise NotImplementedError`. The skeleton is read from the sources each time it is
written, so it always matches the current ops.

`LLM_OPS=my_ops uv run pytest tests/test_ops_softmax.py` grades it: `install` (called by tests/conftest.py)
puts every exercise name the learner's module defines (`SoftmaxFn`, ..., `merge_pairs`) in place of ours in
the module that calls it, so `llm.ops.softmax.softmax`, the `llm.transformer` modules and `train_bpe` run
the learner's code under the same reference comparisons and gradchecks. Names the module leaves out stay ours.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from llm.cli import Parser
from llm.fileio import write_text

ROOT = Path(__file__).resolve().parent
# (module, exercise names, the test that grades them), from easy to hard; `exercises()` adds any other
# autograd Function of llm/ops (before the BPE loop), so a new op is an exercise as soon as it lands
EXERCISES: list[tuple[str, tuple[str, ...], str]] = [
    ("llm.ops.softmax", ("SoftmaxFn",), "tests/test_ops_softmax.py"),
    ("llm.ops.linear", ("LinearFn",), "tests/test_ops_linear.py"),
    ("llm.ops.embedding", ("EmbeddingFn",), "tests/test_ops_embedding.py"),
    ("llm.ops.swiglu", ("SiluFn", "SwiGLUFn"), "tests/test_ops_swiglu.py"),
    ("llm.ops.rmsnorm", ("RmsNormFn",), "tests/test_ops_rmsnorm.py"),
    ("llm.ops.rope", ("RopeFn",), "tests/test_ops_rope.py"),
    ("llm.ops.cross_entropy", ("CrossEntropyFn",), "tests/test_ops_cross_entropy.py"),
    ("llm.ops.attention", ("AttentionFn",), "tests/test_ops_attention.py"),
    ("llm.bpe.train", ("merge_pairs",), "tests/test_bpe.py"),
]

HEADER = '''"""Exercise skeleton, written by `uv run -m llm.exercises` from the project's own sources.

Fill in each body (the docstring above it is the math of the file named there; docs/derivations.md
derives it), then grade one exercise at a time with the test named in its docstring:

    LLM_OPS={name} uv run pytest -q tests/test_ops_softmax.py

Rules of the reference: no torch.nn.functional, tensors needed in backward go through
ctx.save_for_backward, and backward returns one gradient per forward input (None for non-tensors).
"""

from __future__ import annotations

import torch
from torch.autograd import Function
'''


def _functions_in(path: Path) -> tuple[str, ...]:
    """Names of the classes in `path` that derive from `Function` (read with ast: nothing is imported)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return tuple(n.name for n in tree.body if isinstance(n, ast.ClassDef) and any(ast.unparse(b).endswith("Function") for b in n.bases))


def exercises() -> list[tuple[str, tuple[str, ...], str]]:
    """EXERCISES with every further Function of llm/ops inserted before the last (the BPE merge loop)."""
    listed = {module for module, _, _ in EXERCISES}
    extra = []
    for path in sorted((ROOT / "ops").glob("*.py")):
        module = f"llm.ops.{path.stem}"
        if module not in listed and (names := _functions_in(path)):
            test = next((t for t in (f"tests/test_ops_{path.stem}.py", f"tests/test_{path.stem}.py")
                         if (ROOT.parent / t).is_file()), f"tests/test_ops_{path.stem}.py")
            extra.append((module, names, test))
    return [*EXERCISES[:-1], *extra, EXERCISES[-1]]


def _source_path(module: str) -> Path:
    return ROOT.parent.joinpath(*module.split(".")).with_suffix(".py")


def _stub(fn: ast.FunctionDef, doc: str | None, indent: str, where: str) -> str:
    """`def name(args) -> ret:` with only @staticmethod kept, the docstring, and a NotImplementedError body."""
    ret = f" -> {ast.unparse(fn.returns)}" if fn.returns else ""
    lines = [f"{indent}@staticmethod"] if any(ast.unparse(d) == "staticmethod" for d in fn.decorator_list) else []
    lines.append(f"{indent}def {fn.name}({ast.unparse(fn.args)}){ret}:")
    if doc:
        lines.append(f'{indent}    """{doc}"""')
    lines.append(f'{indent}    raise NotImplementedError("{where}: your code here")')
    return "\n".join(lines)


def _exercise(node: ast.ClassDef | ast.FunctionDef, module_doc: str, module: str, test: str) -> str:
    ref = f"Reference: {module.replace('.', '/')}.py. Graded by {test}."
    if isinstance(node, ast.FunctionDef):
        own = (ast.get_docstring(node, clean=False) or "").rstrip()
        return _stub(node, f"{own}\n\n    {ref}\n\n    {module_doc}\n    ", "", node.name)
    methods = [m for m in node.body if isinstance(m, ast.FunctionDef)]
    doc = f'    """{ref}\n\n    {module_doc}\n    """'
    body = "\n\n".join(_stub(m, None, "    ", f"{node.name}.{m.name}") for m in methods)
    return f"class {node.name}(Function):\n{doc}\n\n{body}"


def skeleton(name: str = "my_ops") -> str:
    """The exercise module's text, read from the current sources (see EXERCISES)."""
    parts = [HEADER.format(name=name).rstrip()]
    for module, names, test in exercises():
        tree = ast.parse(_source_path(module).read_text(encoding="utf-8"))
        module_doc = (ast.get_docstring(tree, clean=False) or "").strip().replace("\n", "\n    ")
        found = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef)}
        missing = [n for n in names if n not in found]
        if missing:
            raise RuntimeError(f"{module} no longer defines {', '.join(missing)}: update llm.exercises.EXERCISES")
        parts += [_exercise(found[n], module_doc, module, test) for n in names]
    text = "\n\n\n".join(parts) + "\n"
    return "\n".join(line.rstrip() for line in text.split("\n"))


def load(spec: str) -> ModuleType:
    """The learner's module: a file path (`my_ops.py`, `path/to/x.py`) or an importable name (`my_ops`)."""
    if spec.endswith(".py") or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"LLM_OPS={spec}: no such file")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # `LLM_OPS=my_ops` finds my_ops.py where the command runs
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        raise ValueError(f"LLM_OPS={spec}: cannot import it ({e}); write one with `uv run -m llm.exercises --out {spec}`") from e


def install(spec: str) -> list[str]:
    """Put the learner's exercise names in place of ours (see the module docstring); returns those names."""
    learner = load(spec)
    installed = []
    for module, names, _ in exercises():
        target = importlib.import_module(module)
        for name in names:
            if hasattr(learner, name):
                setattr(target, name, getattr(learner, name))
                installed.append(name)
    if not installed:
        every = ", ".join(n for _, names, _ in exercises() for n in names)
        raise ValueError(f"LLM_OPS={spec}: the module defines none of {every}")
    return installed


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m llm.exercises", description="Write the exercise skeleton (docs/exercises.md).")
    parser.add_argument("--out", default="my_ops", help="module to write: NAME or NAME.py (default my_ops)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file (your work in it is lost)")
    args = parser.parse_args(argv)
    out = Path(args.out if args.out.endswith(".py") else args.out + ".py")
    if not out.stem.isidentifier():
        parser.error(f"--out {args.out}: {out.stem!r} is not a Python module name")
    if out.exists() and not args.force:
        parser.error(f"{out} exists; it may hold your solutions (pass --force to overwrite it)")
    if not out.parent.is_dir():
        parser.error(f"--out {args.out}: directory {out.parent} does not exist")
    write_text(out, skeleton(out.stem))
    n = sum(len(names) for _, names, _ in exercises())
    spec = out.stem if out.parent == Path() else out
    print(f"wrote {out}: {n} exercises; grade one with LLM_OPS={spec} uv run pytest -q tests/test_ops_softmax.py")


if __name__ == "__main__":
    main()
