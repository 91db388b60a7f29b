"""HMAdam / HMAdamW: Adam whose first moment lives in the gradient buffer (docs/algorithms.md §1).

The only optimizer state is ``v`` (``exp_avg_sq``). The momentum is ``p.grad`` itself, the
buffer ``B``: instead of being zeroed it is decayed, ``B <- b1 B``, so that the next backward
pass leaves ``B = b1 B_prev + g_t`` and ``m_t = (1 - b1) B`` is Adam's ``exp_avg``. This saves one
parameter-sized tensor at the peak of the step (AdamW holds P + G + m + v, HMAdam P + B + v).

Step ``t`` (``t`` counts from 1; ``wd`` the weight decay)::

    HMAdam only:   B = B + wd W                                  # coupled L2: enters the history
    m   = (1 - b1) B                                             # a temporary, never stored
    c_t = (1 + b1) / ((1 - b1)(1 - b1^(2t)))                     # variance_correction="noise"
    v   = b2 v + (1 - b2) c_t m^2
    HMAdamW only:  W = W (1 - lr wd)                             # decoupled decay
    W   = W - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    B   = b1 B                                                   # the decay for step t + 1

Units: ``B`` is in gradient units times ``1/(1 - b1)`` (for a constant gradient g, B -> g/(1-b1));
``m`` and ``v`` are in Adam's units (gradient and gradient squared), so lr, eps and weight decay
mean what they mean for AdamW.

``variance_correction="hook"`` estimates ``v`` from the incoming gradient instead of from ``B``:
a hook on each parameter sees the gradient ``g`` of every backward pass before autograd adds it
into ``B`` and updates ``v = b2 v + (1 - b2) w g^2`` (``w`` the number of backward passes per
step, 1 without accumulation; HMAdam: ``(1 - b2)(w g^2 + 2 wd W g)`` per pass plus
``(1 - b2) wd^2 W^2`` at the step, i.e. ``(g + wd W)^2`` for one pass). The first step takes
``v = (1 - b2) B^2`` from the buffer, which is exactly AdamW's. With one backward pass per step
and one process this is AdamW's (HMAdam: Adam-with-L2's) trajectory, with ``v`` as the only
state tensor; under accumulation ``v`` is the mean of the squared micro-batch gradients (see
:class:`HMAdam`); multi-process runs and fp16 loss scaling are refused.

``variance_correction="auto"`` (the default) is ``"hook"`` where the hooks see every gradient
(one process, plain tensors, no fp16 loss scaling) and ``"noise"`` elsewhere (DDP, FSDP2/DTensor
parameters, fp16 loss scaling): HMAdamW then reaches AdamW's trajectory at AdamW's hyperparameters
wherever that is possible, and runs everywhere. The resolved mode is each group's
``variance_mode`` (see :class:`HMAdam`).
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from lowmem.optim._base import Capabilities, LowMemOptimizer, check_grad, check_hparams, state_dtype_for, step_groups
from lowmem.optim._dispatch import check_fused, use_fast_path
from lowmem.optim._fast import FusedForeach, local_tensor

__all__ = ["HMAdam", "HMAdamW", "hmadam", "variance_scale"]

VARIANCE_CORRECTIONS = ("auto", "noise", "stationary", "none", "hook")
_HOOK_EXACT = "one process, plain tensors, no fp16 loss scaling"  # why "auto" is "hook"
_LOOP_FACTS = ("_auto", "_loop", "_loss_scaled", "_unfed_warned", "_settled", "_logged")  # copied with the optimizer
_log = logging.getLogger(__name__)


def variance_scale(kind: str, beta1: float, step: float) -> float:
    """The factor ``c`` with ``E[c m_t^2] = E[g^2]`` for pure-noise gradients (research §1.2).

    ``"noise"``: ``(1+b1) / ((1-b1)(1-b1^(2t)))``, exact for zero-mean gradients at every step and
    exact at ``t = 1`` for any gradient; over-estimates ``v`` by up to ``(1+b1)/(1-b1)`` (19 for
    b1 = 0.9) for a pure signal. ``"stationary"``: its limit ``(1+b1)/(1-b1)``. ``"none"``: 1.
    ``"hook"``: ``"noise"``'s factor at ``t = 1`` (``1/(1-b1)^2``: ``c m^2 = B^2``, AdamW's ``g^2``),
    0 afterwards: from step 2 on the gradient hooks have already updated ``v``.
    """
    if kind == "hook":
        return 1 / (1 - beta1) ** 2 if step == 1 else 0.0
    if kind == "noise":
        return (1 + beta1) / ((1 - beta1) * (1 - beta1 ** (2 * step)))
    if kind == "stationary":
        return (1 + beta1) / (1 - beta1)
    if kind == "none":
        return 1.0
    raise ValueError(f"variance_scale: invalid kind={kind!r}; expected one of {VARIANCE_CORRECTIONS[1:]} "
                     "('auto' is resolved by the optimizer: pass its group's variance_mode)")


class HMAdam(LowMemOptimizer):
    """Adam with coupled L2 (``B = B + wd W``) and the first moment folded into ``p.grad``.

    The maths is in the module docstring. What changes for the training loop:

    * **zero_grad decays, it never zeroes or frees.** The decay ``B <- b1 B`` is fused into the
      end of :meth:`step` (24 instead of 28 bytes moved per parameter in the fast path);
      :meth:`zero_grad` decays (whatever ``set_to_none`` says) only buffers that have not been
      decayed since the last ``step()``: in practice only before the first step. So the buffers
      are decayed exactly once per step, whatever the number of ``zero_grad()`` calls or backward
      passes (gradient accumulation just adds the micro-batch gradients into ``B``), and for the
      loop ``zero_grad(); backward(); step()`` the trajectory is the spec's. Observable
      differences: between ``step()`` and the next backward ``p.grad`` already holds ``b1 B``;
      a step that is skipped (not called) does not decay, so the next backward adds to an
      undecayed ``B``; ``zero_grad()`` twice in a row decays once.
    * **Guard.** ``step()`` raises ``RuntimeError`` if a parameter's buffer was freed (``.grad`` set
      to None) or replaced by another tensor since the optimizer last decayed it: some code
      outside the optimizer (``model.zero_grad()``, a framework) destroyed the momentum.
      Limitation: an in-place ``p.grad.zero_()`` keeps the tensor and cannot be told apart from
      an accumulation without reading the data again, so it is not detected. (The version
      counter cannot separate the two either: autograd's accumulation bumps it the same way.)
    * **Parameters without gradient.** A parameter whose ``.grad`` is None and that never had
      momentum is skipped, as in Adam. One that has a buffer but got no new gradient this step
      (an unused branch) still decays and still steps with its decayed momentum.
    * **Momentum clipping** (``max_momentum_norm``). ``clip_grad_norm_`` on ``.grad`` would clip
      the whole history, with a threshold that means something else (``||B||`` is ~1/(1-b1) times
      a gradient's norm). Instead, when ``max_momentum_norm`` is set, ``step()`` computes the
      global norm of ``m = (1-b1) B`` over all parameters of the optimizer (gradient units, like
      an AdamW user's clipping threshold) and, if it exceeds the threshold, scales the stored
      buffers ``B`` (not just this step's ``m``) by ``max_momentum_norm / norm`` before the
      update. The clipped momentum is the state that decays onward, as AdamW keeps the clipped
      gradient in ``exp_avg``: a gradient spike then fades from a bounded size instead of steering
      ~1/(1-b1) further steps at the full threshold. For HMAdam the clip acts before the L2 term
      is added, as ``clip_grad_norm_`` acts before ``torch.optim.Adam`` adds ``wd W``. Each group
      compares the one global norm with its own threshold.
    * **Checkpoints.** :meth:`state_dict` adds each buffer (``momentum_buffer``) and
      :meth:`load_state_dict` copies it back into ``p.grad``, so a resumed run continues bit for
      bit. Save the optimizer state dict, not just the model's. Like ``v`` and every state
      tensor of a torch state dict, the buffer is the live tensor, not a copy (a checkpoint
      costs no parameter-sized memory): ``torch.save`` it, or ``copy.deepcopy`` it to keep a
      snapshot while training goes on.
    * **Precision.** ``v`` is fp32 for bf16/fp16 parameters unless ``state_in_param_dtype=True``;
      the momentum lives in ``.grad``, i.e. in the parameter's dtype: with bf16 parameters the
      EMA of the gradient is rounded to bf16 (8 bits of mantissa) at every decay and
      accumulation, which is coarser than AdamW's fp32 ``exp_avg``.
    * **variance_correction="hook"** (AdamW's own ``v``). Each parameter of a ``"hook"`` group
      gets a tensor hook and a post-accumulate-grad hook: the first keeps the incoming gradient
      ``g`` of a backward pass, the second, once autograd has added ``g`` into ``B``, updates
      ``v`` from it (decaying ``v`` by ``b2`` at the first pass of each step), so ``v`` sees
      exactly what enters ``.grad`` (``torch.autograd.grad`` calls do not reach it). ``step()``
      then uses ``v`` as it is; the first step of a parameter takes ``v = (1 - b2) B^2`` instead
      (AdamW's ``v`` at ``t = 1`` even under accumulation). Without accumulation, in one process,
      the trajectory is AdamW's (HMAdam: ``torch.optim.Adam`` with ``weight_decay``'s coupled
      L2) to rounding; between steps ``exp_avg_sq`` is AdamW's ``exp_avg_sq``.

      *Accumulation* (``w`` backward passes per step): a hook cannot see the sum of a step's
      micro-batch gradients, only each one, so ``v`` takes their mean square in step units,
      ``v = b2 v + (1 - b2) w sum_j g_j^2`` (``g_j`` as added to ``.grad``, i.e. already divided
      by ``w`` by a mean loss; ``w g_j`` is micro-batch j's own mean gradient). It equals AdamW's
      ``(sum_j g_j)^2`` when the micro-batches agree and is never below it
      (Cauchy-Schwarz): the signal is AdamW's, the noise counts as that of one micro-batch, so
      in a low-SNR phase steps are up to ``sqrt(w)`` smaller than AdamW's, never larger. ``w`` is
      the largest number of backward passes any step has had so far (1 before the first step;
      learnt at the first step, whose ``v`` comes from ``B``; a shorter last accumulation of an
      epoch keeps it), saved in the state dict. *Refused*: more than one process (DDP: the
      hooks see each rank's local gradient before the all-reduce, so ``v`` would differ
      between ranks and the weights drift apart; averaging ``v`` too would double the
      communication and still count per-rank noise), DTensor parameters (FSDP2 writes reduced
      shards into ``.grad`` past autograd), fp16 loss scaling (the hooks would square scaled,
      on overflow infinite, gradients), a step with gradients none of which came through
      autograd since the last step (``.grad`` written by hand), and a group switched to
      ``"hook"`` after its parameters were added. Momentum clipping clips ``B``, not ``v``
      (AdamW's clipping clips the gradient ``v`` sees). Hooks are removed when the optimizer
      is garbage-collected; a deep copy registers its own on the copied parameters.
    * **variance_correction="auto"** (the default): ``"hook"`` where its hooks see every gradient
      that enters ``.grad`` (one process, plain tensors, no fp16 loss scaling: AdamW's trajectory
      at AdamW's hyperparameters), ``"noise"`` elsewhere; never refused. ``"noise"`` when the
      default process group has more than one rank (DDP), a parameter is a DTensor (FSDP2), the
      fit-start check reported an fp16 GradScaler (:meth:`configure_for_loop`, called by
      ``lowmem.strategies.checks.check_trainer``) or :meth:`scale_momentum_` was called (a
      scaler-aware loop). A step that finds no gradient came through autograd's backward since the
      last one (``.grad`` written by hand, a skipped backward), which an explicit ``"hook"``
      refuses, is a ``"noise"`` step (a warning in the log, once). A group keeps the requested
      value in ``variance_correction`` (what :meth:`state_dict` saves and ``load_state_dict``
      restores) and the resolved one in ``variance_mode`` (never saved); :attr:`variance_mode`
      reads it, the ``lowmem.optim.hmadam`` logger says what ``"auto"`` resolved to at INFO
      whenever that changes, and under Lightning ``LowMemCallback`` prints it at fit start. It is resolved at construction and
      :meth:`add_param_group`, at fit start, after ``load_state_dict`` (the new run's loop, not
      the saved one's), and again at the end of the first step after either (a process group
      started after the optimizer was built). The first step of a parameter is the same maths in
      both modes (``v = (1 - b2) B^2``), so hooks registered before the second backward pass see
      everything ``v`` needs; a resolution between steps holds from the next step on.
      *Resuming across a mode change* (a one-process checkpoint resumed under DDP, or the
      reverse) continues from the saved ``v`` in the new run's mode, which is defined: both modes
      keep ``exp_avg_sq`` as an EMA estimate of ``E[g^2]`` in Adam's units (gradient squared),
      bias-corrected by the same ``1 - b2^t`` of the same saved step count. Hook's ``v`` is
      AdamW's; noise's over-estimates a gradient that is mostly signal by up to
      ``(1 + b1)/(1 - b1)``, so after noise -> hook such an excess decays at rate ``b2`` (steps
      smaller than AdamW's until it has), and hook -> noise starts noise's EMA from AdamW's
      ``v``. Under accumulation the first step after a switch to ``"hook"`` counts its
      micro-batches with the saved ``w`` (1 from a noise run), learning ``w`` there.
    * **Not for** an fp16 ``GradScaler`` as is (``unscale_`` divides the whole history; a scaler
      aware integration uses :meth:`scale_momentum_`), gradient-compression DDP hooks, or
      optimizer-in-backward schemes that free gradients.

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0).
        betas: ``(b1, b2)``: decay of the momentum buffer and of ``v``, each in [0, 1).
        eps: added to ``sqrt(v_hat)``, gradient units.
        weight_decay: coupled L2 for HMAdam, decoupled (times lr) for HMAdamW.
        variance_correction: ``"auto"`` (default): ``"hook"`` in one process on plain tensors
            without fp16 loss scaling, ``"noise"`` elsewhere (see above); ``"noise"``,
            ``"stationary"`` or ``"none"``: ``v`` from ``c m^2`` (:func:`variance_scale`);
            ``"hook"``: ``v`` from the incoming gradients through per-parameter hooks (AdamW's
            ``v``; one process only, refused elsewhere, see above).
        fused: ``True`` runs the step as one fused kernel with no parameter-sized temporaries,
            on the backends of :mod:`lowmem.optim._dispatch`: hand-written C for float32
            contiguous CPU tensors (built on first use in ~0.3 s), else ``torch.compile``'d (the
            first step compiles, 10-30 s on 2 CPU cores), else as foreach ops (chunk-sized
            temporaries); ``False`` the plain for-loop (two temporaries the size of the largest
            parameter); ``None`` (default) the fast path when the optimizer holds at least
            2**20 elements.
        state_in_param_dtype: keep ``v`` in the parameter's dtype instead of fp32.
        max_momentum_norm: clip threshold on the global norm of ``m = (1-b1) B``; None disables.
    """

    decoupled_weight_decay: ClassVar[bool] = False
    capabilities: ClassVar[Capabilities] = Capabilities(
        folds_momentum_into_grad=True, supports_grad_scaler=False, supports_dtensor=True
    )

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        variance_correction: str = "auto",
        fused: bool | None = None,
        state_in_param_dtype: bool = False,
        max_momentum_norm: float | None = None,
    ) -> None:
        name = type(self).__name__
        check_hparams(name, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if variance_correction not in VARIANCE_CORRECTIONS:
            raise ValueError(
                f"{name}: invalid variance_correction={variance_correction!r}; expected one of {VARIANCE_CORRECTIONS}"
            )
        if max_momentum_norm is not None:
            check_hparams(name, lr=lr, max_momentum_norm=max_momentum_norm)
        check_fused(name, fused)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            variance_correction=variance_correction,
            fused=fused,
            state_in_param_dtype=state_in_param_dtype,
            max_momentum_norm=max_momentum_norm,
        )
        self._init_hook_registry()
        super().__init__(params, defaults)
        self._decay_pending = True  # zero_grad() must still decay: no step() since the last decay
        self._seen: dict[Tensor, tuple[weakref.ref, int]] = {}  # param -> (its buffer, data_ptr)
        self._resolve_variance()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``Optimizer.add_param_group``; the group's ``variance_mode`` is resolved (with its
        parameters) and a ``"hook"`` group's parameters get their gradient hooks."""
        value = param_group.get("variance_correction", self.defaults["variance_correction"])
        if value not in VARIANCE_CORRECTIONS:
            raise ValueError(f"{type(self).__name__}: invalid variance_correction={value!r} in a param group; "
                             f"expected one of {VARIANCE_CORRECTIONS}")  # fmt: skip
        super().add_param_group(param_group)
        if "_auto" in self.__dict__:  # __init__ resolves every group at its end
            self._resolve_variance()

    @property
    def variance_mode(self) -> str:
        """The variance mode of the groups, as the next step uses it: ``"hook"``, ``"noise"``,
        ``"stationary"`` or ``"none"`` (``"auto"`` resolved); per group, comma-separated, where
        the groups differ. Each group's own is its ``variance_mode`` key."""
        modes = [g["variance_mode"] for g in self.param_groups]
        return modes[0] if len(set(modes)) == 1 else ",".join(modes)

    # ------------------------------------------------------------------------------- the step
    def _init_group(self, group_index: int, group: dict[str, Any], first_index: int) -> tuple[list, list, list, list]:
        """Check buffers against the guard, create state lazily, return the tensor lists."""
        name = type(self).__name__
        params, grads, exp_avg_sqs, steps = [], [], [], []
        for offset, p in enumerate(group["params"]):
            check_grad(name, p)
            self._check_buffer(p, group_index, first_index + offset)
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                dtype = state_dtype_for(p, group["state_in_param_dtype"])
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avg_sqs, steps

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim.Optimizer's signature
        """Update the parameters from the momentum in ``.grad``, then decay it (see the class doc)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every group before touching any tensor: a failed guard leaves everything as it was.
        self._step_modes()
        collected, first = [], 0
        for i, group in enumerate(self.param_groups):
            collected.append(self._init_group(i, group, first))
            first += len(group["params"])
        hook_pending = self._check_hook_groups(collected)
        self._finish_hook_v(hook_pending)
        clip = any(g["max_momentum_norm"] is not None for g in self.param_groups)
        total_norm = self.momentum_norm() if clip else None
        total_numel = sum(p.numel() for g in self.param_groups for p in g["params"])
        for group, (params, grads, exp_avg_sqs, steps) in zip(self.param_groups, collected):
            max_norm = group["max_momentum_norm"]
            clip_coef = None if max_norm is None else torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
            fused = use_fast_path(group["fused"], total_numel)
            beta1, beta2 = group["betas"]
            hmadam(
                params,
                grads,
                exp_avg_sqs,
                steps,
                clip_coef=clip_coef,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                variance_correction=group["variance_mode"],
                decoupled=self.decoupled_weight_decay,
                fused=fused,
            )
        self._decay_pending = False
        self._remember_buffers()
        if self._hook_calls:
            self._micro_batches = max(self._micro_batches, *self._hook_calls.values())
            self._hook_calls.clear()
        self._incoming.clear()  # gradients of torch.autograd.grad calls, never accumulated
        if not self._settled:  # the first step since construction or a load: a process group may have started
            self._settled = True
            self._auto = self._auto_mode()
            self._log_resolution()
        self._sync_hooks()
        return loss

    # ------------------------------------------------------- variance_correction: "auto", "hook"
    def _init_hook_registry(self) -> None:
        self._hooks: dict[Tensor, tuple[Any, Any]] = {}  # param -> its two hook handles
        self._hook_group: dict[Tensor, dict[str, Any]] = {}  # hooked param -> its group
        self._incoming: dict[Tensor, Tensor] = {}  # param -> the gradient autograd is adding
        self.__dict__.setdefault("_hook_calls", {})  # param -> backward passes since the last step
        self.__dict__.setdefault("_micro_batches", 1)  # w: the most backward passes of any step
        # What "auto" resolves from, besides torch.distributed and the parameters (facts of the loop,
        # not of a checkpoint: kept by load_state_dict):
        self.__dict__.setdefault("_loop", {})  # configure_for_loop's world_size, grad_scaler, sharded
        self.__dict__.setdefault("_loss_scaled", False)  # scale_momentum_ was called
        self.__dict__.setdefault("_unfed_warned", False)  # a step found no hook-fed gradient (said once)
        self.__dict__.setdefault("_settled", False)  # resolved again at the end of a step since construction/load
        self.__dict__.setdefault("_logged", None)  # the last (mode, why) logged
        weakref.finalize(self, _remove_hooks, self._hooks)

    def configure_for_loop(self, *, world_size: int, grad_scaler: bool, sharded: bool) -> None:
        """Resolve ``variance_correction="auto"`` for a loop with ``world_size`` processes, an fp16
        GradScaler or sharded (FSDP2) parameters; called at fit start by
        :func:`lowmem.strategies.checks.check_trainer` (before :meth:`loop_refusal`). A plain loop
        need not call it: the optimizer reads ``torch.distributed`` and its parameters itself; only
        loss scaling is invisible to it (a scaler-aware loop calls :meth:`scale_momentum_`, which
        tells it too)."""
        self._loop = {"world_size": int(world_size), "grad_scaler": bool(grad_scaler), "sharded": bool(sharded)}
        self._resolve_variance()

    def loop_note(self) -> str | None:
        """One line: what ``variance_correction="auto"`` resolved to here, and why; None when no
        group asks for ``"auto"``."""
        if not any(g["variance_correction"] == "auto" for g in self.param_groups):
            return None
        mode, why = self._auto
        return f"{type(self).__name__}: variance_correction=auto resolved to {mode} ({why})"

    def _auto_mode(self) -> tuple[str, str]:
        """``("hook", why)`` where the hooks see every gradient that enters ``.grad``, else
        ``("noise", why)``: the same for every group (one process group, one loss scale)."""
        import torch.distributed as dist

        world = int(self._loop.get("world_size") or 1)
        if dist.is_available() and dist.is_initialized():
            world = max(world, dist.get_world_size())
        if world > 1:
            return "noise", f"world size {world}"
        if self._loop.get("sharded") or any(local_tensor(p) is not p for g in self.param_groups for p in g["params"]):
            return "noise", "DTensor parameters (FSDP2)"
        if self._loop.get("grad_scaler") or self._loss_scaled:
            return "noise", "fp16 loss scaling"
        return "hook", _HOOK_EXACT

    def _target_mode(self, group: dict[str, Any]) -> str:
        """The mode a group asks for: its ``variance_correction``, ``"auto"`` resolved."""
        wanted = group["variance_correction"]
        return self._auto[0] if wanted == "auto" else wanted

    def _resolve_variance(self) -> None:
        """Resolve ``"auto"`` now, set every group's ``variance_mode`` and hook or unhook its
        parameters; logged when the resolution changes."""
        self._auto = self._auto_mode()
        self._sync_hooks()
        self._log_resolution()

    def _log_resolution(self) -> None:
        note = self.loop_note()
        if note is not None and self._auto != self._logged:
            self._logged = self._auto
            _log.info(note)

    def _sync_hooks(self) -> None:
        """Set each group's ``variance_mode``; hook every parameter of a ``"hook"`` group that is not
        hooked yet, unhook the parameters no ``"hook"`` group holds any more, and map each hooked
        parameter to its group (``load_state_dict`` replaces the group dicts)."""
        self._hook_group = {}
        me = weakref.ref(self)
        for group in self.param_groups:
            group["variance_mode"] = mode = self._target_mode(group)
            if mode != "hook":
                continue
            for p in group["params"]:
                self._hook_group[p] = group
                if p not in self._hooks and p.requires_grad:
                    self._hooks[p] = (
                        p.register_hook(functools.partial(_keep_incoming, me, weakref.ref(p))),
                        p.register_post_accumulate_grad_hook(functools.partial(_after_accumulation, me)),
                    )
        for p in [p for p in self._hooks if p not in self._hook_group]:  # an "auto" group that became "noise"
            for handle in self._hooks.pop(p):
                handle.remove()
            self._incoming.pop(p, None)
        self._hook_calls = {p: n for p, n in self._hook_calls.items() if p in self._hook_group}

    def _step_modes(self) -> None:
        """Each group's ``variance_mode`` for this step: what it asks for, except that an ``"auto"``
        group whose hooks are not in place yet (set to ``"auto"`` by hand since the last step) steps
        as ``"noise"`` once and is hooked at the end of the step."""
        for group in self.param_groups:
            mode = self._target_mode(group)
            if mode == "hook" and group["variance_correction"] == "auto" and group.get("variance_mode") != "hook":
                mode = "noise"
            group["variance_mode"] = mode

    @torch.no_grad()
    def _update_v(self, p: Tensor, grad: Tensor) -> None:
        """One backward pass's gradient ``grad`` of ``p`` has entered ``B``: add it to ``v``."""
        calls = self._hook_calls.get(p, 0)
        self._hook_calls[p] = calls + 1
        group = self._hook_group.get(p)
        state = self.state.get(p)
        if group is None or self._target_mode(group) != "hook" or not state or state["step"].item() == 0:
            return  # no step yet: the first step takes v from B
        v = state["exp_avg_sq"]
        beta2 = group["betas"][1]
        if calls == 0:
            v.mul_(beta2)
        g = grad.detach().to(v.dtype)
        w = float(self._micro_batches)
        wd = group["weight_decay"]
        if wd != 0 and not self.decoupled_weight_decay:  # (g + wd W)^2 less wd^2 W^2, added at the step
            v.addcmul_(g, g.mul(w).add_(p.detach().to(v.dtype), alpha=2 * wd), value=1 - beta2)
        else:
            v.addcmul_(g, g, value=(1 - beta2) * w)

    def _check_hook_groups(self, collected: list) -> list[tuple[dict, Tensor, Tensor]]:
        """Refuse what the hooks cannot see (before any tensor is touched) in an explicit ``"hook"``
        group, switch ``"auto"`` groups to ``"noise"`` for it; the ``(group, p, v)`` of hook-mode
        parameters past their first step."""
        name = type(self).__name__
        pending, fed = [], False
        for i, (group, (params, _, exp_avg_sqs, steps)) in enumerate(zip(self.param_groups, collected)):
            if group["variance_mode"] != "hook":
                continue
            for p, v, s in zip(params, exp_avg_sqs, steps):
                if p not in self._hooks and group["variance_correction"] != "auto":
                    # ("auto" groups are hooked before they step as "hook" (_step_modes); a parameter
                    # frozen then has no hooks and no autograd gradient: its v only decays, below.)
                    raise RuntimeError(
                        f"{name}: param group {i} was switched to variance_correction='hook' after its parameters "
                        "were added, so their gradients were never seen by a hook; set it in the constructor "
                        "or in the group given to add_param_group"
                    )
                if local_tensor(p) is not p:
                    sharded = "DTensor parameters (FSDP2)"
                    return self._hook_unusable(_refusal(name, sharded), sharded)
                if s.item() >= 1:
                    pending.append((group, p, v))
                    fed = fed or p in self._hook_calls
        if pending:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                world = f"world size {dist.get_world_size()}"
                return self._hook_unusable(_refusal(name, world), world)
            if not fed:
                return self._hook_unusable(
                    f"{name}(variance_correction='hook'): no gradient reached its hooks since the last step, but "
                    "the parameters have .grad: gradients were written into .grad without autograd's backward "
                    "(by hand, FSDP2, an optimizer-in-backward scheme), or step() ran twice without a backward. "
                    "Use variance_correction='noise' there.",
                    None,
                )
        return pending

    def _hook_unusable(self, refusal: str, why: str | None) -> list:
        """Raise ``refusal`` if an explicit ``"hook"`` group steps now. Else the ``"auto"`` groups
        step as ``"noise"``: from now on where the loop rules hooks out (``why``: a process group
        or DTensors that appeared after the first step; a warning), for this step only where no
        gradient came through a backward pass since the last one (``why`` None: ``.grad`` written
        by hand, or a step without a backward; noise's ``c m^2`` is right for both, where
        ``v = b2 v`` would let ``v`` vanish under hand-written gradients; a warning, once).
        No hook parameters are pending then."""
        name = type(self).__name__
        if any(g["variance_mode"] == "hook" and g["variance_correction"] == "hook" for g in self.param_groups):
            raise RuntimeError(refusal)
        if why is not None:
            self._auto = self._logged = ("noise", why)
            _log.warning("%s: variance_correction=auto switched from hook to noise at this step: %s", name, why)
        elif not self._unfed_warned:
            self._unfed_warned = True
            _log.warning("%s: variance_correction=auto: no gradient came through autograd's backward since the last "
                         "step (.grad written by hand, or a step without a backward), so this step and any like it "
                         "take v from the buffer as noise does; hook's v resumes with the next backward", name)  # fmt: skip
        for group in self.param_groups:
            if group["variance_correction"] == "auto":
                group["variance_mode"] = "noise"  # this step; _sync_hooks sets the resolved mode at its end
        return []

    @torch.no_grad()
    def _finish_hook_v(self, pending: list[tuple[dict, Tensor, Tensor]]) -> None:
        """Complete this step's ``v`` of hook parameters: decay it where no gradient came this step
        (the parameter still steps, as for the other corrections), add HMAdam's ``(1-b2) wd^2 W^2``."""
        for group, p, v in pending:
            beta2, wd = group["betas"][1], group["weight_decay"]
            if p not in self._hook_calls:
                v.mul_(beta2)
            if wd != 0 and not self.decoupled_weight_decay:
                v.addcmul_(p, p, value=(1 - beta2) * wd * wd)

    def loop_refusal(self, *, world_size: int, grad_scaler: bool, sharded: bool) -> str | None:
        """Why this optimizer, as configured, cannot run with ``world_size`` processes, an fp16
        GradScaler or sharded (FSDP2) parameters; None when it can (checked at fit start). Only an
        explicit ``"hook"`` is ever refused; ``"auto"`` resolves to ``"noise"`` there."""
        if not any(g["variance_correction"] == "hook" for g in self.param_groups):
            return None
        name = type(self).__name__
        if world_size > 1:
            return _refusal(name, f"world size {world_size}")
        if sharded:
            return _refusal(name, "FSDP2 (ModelParallelStrategy)")
        if grad_scaler:
            return _refusal(name, "an fp16 GradScaler")
        return None

    # ---------------------------------------------------------------------- momentum handling
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Decay the momentum buffers ``B <- b1 B`` in place unless ``step()`` already did.

        Never frees or zeroes ``.grad`` (``set_to_none`` is accepted for compatibility and
        ignored). Calling it several times between two steps decays once. Use
        :meth:`reset_momentum` to discard the momentum on purpose.
        """
        if self._decay_pending:
            for group in self.param_groups:
                grads = [p.grad for p in group["params"] if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, group["betas"][0])
            self._decay_pending = False
        # No _remember_buffers() here: a buffer freed or replaced since the last step must still
        # trip the guard at the next step, even if the loop calls zero_grad() in between.

    def reset_momentum(self, params: Iterable[Tensor] | None = None) -> None:
        """Zero the momentum buffers (all, or those of ``params``) in place; ``v`` is kept."""
        wanted = None if params is None else {id(p) for p in params}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and (wanted is None or id(p) in wanted):
                    p.grad.zero_()

    @torch.no_grad()
    def scale_momentum_(self, factor: float | Tensor) -> None:
        """Multiply every buffer by ``factor`` in place, e.g. ``S_next / S_prev`` to move the
        history into the units of the coming loss-scaled backward (fp16 ``GradScaler``).

        The first call also marks the loop as loss-scaled: ``variance_correction="auto"`` resolves
        to ``"noise"`` from then on (its hooks would square scaled gradients)."""
        if not self._loss_scaled:
            self._loss_scaled = True
            if self._auto[0] == "hook":
                self._resolve_variance()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    @torch.no_grad()
    def momentum_norm(self) -> Tensor:
        """Global L2 norm of ``m = (1 - b1) B`` over all buffers (gradient units; 0-d tensor).

        The figure an AdamW user's gradient-clipping threshold compares with. Between a backward
        and ``step()`` it is the momentum the step will use; after ``step()`` it is the decayed one.
        """
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dtype = torch.float64 if p.grad.dtype == torch.float64 else torch.float32
                    norms.append((1 - group["betas"][0]) * torch.linalg.vector_norm(p.grad, dtype=dtype))
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        return total.full_tensor() if hasattr(total, "full_tensor") else total  # DTensor: all shards

    def accept_grad_buffers(self) -> None:
        """Declare the current ``.grad`` tensors to be the momentum buffers.

        For integrations that legitimately replaced a buffer with an equal-valued tensor (e.g.
        DDP with ``gradient_as_bucket_view=True`` re-pointing ``.grad`` into its buckets) and
        would otherwise trip the guard at the next ``step()``.
        """
        self._remember_buffers()

    def _remember_buffers(self) -> None:
        self._seen = {
            p: (weakref.ref(p.grad), local_tensor(p.grad).data_ptr())
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None
        }

    def _check_buffer(self, p: Tensor, group_index: int, index: int) -> None:
        seen = self._seen.get(p)
        if seen is None:
            return
        ref, ptr = seen
        if p.grad is None:
            what = "was freed (.grad set to None)"
        elif ref() is not p.grad or local_tensor(p.grad).data_ptr() != ptr:
            what = "was replaced by another tensor (freed and re-created by a backward, or reassigned)"
        else:
            return
        name = type(self).__name__
        raise RuntimeError(
            f"{name} keeps its momentum in .grad, but the gradient buffer of parameter {index} "
            f"(group {group_index}, shape {tuple(p.shape)}) {what} since the optimizer last decayed it: "
            "something zeroed or freed gradients outside the optimizer, e.g. a training loop's model.zero_grad() "
            "or a framework's own zero_grad/set_to_none, and the momentum is lost. Fix: call only "
            f"optimizer.zero_grad() (it decays the buffers instead of zeroing them); under Lightning give the "
            "LightningModule the base lowmem.lightning_modules.FoldedMomentumMixin (LowMemModule has it). To restart the momentum on purpose call optimizer.reset_momentum(); "
            "if a framework moved the buffers without changing their values, call optimizer.accept_grad_buffers()."
        )

    # ------------------------------------------------------------------------- checkpointing
    def _extend_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        """Add, per parameter with a buffer, the buffer itself (``momentum_buffer``, a view of
        ``p.grad``: no copy) and whether ``zero_grad()`` still owes its decay."""
        state = dict(sd["state"])  # entries are the live per-param dicts: copy before adding keys
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state[index] = {
                        **state.get(index, {}),
                        "momentum_buffer": p.grad.detach(),
                        "momentum_decay_pending": self._decay_pending,
                    }
                if p in self._hook_group:  # variance_correction="hook": w, and this step's passes so far
                    state[index] = {**state.get(index, {}), "variance_micro_batches": self._micro_batches,
                                    "variance_hook_calls": self._hook_calls.get(p, 0)}  # fmt: skip
                index += 1
        sd["state"] = state
        # The resolved mode belongs to the run, not to the checkpoint: load_state_dict resolves the
        # saved variance_correction (the requested one, e.g. "auto") for the loop that loads it.
        sd["param_groups"] = [{k: v for k, v in g.items() if k != "variance_mode"} for g in sd["param_groups"]]
        return sd

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        """Load ``v`` and ``step`` with their saved dtype and copy each ``momentum_buffer`` back
        into ``p.grad`` (into the existing buffer, else a new one): never into the saved tensor,
        which may be another optimizer's live buffer."""
        momenta, state, pending, calls, micro_batches = {}, {}, True, {}, 1
        for key, entry in state_dict["state"].items():
            entry = dict(entry)
            if "momentum_buffer" in entry:
                momenta[key] = entry.pop("momentum_buffer")
            pending = bool(entry.pop("momentum_decay_pending", pending))
            micro_batches = max(micro_batches, int(entry.pop("variance_micro_batches", 1)))
            calls[key] = int(entry.pop("variance_hook_calls", 0))
            if entry:
                state[key] = entry
        super()._load_state({**state_dict, "state": state})
        # The saved groups' "params" name the keys of "state": indices, or parameter names when
        # the dict comes from torch.distributed.checkpoint (FSDP2).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        for key, entry in state.items():
            # torch casts floating state to the param dtype (bf16 params would lose fp32 v) and,
            # with "fused" in the group, moves "step" to the param's device: keep them as saved.
            p = params[key]
            for name, value in entry.items():
                if isinstance(value, Tensor):
                    device = value.device if name == "step" else p.device
                    self.state[p][name] = value.detach().to(device=device, copy=True)
        with torch.no_grad():
            for key, buf in momenta.items():
                p = params[key]
                if p.grad is not None and p.grad.shape == buf.shape:
                    p.grad.copy_(buf)
                else:
                    p.grad = buf.detach().to(device=p.device, dtype=p.dtype, copy=True)
        self._decay_pending = pending
        self._remember_buffers()
        self._micro_batches = micro_batches
        self._hook_calls = {params[key]: n for key, n in calls.items() if n > 0}
        self._incoming.clear()
        self._settled = False
        self._resolve_variance()  # the saved groups' variance_correction, for this run's loop

    def __getstate__(self) -> dict[str, Any]:
        # The momentum travels with deepcopy/pickle (Parameter.__deepcopy__ drops .grad); hooks do
        # not (they belong to the original parameters): __setstate__ registers the copy's own.
        momentum = [p.grad for g in self.param_groups for p in g["params"]]
        return {**super().__getstate__(), "_decay_pending": self._decay_pending, "_momentum": momentum,
                "_micro_batches": self._micro_batches, "_hook_calls": self._hook_calls,
                **{k: self.__dict__[k] for k in _LOOP_FACTS if k in self.__dict__}}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        momentum = state.pop("_momentum", None)
        super().__setstate__(state)
        if "_hooks" not in self.__dict__:  # a copy or an unpickled optimizer (load_state_dict keeps them)
            self._init_hook_registry()
        if "_auto" in self.__dict__:
            self._sync_hooks()
        else:  # an optimizer pickled before "auto" existed
            self._resolve_variance()
        self.__dict__.setdefault("_decay_pending", True)
        if momentum is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            for p, buf in zip(params, momentum):
                if p.grad is None and buf is not None:
                    p.grad = buf
        self._remember_buffers()  # a copy's buffers are new tensors: re-arm the guard on them


class HMAdamW(HMAdam):
    """HMAdam with decoupled weight decay ``W <- W (1 - lr wd)`` (AdamW's), default ``wd = 1e-2``.

    Everything else, including the training-loop contract, is documented on :class:`HMAdam`.
    """

    decoupled_weight_decay: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        variance_correction: str = "auto",
        fused: bool | None = None,
        state_in_param_dtype: bool = False,
        max_momentum_norm: float | None = None,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            variance_correction=variance_correction,
            fused=fused,
            state_in_param_dtype=state_in_param_dtype,
            max_momentum_norm=max_momentum_norm,
        )


# ------------------------------------------------------------------ variance_correction="hook"
def _refusal(name: str, what: str) -> str:
    return (
        f"{name}(variance_correction='hook') runs in one process on plain tensors without loss scaling, not with "
        f"{what}: its hooks see each backward pass's gradient as autograd adds it into .grad (before DDP's "
        "all-reduce, past FSDP2's reduce-scatter, times an fp16 loss scale). Set "
        "model.init_args.optimizer.init_args.variance_correction to noise (or stationary/none) there."
    )


def _keep_incoming(opt_ref: weakref.ref, p_ref: weakref.ref, grad: Tensor) -> None:
    """Tensor hook: the gradient autograd is about to add into ``p.grad``."""
    opt, p = opt_ref(), p_ref()
    if opt is not None and p is not None and not grad.is_sparse:  # sparse: step() raises the clear error
        opt._incoming[p] = grad


def _after_accumulation(opt_ref: weakref.ref, p: Tensor) -> None:
    """Post-accumulate-grad hook: the kept gradient is now in ``B``; ``v`` takes it."""
    opt = opt_ref()
    if opt is not None:
        grad = opt._incoming.pop(p, None)
        if grad is not None:
            opt._update_v(p, grad)


def _remove_hooks(hooks: dict) -> None:
    for handles in hooks.values():
        for handle in handles:
            handle.remove()
    hooks.clear()


# ------------------------------------------------------------------------ functional core
def hmadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    clip_coef: Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    variance_correction: str,
    decoupled: bool,
    fused: bool,
) -> None:
    """One HMAdam(W) step over lists of tensors; ``grads`` are the momentum buffers ``B``.

    Increments each ``state_steps`` entry, updates ``params`` and ``exp_avg_sqs`` in place, scales
    ``grads`` by ``clip_coef`` (if given) and decays them by ``beta1``.
    """
    impl = _fused_hmadam if fused else _single_tensor_hmadam
    impl(
        params,
        grads,
        exp_avg_sqs,
        state_steps,
        clip_coef=clip_coef,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        variance_correction=variance_correction,
        decoupled=decoupled,
    )


def _single_tensor_hmadam(
    params, grads, exp_avg_sqs, state_steps, *, clip_coef, lr, beta1, beta2, eps, weight_decay, variance_correction,
    decoupled,
) -> None:  # fmt: skip
    for param, buf, exp_avg_sq, step_t in zip(params, grads, exp_avg_sqs, state_steps):
        step_t += 1
        step = step_t.item()
        compute = torch.float64 if exp_avg_sq.dtype == torch.float64 else torch.float32
        b = buf.to(compute)  # the buffer itself, or an fp32 copy of a bf16/fp16 buffer
        if clip_coef is not None:
            b.mul_(clip_coef)
        if weight_decay != 0 and not decoupled:
            b.add_(param, alpha=weight_decay)  # coupled L2 enters the history, like Adam's g + wd W
        m = b * (1 - beta1)
        c = variance_scale(variance_correction, beta1, step)
        if c != 0:  # "hook" after the first step: the hooks have updated v already
            exp_avg_sq.mul_(beta2).addcmul_(m, m, value=(1 - beta2) * c)
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
        param.addcdiv_(m, denom, value=-lr / bias_correction1)
        b.mul_(beta1)  # the decay for the next step (zero_grad() then has nothing left to do)
        if b is not buf:
            buf.copy_(b)


def _hmadam_kernel(
    param: Tensor,
    buf: Tensor,
    exp_avg_sq: Tensor,
    *,
    clip_coef: Tensor,
    l2: Tensor,
    one_minus_beta1: Tensor,
    beta2: Tensor,
    v_scale: Tensor,
    param_decay: Tensor,
    step_size: Tensor,
    inv_bias_correction2_sqrt: Tensor,
    eps: Tensor,
    beta1: Tensor,
) -> None:
    """The same step for one tensor, written for Inductor: reads W, B, v once, writes each once.

    HMAdam and HMAdamW share it (one compile): coupled L2 is ``l2 = wd`` (0 for HMAdamW), the
    decoupled decay ``param_decay = 1 - lr wd`` (1 for HMAdam). Scalar combinations come
    precomputed in float64 on the host (``1 - 0.999`` in float32 is off by 5e-5 relative), and
    divisions are replaced by multiplications where the divisor is a scalar.
    """
    compute = step_size.dtype  # fp32, or fp64 for fp64 tensors (the _fast scalar contract)
    w = param.to(compute)
    b = buf.to(compute) * clip_coef + l2 * w
    m = one_minus_beta1 * b
    v = beta2 * exp_avg_sq.to(compute) + v_scale * m * m
    w = w * param_decay - step_size * m / (v.sqrt() * inv_bias_correction2_sqrt + eps)
    exp_avg_sq.copy_(v)
    param.copy_(w)
    buf.copy_(beta1 * b)


_HMADAM_FAST = FusedForeach(_hmadam_kernel, native="lowmem_hmadam_f32", name="hmadam")


def _fused_hmadam(
    params, grads, exp_avg_sqs, state_steps, *, clip_coef, lr, beta1, beta2, eps, weight_decay, variance_correction,
    decoupled,
) -> None:  # fmt: skip
    if not params:  # a group whose parameters all have no gradient
        return
    for step, indices in step_groups(state_steps).items():
        c = variance_scale(variance_correction, beta1, step)
        scalars = {
            "clip_coef": 1.0 if clip_coef is None else clip_coef,
            "l2": 0.0 if decoupled else weight_decay,
            "one_minus_beta1": 1 - beta1,
            "beta2": beta2 if c != 0 else 1.0,  # c = 0: "hook" after step 1, v = 1 v + 0 m^2 as the hooks left it
            "v_scale": (1 - beta2) * c,
            "param_decay": 1 - lr * weight_decay if decoupled else 1.0,
            "step_size": lr / (1 - beta1**step),
            "inv_bias_correction2_sqrt": 1 / math.sqrt(1 - beta2**step),
            "eps": eps,
            "beta1": beta1,
        }
        _HMADAM_FAST([[t[i] for i in indices] for t in (params, grads, exp_avg_sqs)], scalars)
