"""What an optimizer needs from the Trainer, checked at fit start, and what clipping means for it.

Both read only the optimizer's declared :class:`~lowmem.optim._base.Capabilities`, so they serve
an :class:`~lowmem.strategies.OptimizerStrategy` (before the optimizer exists) and
:class:`~lowmem.lightning_modules.LowMemCallback` (from the optimizers a LightningModule built
itself) alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer

from lowmem.optim._base import Capabilities
from lowmem.strategies.precision import FoldedMomentumPrecision

__all__ = ["StrategyError", "capabilities_of", "check_trainer", "clip_gradients"]


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
    the conservative defaults (no DTensor support). A ``LightningOptimizer`` is unwrapped."""
    optimizer_or_class = getattr(optimizer_or_class, "optimizer", optimizer_or_class)
    cls = optimizer_or_class if isinstance(optimizer_or_class, type) else type(optimizer_or_class)
    return getattr(cls, "capabilities", None) or _TORCH_CAPABILITIES.get(cls) or Capabilities()


def check_trainer(trainer: Any, caps: Capabilities, name: str, single_process: bool = False) -> None:
    """Raise :class:`StrategyError` for a Trainer configuration an optimizer ``name`` with
    capabilities ``caps`` cannot run under; ``single_process``: it refuses a world size above 1."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
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
    if single_process and trainer.world_size > 1:
        raise StrategyError(
            f"{name}(fused_linear=True) is single-process only (the fused weights have no .grad for DDP to "
            f"average); world size is {trainer.world_size}. Set fused_linear: false."
        )
    clip_val = getattr(trainer, "gradient_clip_val", None)
    if clip_val is not None and not (math.isfinite(clip_val) and clip_val >= 0):
        raise StrategyError(
            f"trainer.gradient_clip_val={clip_val} must be a finite number >= 0 (0 or null: no clipping); a negative "
            "threshold would flip the sign of the update."
        )
    if caps.folds_momentum_into_grad and clip_val and (
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
    # Options of a built optimizer that depend on the loop: first resolved for it (HMAdamW's
    # variance_correction="auto": hook in one process, noise elsewhere), then refused where they rule
    # it out (variance_correction="hook": one process).
    loop = {"world_size": trainer.world_size, "grad_scaler": scaler is not None,
            "sharded": isinstance(strategy, ModelParallelStrategy)}  # fmt: skip
    for optimizer in getattr(trainer, "optimizers", None) or ():
        optimizer = getattr(optimizer, "optimizer", optimizer)
        configure = getattr(optimizer, "configure_for_loop", None)
        if callable(configure):
            configure(**loop)
        refusal = getattr(optimizer, "loop_refusal", None)
        message = refusal(**loop) if callable(refusal) else None
        if message:
            raise StrategyError(message)


def clip_gradients(module: Any, optimizer: Optimizer, clip_val: float | None, algorithm: str | None) -> None:
    """What ``Trainer(gradient_clip_val=...)`` means for ``optimizer``.

    Default: Lightning's clipping of ``.grad``. Folded-momentum optimizers: the threshold is
    applied to the global norm of the momentum ``m = (1-b1) B`` (gradient units, the figure an
    AdamW user's threshold is compared with) through the optimizer's ``max_momentum_norm``;
    ``.grad`` itself, i.e. the history, is never clipped by Lightning. Value clipping is refused.
    """
    if not clip_val:
        return
    caps = capabilities_of(optimizer)
    if not caps.folds_momentum_into_grad:
        module.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)
        return
    if algorithm not in (None, "norm"):
        raise StrategyError(_value_clipping_message(type(optimizer).__name__, algorithm))
    for group in optimizer.param_groups:
        group["max_momentum_norm"] = float(clip_val)


def _value_clipping_message(name: str, algorithm: Any) -> str:
    algorithm = getattr(algorithm, "value", algorithm)  # Lightning's GradClipAlgorithmType: its string
    return (
        f"{name} keeps its momentum in .grad; trainer.gradient_clip_algorithm={algorithm} would clip the momentum "
        "history element-wise. Use gradient_clip_algorithm=norm (clips the momentum's global norm, gradient units) "
        "or no clipping."
    )


def _lossy_comm_hook(strategy: Any) -> bool:
    """Whether a DDP strategy transforms gradients in flight (anything but the plain all-reduce hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    hook = getattr(strategy, "_ddp_comm_hook", None)
    return getattr(strategy, "_ddp_comm_wrapper", None) is not None or hook not in (None, allreduce_hook)
