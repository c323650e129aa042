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


@pytest.fixture(autouse=True)
def deterministic_mode_off():
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(False)
