"""Shared pytest configuration.

The project root goes on sys.path so tests import `mtan`, `data`, ... as a
user would after `cd` into the repository. `requires_cuda` marks GPU-only
tests: they are skipped on a machine without CUDA (CI has none). Every test
starts with torch's process-wide deterministic mode off, whatever the test
before it (a run with --deterministic) left behind.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
