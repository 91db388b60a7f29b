"""`LowMemModule`: the convenience base of lowmem's models, and of yours.

A subclass says *what* to compute (``forward``, ``compute_loss``) and the base wires *how* it
is optimized: the optimizer arrives as an optimizer strategy (``lowmem.strategies``) or a plain
callable (``OptimizerCallable``: params -> Optimizer), so parameter groups are built in
``configure_optimizers``, after ``configure_model`` and after any strategy wrapping, from the one
shared role classifier (``lowmem.optim.roles``).

It is built from the two pieces any LightningModule can use on its own
(``lowmem.lightning_modules.integration``): :class:`FoldedMomentumMixin` (``zero_grad`` and
clipping for optimizers that keep momentum in ``.grad``) and :class:`LowMemCallback` (fit-start
checks, a fresh momentum, the training RNG stream), which the module brings along through
``configure_callbacks``, so a plain ``Trainer`` gets it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim import Optimizer

from lowmem.lightning_modules.errors import ConfigError, user_code_error
from lowmem.lightning_modules.integration import FoldedMomentumMixin, LowMemCallback
from lowmem.lightning_modules.validation import (
    MODEL,
    check_scheduler,
    check_str,
    config_error,
    scheduler_class_and_kwargs,
    show,
)
from lowmem.strategies import CallableStrategy, OptimizerStrategy

__all__ = ["LowMemModule", "ConfigError", "OptimizerArg", "default_optimizer"]

# What a module's ``optimizer`` argument accepts: a lowmem strategy or any optimizer callable.
OptimizerArg = OptimizerStrategy | OptimizerCallable


def default_optimizer(params: Iterable) -> Optimizer:
    """AdamW with torch's defaults (lr 1e-3, weight_decay 1e-2)."""
    return torch.optim.AdamW(params)


class LowMemModule(FoldedMomentumMixin, pl.LightningModule):
    """Base LightningModule: optimizer and scheduler injected as callables.

    Args:
        optimizer: an optimizer strategy, e.g. in YAML
            ``{class_path: lowmem.strategies.HMAdamW, init_args: {lr: 3e-4}}``, which builds the
            optimizer with its role-based parameter groups and checks the Trainer setup; or any
            optimizer callable (``{class_path: torch.optim.AdamW, init_args: {...}}``), which
            receives two groups (matrices/kernels with the optimizer's weight decay; norms, biases
            and 1-D params with ``weight_decay=0``) given as ``(name, param)`` pairs.
        lr_scheduler: optional, builds a scheduler from the optimizer; stepped every optimizer step
            (``interval="step"``), or on ``monitor`` for ``ReduceLROnPlateau``.
        monitor: the metric ``ReduceLROnPlateau`` watches.

    Subclasses implement ``forward`` and ``compute_loss(batch) -> (loss, metrics dict)``; the base
    logs ``train/loss``, ``val/loss`` (and every extra metric under ``train/``/``val/``) and ``lr``.
    A subclass that overrides ``configure_optimizers``, ``configure_callbacks``, ``zero_grad`` or
    ``configure_gradient_clipping`` must call ``super()``; every other hook is free.
    """

    def __init__(
        self,
        optimizer: OptimizerArg = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        if not isinstance(optimizer, OptimizerStrategy) and not callable(optimizer):
            raise config_error(MODEL + "optimizer", optimizer, "must be an optimizer strategy or an optimizer callable",
                               "give {class_path: lowmem.strategies.AdamW, init_args: {lr: 0.001}} (in Python: "
                               "lowmem.strategies.AdamW(lr=1e-3), not an optimizer instance)")  # fmt: skip
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise config_error(MODEL + "lr_scheduler", lr_scheduler, "must be a scheduler callable or null",
                               "give {class_path: torch.optim.lr_scheduler.LinearLR, init_args: {...}} (in Python: "
                               "functools.partial(LinearLR, total_iters=30), not a scheduler instance)")  # fmt: skip
        check_scheduler(MODEL + "lr_scheduler", lr_scheduler)
        check_str(MODEL + "monitor", monitor, fix="name a logged metric, e.g. val/loss")
        self.optimizer_strategy = optimizer if isinstance(optimizer, OptimizerStrategy) else CallableStrategy(optimizer)
        self.lr_scheduler_factory = lr_scheduler
        self.monitor = monitor
        self.lowmem_callback = LowMemCallback()  # one per module: its RNG stream survives a second fit

    # --- what subclasses provide -----------------------------------------------------------
    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(loss, extra metrics)`` for one batch. Subclasses must implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss(batch) -> (loss, metrics)")

    # --- optimization ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self._trainer is not None:  # refuse the Trainer's setup before the optimizer's own checks raise
            self.optimizer_strategy.check(self.trainer)
        try:
            optimizer = self.optimizer_strategy.build(self)
        except (ValueError, TypeError) as err:
            if (original := user_code_error(err)) is not None:  # e.g. the model's own lowmem_roles()
                raise original
            raise ConfigError(f"{MODEL}optimizer: invalid optimizer configuration: {err}") from err
        if self.lr_scheduler_factory is None:
            return optimizer
        try:
            scheduler = self.lr_scheduler_factory(optimizer)
        except (ValueError, TypeError) as err:
            if (original := user_code_error(err)) is not None:
                raise original
            raise ConfigError(f"{MODEL}lr_scheduler{_scheduler_args(self.lr_scheduler_factory)}: {err}; fix its "
                              "init_args") from err
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "step"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config.update(interval="epoch", monitor=getattr(scheduler, "monitor", self.monitor))
        return {"optimizer": optimizer, "lr_scheduler": config}

    def configure_callbacks(self) -> list[pl.Callback]:
        return [self.lowmem_callback]

    # --- FSDP2 (ModelParallelStrategy) -------------------------------------------------------
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): ``fully_shard`` each of :meth:`fsdp_units` over
        the data-parallel mesh (parameters and gradients become DTensors sharded along dim 0).
        A no-op under every other strategy, and on a second call."""
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_lowmem_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ConfigError(
                f"trainer.strategy.tensor_parallel_size={mesh['tensor_parallel'].size()}: lowmem's models shard with "
                "FSDP2 data parallelism only; set tensor_parallel_size: 1 and data_parallel_size to the device count"
            )
        data_parallel = mesh["data_parallel"] if "data_parallel" in names else mesh
        for unit in self.fsdp_units():
            fully_shard(unit, mesh=data_parallel)
        self._lowmem_sharded = True

    def fsdp_units(self) -> list[torch.nn.Module]:
        """The modules FSDP2 shards as one unit each (one all-gather per unit in forward): by
        default every direct child that holds trainable parameters. Override for finer units
        (e.g. each transformer block); a parameter shared by two units (a tied embedding and LM
        head) must stay inside one."""
        return [child for child in self.children() if any(p.requires_grad for p in child.parameters())]

    # --- steps -------------------------------------------------------------------------------
    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        loss, metrics = self.compute_loss(batch)
        train = stage == "train"
        batch_size = _batch_size(batch)
        # Epoch-level metrics are averaged over all ranks (one all-reduce per metric per epoch);
        # per-step training loss stays rank-local (an all-reduce per step is not worth it).
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=not train, prog_bar=True, batch_size=batch_size,
                 sync_dist=not train)  # fmt: skip
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, prog_bar=not train, batch_size=batch_size,
                     sync_dist=True)  # fmt: skip
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        self.log("lr", self._current_lr(), on_step=True, on_epoch=False, batch_size=1)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def _current_lr(self) -> float:
        optimizers = self.optimizers(use_pl_optimizer=False)
        optimizer = optimizers[0] if isinstance(optimizers, list) else optimizers
        return float(optimizer.param_groups[0]["lr"])


def _scheduler_args(factory: Any) -> str:
    """`` (LinearLR start_factor=0, ...)`` for a scheduler callable that shows its class, else ``""``."""
    found = scheduler_class_and_kwargs(factory)
    if found is None:
        return ""
    cls, kwargs = found
    return f" ({cls.__name__} " + ", ".join(f"{k}={show(v)}" for k, v in kwargs.items()) + ")"


def _batch_size(batch: Any) -> int:
    first: Callable[[Any], Any] = lambda b: b[0] if isinstance(b, (list, tuple)) else b  # noqa: E731
    x = first(batch)
    if isinstance(x, dict):
        x = next(iter(x.values()))
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim > 0 else 1
