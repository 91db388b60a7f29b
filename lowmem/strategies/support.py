"""The support matrix (optimizer x Lightning strategy / precision / clipping), computed from the code.

Each cell runs the strategy's own fit-start check (``OptimizerStrategy.check``, which reads the
optimizer's declared capabilities) against a stand-in Trainer with that Lightning strategy,
precision plugin or clipping, so the README table cannot disagree with what ``lowmem fit``
refuses. The README's table is this module's output, checked by the tests::

    python -m lowmem.strategies.support
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from lowmem.strategies.base import OptimizerStrategy
from lowmem.strategies.catalog import REGISTRY
from lowmem.strategies.checks import StrategyError

__all__ = ["COLUMNS", "support_matrix"]


def _bare(cls: type) -> Any:
    """An instance of a Lightning strategy class without running its ``__init__`` (DeepSpeed's
    needs the deepspeed package, FSDP1's refuses CPU): the checks only test its type."""
    return cls.__new__(cls)


def _trainer(strategy: Any = None, plugin: Any = None, clip: str | None = None) -> SimpleNamespace:
    from lightning.pytorch.plugins.precision import Precision

    return SimpleNamespace(strategy=strategy, precision_plugin=plugin or Precision(), world_size=2,
                           gradient_clip_val=1.0 if clip else None, gradient_clip_algorithm=clip)  # fmt: skip


def _ddp(lossy: bool = False) -> Any:
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    ddp = _bare(DDPStrategy)
    ddp._ddp_comm_hook, ddp._ddp_comm_wrapper = (fp16_compress_hook if lossy else None), None
    return ddp


def _strategy(name: str) -> Callable[[], Any]:
    def make() -> Any:
        import lightning.pytorch.strategies as strategies

        return _bare(getattr(strategies, name))

    return make


def _fp16(strategy: OptimizerStrategy) -> SimpleNamespace:
    """``precision: 16-mixed`` as the CLI sets it up: the strategy's own plugin where it has one."""
    import torch
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = strategy.precision_plugin("16-mixed", "cpu")
    return _trainer(plugin=plugin or MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")))


# column title -> the stand-in Trainer for a strategy
COLUMNS: dict[str, Callable[[OptimizerStrategy], SimpleNamespace]] = {
    "DDP": lambda s: _trainer(_ddp()),
    "DDP lossy comm hook": lambda s: _trainer(_ddp(lossy=True)),
    "FSDP2 (ModelParallel)": lambda s: _trainer(_strategy("ModelParallelStrategy")()),
    "FSDP1": lambda s: _trainer(_strategy("FSDPStrategy")()),
    "DeepSpeed": lambda s: _trainer(_strategy("DeepSpeedStrategy")()),
    "fp16 `16-mixed`": _fp16,
    "bf16-mixed / bf16-true / 32": lambda s: _trainer(),
    "value clip": lambda s: _trainer(clip="value"),
}


def _cell(strategy: OptimizerStrategy, column: str) -> str:
    trainer = COLUMNS[column](strategy)
    try:
        strategy.check(trainer)
    except StrategyError:
        return "✗"
    plugin = type(trainer.precision_plugin).__name__
    return f"✓ via `{plugin}`" if plugin == "FoldedMomentumPrecision" else "✓"


def support_matrix() -> str:
    """The markdown table: one row per set of strategies with the same cells (registry order)."""
    rows: dict[tuple[str, ...], list[str]] = {}
    for name, strategy_class in REGISTRY.items():
        cells = tuple(_cell(strategy_class(), column) for column in COLUMNS)
        rows.setdefault(cells, []).append(name)
    lines = ["| | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {', '.join(names)} | " + " | ".join(cells) + " |" for cells, names in rows.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(support_matrix())
