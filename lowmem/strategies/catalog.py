"""One `OptimizerStrategy` per optimizer: the classes a config selects.

    model:
      init_args:
        optimizer:
          class_path: lowmem.strategies.HMAdamW
          init_args: {lr: 1.0e-3, weight_decay: 0.01}

Each ``__init__`` lists the optimizer's hyperparameters with their types and defaults, so that
``--print_config`` and ``--help`` document them and a misspelled key is an error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lowmem import optim
from lowmem.strategies.base import OptimizerStrategy

__all__ = ["AdamW", "Adafactor", "HMAdamW", "HMAdam", "AdamS", "SlimAdamW", "AdaPM", "IOAdam", "AdamMini"]

Betas = tuple[float, float]
Roles = dict[str, str] | None


def _attention_shape(module: nn.Module) -> dict[str, Any]:
    """``n_heads``/``dim`` for head-wise blocks, from the module's ``attention_shape()`` if any."""
    shape = getattr(module, "attention_shape", None)
    if shape is None:
        return {}
    n_heads, dim = shape()
    return {"n_heads": n_heads, "dim": dim}


class AdamW(OptimizerStrategy):
    """``torch.optim.AdamW``, the baseline: m and v per parameter (8 bytes/param in fp32)."""

    optimizer_class = torch.optim.AdamW

    def __init__(self, lr: float = 1e-3, betas: Betas = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, fused: bool | None = None, role_overrides: Roles = None) -> None:  # fmt: skip
        super().__init__(role_overrides, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


class Adafactor(OptimizerStrategy):
    """``torch.optim.Adafactor``: factored second moment, no first moment (torch's defaults)."""

    optimizer_class = torch.optim.Adafactor

    def __init__(self, lr: float = 1e-2, beta2_decay: float = -0.8, eps: tuple[float | None, float] = (None, 1e-3),
                 d: float = 1.0, weight_decay: float = 0.0, role_overrides: Roles = None) -> None:  # fmt: skip
        super().__init__(role_overrides, lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay)


class HMAdamW(OptimizerStrategy):
    """HMAdamW: momentum folded into ``.grad``, v only (4 bytes/param of state, plus the persistent
    gradient buffer). ``gradient_clip_val`` clips the momentum's global norm; see ``clip_gradients``."""

    optimizer_class = optim.HMAdamW

    def __init__(self, lr: float = 1e-3, betas: Betas = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 variance_correction: str = "noise", fused: bool | None = None,
                 max_momentum_norm: float | None = None, role_overrides: Roles = None) -> None:  # fmt: skip
        super().__init__(role_overrides, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         variance_correction=variance_correction, fused=fused, max_momentum_norm=max_momentum_norm)  # fmt: skip


class HMAdam(HMAdamW):
    """HMAdam: as HMAdamW with coupled L2 weight decay (``B += wd W`` enters the momentum)."""

    optimizer_class = optim.HMAdam

    def __init__(self, lr: float = 1e-3, betas: Betas = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 variance_correction: str = "noise", fused: bool | None = None,
                 max_momentum_norm: float | None = None, role_overrides: Roles = None) -> None:  # fmt: skip
        super().__init__(lr, betas, eps, weight_decay, variance_correction, fused, max_momentum_norm, role_overrides)


class AdamS(OptimizerStrategy):
    """AdamS: momentum as its own normaliser, m only (4 bytes/param). Warm the lr up."""

    optimizer_class = optim.AdamS

    def __init__(self, lr: float = 1e-3, betas: Betas = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 fused: bool | None = None, role_overrides: Roles = None) -> None:  # fmt: skip
        super().__init__(role_overrides, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


class SlimAdamW(OptimizerStrategy):
    """SlimAdamW: v averaged along high-SNR dims by role, or by a rules JSON file (``rules``)."""

    optimizer_class = optim.SlimAdamW

    def __init__(self, lr: float = 1e-3, betas: Betas = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 rules: str | None = None, fused: bool | None = None, role_overrides: Roles = None) -> None:  # fmt: skip
        super().__init__(role_overrides, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
        self.rules = rules

    def param_groups(self, module: nn.Module) -> list[dict]:
        return optim.slimadam_param_groups(module, rules=self.rules, overrides=self.role_overrides)


class AdaPM(OptimizerStrategy):
    """AdaPM: no / low-rank / full momentum per block by role; ``second_moment: mini`` for AdaPM-mini."""

    optimizer_class = optim.AdaPM

    def __init__(self, lr: float = 1e-3, betas: Betas = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 rank_fraction: float = 0.05, refresh_every: int = 100, clip: float | None = 1.0,
                 second_moment: str = "full", role_overrides: Roles = None) -> None:  # fmt: skip
        super().__init__(role_overrides, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         rank_fraction=rank_fraction, refresh_every=refresh_every, clip=clip,
                         second_moment=second_moment)  # fmt: skip

    def param_groups(self, module: nn.Module) -> list[dict]:
        return optim.adapm_param_groups(module, overrides=self.role_overrides, **_attention_shape(module))


class AdamMini(OptimizerStrategy):
    """Adam-mini: one v per block (head, row, norm tensor), m full (~4 bytes/param)."""

    optimizer_class = optim.AdamMini

    def __init__(self, lr: float = 1e-3, betas: Betas = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.1,
                 fused: bool | None = None, role_overrides: Roles = None) -> None:  # fmt: skip
        super().__init__(role_overrides, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)

    def param_groups(self, module: nn.Module) -> list[dict]:
        return optim.adam_mini_param_groups(module, overrides=self.role_overrides, **_attention_shape(module))


class IOAdam(OptimizerStrategy):
    """IO-Adam for ``nn.Linear`` weights (statistics from hooks), AdamW for the rest. Its best lr is
    about 10x AdamW's; ``adamw_lr`` sets the other parameters' lr."""

    optimizer_class = optim.IOAdam

    def __init__(self, lr: float = 1e-3, betas: Betas = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.1,
                 buffer_size: int = 16, p: float = 2.0, buffer_mode: str = "paper", fused: bool = False,
                 adamw_lr: float | None = None) -> None:  # fmt: skip
        super().__init__(None, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, buffer_size=buffer_size, p=p,
                         buffer_mode=buffer_mode, fused=fused, adamw_lr=adamw_lr)  # fmt: skip

    def build(self, module: nn.Module) -> Optimizer:
        return optim.IOAdam(module, **self.hparams)

    def __call__(self, params: Any) -> Optimizer:
        raise TypeError("IOAdam is built from the model (it hooks its nn.Linear layers), not from parameters")
