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


@pytest.fixture
def no_native(monkeypatch):
    """The hand-written kernels (lowmem.optim._native) unavailable: fast paths use Inductor's."""
    from lowmem.optim import _native

    monkeypatch.setattr(_native, "library", lambda: None)


@pytest.fixture
def foreach_only():
    """The fast path with its foreach tier alone (no native kernels, no torch.compile)."""
    from lowmem.optim import _dispatch

    with _dispatch.only():
        yield


@pytest.fixture
def native_calls(monkeypatch):
    """Record (kernel name, indices given, indices left) of every native element-wise call."""
    from lowmem.optim import _native

    calls, real = [], _native.elementwise

    def spy(name, tensor_lists, scalars):
        rest = real(name, tensor_lists, scalars)
        calls.append((name, len(tensor_lists[0]), len(rest)))
        return rest

    monkeypatch.setattr(_native, "elementwise", spy)
    return calls


@pytest.fixture
def native_kernels(monkeypatch):
    """Count the calls of every native kernel, by name (the library is wrapped, not replaced)."""
    import collections

    from lowmem.optim import _native

    real, calls = _native.library(), collections.Counter()
    assert real is not None, "the native kernels could not be built here"

    class Counting:
        def __getattr__(self, name):
            kernel = getattr(real, name)

            def call(*args):
                calls[name] += 1
                return kernel(*args)

            return call

    monkeypatch.setattr(_native, "library", lambda: Counting())
    return calls


@pytest.fixture(scope="module")
def native_build(tmp_path_factory):
    """The native kernels built with the real compiler (every flag it accepts), once per module,
    into a cache of their own: the library file's path."""
    from _native_state import library_files, new_process

    from lowmem.optim import _native

    folder = tmp_path_factory.mktemp("native_build")
    with pytest.MonkeyPatch.context() as mp:
        new_process(mp, folder)
        assert _native.library() is not None, "the native kernels could not be built here"
    (path,) = library_files(folder)
    return path
