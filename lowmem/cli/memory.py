"""`lowmem memory --config X.yaml`: the params/grads/state table of a config, without training.

Optimizer state is created lazily on the first ``step()``, so the report takes one real step on one
batch, on a copy of the model, for the configured optimizer and for AdamW on the same parameter
groups (the baseline every ratio is against).
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer

from lowmem.lightning_modules.base import LowMemModule
from lowmem.optim.memory import sharded_state_bytes, state_bytes
from lowmem.strategies import CallableStrategy

__all__ = ["measure_optimizer_memory", "memory_report", "format_memory_table"]

MIB = float(2**20)


def _optimizer_of(configured: Any) -> Optimizer:
    if isinstance(configured, dict):
        return configured["optimizer"]
    return configured


def measure_optimizer_memory(model: LowMemModule, batch: Any, optimizer_factory: Any | None = None,
                             ranks: int = 1) -> dict[str, int]:  # fmt: skip
    """state_bytes after one forward/backward/step of a copy of ``model`` on ``batch``; with
    ``ranks > 1`` also ``persistent_per_rank`` and ``persistent_total`` under FSDP2's shard plan
    (:func:`lowmem.optim.sharded_state_bytes`; per rank: rank 0, the largest)."""
    model = copy.deepcopy(model)
    if optimizer_factory is not None:
        model.optimizer_strategy = CallableStrategy(optimizer_factory)
        model.lr_scheduler_factory = None
    optimizer = _optimizer_of(model.configure_optimizers())
    loss, _ = model.compute_loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    sizes = state_bytes(optimizer)
    if ranks > 1:
        per_rank = sharded_state_bytes(optimizer, ranks)
        sizes.update(persistent_per_rank=per_rank[0]["persistent"],
                     persistent_total=sum(r["persistent"] for r in per_rank))  # fmt: skip
    return sizes


def memory_report(model: LowMemModule, datamodule: pl.LightningDataModule, ranks: int = 1) -> list[dict[str, Any]]:
    """Rows for the configured optimizer and the AdamW baseline (MiB and ratio of persistent state);
    ``ranks > 1`` adds the persistent state per rank and in total under FSDP2 with that many ranks."""
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    measured = {
        "AdamW (baseline)": measure_optimizer_memory(model, batch, lambda groups: torch.optim.AdamW(groups), ranks),
    }
    configured = measure_optimizer_memory(model, batch, ranks=ranks)
    name = type(_optimizer_of(copy.deepcopy(model).configure_optimizers())).__name__
    measured[name] = configured
    base = measured["AdamW (baseline)"]["persistent"] or 1
    return [
        {"optimizer": key, **{k: v / MIB for k, v in sizes.items()}, "vs_adamw": sizes["persistent"] / base}
        for key, sizes in measured.items()
    ]


def format_memory_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: MiB of params, grads, state, grad buffers, persistent, and the ratio."""
    cols = ["params", "grads", "state", "grad_buffers", "persistent"]
    cols += [c for c in ("persistent_per_rank", "persistent_total") if c in rows[0]]
    lines = ["| optimizer | " + " | ".join(f"{c} MiB" for c in cols) + " | persistent vs AdamW |",
             "|---|" + "---:|" * (len(cols) + 1)]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['optimizer']} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + f" | {row['vs_adamw']:.1%} |")
    return "\n".join(lines)
