"""`FoldedMomentumPrecision`: fp16 mixed precision with a GradScaler that keeps folded momentum right.

A plain ``GradScaler`` breaks an optimizer whose momentum lives in ``.grad`` (HMAdam) twice:
``unscale_`` divides the *whole* buffer, history included, by the loss scale S every step; and after
one overflow the inf stays in the buffer, so every later step is skipped. This plugin:

- moves the history into the units of the coming backward before the first backward of each
  optimizer step: ``B <- S * B`` (the decay by b1 is the optimizer's own, in ``step``/``zero_grad``),
  so that after backward and ``unscale_`` the buffer is exactly ``b1 B_prev + g``;
- after an overflow step (skipped by the scaler, so no inf/NaN reaches the weights) resets the
  buffers holding non-finite values to zero (a momentum restart for those tensors only), counts
  them in ``momentum_resets`` and ``overflow_steps``, and lets training go on with the reduced scale.
  Buffers that stayed finite keep the skipped step's gradient: it enters the next step's momentum
  (as an extra accumulated micro-batch would), since it cannot be told apart from the history.

Optimizers that do not fold momentum into ``.grad`` are passed through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.optim import Optimizer

__all__ = ["FoldedMomentumPrecision", "folds_momentum"]


def folds_momentum(optimizer: Any) -> bool:
    """Whether ``optimizer`` keeps state in ``.grad`` (its class declares the capability)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap LightningOptimizer
    caps = getattr(type(optimizer), "capabilities", None)
    return bool(getattr(caps, "folds_momentum_into_grad", False))


class FoldedMomentumPrecision(MixedPrecision):
    """``16-mixed`` with a GradScaler, safe for folded-momentum optimizers (see module docstring).

    Args:
        precision: ``"16-mixed"`` (a GradScaler is created) or ``"bf16-mixed"`` (passes through).
        device: ``"cuda"`` or ``"cpu"`` (fp16 autocast and GradScaler on CPU are for testing).
        scaler: an explicit ``torch.amp.GradScaler``; created for ``16-mixed`` when omitted.
    """

    def __init__(self, precision: str = "16-mixed", device: str = "cuda", scaler: Any = None) -> None:
        if precision == "16-mixed" and scaler is None:
            scaler = torch.amp.GradScaler(device)
        super().__init__(precision=precision, device=device, scaler=scaler)
        self.momentum_resets = 0  # tensors whose momentum was reset after an overflow
        self.overflow_steps = 0
        self._history_in_scaled_units = False

    def pre_backward(self, tensor: torch.Tensor, module: Any) -> torch.Tensor:
        if self.scaler is not None and not self._history_in_scaled_units:
            for optimizer in module.trainer.optimizers:
                if folds_momentum(optimizer):
                    optimizer.scale_momentum_(self.scaler.get_scale())
            self._history_in_scaled_units = True
        return super().pre_backward(tensor, module)

    def optimizer_step(self, optimizer: Optimizer, model: Any, closure: Any, **kwargs: Any) -> Any:
        folds = self.scaler is not None and folds_momentum(optimizer)
        scale = self.scaler.get_scale() if folds else None  # pre_backward has synced for it already
        result = super().optimizer_step(optimizer, model, closure, **kwargs)
        self._history_in_scaled_units = False
        # The scaler lowers its scale exactly when it skipped the step for inf/NaN gradients: only
        # then can a buffer hold them, so a finite step costs no per-tensor check (no host syncs).
        if folds and self.scaler.get_scale() < scale:
            self._reset_poisoned(optimizer)
        return result

    @torch.no_grad()
    def _reset_poisoned(self, optimizer: Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all().to(grads[0].device) for g in grads]).tolist() if grads else []
        poisoned = [g for g, ok in zip(grads, finite) if not ok]  # one host sync for all tensors
        if poisoned:
            for g in poisoned:
                g.zero_()
            self.momentum_resets += len(poisoned)
            self.overflow_steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "momentum_resets": self.momentum_resets, "overflow_steps": self.overflow_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.momentum_resets = int(state_dict.pop("momentum_resets", 0))
        self.overflow_steps = int(state_dict.pop("overflow_steps", 0))
        super().load_state_dict(state_dict)
