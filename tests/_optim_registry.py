"""The optimizers that ``tests/test_conformance.py`` runs every check on.

Each optimizer is one :class:`OptimSpec`. Every check runs for every spec unless a *declared*
property below says the check cannot apply (never ``pytest.skip``). ``torch.optim.AdamW`` is in
the list as the control: a check it fails is a wrong check, not an optimizer bug.

How to add an optimizer
-----------------------
1. Export it from ``lowmem.optim`` and import it below (a plain import: a rename then fails loudly).
2. Append an ``OptimSpec`` to ``SPECS``:

   - ``name``: the test id (``test_x[HMAdamW]``); several specs may share a class, e.g. to run the
     same optimizer with the param groups its role rules build (``SlimAdamW-roles``).
   - ``kwargs``: fixed constructor arguments, e.g. ``{"fused": False}`` (no ``torch.compile`` in
     this suite) or a short ``refresh_every`` so a periodic code path runs within a few steps.
     Never put ``lr``/``betas``/``eps``/``weight_decay`` here: checks pass their own.
   - ``param_groups``: ``model -> list of param-group dicts`` when the optimizer is meant to be
     given groups built from the model (``slimadam_param_groups``, ``adapm_param_groups``...);
     ``None`` means one group ``[{"params": list(model.parameters())}]``. The groups must not set
     ``lr``/``betas``/``eps`` (checks override them through the constructor); they may set
     ``weight_decay=0.0`` for parameters that never decay, and any optimizer-specific key.
   - ``needs_model=True`` when the constructor takes the model itself (``IOAdam(model, ...)``):
     the factory then calls ``cls(model, **kwargs)``, and the checks that build param groups by
     hand (per-group overrides, one optimizer vs one per group, ``add_param_group``) do not apply.
   - ``deepcopy_can_step=False`` when a deep copy can hold and load state but not step (IOAdam:
     its statistics come from hooks on one model, which a copy is not attached to). Instead of
     "a deep copy of (model, optimizer) trains exactly like the original", the check then
     requires the copy to hold the same state, load a state dict, and leave the original alone.
   - ``bf16_state_dtype``: dtype of the floating state of bf16 params (lowmem's contract: fp32;
     ``None`` = the param's dtype, which is what torch's AdamW does).
   - ``layout_exact=False`` when a non-contiguous param takes another kernel than a contiguous
     one (the native fast path takes contiguous float32 tensors only; the others go to the
     compiled or for-loop kernels, which round differently): layouts then agree to float32
     tolerance instead of bit for bit.
   - ``backends``: the fast-path tiers (``lowmem.optim._dispatch``) the spec's steps may use,
     e.g. ``()`` for the foreach tier alone (what a device without ``torch.compile`` gets);
     ``None``: all of them. ``slow=True`` marks every check of the spec ``slow`` (the
     ``-compiled`` specs: each kernel compiles once per dtype combination, 10-30 s each).
   - ``invalid_kwargs``: optimizer-specific bad hyperparameters, one ``{name: value}`` each: the
     constructor must raise ``ValueError`` whose message contains the name and ``repr(value)``.
     The standard ones (negative lr/eps/weight_decay, betas outside [0, 1)) are checked for every
     spec already.
3. Run ``/work/main/.venv/bin/python -m pytest tests/test_conformance.py -q``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lowmem.optim import (
    AdamMini,
    AdamS,
    AdaPM,
    HMAdam,
    HMAdamW,
    IOAdam,
    SlimAdamW,
    adam_mini_param_groups,
    adapm_param_groups,
    slimadam_param_groups,
)

__all__ = ["OptimSpec", "SPECS"]


@dataclass(frozen=True)
class OptimSpec:
    """How to build one optimizer under test, and which checks do not apply to it (see module doc)."""

    name: str
    cls: type[Optimizer]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    param_groups: Callable[[nn.Module], list[dict]] | None = None
    needs_model: bool = False
    deepcopy_can_step: bool = True
    bf16_state_dtype: torch.dtype | None = torch.float32
    invalid_kwargs: tuple[Mapping[str, Any], ...] = ()
    layout_exact: bool = True
    backends: tuple[str, ...] | None = None
    slow: bool = False

    def groups(self, model: nn.Module) -> list[dict]:
        """The param groups this optimizer is given for ``model`` (fresh dicts every call)."""
        if self.needs_model:
            raise TypeError(f"{self.name} is built from the model (needs_model=True), not from param groups")
        if self.param_groups is None:
            return [{"params": list(model.parameters())}]
        return self.param_groups(model)

    def build(self, model: nn.Module, **hparams: Any) -> Optimizer:
        """The optimizer over all of ``model``'s trainable parameters; ``hparams`` override defaults."""
        kwargs = {**self.kwargs, **hparams}
        if self.needs_model:
            return self.cls(model, **kwargs)
        return self.cls(self.groups(model), **kwargs)

    def build_from_groups(self, groups: list[dict], **hparams: Any) -> Optimizer:
        """The optimizer over hand-made param groups (not for ``needs_model`` optimizers)."""
        if self.needs_model:
            raise TypeError(f"{self.name} is built from the model (needs_model=True), not from param groups")
        return self.cls(groups, **{**self.kwargs, **hparams})

    def state_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """Expected dtype of the floating state (except ``step``) of a param of ``param_dtype``."""
        if param_dtype in (torch.bfloat16, torch.float16) and self.bf16_state_dtype is not None:
            return self.bf16_state_dtype
        return param_dtype


_HMADAM_INVALID = ({"variance_correction": "bogus"}, {"max_momentum_norm": -1.0})
_ADAPM_INVALID = (
    {"rank_fraction": 0.0},
    {"rank_fraction": 1.5},
    {"refresh_every": 0},
    {"clip": -1.0},
    {"second_moment": "bogus"},
)

SPECS: list[OptimSpec] = [
    # The control: torch's own AdamW, single-tensor path.
    OptimSpec("torch.AdamW", torch.optim.AdamW, kwargs={"fused": False, "foreach": False}, bf16_state_dtype=None),
    # Momentum folded into .grad: every check drives them with zero_grad() as the decay. v from
    # c m^2 (variance_correction noise, named: the default "auto" is "hook" in these one-process
    # checks, HMAdamW-auto below).
    OptimSpec("HMAdamW", HMAdamW, kwargs={"fused": False, "variance_correction": "noise"},
              invalid_kwargs=_HMADAM_INVALID),  # fmt: skip
    OptimSpec("HMAdam", HMAdam, kwargs={"fused": False, "variance_correction": "noise"},
              invalid_kwargs=_HMADAM_INVALID),  # fmt: skip
    # The default, variance_correction="auto": resolved to "hook" in one process.
    OptimSpec("HMAdamW-auto", HMAdamW, kwargs={"fused": False}, invalid_kwargs=_HMADAM_INVALID),
    # v from the incoming gradients through per-parameter hooks (AdamW's / Adam-with-L2's v).
    OptimSpec("HMAdamW-hook", HMAdamW, kwargs={"fused": False, "variance_correction": "hook"},
              invalid_kwargs=_HMADAM_INVALID),  # fmt: skip
    OptimSpec("HMAdam-hook", HMAdam, kwargs={"fused": False, "variance_correction": "hook"},
              invalid_kwargs=_HMADAM_INVALID),  # fmt: skip
    OptimSpec("AdamS", AdamS, kwargs={"fused": False}),
    # One group, compress_dims=None: the plain-AdamW path of SlimAdamW.
    OptimSpec("SlimAdamW", SlimAdamW, kwargs={"fused": False}),
    # Groups from the role table: compressed second moments on the matrices and the embedding.
    OptimSpec("SlimAdamW-roles", SlimAdamW, kwargs={"fused": False}, param_groups=slimadam_param_groups),
    # A plain list: one v per output row of each matrix (block="row").
    OptimSpec("AdamMini", AdamMini),
    OptimSpec("AdamMini-roles", AdamMini, param_groups=adam_mini_param_groups),
    # A plain list: momentum="full" everywhere (elementwise maths).
    OptimSpec("AdaPM", AdaPM, invalid_kwargs=_ADAPM_INVALID),
    # The role partition: no momentum (embedding), low-rank (fc1, fc2), AdamW (biases). A short
    # refresh_every so the randomized-SVD refresh runs inside the checks, not only at t = 1.
    OptimSpec("AdaPM-roles", AdaPM, kwargs={"refresh_every": 3}, param_groups=adapm_param_groups),
    OptimSpec(
        "AdaPM-mini-roles",
        AdaPM,
        kwargs={"refresh_every": 3, "second_moment": "mini"},
        param_groups=adapm_param_groups,
    ),
    # The native fast path (``fused=True``: hand-written C kernels for float32 CPU tensors, the
    # compiled kernels for other dtypes), which ``fused=None`` picks for models of 2^20+ elements.
    *[
        OptimSpec(f"{spec.name}-fused", spec.cls, kwargs={**spec.kwargs, "fused": True}, param_groups=spec.param_groups,
                  invalid_kwargs=spec.invalid_kwargs, layout_exact=False)  # fmt: skip
        for spec in (
            OptimSpec("HMAdamW", HMAdamW, kwargs={"variance_correction": "noise"}, invalid_kwargs=_HMADAM_INVALID),
            OptimSpec("HMAdam", HMAdam, kwargs={"variance_correction": "noise"}, invalid_kwargs=_HMADAM_INVALID),
            OptimSpec("HMAdamW-hook", HMAdamW, kwargs={"variance_correction": "hook"}, invalid_kwargs=_HMADAM_INVALID),
            OptimSpec("AdamS", AdamS),
            OptimSpec("SlimAdamW", SlimAdamW),
            OptimSpec("SlimAdamW-roles", SlimAdamW, param_groups=slimadam_param_groups),
            OptimSpec("AdamMini", AdamMini),
            OptimSpec("AdamMini-roles", AdamMini, param_groups=adam_mini_param_groups),
            # AdaPM's fast path: the element-wise kernel (lowmem_adapm_f32 / compiled), the ALS
            # sweep without M and AdaPM-mini's native block means.
            OptimSpec("AdaPM", AdaPM, invalid_kwargs=_ADAPM_INVALID),
            OptimSpec("AdaPM-roles", AdaPM, kwargs={"refresh_every": 3}, param_groups=adapm_param_groups),
            OptimSpec("AdaPM-mini-roles", AdaPM, kwargs={"refresh_every": 3, "second_moment": "mini"},
                      param_groups=adapm_param_groups),  # fmt: skip
        )
    ],
    # The foreach tier alone (no native kernels, no torch.compile) and the compiled tier (no native
    # kernels), for the optimizers whose fast path has element-wise kernels.
    *[
        OptimSpec(f"{spec.name}-{tier or 'foreach'}", spec.cls, kwargs={**spec.kwargs, "fused": True},
                  param_groups=spec.param_groups, layout_exact=False, backends=(tier,) if tier else (),
                  slow=bool(tier))  # fmt: skip
        for tier in (None, "compiled")
        for spec in (
            OptimSpec("HMAdamW", HMAdamW, kwargs={"variance_correction": "noise"}),
            OptimSpec("HMAdam", HMAdam, kwargs={"variance_correction": "noise"}),
            OptimSpec("AdamS", AdamS),
            OptimSpec("SlimAdamW-roles", SlimAdamW, param_groups=slimadam_param_groups),
            OptimSpec("AdaPM-roles", AdaPM, kwargs={"refresh_every": 3}, param_groups=adapm_param_groups),
            OptimSpec("AdaPM-mini-roles", AdaPM, kwargs={"refresh_every": 3, "second_moment": "mini"},
                      param_groups=adapm_param_groups),  # fmt: skip
        )
    ],
    # A small buffer so the slot index wraps around inside the checks.
    OptimSpec(
        "IOAdam",
        IOAdam,
        kwargs={"buffer_size": 3, "fused": False},
        needs_model=True,
        deepcopy_can_step=False,
        invalid_kwargs=({"buffer_size": 0}, {"p": 1.0}, {"buffer_mode": "bogus"}),
    ),
    # IO-Adam's fast step (lowmem_ioadam_f32: D built tile by tile, never stored; compiled
    # elsewhere) and the native AdamW kernel for the other parameters.
    OptimSpec(
        "IOAdam-fused",
        IOAdam,
        kwargs={"buffer_size": 3, "fused": True},
        needs_model=True,
        deepcopy_can_step=False,
        invalid_kwargs=({"buffer_size": 0}, {"p": 1.0}, {"buffer_mode": "bogus"}, {"fused": "yes"}),
        layout_exact=False,
    ),
    # Its foreach and compiled tiers: D from one GEMM, the update as foreach ops or compiled.
    *[
        OptimSpec(f"IOAdam-{tier or 'foreach'}", IOAdam, kwargs={"buffer_size": 3, "fused": True}, needs_model=True,
                  deepcopy_can_step=False, layout_exact=False, backends=(tier,) if tier else (), slow=bool(tier))
        for tier in (None, "compiled")
    ],  # fmt: skip
]
