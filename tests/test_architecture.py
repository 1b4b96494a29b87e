"""The layout rules of docs/architecture.md: imports only run down the layers, no library module imports an entry point,
every module with a __main__ block is an entry point, layer 0 imports without torch, no file passes 400 lines and no
function 80 (outside tests/), and every file the page names exists."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layer of each module, by the longest dotted prefix that names it; a module may import its own layer and below.
LAYERS = {
    # 0: vocabulary and files, no torch
    "cli": 0, "integrity": 0, "models.registry": 0, "latent_data.format": 0,
    # 1: the numerics and the formats
    "devices": 1, "profiling": 1, "checkpoints": 1, "loss": 1, "samplers": 1, "models": 1, "latent_codecs": 1,
    "latent_data": 1, "dataset": 1, "evaluations": 1, "preprocessing": 1, "hub_files": 1,
    # 2: alignment methods (heads on the models, loss terms)
    "alignment": 2,
    # 3: the sampling pipeline; 4: the training loop, which samples through it
    "sampling": 3, "training": 4,
    # 5: entry points: command lines and scripts
    "train": 5, "generate": 5, "preprocessing.encode": 5, "evaluations.evaluator": 5,
    "evaluations.check_adm_regression": 5, "scripts": 5,
}
ENTRY = 5
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def layer(module: str) -> int | None:
    """The layer of a dotted module name of this repository, None for a third-party or standard module."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def source_files() -> list[Path]:
    """The repository's tracked Python files outside tests/."""
    names = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / n for n in names.split() if not n.startswith("tests/")]
    return [f for f in files if f.is_file()]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Every module an import statement or an `importlib.import_module` / `__import__` call with a literal name
    names, at any depth (imports inside functions count)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in package a.b is a.b.x
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if layer(f"{base}.{a.name}") is not None}
    return found


def test_layer_table_knows_every_module():
    unknown = [module_name(f) for f in source_files() if layer(module_name(f)) is None]
    assert not unknown, f"give these modules a layer in LAYERS (and docs/architecture.md): {unknown}"


def test_imports_run_down_the_layers_and_never_reach_an_entry_point():
    upward = []
    for path in source_files():
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own = layer(name)
        for target in imported_modules(ast.parse(path.read_text()), package):
            theirs = layer(target)
            if theirs is None or target == name or name.startswith("scripts"):
                continue
            if theirs > own:
                upward.append(f"{name} (layer {own}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("code", ["def f():\n    from generate import sample_batch\n",
                                  "import importlib\nsample = importlib.import_module('generate').sample_batch\n"])
def test_the_layer_check_sees_an_upward_import(code):
    """The check above would fail on the import this layout removed: training's evaluation importing generate.py."""
    targets = imported_modules(ast.parse(code), "training")
    assert max(layer(t) for t in targets if layer(t) is not None) > layer("training.evaluation")


def runs_as_main(tree: ast.AST) -> bool:
    """True for a module with an `if __name__ == "__main__":` block."""
    return any(isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "__name__"
               and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.comparators)
               for node in ast.walk(tree))


def test_every_module_that_runs_as_main_is_an_entry_point():
    library = [module_name(f) for f in source_files()
               if runs_as_main(ast.parse(f.read_text())) and layer(module_name(f)) != ENTRY]
    assert not library, f"modules with a __main__ block outside the entry-point layer: {library}"
    assert runs_as_main(ast.parse('if __name__ == "__main__":\n    main()\n'))


def test_layer_zero_imports_without_torch():
    """The bottom layer is what command lines use before parsing (`--help` answers without torch)."""
    names = sorted({module_name(f) for f in source_files() if layer(module_name(f)) == 0})
    code = f"import sys; import {', '.join(names)}; assert 'torch' not in sys.modules, sorted(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"cli", "integrity", "latent_data.format", "models.registry"} <= set(names)


def test_no_file_over_400_lines_and_no_function_over_80():
    too_long = []
    for path in source_files():
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)


def named_paths(text: str) -> set[str]:
    """The repository paths a page names in backticks: `x.py`, `folder/`, `folder/x.py`."""
    return {m for m in re.findall(r"`([\w./-]+(?:\.py|/))`", text) if not m.startswith(("-", "/"))}


def test_architecture_page_names_only_files_that_exist():
    page = (ROOT / "docs" / "architecture.md").read_text()
    paths = named_paths(page)
    assert len(paths) > 30, "the page should name the layout's files"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


@pytest.mark.parametrize("text, expected", [("`sampling/batch.py` and `models/`", {"sampling/batch.py", "models/"}),
                                            ("`--flag` `x = 1` `train.py`", {"train.py"})])
def test_named_paths(text, expected):
    assert named_paths(text) == expected
