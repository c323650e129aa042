"""Shared pytest configuration.

The project root goes on sys.path so tests import `mtan`, `data`, ... as a
user would after `cd` into the repository.

Devices. Every test runs on the CPU unless it is marked `requires_cuda`: an
autouse fixture makes torch.cuda.is_available() answer False for it, so on a
machine with a GPU the CPU tests see the machine they were written for (train.py
and eval.py default to the CPU and amp off there) instead of silently training
on the GPU. `requires_cuda` tests (`python -m pytest -m requires_cuda` runs
them all, as tests/gpu_check.py does) are skipped without CUDA (CI has none).

Every test starts with torch's process-wide deterministic mode off, whatever
the test before it (a run with --deterministic) left behind.

`TINY` is the one tiny training configuration of the suite, and `tiny_run` the
one finished run of it, made once per session.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CUDA = torch.cuda.is_available()  # read once, before any test pins the CPU
requires_cuda = pytest.mark.requires_cuda


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_cuda: a GPU test, skipped without CUDA")


def pytest_collection_modifyitems(config, items):
    if not CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "requires_cuda" in item.keywords:
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A CPU test sees a machine without CUDA (see the module docstring), from the setup of its fixtures
    (module-scoped ones too, such as a shared trained run) to their teardown. Subprocesses it starts pass
    `--device cpu` or build their tensors on the CPU themselves."""
    with pytest.MonkeyPatch.context() as patch:
        if "requires_cuda" not in item.keywords:
            patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


# One tiny configuration for every test that trains: 4 synthetic scenes per split at 64x64, a 1/16-width
# network, batch 2 (2 steps per epoch), one epoch. A test that needs another setting appends its flags to it
# (argparse: the last value of a flag wins).
TINY = ["--data", "synthetic", "--resolution", "64x64", "--subset", "4", "--batch-size", "2", "--width", "0.0625",
        "--epochs", "1"]


def tiny(model):
    """TINY for `--model model`: the HRNet models take no --width (their size is their --backbone)."""
    flags = list(TINY)
    if model in ("mtinet", "padnet", "hrnet-mtl"):
        width = flags.index("--width")
        del flags[width:width + 2]
    return ["--model", model] + flags


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The folder of one finished TINY run of MTAN (equal weighting), trained once for the whole session and
    shared by every test that reads a finished run; a test that changes a run works on a copy of it."""
    import train

    out = str(tmp_path_factory.mktemp("tiny") / "mtan")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast and does not stall on a busy CPU
    try:
        train.main(TINY + ["--out", out])
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def one_thread():
    """Small tensors: one intra-op thread is as fast, and on a busy CPU it avoids OpenMP's barrier stalls (an op
    waiting for a descheduled second thread), which made these files up to ten times slower. Restored after.
    A test file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def deterministic_mode_off():
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(False)
