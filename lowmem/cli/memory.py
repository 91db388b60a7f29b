"""`lowmem memory --config X.yaml`: the params/grads/state table of a config, without training;
the memory summary that ends every `lowmem fit` (and so `make run`).

Optimizer state is created lazily on the first ``step()``, so the report takes one real step on one
batch, on a copy of the model, for the configured optimizer and for AdamW on the same parameter
groups (the baseline every ratio is against).

The end-of-fit summary (:func:`fit_memory_summary`) replays one optimizer step of the trained
model (a copy, on the CPU, where Lightning leaves it after ``fit``) on one training batch, with the
run's number of micro-batches per step and its precision's autocast, once with the run's
optimizer and once with ``torch.optim.AdamW`` on the same parameter groups, and prints what each
held: params, grads (after the backward), optimizer state, persistent grad buffers and the peak
of the step. The peak is tensor bytes (:func:`peak_step_bytes`: the tensors alive when the step
starts plus the largest running sum of the CPU allocator's allocations minus frees recorded by
``torch.profiler``), the CPU analogue of ``torch.cuda.max_memory_allocated``, never the process's
RSS.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer

from lowmem.lightning_modules.base import LowMemModule
from lowmem.optim.memory import sharded_state_bytes, state_bytes, tensor_bytes
from lowmem.strategies import CallableStrategy

__all__ = ["measure_optimizer_memory", "memory_report", "format_memory_table", "peak_step_bytes", "fit_memory_summary"]

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


# --- the peak of a training step, in tensor bytes --------------------------------------------------
def _live_bytes(model: torch.nn.Module, optimizer: Optimizer, batch: Any) -> int:
    """Bytes of the distinct tensors alive between two steps: params, buffers, grads, state, batch."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, (list, tuple)):
                tensors += [v for v in value if isinstance(v, torch.Tensor)]
    tensors += [t for t in (batch if isinstance(batch, (list, tuple)) else [batch]) if isinstance(t, torch.Tensor)]
    return tensor_bytes(tensors)


def _allocation_peak(prof: Any) -> tuple[int, str]:
    """Largest running total of (allocations - frees) recorded by the profiler, in bytes, and the
    phase (``record_function("phase:...")`` range) in which it was reached."""
    from torch._C._profiler import _EventType

    events, stack = [], [(e, "") for e in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        event, phase = stack.pop()
        if event.name.startswith("phase:"):
            phase = event.name.removeprefix("phase:")
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size, phase))
        stack.extend((child, phase) for child in event.children)
    running = peak = 0
    where = "start"
    for _, size, phase in sorted(events):
        running += size
        if running > peak:
            peak, where = running, phase or "?"
    return peak, where


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the body: the profiler's C++ side prints a start and a stop
    line (``USDT: ... profiler_start``) that would land in the middle of the fit's report."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_bytes(model: Any, optimizer: Optimizer, batch: Any, micro_batches: int = 1,
                    forward_context: Callable[[], AbstractContextManager] = nullcontext) -> tuple[int, str, dict[str, int]]:  # fmt: skip
    """Run one training step (``micro_batches`` forward/backward passes of ``batch``, each loss
    divided by their number, then ``step()`` and ``zero_grad()``) under the CPU memory profiler;
    return (peak tensor bytes, phase of the peak, :func:`state_bytes` after ``step()``)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    start = _live_bytes(model, optimizer, batch)
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(micro_batches):
            with record_function("phase:forward"), forward_context():
                loss = model.compute_loss(batch)[0] / micro_batches
            with record_function("phase:backward"):
                loss.backward()
            del loss
        with record_function("phase:step"):
            optimizer.step()
        sizes = state_bytes(optimizer)
        with record_function("phase:zero_grad"):
            optimizer.zero_grad()
    peak, where = _allocation_peak(prof)
    return start + peak, where, sizes


def _replay(model: LowMemModule, batch: Any, factory: Any | None, micro_batches: int,
            forward_context: Callable[[], AbstractContextManager]) -> dict[str, Any]:  # fmt: skip
    """A warm-up step (creates the state) then the measured one, on a copy of ``model``."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = None
    if factory is not None:
        model.optimizer_strategy = CallableStrategy(factory)
    model.lr_scheduler_factory = None
    optimizer = _optimizer_of(model.configure_optimizers())
    with forward_context():
        loss = model.compute_loss(batch)[0]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    del loss
    peak, where, sizes = peak_step_bytes(model, optimizer, batch, micro_batches, forward_context)
    return {"name": type(optimizer).__name__, "peak": peak, "peak_phase": where, **sizes}


def _on_cpu(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.cpu()
    if isinstance(batch, (list, tuple)):
        return type(batch)(_on_cpu(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _on_cpu(v) for k, v in batch.items()}
    return batch


def fit_memory_rows(trainer: pl.Trainer, model: LowMemModule, datamodule: Any) -> tuple[dict, dict | None, int]:
    """(the run's optimizer, AdamW, micro-batches per step): :func:`state_bytes` of each after the
    replayed step's ``step()`` plus ``peak`` (tensor bytes) and ``peak_phase``; see the module doc.
    ``adamw`` is None when the run's optimizer is AdamW itself. The replays run on the CPU; the
    trained model goes back to its device afterwards."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        return _fit_memory_rows(trainer, model.cpu(), datamodule)
    finally:
        model.to(device)


def _fit_memory_rows(trainer: pl.Trainer, model: LowMemModule, datamodule: Any) -> tuple[dict, dict | None, int]:
    batch = _on_cpu(next(iter(datamodule.train_dataloader())))
    k = max(1, int(trainer.accumulate_grad_batches))
    precision = str(getattr(trainer, "precision", ""))
    context: Callable[[], AbstractContextManager] = nullcontext  # the replay runs on the CPU: autocast there
    if precision.endswith("-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        context = lambda: torch.autocast("cpu", dtype=dtype)  # noqa: E731
    with warnings.catch_warnings():  # the run has shown its warnings already
        warnings.simplefilter("ignore")
        ours = _replay(model, batch, None, k, context)
        if ours["name"] == "AdamW":
            return ours, None, k
        adamw = _replay(model, batch, lambda groups: torch.optim.AdamW(groups), k, context)
    adamw["name"] = "AdamW"
    return ours, adamw, k


def fit_memory_summary(trainer: pl.Trainer, model: Any, datamodule: Any) -> str | None:
    """The lines ``lowmem fit`` ends with (module docstring); None when there is nothing to replay
    (not a LowMemModule, no training data, no optimizer step)."""
    if not isinstance(model, LowMemModule) or datamodule is None or trainer.global_step == 0:
        return None
    ours, adamw, k = fit_memory_rows(trainer, model, datamodule)

    def line(row: dict[str, Any]) -> str:
        return (f"lowmem fit:   {row['name']:<12} params {row['params'] / MIB:8.2f} | grads {row['grads'] / MIB:8.2f} | "
                f"optimizer state {row['state'] / MIB:8.2f} | grad buffers {row['grad_buffers'] / MIB:8.2f} | "
                f"peak {row['peak'] / MIB:8.2f} (in {row['peak_phase']})")  # fmt: skip

    def ratio(key: str) -> str:
        return f"{ours[key] / adamw[key]:.1%}" if adamw[key] else "n/a"

    micro = f", {k} micro-batches" if k > 1 else ""
    head = (f"lowmem fit: memory of one training step of this model (MiB of tensors, one training batch{micro}, "
            "replayed on a copy after the fit")  # fmt: skip
    if adamw is None:
        return "\n".join([head + "):", line(ours)])
    return "\n".join([
        head + "; AdamW on the same parameter groups):",
        line(ours),
        line(adamw),
        f"lowmem fit:   {ours['name']} vs AdamW: optimizer state {ratio('state')}, state + grad buffers "
        f"{ratio('persistent')}, peak {ratio('peak')}",
    ])  # fmt: skip
