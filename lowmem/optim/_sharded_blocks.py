"""Adam-mini's blocks on FSDP2 shards: v of the local rows, with the statistics that span dim 0.

Shared by :class:`~lowmem.optim.AdamMini` and AdaPM-mini (:class:`~lowmem.optim.AdaPM` with
``second_moment="mini"``). See :mod:`lowmem.optim._sharding` for the shard layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lowmem.optim._sharding import all_reduce_sum, gather_rows, is_sharded, local_rows, state_like
from lowmem.optim.blocks import block_means_of_rows, block_shape, expand_blocks

__all__ = ["block_comm_bytes", "block_v_state", "fan_out", "sharded_block_mean_sq", "sharded_expand"]


def fan_out(p: torch.Tensor, blocks: Mapping[str, Any]) -> int:
    return blocks["fan_out_dim"] % p.ndim


def sharded_block_mean_sq(g: torch.Tensor, blocks: Mapping[str, Any], p: torch.Tensor) -> torch.Tensor:
    """:func:`~lowmem.optim.blocks.block_mean_sq` of the local shard ``g`` of FSDP2 parameter ``p``,
    in the layout of its v state (:func:`block_v_state`). Entries and whole rows of dim 0 are local; a
    tensor's mean and rows of another fan-out dim all-reduce their partial sums; head and q/k/v
    blocks (which may straddle two ranks) all-gather the per-row means, one number per row."""
    kind, sq = blocks["block"], g.contiguous() * g.contiguous()
    if kind == "element" or p.ndim == 0:
        return sq
    if kind == "tensor":
        return all_reduce_sum(sq.sum(), p) / p.numel()
    d = fan_out(p, blocks)
    others = [i for i in range(p.ndim) if i != d]
    if d == 0:
        row_mean = sq.mean(dim=others, keepdim=True) if others else sq
        if kind == "row":
            return row_mean
        return block_means_of_rows(gather_rows(row_mean.reshape(-1), p), p.shape, blocks)
    row_mean = all_reduce_sum(sq.sum(dim=others, keepdim=True), p) / (p.numel() // p.shape[d])
    return row_mean if kind == "row" else block_means_of_rows(row_mean.reshape(-1), p.shape, blocks)


def sharded_expand(v: torch.Tensor, blocks: Mapping[str, Any], p: torch.Tensor) -> torch.Tensor:
    """The local v of FSDP2 parameter ``p``, broadcastable against its shard: head/q/k/v blocks
    (held whole on every rank) are expanded and, along dim 0, cut to this rank's rows."""
    if blocks["block"] not in ("head", "qkv") or p.ndim == 0:
        return v
    full = expand_blocks(v, p.shape, blocks)
    if fan_out(p, blocks) != 0:
        return full
    start, count = local_rows(p)
    return full[start : start + count]


def block_v_state(p: torch.Tensor, group: dict, dtype: torch.dtype) -> torch.Tensor:
    """The zero v of ``p``. FSDP2 parameters get a DTensor: sharded like ``p`` where v has one
    entry per entry or per row of dim 0, replicated where it is per tensor, per row of another
    fan-out dim or per head (every rank needs those whole)."""
    shape = block_shape(p.shape, group)
    if not is_sharded(p):
        return torch.zeros(shape, dtype=dtype, device=p.device)
    kind = group["block"]
    per_row_0 = p.ndim > 0 and (kind == "element" or (kind == "row" and fan_out(p, group) == 0))
    return state_like(p, shape, dtype, sharded_rows=per_row_0)


def block_comm_bytes(p: torch.Tensor, group: Mapping[str, Any], v: torch.Tensor) -> int:
    """Bytes one Adam-mini (or AdaPM-mini) step sends for the v for parameter ``p`` (the payload of its all-reduce or
    all-gather; 0 for a plain tensor, entries and rows of dim 0)."""
    kind = group["block"]
    if not is_sharded(p) or kind == "element" or p.ndim == 0:
        return 0
    if kind == "tensor":
        return v.element_size()
    if fan_out(p, group) == 0:
        return 0 if kind == "row" else p.shape[0] * v.element_size()  # all-gathered row means
    return p.shape[fan_out(p, group)] * v.element_size()
