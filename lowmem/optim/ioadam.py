"""IO-Adam: second moments from layer inputs and output gradients (docs/algorithms.md §5).

Chen, Huo, Yan, "IO-Adam: Rethinking Memory-Efficient Adaptive Optimizers from Gradient
Computation" (ICML 2026). For a Linear weight ``W`` (n_out x n_in) the gradient is
``G = sum_tokens dY^T X``; by Hölder's inequality, per entry,

    |G[i, j]| <= (sum_tokens |dY[:, i]|^q)^(1/q) (sum_tokens |X[:, j]|^p)^(1/p),  1/p + 1/q = 1,

so EMAs of those two vectors bound Adam's second moment with ``n_out + n_in`` numbers per slot.
Per step ``t`` (from 1), with ``k = (t-1) mod b`` the buffer slot of this step::

    C[:, k] += (1-b2) sum_tokens |X|^p         # C: n_in x b   (state "in_stats")
    R[:, k] += (1-b2) sum_tokens |dY|^q        # R: n_out x b  (state "out_stats")
    M = b1 M + (1-b1) G                        # full n_out x n_in (state "exp_avg")
    W = W (1 - lr wd)
    D = (sum_k R[:,k]^(2/q) (x) C[:,k]^(2/p))^(1/2)      buffer_mode="paper"    (Eq. 9 / 18)
    D = sum_k R[:,k]^(1/q) (x) C[:,k]^(1/p)              buffer_mode="per_slot"
    W = W - lr (1-b2^t)/(1-b1^t) M / (D + eps)
    k = (k+1) mod b ;  R = b2 R ;  C = b2 C    # decay after the update

Bias correction: ``D^2`` is a product of two EMAs, each carrying a factor ``(1-b2^t)``, so
``V_hat = D^2/(1-b2^t)^2`` and ``M_hat/sqrt(V_hat) = (1-b2^t)/(1-b1^t) M/D``: the spec's
step-size factor and "bias correction (1-b2^t)^2 of the product" are the same statement. eps
is added to the uncorrected ``D`` (as in the authors' code), i.e. it acts as ``eps/(1-b2^t)``.

A Linear weight tied to an ``nn.Embedding`` (a tied LM head, vocabulary on W's dim 0) gets
``G = G_head + G_emb`` with ``G_emb[v, :] = sum_tokens [id = v] dE``: an outer-product sum too,
with the one-hot token as the vocabulary-side factor. Each use keeps its own statistics, with
the same slot, decay and step count: the head's ``R``, ``C`` above and the embedding's
``Re[:, k] += (1-b2) count(v)`` (n_vocab x b, state "emb_out_stats"; ``count(v)`` is the sum of
the indicator to any power) and ``Ce[:, k] += (1-b2) sum_tokens |dE|^p`` (n_in x b, state
"emb_in_stats"). By the triangle inequality and Hölder per use, ``|G| <= |G_head| + |G_emb|``
is bounded by the sum of the two denominators::

    D = (sum_k R_k^(2/q) (x) C_k^(2/p))^(1/2) + (sum_k Re_k^(2/q) (x) Ce_k^(2/p))^(1/2)   "paper"
    D = sum_k R_k^(1/q) (x) C_k^(1/p) + sum_k Re_k^(1/q) (x) Ce_k^(1/p)                   "per_slot"

with the bias correction and eps above (each term carries the factor ``(1-b2^t)``). Summing
both uses into one ``R`` and ``C`` (lowmem before) also bounds ``|G|``, but its cross term
``count(v) sum_tokens |H|^p`` (both ~ the token count) inflates ``D`` by orders of magnitude and
freezes the tied weight. Two Linear modules sharing a weight add into one ``R``, ``C`` (same
semantics, as the gradient does).

Gradient accumulation and loss scaling: statistics use ``dY`` exactly as autograd delivers it,
summed over every token of every micro-batch between two steps, as the gradient is. With the
usual ``loss / n_micro`` scaling this equals the full-batch statistics; for an untied weight
the update is invariant to any constant loss scale ``s`` (``M`` and ``D`` both scale by ``|s|``;
only eps is not). A weight tied to an embedding is not: its token counts are untouched by a
loss scale. Distributed (DDP or FSDP2 over ``w`` ranks), the averaged gradient is the gradient
of the global batch, whose output gradients are each rank's ``dY / w``: every rank stages
``w^-q sum |dY|^q`` (``w^-p`` for an embedding's ``dE``; counts unscaled) and ``step()``
all-reduces the *sums*, so ``R``, ``C`` (and ``Re``, ``Ce``) are exactly the statistics one
process would gather from the global batch.

A Hugging Face ``Conv1D`` (GPT-2's layers: ``Y = X W + b``, ``W`` stored n_in x n_out) is owned
as a Linear is: its statistics are the same two vectors, and ``M``, ``D`` and the update are kept
in the weight's own (transposed) layout, ``D = (sum_k C_k^(2/p) (x) R_k^(2/q))^(1/2)``.

Everything not owned by IO-Adam (biases, norms, embeddings, convolutions, Linear weights used
elsewhere) follows AdamW in the same optimizer. See ``lowmem.optim._io_stats`` for how the
statistics are captured.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.graph import increment_version

from lowmem.optim import _dispatch, _native
from lowmem.optim._base import (
    Capabilities, LowMemOptimizer, check_grad, check_hparams, check_non_negative, state_dtype_for,
    step_groups,
)  # fmt: skip
from lowmem.optim._adamw import adamw
from lowmem.optim._dispatch import check_fused, use_fast_path
from lowmem.optim._fast import FusedForeach
from lowmem.optim._io_stats import StatsHooks, io_weights, power_sum, transposed_layout
from lowmem.optim._sharding import check_fsdp_layout, is_sharded, local_rows, state_like
from lowmem.optim.roles import weight_decay_param_groups

__all__ = ["IOAdam", "io_adam"]

_BUFFER_MODES = ("paper", "per_slot")


def _check_single_process() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"IOAdam(fused_linear=True) runs in a single process only, but torch.distributed is initialized with "
            f"world size {dist.get_world_size()}: under DDP the fused weights have no .grad for DDP to average, so "
            "the replicas would drift apart. Use IOAdam(model, fused_linear=False), which lets DDP average the "
            "gradients and all-reduces the input/output statistics in step()."
        )


class IOAdam(LowMemOptimizer):
    r"""IO-Adam for the ``nn.Linear`` weights of ``model``, AdamW for every other parameter.

    See the module docstring for the update. State per IO-Adam weight: ``exp_avg`` (M, the
    weight's shape), ``out_stats`` (R, n_out x b), ``in_stats`` (C, n_in x b), ``slot`` (k, an
    int) and ``step`` (0-d float32); a weight tied to an embedding also keeps the embedding
    use's ``emb_out_stats`` (Re, n_vocab x b) and ``emb_in_stats`` (Ce, n_in x b). AdamW
    parameters keep ``exp_avg``, ``exp_avg_sq``, ``step``. In fp32 that is
    ``4 (n_out n_in + b (n_out + n_in))`` bytes per weight (twice the ``b`` term when tied):
    about half of AdamW. A state dict saved before the two uses were kept apart (a tied weight
    with ``out_stats``/``in_stats`` only, both uses summed) loads: its buffers become the head
    use's and the embedding use's start at zero; the mixed sums over-estimate the head's bound,
    so the first steps are only smaller, and they decay away at ``b2``.

    Learning rate: the bound ``D >= sqrt(v)`` can be loose by up to the token count, so IO-Adam's
    best lr is about 10x AdamW's (the paper: 0.02-0.025 vs 0.002); ``adamw_lr`` sets the other
    parameters' lr separately. With ``buffer_mode="paper"`` ``D`` shrinks about ``1/sqrt(b)`` as
    the buffer grows (a sum of b partially filled slots under one root), so retune lr when you
    change ``buffer_size``; ``"per_slot"`` (sum of per-slot roots) keeps the scale of ``b = 1``.

    Which weights: a 2-D trainable parameter that a plain ``nn.Linear`` or a Hugging Face
    ``Conv1D`` (GPT-2; state kept in its (n_in, n_out) layout) uses as its weight and that no
    other module registers, except dense ``nn.Embedding`` layers tied to a Linear weight (their
    gradient is an outer-product sum too; each use keeps its own statistics, see the module
    docstring). Linear layers inside
    ``nn.MultiheadAttention`` and Linear subclasses with their own ``forward`` get AdamW. A weight
    used by code that bypasses the module (``F.linear(x, lin.weight)``) gets a gradient without
    statistics: the first such step raises an error; a partial bypass cannot be detected.

    Statistics are staged between steps and committed in ``step()``; ``zero_grad()`` discards
    them with the gradients (``fused_linear=False``), so a skipped step leaks nothing. With ``fused_linear=True``
    there is no gradient to discard: ``zero_grad()`` leaves the accumulated momentum and
    statistics alone and every backward until the next step counts, like gradient accumulation.
    ``load_state_dict`` discards staged statistics. Staged statistics are not saved (nor are
    gradients).

    Distributed: under DDP (``fused_linear=False``) ``step()`` all-reduces (sums) this step's staged
    sums of every IO-Adam weight in one collective over the default process group before it
    commits them (the output-gradient terms staged scaled, see the module docstring), so every
    rank computes the ``D`` of one process at the global batch; every rank must call ``step()``.
    ``fused_linear=True`` refuses a world size above 1. Under FSDP2 (``fully_shard``: weights sharded
    along dim 0, the output rows) each rank still sees the whole ``X`` and ``dY`` of its own
    micro-batch, so the statistics are captured and summed exactly as under DDP; then each rank
    keeps the rows of ``R`` (and of a tied embedding's ``Re``: the vocabulary is W's dim 0 for both
    uses; sharded like the weight, as ``M`` is) that its shard of ``W`` needs, and all of ``C``
    (and ``Ce``; replicated). ``comm_bytes_per_step`` counts the bytes the sum sends.

    Not compatible with an fp16 ``GradScaler`` (``R`` sees the scaled ``dY``, the unscale does
    not reach it, and fused updates happen before the inf check): use bf16. Gradient clipping
    scales ``M`` but not ``D``, and with ``fused_linear=True`` it does not see these weights at all.

    Args:
        model: the module to optimize (all its trainable parameters); hooks are registered on
            its Linear (and tied Embedding) modules, so a DDP wrapper may be added before or
            after. Not tested under ``torch.compile``.
        lr: learning rate (default 1e-3).
        betas: ``(b1, b2)`` (default ``(0.9, 0.999)``).
        eps: added to the uncorrected ``D`` (default 1e-8).
        weight_decay: decoupled weight decay for matrices (default 0.1); norms, biases and the
            model's ``no_weight_decay()`` names get none (``weight_decay_param_groups``).
        buffer_size: number of slots ``b`` in R and C (default 16).
        p: Hölder exponent of the inputs, ``p > 1``; the output gradients use ``q = p/(p-1)``
            (default 2). A large ``q`` (p near 1) can underflow ``|dY|^q`` in fp32.
        buffer_mode: ``"paper"`` (root of the sum over slots) or ``"per_slot"`` (sum of roots).
        fused_linear: accumulate ``M`` in the backward straight from ``dY`` and ``X``; the IO-Adam
            weights then never get a ``.grad`` (single process only).
        adamw_lr: lr of the AdamW parameters (default: ``lr``).
        state_in_param_dtype: keep state in the dtype of bf16/fp16 parameters instead of fp32.
        fused: how ``step()`` runs (``fused_linear`` above is about the backward). ``True``: the
            fast path, one kernel per step for the IO-Adam weights that builds ``D`` tile by tile
            while it updates ``M`` and ``W`` (``D`` never stored: hand-written C for float32
            contiguous CPU tensors; else ``D`` from one GEMM and the update compiled or as
            foreach ops: the backends of :mod:`lowmem.optim._dispatch`), and AdamW's fast path
            for the other parameters; ``False``: the plain for-loop (the reference); ``None``
            (default): the fast path when the optimizer holds at least 2**20 elements. FSDP2
            shards and a ``torch.compile``'d step take the for-loop either way.
    """

    capabilities = Capabilities(
        needs_model=True, needs_full_shapes=True, supports_dtensor=True, supports_grad_scaler=False
    )
    comm_bytes_per_step = 0  # bytes the last step all-reduced between ranks (DDP or FSDP2)

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        buffer_size: int = 16,
        p: float = 2.0,
        buffer_mode: str = "paper",
        fused_linear: bool = False,
        *,
        adamw_lr: float | None = None,
        state_in_param_dtype: bool = False,
        fused: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"IOAdam needs the model itself (an nn.Module) to hook its Linear layers, got {type(model).__name__}; "
                "call IOAdam(model, ...) instead of IOAdam(model.parameters(), ...)"
            )
        check_hparams("IOAdam", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, buffer_size=buffer_size)
        if int(buffer_size) != buffer_size:
            raise ValueError(f"IOAdam: invalid buffer_size={buffer_size!r}; it must be an integer >= 1")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 1.0 < p < math.inf:
            raise ValueError(f"IOAdam: invalid p={p!r}; the Hölder exponent must be a number > 1 (q = p/(p-1))")
        if buffer_mode not in _BUFFER_MODES:
            raise ValueError(f"IOAdam: invalid buffer_mode={buffer_mode!r}; expected one of {_BUFFER_MODES}")
        if adamw_lr is not None:
            check_non_negative("IOAdam", adamw_lr=adamw_lr)
        if fused_linear:
            _check_single_process()
        check_fused("IOAdam", fused)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, buffer_size=int(buffer_size),
            p=float(p), buffer_mode=buffer_mode, io=False, state_in_param_dtype=state_in_param_dtype,
            fused=fused,
        )  # fmt: skip
        linears, embeddings = io_weights(model)
        groups = []
        for g in weight_decay_param_groups(model, weight_decay):
            io = [(n, w) for n, w in g["params"] if id(w) in linears]
            rest = [(n, w) for n, w in g["params"] if id(w) not in linears]
            if io:
                groups.append({**g, "params": io, "io": True})
            if rest:
                groups.append({**g, "params": rest, **({} if adamw_lr is None else {"lr": adamw_lr})})
        super().__init__(groups, defaults)
        self._fused_linear = bool(fused_linear)
        self._reset_transient()
        params = {id(w): w for g in self.param_groups if g["io"] for w in g["params"]}
        # Weights stored (n_in, n_out) (HF Conv1D): R and C keep their meaning, W's dim 0 is C's.
        self._transposed = {w for pid, w in params.items() if transposed_layout(linears[pid])}
        # Weights also used by an nn.Embedding: the embedding use keeps its own statistics.
        self._tied = {w for pid, w in params.items() if pid in embeddings}
        self._hooks: StatsHooks | None = StatsHooks(self, linears, embeddings, params, self._fused_linear)
        weakref.finalize(self, self._hooks.remove)

    def _reset_transient(self) -> None:
        # Per-step, unsaved: staged (out_sum, in_sum) per weight, of its Linear use and of its
        # embedding use (tied weights: (count, sum |dE|^p)), see _stage_into; weights whose M got
        # this step's fused contribution (and its b1 decay). Group index per IO weight, for the hooks.
        self._staged: dict[Tensor, tuple[Tensor, Tensor] | list[Tensor]] = {}
        self._staged_emb: dict[Tensor, tuple[Tensor, Tensor] | list[Tensor]] = {}
        self._momentum_ready: set[Tensor] = set()
        self._io_group = {w: i for i, g in enumerate(self.param_groups) if g["io"] for w in g["params"]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict comes through here too (keep the hooks); a deepcopy/unpickle
        # starts from a bare __dict__: that copy has no hooks on any model, it can hold and load
        # state but not step.
        super().__setstate__(state)
        if "_hooks" not in self.__dict__:
            self._fused_linear, self._hooks = False, None
        self.__dict__.setdefault("_transposed", set())
        self.__dict__.setdefault("_tied", set())
        self._reset_transient()

    # -- the public extras ---------------------------------------------------------------------

    def remove_hooks(self) -> None:
        """Detach every hook (and restore fused forwards) from the model. The optimizer can no
        longer step IO-Adam weights afterwards; build a new ``IOAdam(model)`` and load this
        one's ``state_dict()`` to continue."""
        if self._hooks is not None:
            self._hooks.remove()

    def __enter__(self) -> IOAdam:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove_hooks()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and discard the statistics staged with them (``fused_linear=False``)."""
        super().zero_grad(set_to_none)
        if not self._fused_linear:
            self._staged.clear()
            self._staged_emb.clear()

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        """Load state (``load_state_dict``, after its pre-hooks): floating state is copied in the
        dtype it was saved in (torch casts it to the param dtype, which would round fp32 state of
        bf16 params). Staged statistics are dropped. A tied weight saved without the embedding
        use's statistics (the format before they were kept apart: both uses summed into
        ``out_stats``/``in_stats``) keeps those as the head use's and starts ``emb_*`` at zero
        (the mixed sums only over-estimate the head's bound; they decay at ``b2``)."""
        super()._load_state(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [w for g in self.param_groups for w in g["params"]]
        for pid, w in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                    self.state[w][key] = value.to(device=w.device, copy=True)
        for w in self._tied:
            state = self.state.get(w)
            if state and "emb_out_stats" not in state:
                self._init_emb_state(w, self.param_groups[self._io_group[w]])
        self._reset_transient()

    # -- called by the hooks (lowmem.optim._io_stats) ------------------------------------------

    def _owns(self, w: Tensor) -> bool:
        return w in self._io_group

    def fsdp2_state_sharded(self, p: Tensor, key: str) -> bool | None:
        """How FSDP2 places ``key`` of ``p`` (for :func:`~lowmem.optim.sharded_state_bytes`): the
        per-input-feature statistics (of both uses of a tied weight) are whole on every rank, the
        rest follows the rows rule."""
        return False if key in (("out_stats",) if p in self._transposed else ("in_stats", "emb_in_stats")) else None

    def _grad_stat_scale(self, exponent: float) -> float:
        """``world^-exponent``: a power sum of this rank's output gradients as a part of the global
        batch's (the averaged gradient's output gradients are ``dY / world``); 1 in one process."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return float(world) ** -exponent

    def _io_exponents(self, w: Tensor) -> tuple[float, float]:
        p = self.param_groups[self._io_group[w]]["p"]
        return p, p / (p - 1.0)

    def _state_dtype(self, w: Tensor) -> torch.dtype:
        return state_dtype_for(w, self.param_groups[self._io_group[w]]["state_in_param_dtype"])

    def _stage_stats(self, w: Tensor, out_sum: Tensor, in_sum: Tensor) -> None:
        """Add one Linear call's ``(sum |dY|^q, sum |X|^p)`` to the sums staged for ``w``'s ``R``, ``C``."""
        self._stage_into(self._staged, w, out_sum, in_sum)

    def _stage_embedding_stats(self, w: Tensor, counts: Tensor, in_sum: Tensor) -> None:
        """Add one Embedding call's ``(count(v), sum |dE|^p)`` to the sums staged for the embedding
        use of the tied weight ``w`` (its ``Re``, ``Ce``)."""
        self._stage_into(self._staged_emb, w, counts, in_sum)

    def _stage_into(self, staged_sums: dict[Tensor, Any], w: Tensor, out_sum: Tensor, in_sum: Tensor) -> None:
        """Stage one call's pair. The first call's pair is kept as it is (a tuple, no copies; never
        written to: its ``in_sum`` lives on in its closure, which a retained graph's second
        backward calls again); from a second call on, the staged pair is a list of copies in the
        state dtype that each call's sums are added to in place. :meth:`_staged_sums` reads both."""
        staged = staged_sums.get(w)
        if staged is None:
            staged_sums[w] = (out_sum, in_sum)
            return
        if type(staged) is tuple:
            dtype = self._state_dtype(w)
            staged = staged_sums[w] = [staged[0].to(dtype=dtype, copy=True), staged[1].to(dtype=dtype, copy=True)]
        staged[0].add_(out_sum)
        staged[1].add_(in_sum)

    def _staged_sums(self, staged_sums: dict[Tensor, Any], w: Tensor) -> Sequence[Tensor] | None:
        """``w``'s staged ``(out_sum, in_sum)`` in the state dtype (None: no call staged)."""
        staged = staged_sums.get(w)
        if staged is None or type(staged) is list:
            return staged
        dtype = self._state_dtype(w)
        return staged if staged[0].dtype == dtype and staged[1].dtype == dtype else [t.to(dtype) for t in staged]

    def _fused_momentum(self, w: Tensor, x2d: Tensor, dy2d: Tensor) -> None:
        group = self.param_groups[self._io_group[w]]
        p, q = self._io_exponents(w)
        self._stage_stats(w, power_sum(dy2d, q), power_sum(x2d, p))
        state = self.state[w]
        if not state:
            self._init_io_state(w, group)
        exp_avg, beta1 = state["exp_avg"], group["betas"][0]
        if w not in self._momentum_ready:  # M = b1 M + (1-b1) G, G arriving in parts
            exp_avg.mul_(beta1)
            self._momentum_ready.add(w)
        x, dy = x2d.to(exp_avg.dtype), dy2d.to(exp_avg.dtype)
        if w in self._transposed:  # G = X^T dY, (n_in, n_out)
            exp_avg.addmm_(x.t(), dy, alpha=1.0 - beta1)
        else:  # G = dY^T X, (n_out, n_in)
            exp_avg.addmm_(dy.t(), x, alpha=1.0 - beta1)

    # -- the step ------------------------------------------------------------------------------

    def _io_sizes(self, w: Tensor) -> tuple[int, int]:
        """``(n_out, n_in)`` of an IO-Adam weight, whatever its layout."""
        return (w.shape[1], w.shape[0]) if w in self._transposed else (w.shape[0], w.shape[1])

    def _init_io_state(self, w: Tensor, group: dict[str, Any]) -> None:
        dtype, b = self._state_dtype(w), group["buffer_size"]
        (n_out, n_in), transposed = self._io_sizes(w), w in self._transposed
        state = self.state[w]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["slot"] = 0
        if is_sharded(w):  # M and the statistic of W's dim 0 (R; C for a Conv1D) by rows like W; the other whole
            check_fsdp_layout(w, "IOAdam")
            state["exp_avg"] = state_like(w, tuple(w.shape), dtype, sharded_rows=True)
            state["out_stats"] = state_like(w, (n_out, b), dtype, sharded_rows=not transposed)
            state["in_stats"] = state_like(w, (n_in, b), dtype, sharded_rows=transposed)
        else:
            state["exp_avg"] = torch.zeros_like(w, dtype=dtype, memory_format=torch.preserve_format)
            state["out_stats"] = torch.zeros(n_out, b, dtype=dtype, device=w.device)
            state["in_stats"] = torch.zeros(n_in, b, dtype=dtype, device=w.device)
        if w in self._tied:
            self._init_emb_state(w, group)

    def _init_emb_state(self, w: Tensor, group: dict[str, Any]) -> None:
        """Zero ``Re`` (n_vocab x b: W's dim 0, sharded by rows like ``R`` under FSDP2) and ``Ce``
        (n_in x b, whole on every rank) of the embedding use of the tied weight ``w``."""
        dtype, b = self._state_dtype(w), group["buffer_size"]
        n_out, n_in = self._io_sizes(w)  # a tied weight is never transposed (io_weights)
        state = self.state[w]
        if is_sharded(w):
            state["emb_out_stats"] = state_like(w, (n_out, b), dtype, sharded_rows=True)
            state["emb_in_stats"] = state_like(w, (n_in, b), dtype, sharded_rows=False)
        else:
            state["emb_out_stats"] = torch.zeros(n_out, b, dtype=dtype, device=w.device)
            state["emb_in_stats"] = torch.zeros(n_in, b, dtype=dtype, device=w.device)

    def _all_reduce_statistics(self) -> None:
        """Sum this step's staged sums over the DDP/FSDP2 ranks (one all-reduce per dtype/device)."""
        self.comm_bytes_per_step = 0
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for g in self.param_groups:
            for w in g["params"] if g["io"] else ():
                buckets.setdefault((self._state_dtype(w), w.device), []).append(w)
        for (dtype, device), weights in buckets.items():
            # n_out, n_in per use of each weight: R's and C's sums, then a tied weight's Re's and Ce's
            uses = [(w, staged) for w in weights for staged in (self._staged, self._staged_emb)
                    if staged is self._staged or w in self._tied]  # fmt: skip
            sizes = [n for w, _ in uses for n in self._io_sizes(w)]
            flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
            parts = flat.split(sizes)
            for i, (w, staged_sums) in enumerate(uses):
                for part, staged in zip(parts[2 * i : 2 * i + 2], staged_sums.get(w, ())):
                    part.copy_(staged)
            dist.all_reduce(flat)
            self.comm_bytes_per_step += flat.numel() * flat.element_size()
            for i, (w, staged_sums) in enumerate(uses):
                staged_sums[w] = [parts[2 * i], parts[2 * i + 1]]

    def _init_io_group(self, group: dict[str, Any]) -> tuple[list, ...]:
        """The weights of an IO group that step now (first list) and the arguments of ``io_adam``
        for them (local shards under FSDP2)."""
        lists: tuple[list, ...] = tuple([] for _ in range(16))
        owners, params, grads, exp_avgs, out_stats, in_stats, out_sums, in_sums, steps, slots, ready, transposed = (
            lists[:12]
        )
        emb_out_stats, emb_in_stats, emb_out_sums, emb_in_sums = lists[12:]
        for i, w in enumerate(group["params"]):
            fused_part = w in self._momentum_ready
            if w.grad is None and not fused_part:
                continue
            check_grad("IOAdam", w)
            state = self.state[w]
            if not state:
                self._init_io_state(w, group)
            staged = self._local_rows_of(w, self._staged_sums(self._staged, w))
            staged_emb = self._local_rows_of(w, self._staged_sums(self._staged_emb, w))
            if (staged is None and staged_emb is None and w.grad is not None and not _local(state["in_stats"]).any()
                    and _local(w.grad).any()):  # fmt: skip
                name = group["param_names"][i] if "param_names" in group else f"of shape {tuple(w.shape)}"
                raise RuntimeError(
                    f"IOAdam: the Linear weight {name} got a gradient but its module's forward never ran with grad: "
                    "the weight is used by code that bypasses the module (e.g. F.linear(x, layer.weight)), so IO-Adam "
                    "has no input/output statistics for it. Call the module itself, or untie/freeze the weight."
                )
            owners.append(w)
            params.append(_local(w))
            grads.append(None if w.grad is None else _local(w.grad))
            exp_avgs.append(_local(state["exp_avg"]))
            out_stats.append(_local(state["out_stats"]))
            in_stats.append(_local(state["in_stats"]))
            out_sums.append(None if staged is None else staged[0])
            in_sums.append(None if staged is None else staged[1])
            steps.append(state["step"])
            slots.append(state["slot"])
            ready.append(fused_part)
            transposed.append(w in self._transposed)
            tied = "emb_out_stats" in state
            emb_out_stats.append(_local(state["emb_out_stats"]) if tied else None)
            emb_in_stats.append(_local(state["emb_in_stats"]) if tied else None)
            emb_out_sums.append(None if staged_emb is None else staged_emb[0])
            emb_in_sums.append(None if staged_emb is None else staged_emb[1])
        return lists

    def _local_rows_of(self, w: Tensor, staged: Sequence[Tensor] | None) -> Sequence[Tensor] | None:
        """Staged ``(out_sum, in_sum)`` of ``w`` with the sum along W's dim 0 cut to this rank's
        rows under FSDP2 (the staged sums are full: every rank sees its whole micro-batch)."""
        if staged is None or not is_sharded(w):
            return staged
        start, rows = local_rows(w)
        if w in self._transposed:
            return [staged[0], staged[1].narrow(0, start, rows)]
        return [staged[0].narrow(0, start, rows), staged[1]]

    def _init_adamw_group(self, group: dict[str, Any]) -> tuple[list, ...]:
        params, grads, exp_avgs, exp_avg_sqs, steps = lists = tuple([] for _ in range(5))
        for w in group["params"]:
            if w.grad is None:
                continue
            check_grad("IOAdam", w)
            state = self.state[w]
            if not state:
                dtype = state_dtype_for(w, group["state_in_param_dtype"])
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(w, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(w, dtype=dtype, memory_format=torch.preserve_format)
            params.append(_local(w))
            grads.append(_local(w.grad))
            exp_avgs.append(_local(state["exp_avg"]))
            exp_avg_sqs.append(_local(state["exp_avg_sq"]))
            steps.append(state["step"])
        return lists

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One optimizer step; ``closure`` (re-evaluates the model, returns the loss) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._hooks is None or self._hooks.removed:
            if any(w.grad is not None for w in self._io_group):
                raise RuntimeError(
                    "IOAdam.step(): this optimizer's hooks were removed (remove_hooks(), a context exit, or a copy of "
                    "the optimizer), so the Linear weights have no statistics. Build a new IOAdam(model) and "
                    "load_state_dict() this one's state to continue."
                )
        elif self._fused_linear:
            _check_single_process()
        else:
            self._all_reduce_statistics()
        total_numel = sum(w.numel() for g in self.param_groups for w in g["params"])
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            fast = use_fast_path(group["fused"], total_numel)
            if group["io"]:
                lists = self._init_io_group(group)
                owners, params, grads, exp_avgs, out_stats, in_stats, out_sums, in_sums, steps, slots, ready, transposed = (
                    lists[:12]
                )
                emb_out_stats, emb_in_stats, emb_out_sums, emb_in_sums = lists[12:]
                io_adam(
                    params, grads, exp_avgs, out_stats, in_stats, out_sums, in_sums, steps, slots, ready,
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    p=group["p"], buffer_mode=group["buffer_mode"], transposed=transposed,
                    emb_out_stats=emb_out_stats, emb_in_stats=emb_in_stats, emb_out_sums=emb_out_sums,
                    emb_in_sums=emb_in_sums, fused=fast and not any(is_sharded(w) for w in owners),
                )  # fmt: skip
                for w, k in zip(owners, slots):  # advance the slot once per processed step
                    self.state[w]["slot"] = (k + 1) % self.state[w]["in_stats"].shape[1]
            else:
                params, grads, exp_avgs, exp_avg_sqs, steps = self._init_adamw_group(group)
                adamw(
                    params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                    eps=group["eps"], weight_decay=group["weight_decay"], fused=fast,
                )  # fmt: skip
        self._staged.clear()
        self._staged_emb.clear()
        self._momentum_ready.clear()
        return loss


def _local(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 DTensor; a plain tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def _denominator(out_stats: Tensor, in_stats: Tensor, p: float, buffer_mode: str, transposed: bool = False) -> Tensor:
    """``D`` (n_out x n_in; n_in x n_out if ``transposed``, a Conv1D weight's layout) from R
    (n_out x b) and C (n_in x b), before bias correction."""
    q = p / (p - 1.0)
    if buffer_mode == "paper":  # (sum_k R_k^(2/q) (x) C_k^(2/p))^(1/2)
        r, c = (out_stats, in_stats) if p == 2.0 else (out_stats.pow(2.0 / q), in_stats.pow(2.0 / p))
        return (c @ r.t() if transposed else r @ c.t()).sqrt_()
    r, c = out_stats.pow(1.0 / q), in_stats.pow(1.0 / p)  # per_slot: sum_k R_k^(1/q) (x) C_k^(1/p)
    return c @ r.t() if transposed else r @ c.t()


def _tied_denominator(r: Tensor, c: Tensor, re: Tensor, ce: Tensor, p: float, buffer_mode: str) -> Tensor:
    """``D_head + D_emb`` of a weight tied to an embedding (n_vocab x n_in, before bias
    correction): each use's :func:`_denominator` from its own statistics (``R``, ``C`` of the
    Linear use; ``Re`` = counts, ``Ce`` = sums of ``|dE|^p`` of the embedding use), added: by the
    triangle inequality ``|G_head + G_emb| <= D_head + D_emb``."""
    return _denominator(r, c, p, buffer_mode).add_(_denominator(re, ce, p, buffer_mode))


def _commit(stats: Tensor | None, sums: Tensor | None, k: int, beta2: float) -> None:
    """``stats[:, k] += (1-b2) sums`` (nothing when no sums arrived or the weight has no such use)."""
    if stats is not None and sums is not None:
        stats[:, k].add_(sums, alpha=1.0 - beta2)


def io_adam(
    params: list[Tensor],
    grads: list[Tensor | None],
    exp_avgs: list[Tensor],
    out_stats: list[Tensor],
    in_stats: list[Tensor],
    out_sums: list[Tensor | None],
    in_sums: list[Tensor | None],
    state_steps: list[Tensor],
    slots: list[int],
    momentum_ready: list[bool],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    p: float,
    buffer_mode: str,
    transposed: list[bool] | None = None,
    emb_out_stats: list[Tensor | None] | None = None,
    emb_in_stats: list[Tensor | None] | None = None,
    emb_out_sums: list[Tensor | None] | None = None,
    emb_in_sums: list[Tensor | None] | None = None,
    fused: bool = False,
) -> None:
    """Functional IO-Adam step (see the module docstring) on lists of weights and their state.

    ``out_sums``/``in_sums`` are this step's ``sum_tokens |dY|^q`` / ``|X|^p`` (None: none arrived);
    ``slots`` the current slot ``k`` of each weight (the caller advances it); ``momentum_ready[i]``
    says the fused backward already applied ``M = b1 M + (1-b1) G`` for this step, in which case
    ``grads[i]`` (if any, e.g. from a tied embedding) is only added. ``grads[i]`` may be None.
    ``transposed[i]``: weight ``i`` is stored (n_in, n_out) (HF ``Conv1D``), and so are its ``M``
    and ``D``; R and C are the same (n_out x b, n_in x b) in either layout.
    ``emb_out_stats[i]``/``emb_in_stats[i]`` (None, or the lists None: no embedding use): the
    embedding use's ``Re``, ``Ce`` of a weight tied to an embedding, with this step's
    ``emb_out_sums[i]`` (token counts) / ``emb_in_sums[i]`` (``sum |dE|^p``); its ``D`` is then
    ``D_head + D_emb`` (:func:`_tied_denominator`).
    ``fused=True``: :func:`_io_adam_fast` (same maths, one pass, ``D`` never stored for untied
    weights) for all but the empty weights (the caller keeps FSDP2 shards on the loop).
    """
    n = len(params)
    transposed = transposed or [False] * n
    emb_out_stats, emb_in_stats = emb_out_stats or [None] * n, emb_in_stats or [None] * n
    emb_out_sums, emb_in_sums = emb_out_sums or [None] * n, emb_in_sums or [None] * n
    indices = range(n)
    if fused:
        fast = [i for i in indices if params[i].numel() > 0]
        _io_adam_fast(
            *([x[i] for i in fast] for x in (params, grads, exp_avgs, out_stats, in_stats, out_sums, in_sums,
                                             state_steps, slots, momentum_ready, transposed, emb_out_stats,
                                             emb_in_stats, emb_out_sums, emb_in_sums)),
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, p=p, buffer_mode=buffer_mode,
        )  # fmt: skip
        indices = [i for i in indices if params[i].numel() == 0]
    for i in indices:
        w = params[i]
        grad, exp_avg, r, c, step_t = grads[i], exp_avgs[i], out_stats[i], in_stats[i], state_steps[i]
        re, ce = emb_out_stats[i], emb_in_stats[i]
        step_t += 1
        t = step_t.item()
        if not momentum_ready[i]:
            exp_avg.mul_(beta1)
        if grad is not None:
            exp_avg.add_(grad.to(exp_avg.dtype), alpha=1.0 - beta1)
        k = slots[i]
        for stats, sums in ((r, out_sums[i]), (c, in_sums[i]), (re, emb_out_sums[i]), (ce, emb_in_sums[i])):
            _commit(stats, sums, k, beta2)
        if re is None:
            denom = _denominator(r, c, p, buffer_mode, transposed[i]).add_(eps)
        else:
            denom = _tied_denominator(r, c, re, ce, p, buffer_mode).add_(eps)
        step_size = lr * (1.0 - beta2**t) / (1.0 - beta1**t)
        w_work = w if w.dtype == exp_avg.dtype else w.to(exp_avg.dtype)
        w_work.mul_(1.0 - lr * weight_decay).addcdiv_(exp_avg, denom, value=-step_size)
        if w_work is not w:
            w.copy_(w_work)
        for stats in (r, c, re, ce):
            if stats is not None:
                stats.mul_(beta2)


# --------------------------------------------------------------------------- the fast path (fused=True)


def _io_adam_kernel(
    param: Tensor, grad: Tensor, exp_avg: Tensor, d: Tensor, *, m_decay: Any, one_minus_beta1: Any, decay: Any,
    step_size: Any, eps: Any, root: bool,
) -> None:  # fmt: skip
    """IO-Adam's update of one weight given ``d`` = the sum over slots (before the root of
    ``buffer_mode="paper"``), in place: ``M = m_decay M + (1-b1) g``, ``W = W decay - step_size M /
    (D + eps)`` (the maths of ``lowmem_ioadam_f32``). ``grad`` is ``d`` itself when there is none
    (``one_minus_beta1`` is then 0)."""
    dtype = exp_avg.dtype
    m = exp_avg * m_decay + one_minus_beta1 * grad.to(dtype)
    exp_avg.copy_(m)
    den = (d.sqrt() if root else d) + eps
    param.copy_(param.to(dtype) * decay - step_size * (m / den))


_IO_ADAM_FAST = FusedForeach(_io_adam_kernel, name="ioadam")


def _io_factors(r: Tensor, c: Tensor, p: float, buffer_mode: str, transposed: bool) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with ``D = sum_k a[:, k] (x) b[:, k]`` before the root (rows of a: W's dim 0)."""
    q = p / (p - 1.0)
    if buffer_mode == "paper":
        a, b = (r, c) if p == 2.0 else (r.pow(2.0 / q), c.pow(2.0 / p))
    else:
        a, b = r.pow(1.0 / q), c.pow(1.0 / p)
    return (b, a) if transposed else (a, b)


def _io_adam_fast(
    params: list[Tensor], grads: list[Tensor | None], exp_avgs: list[Tensor], out_stats: list[Tensor],
    in_stats: list[Tensor], out_sums: list[Tensor | None], in_sums: list[Tensor | None], state_steps: list[Tensor],
    slots: list[int], momentum_ready: list[bool], transposed: list[bool], emb_out_stats: list[Tensor | None],
    emb_in_stats: list[Tensor | None], emb_out_sums: list[Tensor | None], emb_in_sums: list[Tensor | None], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, p: float, buffer_mode: str,
) -> None:  # fmt: skip
    """:func:`io_adam`'s step in one pass per weight (see ``lowmem_ioadam_f32``): the statistics
    commit and decay and the step counts as a few small ops for all weights; float32 contiguous
    CPU weights, tied or not, in one native call that never stores ``D`` (a weight tied to an
    embedding passes the embedding use's factors as a second pair: ``D = D_head + D_emb``, each
    use's root taken apart); the others (other dtypes, devices, layouts) one at a time, ``D`` from
    GEMMs (the n x m temporary) and the update compiled."""
    if not params:
        return
    steps = {}
    for t, positions in step_groups(state_steps).items():
        for i in positions:
            steps[i] = t
    for i in range(len(params)):
        for stats, sums in ((out_stats[i], out_sums[i]), (in_stats[i], in_sums[i]),
                            (emb_out_stats[i], emb_out_sums[i]), (emb_in_stats[i], emb_in_sums[i])):  # fmt: skip
            _commit(stats, sums, slots[i], beta2)
    decay = 1.0 - lr * weight_decay
    root = buffer_mode == "paper"
    step_sizes = [lr * (1.0 - beta2 ** steps[i]) / (1.0 - beta1 ** steps[i]) for i in range(len(params))]
    m_decays = [1.0 if momentum_ready[i] else beta1 for i in range(len(params))]
    factors = [_io_factors(out_stats[i], in_stats[i], p, buffer_mode, transposed[i]) for i in range(len(params))]
    emb_factors = [None if emb_out_stats[i] is None else _io_factors(emb_out_stats[i], emb_in_stats[i], p, buffer_mode,
                                                                     False) for i in range(len(params))]  # fmt: skip
    grads = [None if g is None else g.to(exp_avgs[i].dtype) for i, g in enumerate(grads)]
    native = [i for i in range(len(params)) if _native.native_ok(params[i], exp_avgs[i], *factors[i])
              and (emb_factors[i] is None or _native.native_ok(*emb_factors[i]))
              and (grads[i] is None or _native.native_ok(grads[i]))]  # fmt: skip
    lib = _dispatch.native_library() if native else None
    if lib is None:
        native = []
    else:
        bts = [factors[i][1].t().contiguous() for i in native]  # b x cols: each slot's column factors in a row
        pairs2 = [(None, None) if emb_factors[i] is None else (emb_factors[i][0], emb_factors[i][1].t().contiguous())
                  for i in native]  # fmt: skip
        status = lib.lowmem_ioadam_f32(
            len(native), _native.int64_array(params[i].shape[0] for i in native),
            _native.int64_array(params[i].shape[1] for i in native),
            _native.int64_array(factors[i][0].shape[1] for i in native),
            _native.int64_array(0 if a2 is None else a2.shape[1] for a2, _ in pairs2),
            _native.pointer_array(params[i] for i in native), _native.pointer_array(grads[i] for i in native),
            _native.pointer_array(exp_avgs[i] for i in native), _native.pointer_array(factors[i][0] for i in native),
            _native.pointer_array(bts), _native.pointer_array(a2 for a2, _ in pairs2),
            _native.pointer_array(bt2 for _, bt2 in pairs2), _native.float_array(m_decays[i] for i in native),
            _native.float_array(step_sizes[i] for i in native), _native.int32_array([int(root)] * len(native)),
            decay, 1.0 - beta1, eps, torch.get_num_threads(),
        )  # fmt: skip
        _native.check_status(status, "IOAdam")
        increment_version([params[i] for i in native] + [exp_avgs[i] for i in native])
    done = set(native)
    for i in range(len(params)):
        if i in done:
            continue
        if emb_out_stats[i] is None:
            a, b = factors[i]
            d, take_root = a @ b.t(), root
        else:  # D itself: the root of each use's sum (paper), or the sum of both sums of roots
            d, take_root = _tied_denominator(out_stats[i], in_stats[i], emb_out_stats[i], emb_in_stats[i], p,
                                             buffer_mode), False  # fmt: skip
        grad = d if grads[i] is None else grads[i]
        scalars = dict(m_decay=m_decays[i], one_minus_beta1=0.0 if grads[i] is None else 1.0 - beta1, decay=decay,
                       step_size=step_sizes[i], eps=eps)  # fmt: skip
        _IO_ADAM_FAST([[params[i]], [grad], [exp_avgs[i]], [d]], scalars, {"root": take_root})
    tied_stats = [t for t in emb_out_stats + emb_in_stats if t is not None]
    torch._foreach_mul_(out_stats + in_stats + tied_stats, beta2)
