"""`OptimizerStrategy`: everything an optimizer needs from the training loop, in one object.

A strategy

- builds the optimizer and its parameter groups from the module (roles, no-decay groups, SlimAdam
  rules, AdaPM partitions, IO-Adam hooks);
- declares the optimizer's capabilities and checks them against the Trainer's Lightning strategy
  and precision at setup, failing fast with a message that names the alternative;
- picks the precision plugin that is safe for the optimizer (``precision_plugin``);
- defines what the Trainer's ``gradient_clip_val`` means for the optimizer (``clip_gradients``).

The ``zero_grad`` policy of folded-momentum optimizers lives in
``lowmem.lightning_modules.FoldedMomentumMixin`` (it protects ``.grad`` from Lightning's own
zeroing whenever the optimizer declares ``folds_momentum_into_grad``), and the fit-start checks
run from ``lowmem.lightning_modules.LowMemCallback``, so both also hold for an optimizer given
as a plain callable or built by a user's own ``configure_optimizers``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from torch import nn
from torch.optim import Optimizer

from lowmem.optim._base import Capabilities
from lowmem.optim.roles import weight_decay_param_groups
from lowmem.strategies.checks import StrategyError, capabilities_of, check_trainer, clip_gradients
from lowmem.strategies.precision import FoldedMomentumPrecision

__all__ = ["OptimizerStrategy", "CallableStrategy"]


class OptimizerStrategy:
    """Base class. Subclasses set ``optimizer_class`` and pass the optimizer's keyword arguments.

    Args:
        role_overrides: ``{glob pattern on parameter names (per name component): role}`` for layers the role
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

    # --- checks ---------------------------------------------------------------------------------
    def check(self, trainer: Any) -> None:
        """Raise :class:`StrategyError` for a Trainer configuration this optimizer cannot run under."""
        caps = self.capabilities
        check_trainer(trainer, caps, self.name, single_process=caps.needs_model and bool(self.hparams.get("fused_linear")))

    # --- precision and clipping ------------------------------------------------------------------
    def precision_plugin(self, precision: str, device: str) -> Any | None:
        """The plugin to use instead of ``precision``, or None if Lightning's default is safe."""
        if self.capabilities.folds_momentum_into_grad and str(precision) in ("16-mixed", "16"):
            return FoldedMomentumPrecision("16-mixed", device=device)
        return None

    def clip_gradients(self, module: Any, optimizer: Optimizer, clip_val: float | None, algorithm: str | None) -> None:
        """What ``Trainer(gradient_clip_val=...)`` means for this optimizer: see :func:`clip_gradients`."""
        clip_gradients(module, optimizer, clip_val, algorithm)


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
