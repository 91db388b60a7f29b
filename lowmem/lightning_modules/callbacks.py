"""Callbacks that make the memory story visible in TensorBoard.

`MemoryMonitor` logs, every ``log_every_n_steps`` optimizer steps, in MiB (floats: byte counts
lose exactness in float32):

- ``memory/params_mib``, ``memory/grads_mib``, ``memory/optimizer_state_mib``,
  ``memory/grad_buffers_mib`` (gradient buffers that persist because the optimizer keeps state
  in them, e.g. HMAdam's momentum) from :func:`lowmem.optim.state_bytes` (local shard per rank);
  with several ranks also ``memory/<that>_total_mib``, summed over all ranks (one all-reduce of
  four numbers per logged step);
- ``memory/peak_mib``: on CUDA the peak allocated by the caching allocator since the previous log
  (``torch.cuda.max_memory_allocated``, reset after each log); on CPU the process's peak resident
  set size (``ru_maxrss``, monotone over the process lifetime);
- ``time/step_ms``: wall time of the last training batch (forward, backward, optimizer step).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch

from lowmem.lightning_modules.validation import check_optional_positive_int
from lowmem.optim.memory import state_bytes

__all__ = ["MemoryMonitor", "peak_memory_mib"]

MIB = float(2**20)
_TOTALS = ("params", "grads", "state", "grad_buffers")  # summed over ranks under DDP/FSDP2


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA max allocated on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (MIB if sys.platform == "darwin" else 1024.0)


class MemoryMonitor(pl.Callback):
    """Log memory (MiB) and step time (ms) of training; see the module docstring for the keys."""

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        key = "trainer.callbacks[MemoryMonitor].init_args.log_every_n_steps"
        check_optional_positive_int(key, log_every_n_steps, fix="log every n optimizer steps, e.g. 10, or null for "
                                    "trainer.log_every_n_steps")  # fmt: skip
        self.log_every_n_steps = log_every_n_steps
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step_ms = (time.perf_counter() - self._start) * 1e3
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if not every:  # trainer.log_every_n_steps=0: no step logging
            return
        if trainer.global_step % every and trainer.global_step != 1:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if optimizer is None:
            return
        sizes = state_bytes(optimizer)
        metrics = {
            "memory/params_mib": sizes["params"] / MIB,
            "memory/grads_mib": sizes["grads"] / MIB,
            "memory/optimizer_state_mib": sizes["state"] / MIB,
            "memory/grad_buffers_mib": sizes["grad_buffers"] / MIB,
            "memory/peak_mib": peak_memory_mib(pl_module.device),
            "time/step_ms": step_ms,
        }
        if trainer.world_size > 1:  # every rank logs at the same steps: the reduce is reached by all
            local = torch.tensor([sizes[k] for k in _TOTALS], dtype=torch.float64, device=pl_module.device)
            total = trainer.strategy.reduce(local, reduce_op="sum")
            metrics.update({f"memory/{k}_total_mib": float(v) / MIB for k, v in zip(_TOTALS, total.tolist())})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
