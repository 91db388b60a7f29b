"""Start ``nprocs`` worker processes (``spawn``) and wait for them with a hard deadline: a hung
collective must fail the test, not block the suite (the stragglers are killed)."""

from __future__ import annotations

import time
from collections.abc import Callable


def run_workers(worker: Callable[..., None], args: tuple, nprocs: int, timeout_s: float) -> None:
    """``worker(rank, *args)`` in ``nprocs`` processes; raises if one fails or time runs out."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5):
            assert time.monotonic() < deadline, f"workers still running after {timeout_s} s"
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
