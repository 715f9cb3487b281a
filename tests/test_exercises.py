"""Exercise mode (llm/exercises.py, docs/exercises.md): the skeleton is generated from the current sources,
and LLM_OPS=<module> makes the op tests grade that module: they fail on a wrong backward and pass on ours."""

import importlib
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llm.exercises as exercises_mod
from llm.exercises import exercises, main

ROOT = Path(__file__).resolve().parent.parent
OPS_MODULES = sorted(p.stem for p in (ROOT / "llm" / "ops").glob("*.py") if p.stem != "__init__")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_op_function_is_an_exercise() -> None:
    """Every Function of llm/ops is an exercise (found by import here, by ast in the generator)."""
    listed = {(m, n) for m, names, _ in exercises() for n in names}
    for stem in OPS_MODULES:
        module = importlib.import_module(f"llm.ops.{stem}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, torch.autograd.Function) and obj.__module__ == module.__name__:
                assert (module.__name__, name) in listed, f"{module.__name__}.{name} is not an exercise"
    for _, _, test in exercises():
        assert (ROOT / test).is_file()


def test_skeleton_is_generated_from_the_current_sources(tmp_path, capsys) -> None:
    main(["--out", str(tmp_path / "my_ops")])
    n = sum(len(names) for _, names, _ in exercises())
    assert f"{n} exercises" in capsys.readouterr().out
    skeleton = _load(tmp_path / "my_ops.py")
    for module_name, names, test in exercises():
        real_module = importlib.import_module(module_name)
        math_lines = [line.strip() for line in real_module.__doc__.splitlines() if line.strip()]
        for name in names:
            real, ours = getattr(real_module, name), getattr(skeleton, name)
            doc = " ".join(line.strip() for line in ours.__doc__.splitlines())
            assert all(line in doc for line in math_lines) and test in doc, name
            if inspect.isclass(real):
                assert issubclass(ours, torch.autograd.Function)
                pairs = [(getattr(real, m), getattr(ours, m)) for m in ("forward", "backward")]
            else:
                pairs = [(real, ours)]
            for r, o in pairs:
                sig = inspect.signature(o)
                assert str(sig) == str(inspect.signature(r)), f"{name}.{o.__name__}"
                with pytest.raises(NotImplementedError):
                    o(*[None] * sum(p.default is inspect.Parameter.empty for p in sig.parameters.values()))


def test_cli_keeps_existing_work(tmp_path, capsys) -> None:
    out = tmp_path / "mine.py"
    out.write_text("# my solutions\n")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out)])
    assert e.value.code == 2 and out.read_text() == "# my solutions\n"
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--force" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "not-a-name")])
    main(["--out", str(out), "--force"])
    assert "class SoftmaxFn(Function)" in out.read_text()


WRONG = '''
import torch
from torch.autograd import Function

from llm.bpe.train import merge_pairs as _merge_pairs


class SoftmaxFn(Function):
    @staticmethod
    def forward(ctx, x, dim):
        y = (x - x.amax(dim, keepdim=True)).exp()
        y = y / y.sum(dim, keepdim=True)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return y * dy, None  # forgets the - y * sum(dy * y) term


def merge_pairs(word_counts, num_merges, first_id, progress=False):
    return _merge_pairs(word_counts, num_merges, first_id, progress)[::-1]  # right merges, wrong order
'''

OURS = "from llm.bpe.train import merge_pairs\nfrom llm.ops.softmax import SoftmaxFn\n"
GRADED = ["tests/test_ops_softmax.py", "tests/test_bpe.py::test_train_ties_prefer_greatest_pair"]


def _grade(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess:
    (tmp_path / f"{name}.py").write_text(source)
    env = {**os.environ, "LLM_OPS": name, "PYTHONPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *GRADED]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_exercise_mode_fails_on_a_wrong_backward_and_passes_on_ours(tmp_path) -> None:
    wrong = _grade(tmp_path, "wrong_ops", WRONG)
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "graded the learner's SoftmaxFn, merge_pairs" in wrong.stdout
    for failing in ("test_ops_softmax.py::test_gradcheck", "test_ops_softmax.py::test_matches_f_softmax",
                    "test_bpe.py::test_train_ties_prefer_greatest_pair"):
        assert f"FAILED tests/{failing}" in wrong.stdout, wrong.stdout
    assert "test_stable_for_large_logits" not in wrong.stdout  # the forward is right: its test passes
    ours = _grade(tmp_path, "our_ops", OURS)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert "graded the learner's SoftmaxFn, merge_pairs" in ours.stdout


def test_a_new_op_is_an_exercise_as_soon_as_it_lands(tmp_path, monkeypatch) -> None:
    """A Function in a new llm/ops file joins the skeleton (before the BPE loop) without editing EXERCISES."""
    fake = tmp_path / "llm"
    shutil.copytree(ROOT / "llm" / "ops", fake / "ops")
    (fake / "bpe").mkdir()
    shutil.copy(ROOT / "llm" / "bpe" / "train.py", fake / "bpe" / "train.py")
    (fake / "ops" / "scale.py").write_text(
        '"""y = 2 x.\n\n    backward: dx = 2 dy\n"""\n\nfrom torch.autograd import Function\n\n\n'
        "class ScaleFn(Function):\n    @staticmethod\n    def forward(ctx, x):\n        return 2 * x\n\n"
        "    @staticmethod\n    def backward(ctx, dy):\n        return 2 * dy\n"
    )
    monkeypatch.setattr(exercises_mod, "ROOT", fake)
    assert [names for _, names, _ in exercises()][-2:] == [("ScaleFn",), ("merge_pairs",)]
    text = exercises_mod.skeleton()
    assert "class ScaleFn(Function):" in text and "backward: dx = 2 dy" in text
    assert text.index("class ScaleFn") < text.index("def merge_pairs")


SPIES = '''
from llm.ops.cross_entropy import CrossEntropyFn as _CE
from llm.ops.lora import LoRALinearFn as _LoRA

CALLS = []


class LoRALinearFn(_LoRA):
    @staticmethod
    def forward(ctx, *args):
        CALLS.append("lora")
        return _LoRA.forward(ctx, *args)


class CrossEntropyFn(_CE):
    @staticmethod
    def forward(ctx, *args):
        CALLS.append("ce")
        return _CE.forward(ctx, *args)
'''


def test_lora_and_the_masked_loss_run_the_learners_functions(tmp_path, monkeypatch) -> None:
    """Exercises 8 and 10 of docs/exercises.md: a LoRA model (LoRALinear) and the masked model loss reach the
    learner's LoRALinearFn and CrossEntropyFn, so tests/test_lora.py and tests/test_masked_loss.py grade them."""
    import llm.ops.cross_entropy
    import llm.ops.lora
    from llm.lora import LoraConfig, apply_lora
    from llm.transformer import Transformer

    for module, name in ((llm.ops.lora, "LoRALinearFn"), (llm.ops.cross_entropy, "CrossEntropyFn")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    (tmp_path / "spy_ops.py").write_text(SPIES)
    assert exercises_mod.install(str(tmp_path / "spy_ops.py")) == ["CrossEntropyFn", "LoRALinearFn"]
    learner = llm.ops.lora.LoRALinearFn.forward.__globals__["CALLS"]
    model = Transformer(vocab_size=16, context_length=8, d_model=8, num_layers=1, num_heads=2, impl="reference")
    apply_lora(model, LoraConfig(rank=2, targets="q"))
    x = torch.randint(0, 16, (1, 8))
    model.loss(x, x, torch.arange(8)[None] > 3).backward()
    assert learner.count("lora") == 1 and learner.count("ce") == 1
