"""`LowMemModule`: the LightningModule every lowmem model subclasses.

A subclass says *what* to compute (``forward``, ``compute_loss``) and the base wires *how* it
is optimized: the optimizer arrives as an optimizer strategy (``lowmem.strategies``) or a plain
callable (``OptimizerCallable``: params -> Optimizer), so parameter groups are built in
``configure_optimizers``, after ``configure_model`` and after any strategy wrapping, from the one
shared role classifier (``lowmem.optim.roles``).

Folded momentum (HMAdam keeps its first moment in ``.grad``): whenever the optimizer declares
``folds_momentum_into_grad``, the module's own ``zero_grad()`` leaves ``.grad`` alone. Lightning
calls it at the start of every stage (after restoring a checkpoint) and before every in-fit
validation; with a folding optimizer the only code that touches ``.grad`` between steps is the
optimizer's ``zero_grad()``, which decays it. A newly built folding optimizer starts from zero
momentum (stale buffers are freed in ``configure_optimizers``); a checkpoint restore then writes
its saved momentum back, after which Lightning's stage-start ``zero_grad`` leaves it alone.

Randomness: training draws from torch's global RNG (dropout, anything in ``training_step``) come
from a *training stream* the module owns: its state is restored at the start of every training
batch and captured at the end, and saved in checkpoints (per rank under DDP). So in-fit
validation, sanity checks and DataLoader iterators (which also draw from the global RNG) cannot
change the training trajectory, and a resumed run draws exactly what the uninterrupted one
would have. Draws made while a batch is fetched (augmentation in a Dataset) are not covered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim import Optimizer

from lowmem.strategies import CallableStrategy, FoldedMomentumPrecision, OptimizerStrategy, folds_momentum

__all__ = ["LowMemModule", "ConfigError", "OptimizerArg", "default_optimizer"]

_RNG_KEY = "lowmem_rng_stream"  # checkpoint key: the training stream's RNG states, one per rank

# What a module's ``optimizer`` argument accepts: a lowmem strategy or any optimizer callable.
OptimizerArg = OptimizerStrategy | OptimizerCallable


class ConfigError(ValueError):
    """A configuration value is invalid; the CLI prints it as a one-line error."""


def default_optimizer(params: Iterable) -> Optimizer:
    """AdamW with torch's defaults (lr 1e-3, weight_decay 1e-2)."""
    return torch.optim.AdamW(params)


class LowMemModule(pl.LightningModule):
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
    A subclass that overrides ``on_fit_start``, ``on_train_batch_start``/``_end``,
    ``on_save_checkpoint``/``on_load_checkpoint``, ``configure_optimizers`` or ``zero_grad`` must
    call ``super()``: they carry the optimizer checks, the training RNG stream and the momentum.
    """

    def __init__(
        self,
        optimizer: OptimizerArg = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        self.optimizer_strategy = optimizer if isinstance(optimizer, OptimizerStrategy) else CallableStrategy(optimizer)
        self.lr_scheduler_factory = lr_scheduler
        self.monitor = monitor
        self._folds_momentum = False
        self._rng_stream: dict[str, torch.Tensor] | None = None  # global RNG state(s) of the training stream
        self._in_train_batch = False

    # --- what subclasses provide -----------------------------------------------------------
    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(loss, extra metrics)`` for one batch. Subclasses must implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss(batch) -> (loss, metrics)")

    # --- optimization ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        try:
            optimizer = self.optimizer_strategy.build(self)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"invalid optimizer configuration: {err}") from err
        self._folds_momentum = folds_momentum(optimizer)
        if self._folds_momentum:
            # .grad is this new optimizer's momentum: start it from zero, not from buffers left by an
            # earlier fit (AdamW's momentum restarts too); a checkpoint restore refills it afterwards.
            super().zero_grad(set_to_none=True)
        if self.lr_scheduler_factory is None:
            return optimizer
        try:
            scheduler = self.lr_scheduler_factory(optimizer)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"invalid lr_scheduler configuration: {err}") from err
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "step"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config.update(interval="epoch", monitor=getattr(scheduler, "monitor", self.monitor))
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_fit_start(self) -> None:
        self.optimizer_strategy.check(self.trainer)
        if self._rng_stream is None:  # neither restored nor left by an earlier fit: start it here
            self._rng_stream = _rng_state(self.device)

    def configure_gradient_clipping(self, optimizer: Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:  # fmt: skip
        self.optimizer_strategy.clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- folded momentum: .grad belongs to the optimizer -----------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Free/zero gradients, except when the optimizer keeps its momentum in them (then a no-op)."""
        if not self._folds_momentum:
            super().zero_grad(set_to_none)

    # --- the training RNG stream (see the module docstring) -------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_stream is not None:
            _set_rng_state(self._rng_stream, self.device)
        self._in_train_batch = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._rng_stream = _rng_state(self.device)
        self._in_train_batch = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # ModelCheckpoint saves in its on_train_batch_end, before ours: then the live state is the stream's.
        stream = _rng_state(self.device) if self._in_train_batch else self._rng_stream
        if stream is not None:
            checkpoint[_RNG_KEY] = {name: self._per_rank(state) for name, state in stream.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_RNG_KEY)
        if saved is not None:
            self._rng_stream = {name: self._this_rank(states) for name, states in saved.items()}

    def _per_rank(self, state: torch.Tensor) -> list[torch.Tensor]:
        """``state`` of every rank, in rank order (an all-gather under DDP; call it on all ranks).

        For per-rank state (RNG) in ``on_save_checkpoint``: only rank 0 writes the checkpoint."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return [state.cpu()]
        # Each row gets its own storage: torch 2.13's set_rng_state/Generator.set_state segfault on a
        # view with a storage offset (also after a torch.save/load round trip).
        return [s.cpu().clone() for s in self.all_gather(state.to(self.device))]

    def _this_rank(self, states: list[torch.Tensor]) -> torch.Tensor:
        """This rank's entry of a :meth:`_per_rank` list (rank modulo its length), own storage."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return states[rank % len(states)].clone()

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
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, FoldedMomentumPrecision):
            self.log("precision/momentum_resets", float(plugin.momentum_resets), on_step=True, batch_size=1)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def _current_lr(self) -> float:
        optimizers = self.optimizers(use_pl_optimizer=False)
        optimizer = optimizers[0] if isinstance(optimizers, list) else optimizers
        return float(optimizer.param_groups[0]["lr"])


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global RNG state(s) that training on ``device`` draws from (CPU, and CUDA's)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _batch_size(batch: Any) -> int:
    first: Callable[[Any], Any] = lambda b: b[0] if isinstance(b, (list, tuple)) else b  # noqa: E731
    x = first(batch)
    if isinstance(x, dict):
        x = next(iter(x.values()))
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim > 0 else 1
