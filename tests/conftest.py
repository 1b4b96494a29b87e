"""Shared test settings: deterministic seeds; a fresh accelerate state per test; tests marked `gpu` skip (with the
reason) where no GPU is visible."""

import logging
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers_data import TINY_TRAIN


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible here (make test-gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one state per process: after an in-process train.main with --mixed-precision fp16, another with
    bf16 would be refused ("AcceleratorState has already been initialized"), as it would be in one user process."""
    yield
    if "accelerate.state" in sys.modules and not torch.distributed.is_initialized():
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def run_train(tmp_path, capsys):
    """run_train(*argv): train.py's main in this process with TINY_TRAIN's flags and --output-dir tmp_path/runs, started
    as a new process would be (no log handler of an earlier run): its exit status and stderr."""
    import train

    def run(*argv: str) -> SimpleNamespace:
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        try:
            code = train.main(["--output-dir", str(tmp_path / "runs"), *TINY_TRAIN, *argv])
        except SystemExit as e:  # argparse's refusals
            code = e.code
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (use with `pytestmark = pytest.mark.usefixtures("one_thread")`): the
    CPU machines running the suite share 2 cores, and more threads than cores makes CPU matmuls many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
