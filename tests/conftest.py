"""pytest's set-up for the tests: one CPU thread for the session (and the processes it starts), and the
fixtures. Plain helpers live in tests/helpers.py; test files import them from there, never from here."""
import os
from pathlib import Path

# Set before torch starts any thread pool, and inherited by the processes the tests start (torchrun, spawn).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import SYNTHETIC_SIZES  # noqa: E402

# The tests' models are tiny; on a shared 2-core machine a second thread makes small ops ~50x slower as the
# OpenMP threads spin-wait on each other.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The session's synthetic dataset (helpers.SYNTHETIC_SIZES), generated once."""
    from datasets import synthetic
    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "data", **SYNTHETIC_SIZES)
