"""CUDA-backend test setup.

The Triton interpreter is selected when `triton.jit` decorates a kernel, so TRITON_INTERPRET must be set
before the kernel module is first imported; on a machine without a GPU that is the only way to run them.
Torch runs single-threaded here: the tiny model's ops are far too small to gain from threads, and on a
busy 2-core machine intra-op spinning made decode steps ~5x slower.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
