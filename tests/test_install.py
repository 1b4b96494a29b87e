"""pyproject.toml: the core dependencies cover what train, generate, preprocessing and evaluations import, and each
extra covers what its part imports (read from the source, mapped to distributions by the installed metadata)."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
CORE = ["train.py", "generate.py", "cli.py", "checkpoints.py", "devices.py", "dataset.py", "loss.py", "samplers.py",
        "alignment", "evaluations", "latent_codecs", "latent_data", "models", "preprocessing", "sampling",
        "training"]
PARTS = {"quickstart": ["scripts/quickstart.py", *(f"scripts/quickstart_{part}.py" for part in (
    "figures", "images", "progress", "report", "runs", "scoring", "stages", "vae"))], "dev": ["tests"]}
# Imported only where the user asks for them, through accelerate (train.py --report-to): the trackers extra.
TRACKERS = {"wandb", "tensorboard"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def third_party_imports(paths: list[str]) -> set[str]:
    local = {p.stem for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    local |= {p.stem for p in [*(ROOT / "tests").glob("*.py"), *(ROOT / "scripts").glob("*.py")]}  # tests import these
    found = set()
    for path in paths:
        files = [ROOT / path] if path.endswith(".py") else sorted((ROOT / path).rglob("*.py"))
        for file in files:
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in local and m != "__future__"}


def distributions(modules: set[str]) -> set[str]:
    mapping = importlib.metadata.packages_distributions()
    return {mapping[m][0].lower().replace("_", "-") for m in modules}


def test_core_dependencies_cover_the_core_imports():
    core = names(project()["dependencies"])
    assert distributions(third_party_imports(CORE)) <= core
    assert not core & {"wandb", "tensorboard", "mlxtend", "matplotlib", "pytest", "ruff"}  # optional, not core


@pytest.mark.parametrize("extra", sorted(PARTS))
def test_each_extra_covers_its_imports(extra):
    extras = project()["optional-dependencies"]
    allowed = names(project()["dependencies"]) | names(extras[extra])
    assert distributions(third_party_imports(PARTS[extra])) <= allowed
    assert names(extras["trackers"]) == TRACKERS


def test_requirements_txt_is_the_package_with_every_extra():
    extras = project()["optional-dependencies"]
    text = (ROOT / "requirements.txt").read_text().splitlines()
    lines = [line.strip() for line in text if line.strip()[:1] not in ("#", "")]
    assert lines == ["-e .[all]"]
    assert set(re.search(r"\[(.*)\]", extras["all"][0]).group(1).split(",")) == set(extras) - {"all"}


def test_every_module_of_the_root_is_installed():
    """A non-editable install gets what [tool.setuptools] names: every module and package of the repository root."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {p.stem for p in ROOT.glob("*.py")}
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert set(setup["py-modules"]) == modules and set(setup["packages"]) == packages
