"""Suite-wide fixtures. Tests use small tensors, for which one intra-op thread is fastest and
keeps timings stable on a shared 2-core machine."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank_mesh():
    """A one-rank gloo process group and CPU device mesh: DTensor (FSDP2) parameters in-process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
