"""Suite-wide settings: tests use small tensors, for which one intra-op thread is fastest and
keeps timings stable on a shared 2-core machine."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
