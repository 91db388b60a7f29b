"""FSDP2 shards for optimizers whose statistics span a parameter (SlimAdamW, Adam-mini).

``fully_shard`` makes each parameter a DTensor split along dim 0 over a 1-D mesh, in
``torch.chunk`` order: rank ``r`` holds rows ``[r c, min((r+1) c, n))`` with ``c = ceil(n / world)``
(uneven where ``n`` does not divide; a rank may hold none). Element-wise maths runs on the local
shard as it is. A statistic over whole rows of dim 0 is local too. A statistic that spans dim 0
(a mean over the fan-out rows, one value per tensor, a head that straddles two ranks) needs the
other ranks' contributions: these helpers all-reduce the partial sums, or all-gather the per-row
values (one number per row), explicitly, so that each optimizer can count what a step sends.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["is_sharded", "check_fsdp_layout", "local_rows", "all_reduce_sum", "gather_rows", "state_like"]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, gradient or state tensor)."""
    return hasattr(t, "device_mesh")


def check_fsdp_layout(p: Tensor, owner: str) -> None:
    """Raise ``NotImplementedError`` unless ``p`` is sharded along dim 0 over a 1-D mesh."""
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise NotImplementedError(
            f"{owner} runs on FSDP2 parameters sharded along dim 0 over a 1-D mesh (fully_shard); this one has "
            f"placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh. Use FSDP2 data parallelism only, or DDP."
        )


def local_rows(p: Tensor) -> tuple[int, int]:
    """``(first row, number of rows)`` of dim 0 that this rank's shard of ``p`` holds."""
    n, world = p.shape[0], p.device_mesh.size()
    chunk = math.ceil(n / world) if n else 0
    start = min(p.device_mesh.get_local_rank() * chunk, n)
    return start, min(chunk, n - start)


def all_reduce_sum(t: Tensor, p: Tensor) -> Tensor:
    """``t`` summed over the ranks of ``p``'s mesh, in place."""
    torch.distributed.all_reduce(t, group=p.device_mesh.get_group())
    return t


def gather_rows(local: Tensor, p: Tensor) -> Tensor:
    """The full ``(n, *rest)`` tensor of per-row values of ``p``'s dim 0 from each rank's
    ``(local rows, *rest)`` part (a number per row, or a row of k numbers)."""
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size([p.shape[0], *local.shape[1:]])
    full = DTensor.from_local(local.contiguous(), p.device_mesh, [Shard(0)], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())  # fmt: skip
    return full.full_tensor()


def state_like(p: Tensor, full_shape: tuple[int, ...], dtype: torch.dtype, sharded_rows: bool) -> Tensor:
    """A zero state DTensor of ``full_shape`` for FSDP2 parameter ``p``: sharded along dim 0 like
    ``p`` (``sharded_rows``: one entry per row of ``p``, e.g. v per output row), else replicated
    (a per-tensor, per-column or per-head value every rank needs whole)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if sharded_rows:
        local = torch.zeros((local_rows(p)[1], *full_shape[1:]), dtype=dtype, device=p.to_local().device)
        placements = [Shard(0)]
    else:
        local = torch.zeros(full_shape, dtype=dtype, device=p.to_local().device)
        placements = [Replicate()]
    stride = torch.empty(full_shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=torch.Size(full_shape),
                              stride=stride)  # fmt: skip
