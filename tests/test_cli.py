"""Every command line: `--help` works, shows the defaults in one style, and (where it promises to) answers without
importing torch."""

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parents[1]
# (command after `python`, whether its --help must answer before torch is imported)
ENTRY_POINTS = [
    (["train.py"], True),
    (["generate.py"], True),
    (["-m", "preprocessing.encode"], True),
    (["preprocessing/encode.py"], True),
    (["-m", "evaluations.evaluator"], True),
    (["evaluations/evaluator.py"], True),
    (["-m", "evaluations.check_adm_regression"], True),
    (["scripts/export.py"], True),
    (["scripts/quickstart.py"], False),
    (["scripts/measure_pixel_rounding.py"], False),
    (["scripts/benchmark_train.py"], False),
    (["scripts/benchmark_encode.py"], False),
    (["scripts/benchmark_eval.py"], False),
    (["scripts/benchmark_sample.py"], False),
    (["scripts/benchmarks_doc.py"], True),
]
# Modules whose build_parser() gives the whole command line.
PARSERS = ["train", "generate", "preprocessing.encode", "evaluations.evaluator"]


def imported_modules(stderr: str) -> set[str]:
    """Module names from `python -X importtime` output ('import time: self | cumulative | name')."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("command,torch_free", ENTRY_POINTS, ids=[" ".join(c) for c, _ in ENTRY_POINTS])
def test_help_works_and_says_the_defaults(command, torch_free):
    proc = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")
    text = " ".join(proc.stdout.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default:" in text
    modules = imported_modules(proc.stderr)
    assert "argparse" in modules  # the importtime listing was read
    if torch_free:
        assert "torch" not in modules, f"{' '.join(command)} --help imports torch"


@pytest.mark.parametrize("name", PARSERS)
def test_every_option_with_a_value_shows_its_default(name):
    """Each option that has a default (not None) and takes a value, or is a --x/--no-x pair, says its default."""
    module = importlib.import_module(name)
    parser = module.build_parser()
    formatter = parser._get_formatter()
    assert isinstance(formatter, cli.HelpFormatter)
    for action in parser._actions:
        if not action.option_strings or action.help is argparse.SUPPRESS or action.default in (None, False):
            continue
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
            continue
        shown = formatter._expand_help(action)
        assert "default" in shown.lower(), (name, action.option_strings, shown)


def test_help_style():
    p = cli.parser("first line\n  indented line kept")
    p.add_argument("--required", required=True, help="must be given")
    p.add_argument("--zero", type=int, default=0, help="an int")
    p.add_argument("--none", default=None, help="when absent, something else happens")
    p.add_argument("--switch", action="store_true", help="turns a thing on")
    p.add_argument("--on", action=argparse.BooleanOptionalAction, default=True, help="on or off")
    p.add_argument("--off", action=argparse.BooleanOptionalAction, default=False, help="off or on")
    p.add_argument("--pair", type=float, nargs=2, default=(0.0, 1.0), help="two numbers")
    p.add_argument("--said", type=int, default=3, help="a count (default: three)")
    p.add_argument("--percent", default="50%", help="a share")
    text = " ".join(p.format_help().split())
    assert "first line\n  indented line kept" in p.format_help()
    assert "must be given --zero" in text  # nothing appended to a required option
    assert "an int (default: 0)" in text  # a zero default is shown too
    assert "something else happens --switch" in text and "turns a thing on --on" in text
    assert "on or off (default: --on)" in text and "off or on (default: --no-off)" in text
    assert "two numbers (default: 0.0 1.0)" in text
    assert "a count (default: three) --percent" in text  # not said twice
    assert "a share (default: 50%)" in text


def test_choices_match_the_modules_that_implement_them():
    """cli.py holds the choices without importing torch; they must be what the models and losses accept."""
    import models
    from loss import sample_time

    assert cli.MODEL_NAMES == list(models.MODEL_NAMES) and "SiT-XL/2" in cli.MODEL_NAMES
    for weighting in cli.WEIGHTINGS:  # every choice the flag offers is one the loss implements
        t = sample_time(64, weighting)
        assert t.shape == (64,) and bool(((t >= 0) & (t <= 1)).all()), weighting
    from models.registry import FAMILIES

    assert set(cli.SRA_DEFAULT_BLOCKS) >= {size for sizes, _ in FAMILIES.values() for size in sizes}


def test_train_usage_errors_answer_before_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "train.py", "--data-dir", "x", "--logging-dir", "l"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and re.search(r"--logging-dir: .*run directory", proc.stderr)
    assert "torch" not in imported_modules(proc.stderr)


@pytest.mark.parametrize("argv, says", [
    (["train.py", "--model", "SiT-XL2"], "argument --model: invalid choice: 'SiT-XL2'"),
    (["generate.py", "--ckpt", "x", "--mode", "odd"], "argument --mode: invalid choice: 'odd'"),
    (["-m", "preprocessing.encode", "--source", "s"], "the following arguments are required: --dest"),
])
def test_a_usage_error_is_a_short_usage_line_and_the_error(argv, says):
    """A mistyped flag ends with two lines, the error last, not after the usage of every flag (60 lines)."""
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr
    assert lines[0].startswith("usage: ") and "--help lists every flag" in lines[0]
    assert ": error: " + says in lines[1]
