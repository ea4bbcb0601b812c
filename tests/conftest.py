"""pytest's set-up for the tests: one CPU thread for the session (and the processes it starts), and the
fixtures. Plain helpers live in tests/helpers.py; test files import them from there, never from here."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Set before torch starts any thread pool, and inherited by the processes the tests start (torchrun, spawn).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch.compile's kernels go to a cache of this session's (of each pytest-xdist worker's) own: the machine-wide
# /tmp/torchinductor_$USER outlives the run, and a kernel left there by a run that was killed, or built under
# other ATEN_CPU_CAPABILITY settings, has crashed the compile tests of a later run (Fatal Python error: Aborted).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="detr-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest
import torch

from helpers import SYNTHETIC_SIZES

# The tests' models are tiny; on a shared 2-core machine a second thread makes small ops ~50x slower as the
# OpenMP threads spin-wait on each other.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The session's synthetic dataset (helpers.SYNTHETIC_SIZES), generated once."""
    from datasets import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "data", **SYNTHETIC_SIZES)
