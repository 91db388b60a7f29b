"""SlimAdamW on FSDP2 shards (2 processes, gloo): the mean over a sharded dim is global.

``fully_shard`` splits dim 0 of every parameter over the ranks: unevenly for Linear(7, 5)
(3 + 2 rows) and with one rank holding nothing for Linear(3, 1) (a parameter smaller than the
world size). Averaging v over dim 1 (fan-in of a Linear) needs no communication; averaging over
dim 0 (fan-out) needs the sums of every rank's rows: one all-reduce of v's size, counted in
``comm_bytes_per_step``. The control switches that all-reduce off: the result is then wrong.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lowmem import optim

WORLD, STEPS = 2, 20


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))


def _groups(model: nn.Module, dim: int) -> list[dict]:
    return [{"params": [p], "compress_dims": (dim if p.ndim == 2 else None)} for p in model.parameters()]


def _train(model: nn.Module, opt: optim.SlimAdamW, rank: int = 0, world: int = 1) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(8, 7, generator=gen), torch.randn(8, 1, generator=gen)
        n = 8 // world
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n]).backward()
        opt.step()


def _worker(rank: int, tmp: str, dim: int, without_all_reduce: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        if without_all_reduce:
            dist.all_reduce = lambda tensor, **kw: None  # the control: local row sums only
        mesh = init_device_mesh("cpu", (WORLD,))
        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        opt = optim.SlimAdamW(_groups(model, dim), lr=1e-2, fused=False)
        _train(model, opt, rank, WORLD)
        full = [p.full_tensor() for p in model.parameters()]
        if rank == 0:
            torch.save({"params": full, "comm_bytes": opt.comm_bytes_per_step}, f"{tmp}/result.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_sharded(tmp_path, dim: int, without_all_reduce: bool = False) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(str(tmp_path), dim, without_all_reduce), nprocs=WORLD, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 120  # a hung collective must fail, not block the suite
    try:
        while not ctx.join(timeout=5):
            assert time.monotonic() < deadline, "FSDP2 workers timed out"
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return torch.load(tmp_path / "result.pt", weights_only=True)


def _reference(dim: int) -> list[torch.Tensor]:
    model = _model()
    _train(model, optim.SlimAdamW(_groups(model, dim), lr=1e-2, fused=False))
    return [p.detach() for p in model.parameters()]


@pytest.mark.distributed
@pytest.mark.parametrize("dim", [0, 1], ids=["fan-out-dim0-all-reduced", "fan-in-dim1-local"])
def test_sharded_slimadamw_matches_one_process(dim, tmp_path):
    result = _run_sharded(tmp_path, dim)
    diff = max(float((a - b).abs().max()) for a, b in zip(result["params"], _reference(dim)))
    assert diff < 1e-6, diff
    # v of the three weights averaged over dim 0: (1, 7) + (1, 5) + (1, 3) float32 sums per step.
    assert result["comm_bytes"] == (4 * (7 + 5 + 3) if dim == 0 else 0)


@pytest.mark.distributed
def test_negative_control_local_row_means_are_wrong(tmp_path):
    result = _run_sharded(tmp_path, 0, without_all_reduce=True)
    diff = max(float((a - b).abs().max()) for a, b in zip(result["params"], _reference(0)))
    assert diff > 1e-3, diff
