"""`OptimizerStrategy`: everything an optimizer needs from the training loop, in one object.

A strategy

- builds the optimizer and its parameter groups from the module (roles, no-decay groups, SlimAdam
  rules, AdaPM partitions, IO-Adam hooks);
- declares the optimizer's capabilities and checks them against the Trainer's Lightning strategy
  and precision at setup, failing fast with a message that names the alternative;
- picks the precision plugin that is safe for the optimizer (``precision_plugin``);
- defines what the Trainer's ``gradient_clip_val`` means for the optimizer (``clip_gradients``).

The ``zero_grad`` policy of folded-momentum optimizers lives in ``LowMemModule`` (it protects
``.grad`` from Lightning's own zeroing whenever the optimizer declares
``folds_momentum_into_grad``), so it also holds for an optimizer given as a plain callable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from lowmem.optim._base import Capabilities
from lowmem.optim.roles import weight_decay_param_groups
from lowmem.strategies.precision import FoldedMomentumPrecision

__all__ = ["OptimizerStrategy", "CallableStrategy", "StrategyError", "capabilities_of"]


class StrategyError(ValueError):
    """An optimizer cannot run under the configured Lightning strategy, precision or clipping."""


# torch's optimizers declare no capabilities; these are the ones lowmem offers or users pick most.
# Elementwise ones run on FSDP2 DTensors; Adafactor factors by shape (and fails on DTensors).
_TORCH_CAPABILITIES = {
    torch.optim.AdamW: Capabilities(supports_dtensor=True),
    torch.optim.Adam: Capabilities(supports_dtensor=True),
    torch.optim.SGD: Capabilities(supports_dtensor=True),
    torch.optim.Adafactor: Capabilities(needs_full_shapes=True, supports_dtensor=False),
}


def capabilities_of(optimizer_or_class: Any) -> Capabilities:
    """The optimizer's declared ``capabilities`` (lowmem optimizers), torch's from a table, else
    the conservative defaults (no DTensor support)."""
    cls = optimizer_or_class if isinstance(optimizer_or_class, type) else type(optimizer_or_class)
    return getattr(cls, "capabilities", None) or _TORCH_CAPABILITIES.get(cls) or Capabilities()


class OptimizerStrategy:
    """Base class. Subclasses set ``optimizer_class`` and pass the optimizer's keyword arguments.

    Args:
        role_overrides: ``{fnmatch pattern on parameter names: role}`` for layers the role
            classifier cannot read (see ``lowmem.optim.roles``).
        **hparams: keyword arguments of the optimizer.
    """

    optimizer_class: ClassVar[type[Optimizer]]

    def __init__(self, role_overrides: Mapping[str, str] | None = None, **hparams: Any) -> None:
        self.role_overrides = dict(role_overrides or {})
        self.hparams = hparams

    # --- building --------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return capabilities_of(self.optimizer_class)

    @property
    def name(self) -> str:
        return self.optimizer_class.__name__

    def param_groups(self, module: nn.Module) -> list[dict]:
        """Groups for ``module``; the default separates decayed matrices from norms/biases."""
        return weight_decay_param_groups(module, overrides=self.role_overrides)

    def build(self, module: nn.Module) -> Optimizer:
        """The optimizer for ``module`` (the unwrapped LightningModule)."""
        return self.optimizer_class(self.param_groups(module), **self.hparams)

    def __call__(self, params: Iterable) -> Optimizer:
        """Build from plain parameters or groups (``OptimizerCallable`` compatible)."""
        return self.optimizer_class(params, **self.hparams)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"

    # --- checks ----------------------------------------------------------------------------------
    def check(self, trainer: Any) -> None:
        """Raise :class:`StrategyError` for a Trainer configuration this optimizer cannot run under."""
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        caps, name, strategy = self.capabilities, self.name, trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) and (caps.folds_momentum_into_grad or caps.needs_full_shapes or caps.needs_model):
            raise StrategyError(
                f"{name} cannot run under DeepSpeed: DeepSpeed keeps gradients in its own flat buffers and frees "
                f"them every step{' (the momentum lives in .grad)' if caps.folds_momentum_into_grad else ''}. "
                "Use trainer.strategy=ddp, or FSDP2 via lightning.pytorch.strategies.ModelParallelStrategy"
                + ("" if caps.supports_dtensor else f" (not supported by {name} either; use ddp)") + "."
            )
        if isinstance(strategy, FSDPStrategy) and (caps.folds_momentum_into_grad or caps.needs_full_shapes or caps.needs_model):
            raise StrategyError(
                f"{name} is not supported under FSDP1 (trainer.strategy=fsdp): it flattens parameters into shards "
                "and its gradient accumulation into sharded .grad is untested with lowmem. Use trainer.strategy=ddp"
                + (", or FSDP2 via ModelParallelStrategy" if caps.supports_dtensor else "") + "."
            )
        if isinstance(strategy, ModelParallelStrategy) and not caps.supports_dtensor:
            why = (
                "its maths needs full parameter shapes on every rank"
                if caps.needs_full_shapes
                else "it does not declare DTensor support (capabilities.supports_dtensor)"
            )
            raise StrategyError(
                f"{name} does not support FSDP2/ModelParallelStrategy (DTensor parameters): {why}. "
                "Use trainer.strategy=ddp."
            )
        if isinstance(strategy, DDPStrategy) and caps.folds_momentum_into_grad and _lossy_comm_hook(strategy):
            raise StrategyError(
                f"{name} keeps its momentum in .grad, which DDP all-reduces every step: a gradient-compression "
                "comm hook or wrapper (fp16/bf16 compress, PowerSGD) would quantise the momentum history on every "
                "step. Remove ddp_comm_hook/ddp_comm_wrapper, or use AdamW/AdamS if you need compression."
            )
        if caps.needs_model and self.hparams.get("fused") and trainer.world_size > 1:
            raise StrategyError(
                f"{name}(fused=True) is single-process only (the fused weights have no .grad for DDP to "
                f"average); world size is {trainer.world_size}. Set fused: false."
            )
        if caps.folds_momentum_into_grad and getattr(trainer, "gradient_clip_val", None) and (
            getattr(trainer, "gradient_clip_algorithm", None) not in (None, "norm")
        ):
            raise StrategyError(_value_clipping_message(name, trainer.gradient_clip_algorithm))
        plugin = trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None and caps.folds_momentum_into_grad and not isinstance(plugin, FoldedMomentumPrecision):
            raise StrategyError(
                f"{name} is not safe with a plain fp16 GradScaler ({type(plugin).__name__}): unscale_ would divide the "
                "momentum history stored in .grad by the loss scale every step, and one overflow would leave an inf in "
                "it for good. Use precision bf16-mixed, or the plugin lowmem.strategies.FoldedMomentumPrecision "
                "(trainer.plugins) instead of trainer.precision=16-mixed; the lowmem CLI swaps it in for you."
            )
        if scaler is not None and not caps.supports_grad_scaler and not caps.folds_momentum_into_grad:
            raise StrategyError(
                f"{name} cannot run with an fp16 GradScaler ({type(plugin).__name__}): its statistics see the "
                "loss-scaled gradients that the scaler's unscale_ never reaches. Use precision bf16-mixed (or 32-true)."
            )

    # --- precision and clipping ------------------------------------------------------------------
    def precision_plugin(self, precision: str, device: str) -> Any | None:
        """The plugin to use instead of ``precision``, or None if Lightning's default is safe."""
        if self.capabilities.folds_momentum_into_grad and str(precision) in ("16-mixed", "16"):
            return FoldedMomentumPrecision("16-mixed", device=device)
        return None

    def clip_gradients(self, module: Any, optimizer: Optimizer, clip_val: float | None, algorithm: str | None) -> None:
        """What ``Trainer(gradient_clip_val=...)`` means for this optimizer.

        Default: Lightning's clipping of ``.grad``. Folded-momentum optimizers: the threshold is
        applied to the global norm of the momentum ``m = (1-b1) B`` (gradient units, the figure an
        AdamW user's threshold is compared with) through the optimizer's ``max_momentum_norm``;
        ``.grad`` itself, i.e. the history, is never clipped by Lightning. Value clipping is refused.
        """
        if not clip_val:
            return
        if not self.capabilities.folds_momentum_into_grad:
            module.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)
            return
        if algorithm not in (None, "norm"):
            raise StrategyError(_value_clipping_message(self.name, algorithm))
        for group in optimizer.param_groups:
            group["max_momentum_norm"] = float(clip_val)


def _value_clipping_message(name: str, algorithm: str) -> str:
    return (
        f"{name} keeps its momentum in .grad; gradient_clip_algorithm={algorithm!r} would clip the momentum "
        "history element-wise. Use gradient_clip_algorithm=norm (clips the momentum's global norm, gradient units) "
        "or no clipping."
    )


def _lossy_comm_hook(strategy: Any) -> bool:
    """Whether a DDP strategy transforms gradients in flight (anything but the plain all-reduce hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    hook = getattr(strategy, "_ddp_comm_hook", None)
    return getattr(strategy, "_ddp_comm_wrapper", None) is not None or hook not in (None, allreduce_hook)


class CallableStrategy(OptimizerStrategy):
    """Wraps a plain optimizer factory (``params -> Optimizer``, e.g. ``torch.optim.AdamW`` from a
    config's ``class_path``); capabilities are read from the optimizer it builds."""

    def __init__(self, factory: Callable[[Iterable], Optimizer]) -> None:
        super().__init__()
        self.factory = factory
        self._built: type[Optimizer] | None = None

    @property
    def capabilities(self) -> Capabilities:
        return capabilities_of(self._built) if self._built is not None else Capabilities()

    @property
    def name(self) -> str:
        return self._built.__name__ if self._built is not None else "optimizer"

    def build(self, module: nn.Module) -> Optimizer:
        optimizer = self.factory(self.param_groups(module))
        self._built = type(optimizer)
        return optimizer

    def __call__(self, params: Iterable) -> Optimizer:
        return self.factory(params)

    def __repr__(self) -> str:
        return f"CallableStrategy({self.factory!r})"
