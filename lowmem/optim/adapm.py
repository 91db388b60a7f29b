"""AdaPM: partial momentum per block, low-rank momentum with residual correction (docs/algorithms.md §4).

Paper: Zhang, Liu, Fang, "AdaPM: a Partial Momentum Algorithm for LLM Training" (arXiv
2510.09103). No public code; the decisions the paper leaves open are listed in :class:`AdaPM`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import increment_version

from lowmem.optim import _dispatch, _native
from lowmem.optim._base import Capabilities, LowMemOptimizer, check_grad, check_hparams, state_dtype_for, step_groups
from lowmem.optim._dispatch import check_fused, use_fast_path
from lowmem.optim._fast import FusedForeach
from lowmem.optim._sharded_blocks import block_comm_bytes, block_v_state, sharded_block_mean_sq, sharded_expand
from lowmem.optim._sharding import check_fsdp_layout, gather_rows, is_sharded, local_rows, state_like
from lowmem.optim.blocks import (
    BLOCK_DEFAULTS, block_keys, block_mean_sq, block_means_of_rows, check_block, expand_blocks, group_params,
    head_config, qkv_split,
)  # fmt: skip
from lowmem.optim.roles import ParamRole, Role, classify_parameters

__all__ = ["AdaPM", "adapm", "adapm_param_groups", "lowrank_rank"]

MOMENTUM_KINDS = ("none", "lowrank", "full", "adamw", "qkv")
SECOND_MOMENTS = ("full", "mini")
OVERSAMPLE = 10  # extra columns of the randomized range finder
POWER_ITERS = 2  # subspace (power) iterations of the randomized SVD

# AdaPM's partition (paper §4.1); every other role gets "adamw".
_MOMENTUM_BY_ROLE = {
    Role.EMBEDDING: "none", Role.ATTN_OUT: "none",
    Role.QUERY: "lowrank", Role.KEY: "lowrank",
    Role.MLP_UP: "lowrank", Role.MLP_GATE: "lowrank", Role.MLP_DOWN: "lowrank",
    Role.VALUE: "full", Role.QKV: "qkv",
}  # fmt: skip


class AdaPM(LowMemOptimizer):
    r"""AdaPM / AdaPM-mini: a different momentum per block (docs/algorithms.md §4).

    Param-group key ``momentum`` picks the block type; :func:`adapm_param_groups` sets it by role.
    With ``u = clamp(m / (sqrt(v) + eps), -clip, clip)`` and ``v = b2 v + (1-b2) g^2`` (no bias
    correction, as the paper), every block except ``"adamw"`` steps ``W = W - lr (u + wd W)``, with:

    - ``"none"`` (token embedding, attention output): ``m = g``.
    - ``"full"`` (value): ``m = b1 m + (1-b1) g``.
    - ``"lowrank"`` (query, key, MLP; W is n x m, rank ``r = ceil(rank_fraction * min(n, m))``)::

          M   = (1-b1) g + b1 L R            # temporary; L (n x r), R (r x m) are fp32 state
          L,R = refine(M)                    # see below
          m   = L R + (M - L R) / (1-b1)     # residual-corrected momentum (paper Eq. 3-4; its
                                             # Algorithm 1 line 8, M - (M - L R)/(1-b1), has the sign wrong)

    - ``"qkv"`` (fused query/key/value, nanoGPT ``c_attn``): cut along the fan-out dim (group key
      ``qkv_heads``, thirds by default): ``"lowrank"`` for the q and k parts, ``"full"`` for v.
    - ``"adamw"`` (norms, biases, position embedding, LM head, conv, anything else): exactly
      ``torch.optim.AdamW``: ``W = W (1 - lr wd) - lr (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)``,
      no clip. docs/algorithms.md §4 says "full AdamW" for these and defines "AdamW" with bias
      correction; the paper's "no bias correction" is about its partial-momentum blocks.

    A plain parameter list (no roles) gets ``momentum="full"`` everywhere; build the groups with
    :func:`adapm_param_groups` to get AdaPM's partition.

    State per parameter: ``step``; ``exp_avg_sq`` (v: param-sized, or one value per Adam-mini block);
    ``exp_avg`` ("full", "adamw"); ``factor_L``/``factor_R`` ("lowrank"); ``factor_L_q``,
    ``factor_R_q``, ``factor_L_k``, ``factor_R_k``, ``exp_avg_v`` ("qkv"). On GPT-2 small (124M,
    tied head) that is 55% of AdamW's state bytes for AdaPM, 5.3% for AdaPM-mini.

    ``second_moment="mini"`` (AdaPM-mini) replaces every ``v`` (all blocks, ``"adamw"`` included)
    by Adam-mini's block means (:mod:`lowmem.optim.blocks`, group keys from
    :func:`adapm_param_groups` with ``n_heads``/``dim``).

    Factor refinement (deterministic, so DDP replicas stay identical without communication):
    at the parameter's steps t = 1, 1 + T, 1 + 2T, ... (T = ``refresh_every``) L R is the rank-r
    truncation of M by a randomized SVD (``OVERSAMPLE`` extra columns, ``POWER_ITERS`` power
    iterations, Gaussian test matrix drawn on the CPU from a private generator seeded with the
    step t: the global RNG is never touched, and the factors depend neither on the parameter's
    position in the optimizer nor on how the parameters are grouped). Zero
    factors are a saddle of the factorisation, so they are never the starting point. At every
    other step, one sweep of alternating least squares warm-started from R, in its QR form:
    ``L = orth(M orth(R^T))``, ``R = L^T M`` (the same product L R as the normal equations
    ``L = M R^T (R R^T)^-1``, ``R = (L^T L)^-1 L^T M``, without squaring the condition number).
    L has orthonormal columns after every step.

    FSDP2 (parameters sharded along dim 0, ``fully_shard``): every rank steps its rows with the
    maths of one process. Element-wise parts (``v``, full momentum) are local; AdaPM-mini's block
    means communicate as Adam-mini's do. A low-rank block keeps ``L`` sharded by rows like the
    weight and ``R`` whole on every rank; the factor updates need two kinds of collective:
    the orthonormal bases ``orth(Y)`` of tall products ``Y = M X`` (n x k, k = r + 10 at most) are
    taken of the all-gathered ``Y`` (every rank computes the same QR, then keeps its rows), and the
    products ``M^T Q``, ``Q^T M`` (m x k) sum their per-rank parts (all-reduce). A fused q/k/v cut
    along dim 0, the sharded dim, has segments whose rows straddle the shards: its gradient is
    all-gathered (the parameter's size) and its momentum state kept whole on every rank, so the
    step is the one-process step on the whole tensor. ``comm_bytes_per_step`` counts all of it.

    Args:
        params: parameters or param groups, best from :func:`adapm_param_groups`.
        lr: learning rate.
        betas: ``(b1, b2)``.
        eps: added to ``sqrt(v)``.
        weight_decay: decoupled weight decay coefficient (per unit of lr).
        rank_fraction: low-rank blocks keep rank ``ceil(rank_fraction * min(n, m))``; in (0, 1];
            read when the factors are created (first step of each parameter).
        refresh_every: re-initialise the factors from a randomized SVD every this many steps.
        clip: elementwise clamp of the normalised update to ``[-clip, clip]``; ``None`` disables.
        second_moment: ``"full"`` (AdaPM) or ``"mini"`` (AdaPM-mini).
        state_in_param_dtype: keep ``m``/``v`` in the param dtype for bf16/fp16 params (the
            factors stay fp32: an ALS solve in bf16 is unstable).
        fused: ``True`` runs the fast path (:func:`_adapm_fast`): the element-wise part of every
            block (v, momentum, clip, update, decay) as one kernel, hand-written C for float32
            contiguous CPU tensors, else ``torch.compile``'d, else foreach ops (the backends of
            :mod:`lowmem.optim._dispatch`; AdaPM-mini's broadcast block denominators: foreach);
            the ALS sweep without the n x m temporary ``M`` (three GEMMs over ``g``, QRs
            single-threaded on the CPU); ``False`` the plain for-loop (the reference); ``None``
            (default) the fast path when the optimizer holds at least 2**20 elements. FSDP2
            shards, empty tensors and a ``torch.compile``'d step take the for-loop either way.
    """

    capabilities = Capabilities(needs_full_shapes=True, needs_param_names=True, supports_dtensor=True)
    comm_bytes_per_step = 0  # bytes the last step sent between FSDP2 ranks (set by step)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        rank_fraction: float = 0.05,
        refresh_every: int = 100,
        clip: float | None = 1.0,
        second_moment: str = "full",
        *,
        state_in_param_dtype: bool = False,
        fused: bool | None = None,
    ) -> None:
        check_hparams("AdaPM", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        _check_options(rank_fraction, refresh_every, clip, second_moment)
        check_fused("AdaPM", fused)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank_fraction=rank_fraction,
            refresh_every=refresh_every, clip=clip, second_moment=second_moment, momentum="full",
            state_in_param_dtype=state_in_param_dtype, fused=fused, **BLOCK_DEFAULTS,
        )  # fmt: skip
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_options(group["rank_fraction"], group["refresh_every"], group["clip"], group["second_moment"])
        kind = group["momentum"]
        if kind not in MOMENTUM_KINDS:
            raise ValueError(f"AdaPM: invalid momentum={kind!r} in a param group; expected one of {MOMENTUM_KINDS}")
        for p in group["params"]:
            if kind in ("lowrank", "qkv") and p.ndim != 2:
                raise ValueError(
                    f"AdaPM: momentum={kind!r} needs a matrix, got a parameter of shape {tuple(p.shape)}; "
                    "put it in a group with momentum='full' or 'none'"
                )
            if kind == "qkv":
                qkv_split(p.shape[group["fan_out_dim"]], tuple(group["qkv_heads"]))
            if group["second_moment"] == "mini":
                check_block(p, group, "AdaPM-mini")

    def fsdp2_state_sharded(self, p: torch.Tensor, key: str) -> bool | None:
        """How FSDP2 places ``key`` of ``p`` (for :func:`~lowmem.optim.sharded_state_bytes`): ``R``
        factors and the momentum of a q/k/v cut along dim 0 whole on every rank, the rest by rows."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        momentum_part = key.startswith("factor_") or key == "exp_avg_v"
        if key.startswith("factor_R") or (momentum_part and group["momentum"] == "qkv" and group["fan_out_dim"] % p.ndim == 0):
            return False
        return None

    def _init_group(self, group: dict, params: list, grads: list, states: list) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad("AdaPM", p)
            state = self.state[p]
            if not state:
                _init_state(state, p, group)
            params.append(p)
            grads.append(p.grad)
            states.append(state)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (if a closure is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sent = 0
        total_numel = sum(p.numel() for g in self.param_groups for p in g["params"])
        for group in self.param_groups:
            params, grads, states = [], [], []
            self._init_group(group, params, grads, states)
            beta1, beta2 = group["betas"]
            sent += adapm(
                params, grads, states,
                momentum=group["momentum"], second_moment=group["second_moment"], lr=group["lr"],
                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                clip=group["clip"], refresh_every=group["refresh_every"],
                blocks={k: group[k] for k in BLOCK_DEFAULTS}, fused=use_fast_path(group["fused"], total_numel),
            )  # fmt: skip
        self.comm_bytes_per_step = sent
        return loss


def _check_options(rank_fraction: Any, refresh_every: Any, clip: Any, second_moment: Any) -> None:
    check_hparams("AdaPM", lr=0.0, rank_fraction=rank_fraction, refresh_every=refresh_every)
    if float(rank_fraction) > 1.0:
        raise ValueError(f"AdaPM: invalid rank_fraction={rank_fraction!r}; it must be in (0, 1]")
    if not isinstance(refresh_every, int):
        raise ValueError(f"AdaPM: invalid refresh_every={refresh_every!r}; it must be an int >= 1 (steps)")
    if clip is not None:
        check_hparams("AdaPM", lr=0.0, clip=clip)
    if second_moment not in SECOND_MOMENTS:
        raise ValueError(f"AdaPM: invalid second_moment={second_moment!r}; expected one of {SECOND_MOMENTS}")


def lowrank_rank(n: int, m: int, rank_fraction: float) -> int:
    """``r = ceil(rank_fraction * min(n, m))``, at least 1 unless the matrix is empty (the product
    is rounded to 9 decimals first, so that 0.07 * 100 = 7.000000000000001 gives 7, not 8)."""
    return min(min(n, m), max(1, math.ceil(round(rank_fraction * min(n, m), 9))))


def _segments(shape: torch.Size, group: Mapping[str, Any]) -> list[tuple[str, str, tuple[int, int] | None]]:
    """Momentum parts of a parameter: ``(state-key suffix, "full"|"lowrank", (start, length) along
    the fan-out dim or None for the whole tensor)``."""
    kind = group["momentum"]
    if kind == "none":
        return []
    if kind in ("full", "adamw"):
        return [("", "full", None)]
    if kind == "lowrank":
        return [("", "lowrank", None)]
    q, k, v = qkv_split(shape[group["fan_out_dim"]], tuple(group["qkv_heads"]))
    return [("_q", "lowrank", (0, q)), ("_k", "lowrank", (q, k)), ("_v", "full", (q + k, v))]


def _part(t: torch.Tensor, dim: int, span: tuple[int, int] | None) -> torch.Tensor:
    return t if span is None else t.narrow(dim, *span)


def _init_state(state: dict, p: torch.Tensor, group: dict) -> None:
    dtype = state_dtype_for(p, group["state_in_param_dtype"])
    factor_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    sharded = is_sharded(p)
    if sharded:
        check_fsdp_layout(p, "AdaPM")

    def zeros(shape: tuple[int, ...], dtype: torch.dtype, rows_like_p: bool) -> torch.Tensor:
        """A zero state tensor; under FSDP2 sharded by rows like ``p``, else whole on every rank
        (R; the parts of a q/k/v cut along dim 0, see :func:`_whole_on_every_rank`)."""
        if not sharded:
            return torch.zeros(shape, dtype=dtype, device=p.device)
        return state_like(p, shape, dtype, sharded_rows=rows_like_p)

    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    if group["second_moment"] == "mini":
        state["exp_avg_sq"] = block_v_state(p, group, dtype)
    else:
        state["exp_avg_sq"] = zeros(tuple(p.shape), dtype, rows_like_p=True)
    dim = group["fan_out_dim"]
    for suffix, kind, span in _segments(p.shape, group):
        shape = list(p.shape)
        if span is not None:
            shape[dim] = span[1]
        if kind == "full":
            state["exp_avg" + suffix] = zeros(tuple(shape), dtype, rows_like_p=span is None or dim != 0)
        else:
            n, m = shape
            r = lowrank_rank(n, m, group["rank_fraction"])
            # Zeros are placeholders: the first step re-initialises the factors from an SVD of M.
            state["factor_L" + suffix] = zeros((n, r), factor_dtype, rows_like_p=span is None or dim != 0)
            state["factor_R" + suffix] = zeros((r, m), factor_dtype, rows_like_p=False)


def _whole_on_every_rank(p: torch.Tensor, group: Mapping[str, Any]) -> bool:
    """Whether FSDP2 parameter ``p`` is a fused q/k/v cut along dim 0, the sharded dim: its
    momentum state is kept whole on every rank and stepped from the all-gathered gradient."""
    return is_sharded(p) and group["momentum"] == "qkv" and group["fan_out_dim"] % p.ndim == 0


class _Rows:
    """The rows of a block of M (n x m) that this rank holds, and the collectives over them.

    One process: all rows; ``orth`` is a QR and ``total`` the identity. FSDP2 (``shard`` the
    parameter, whose dim-0 shards are the block's rows): ``orth`` QR-factors the all-gathered
    tall matrix (every rank the same QR) and returns this rank's rows of Q; ``total`` sums the
    per-rank parts of a product over the rows. ``sent`` counts the bytes.
    """

    def __init__(self, shard: torch.Tensor | None = None) -> None:
        self.shard, self.sent = shard, 0

    def n(self, M: torch.Tensor) -> int:
        return M.shape[0] if self.shard is None else self.shard.shape[0]

    def orth(self, Y: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return torch.linalg.qr(Y).Q
        full = gather_rows(Y, self.shard)
        self.sent += full.numel() * full.element_size()
        start, count = local_rows(self.shard)
        return torch.linalg.qr(full).Q[start : start + count]

    def total(self, t: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return t
        torch.distributed.all_reduce(t, group=self.shard.device_mesh.get_group())
        self.sent += t.numel() * t.element_size()
        return t


def _truncated_svd(M: torch.Tensor, r: int, seed: int, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of M (this rank's ``rows``) by a randomized SVD: ``L`` (n x r, orthonormal), ``R = L^T M``."""
    m = M.shape[1]
    k = min(r + OVERSAMPLE, rows.n(M), m)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(m, k, generator=generator, dtype=torch.float32).to(device=M.device, dtype=M.dtype)
    Q = rows.orth(M @ omega)
    for _ in range(POWER_ITERS):  # re-orthonormalise between the products: fp32 loses the small directions
        Q = rows.orth(M @ torch.linalg.qr(rows.total(M.T @ Q)).Q)
    U, S, Vh = torch.linalg.svd(rows.total(Q.T @ M), full_matrices=False)
    return Q @ U[:, :r], S[:r, None] * Vh[:r]


def _als_sweep(M: torch.Tensor, R: torch.Tensor, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """One alternating-least-squares sweep (L step, then R step) warm-started from R, in QR form."""
    L = rows.orth(M @ torch.linalg.qr(R.T).Q)
    return L, rows.total(L.T @ M)


def _lowrank_momentum(
    g: torch.Tensor, L: torch.Tensor, R: torch.Tensor, beta1: float, refresh: bool, seed: int, rows: _Rows
) -> torch.Tensor:
    """Update the factors in place; return the corrected momentum ``L R + (M - L R)/(1-b1)``."""
    M = torch.addmm(g.to(L.dtype), L, R, beta=1 - beta1, alpha=beta1)  # (1-b1) g + b1 L R
    if rows.n(M) * M.shape[1] == 0:
        return M
    new_L, new_R = _truncated_svd(M, L.shape[1], seed, rows) if refresh else _als_sweep(M, R, rows)
    L.copy_(new_L)
    R.copy_(new_R)
    return torch.addmm(M, L, R, alpha=-beta1).div_(1 - beta1)  # = L R + (M - L R)/(1-b1)


def _momentum(g: torch.Tensor, state: dict, group: Mapping[str, Any], step: int, rows: _Rows) -> torch.Tensor:
    """The block's momentum estimate m (a fresh tensor or the exp_avg state; never g itself modified).
    ``g`` and ``state`` are this rank's rows under FSDP2 (``rows``)."""
    segments = _segments(g.shape, group)
    if not segments:
        return g
    if segments[0][2] is None and segments[0][1] == "full":
        return state["exp_avg"].lerp_(g, 1 - group["beta1"])
    refresh = (step - 1) % group["refresh_every"] == 0
    out = torch.empty_like(g, dtype=torch.promote_types(g.dtype, state["factor_L" + segments[0][0]].dtype))
    dim = group["fan_out_dim"]
    for suffix, kind, span in segments:
        g_part = _part(g, dim, span)
        if kind == "full":
            value = state["exp_avg" + suffix].lerp_(g_part, 1 - group["beta1"])
        else:
            L, R = state["factor_L" + suffix], state["factor_R" + suffix]
            value = _lowrank_momentum(g_part, L, R, group["beta1"], refresh, seed=step, rows=rows)
        _part(out, dim, span).copy_(value)
    return out


def adapm(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    *,
    momentum: str,
    second_moment: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip: float | None,
    refresh_every: int,
    blocks: Mapping[str, Any],
    fused: bool = False,
) -> int:
    """Functional AdaPM step over one param group (see :class:`AdaPM`); ``states`` are the
    per-parameter state dicts. Returns the bytes sent between FSDP2 ranks (0 for plain tensors).
    ``fused=True`` steps the plain, non-empty tensors by :func:`_adapm_fast`, the rest as below."""
    group = dict(blocks, momentum=momentum, beta1=beta1, refresh_every=refresh_every)
    mini = second_moment == "mini"
    sent = 0
    if fused:
        params, grads, states = _adapm_fast(
            params, grads, states, group=group, second_moment=second_moment, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=weight_decay, clip=clip,
        )  # fmt: skip
    for param, grad, state in zip(params, grads, states):
        state["step"] += 1
        step = int(state["step"].item())
        shard = param if is_sharded(param) else None
        if shard is not None:  # FSDP2: the local rows of everything (whole-tensor state stays whole)
            param, grad = param.to_local(), grad.to_local()
            state = {k: v.to_local() if is_sharded(v) else v for k, v in state.items()}
        exp_avg_sq = state["exp_avg_sq"]
        g = grad.to(exp_avg_sq.dtype)
        if mini and shard is not None:
            exp_avg_sq.mul_(beta2).add_(sharded_block_mean_sq(g, blocks, shard), alpha=1 - beta2)
            v = sharded_expand(exp_avg_sq, blocks, shard)
            sent += block_comm_bytes(shard, blocks, exp_avg_sq)
        elif mini:
            exp_avg_sq.mul_(beta2).add_(block_mean_sq(g, blocks), alpha=1 - beta2)
            v = expand_blocks(exp_avg_sq, param.shape, blocks)
        else:
            v = exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if shard is not None and _whole_on_every_rank(shard, group):
            g_full = gather_rows(g, shard)  # the one-process step on the whole tensor, then our rows
            start, count = local_rows(shard)
            m = _momentum(g_full, state, group, step, _Rows())[start : start + count]
            sent += g_full.numel() * g_full.element_size()
        else:
            rows = _Rows(shard if momentum in ("lowrank", "qkv") else None)
            m = _momentum(g, state, group, step, rows)
            sent += rows.sent
        if momentum == "adamw":  # torch.optim.AdamW, bias-corrected, no clip
            denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            update = m / denom
            update_scale = lr / (1 - beta1**step)
        else:
            update = m / (v.sqrt() + eps)
            if clip is not None:
                update.clamp_(-clip, clip)
            update_scale = lr
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(update.to(param.dtype), alpha=-update_scale)
    return sent


# --------------------------------------------------------------------------- the fast path (fused=True)


@contextlib.contextmanager
def _single_thread(t: torch.Tensor) -> Iterator[None]:
    """Run the small matrix work of a low-rank block (QRs of n x r and r x m factors, r x r
    products, the factors' copies) in one thread on the CPU; only the three GEMMs over ``g`` use
    them all. Small ops are latency-bound, and every multi-threaded one waits at a barrier for all
    threads: with another process on one of the 2 cores this was measured on, a multi-threaded
    LAPACK QR (MKL ``orgqr``, many barriers) of a 3072 x 39 matrix took 20-300x its one-thread
    time, a ``cat`` of two such factors milliseconds. One thread also makes the factors
    independent of the thread count."""
    threads = torch.get_num_threads()
    if t.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fast_lowrank(
    g: torch.Tensor, L: torch.Tensor, R: torch.Tensor, beta1: float, refresh: bool, seed: int,
    out: torch.Tensor | None = None,
) -> tuple[int, torch.Tensor]:
    """The low-rank block of :func:`_lowrank_momentum` (one process) without the n x m temporary
    ``M = (1-b1) g + b1 L R``; updates ``L``, ``R`` in place and returns ``(mode, t)``: mode 2,
    ``t = (b1/(1-b1)) (L R - L' R')`` (the momentum is ``g + t``), or, at a refresh, mode 3 and
    ``t`` the momentum itself (the randomized SVD of the materialised ``M``: once in
    ``refresh_every`` steps). With ``Q = orth(R^T)`` and the new factors ``L' = orth(M Q)``,
    ``R' = L'^T M``::

        M Q   = (1-b1) g Q + b1 L (R Q)            one GEMM over g (n x m x r)
        R'    = (1-b1) L'^T g + b1 (L'^T L) R      one GEMM over g
        m_c   = L' R' + (M - L' R')/(1-b1) = g + (b1/(1-b1)) [L, L'] [R; -R']   one GEMM (inner 2r)

    8 n m r multiply-adds in all, as the for-loop, but no pass that forms ``M`` or ``m_c``. ``out``
    (n x m, optional) receives the correction: a scratch buffer reused from block to block (a fresh
    n x m tensor per block costs its page faults).
    """
    g = g.to(L.dtype)
    if refresh:
        with _single_thread(g):
            return 3, _lowrank_momentum(g, L, R, beta1, True, seed, _Rows())
    with _single_thread(g):
        q_r = torch.linalg.qr(R.T).Q  # m x r
        y = L @ (R @ q_r)
    y = torch.addmm(y, g, q_r, beta=beta1, alpha=1 - beta1)  # M Q, n x r
    with _single_thread(g):
        new_L = torch.linalg.qr(y).Q
        new_R = (new_L.T @ L) @ R
    new_R = torch.addmm(new_R, new_L.T, g, beta=beta1, alpha=1 - beta1)  # L'^T M
    c = beta1 / (1 - beta1)
    with _single_thread(g):
        left, right = torch.cat([L, new_L], 1), torch.cat([R * c, new_R * -c], 0)
        L.copy_(new_L)
        R.copy_(new_R)
    if out is None:
        return 2, left @ right
    return 2, torch.mm(left, right, out=out)


def _adapm_kernel(
    param: torch.Tensor, grad: torch.Tensor, mom: torch.Tensor, v: torch.Tensor, *, decay: Any, step_size: Any,
    one_minus_beta1: Any, beta2: Any, one_minus_beta2: Any, bias_correction2_sqrt: Any, eps: Any, clip: Any,
    mom_g: Any, mom_d: Any, lerp: bool, full_v: bool,
) -> None:  # fmt: skip
    """AdaPM's element-wise step on one tensor (the maths of ``lowmem_adapm_f32``), in place.

    Momentum: ``lerp``: ``mom = mom + (1-b1)(g - mom)`` (stored; full and AdamW blocks), else
    ``mom_g g + mom_d mom`` (1, 0: no momentum; 1, 1: low-rank correction; 0, 1: a momentum
    computed elsewhere). ``full_v``: ``v = b2 v + (1-b2) g^2`` (stored), denominator
    ``sqrt(v)/bias_correction2_sqrt + eps``; else ``v`` is the denominator (broadcasts). Then
    ``W = W decay - step_size clamp(mom / den, -clip, clip)``.
    """
    dtype = v.dtype
    g = grad.to(dtype)
    if full_v:
        v_new = v * beta2 + one_minus_beta2 * (g * g)
        v.copy_(v_new)
        den = v_new.sqrt() / bias_correction2_sqrt + eps
    else:
        den = v
    if lerp:
        m = mom + one_minus_beta1 * (g - mom)
        mom.copy_(m)
    else:
        m = mom_g * g + mom_d * mom
    update = torch.clamp(m / den, -clip, clip)
    param.copy_(param.to(dtype) * decay - step_size * update)


_ADAPM_FAST = FusedForeach(_adapm_kernel, name="adapm")
# native mode -> (lerp, mom_g, mom_d) of the torch kernel
_TORCH_MODES = {0: (False, 1.0, 0.0), 1: (True, 0.0, 0.0), 2: (False, 1.0, 1.0), 3: (False, 0.0, 1.0)}


class _Pieces:
    """Tensors waiting for the element-wise kernel, all with the same scalars: each piece is
    ``(w, g, mom, v, mode, full_v, div, len)`` (see ``lowmem_adapm_f32``); float32 contiguous CPU
    pieces run in one native call, the others through :data:`_ADAPM_FAST` (compiled, or foreach
    ops where a compile cannot run or a denominator broadcasts)."""

    def __init__(self, scalars: dict[str, float]) -> None:
        self.scalars, self.items = scalars, []

    def add(self, w, g, mom, v, mode: int, full_v: bool, div: int = 1, length: int = 1) -> None:  # noqa: ANN001
        self.items.append((w, g, g if mode == 0 else mom, v, mode, full_v, div, length))

    def flush(self) -> None:
        items, self.items = self.items, []
        if not items:
            return
        native = [it for it in items if _native.native_ok(*it[:4])]
        lib = _dispatch.native_library() if native else None
        if lib is None:
            native = []
        else:
            s = self.scalars
            status = lib.lowmem_adapm_f32(
                len(native), _native.int64_array(it[0].numel() for it in native),
                *(_native.pointer_array(it[k] for it in native) for k in range(4)),
                _native.int32_array(it[4] for it in native), _native.int32_array(int(it[5]) for it in native),
                _native.int64_array(it[6] for it in native), _native.int64_array(it[7] for it in native),
                s["decay"], s["one_minus_beta1"], s["beta2"], s["one_minus_beta2"], s["step_size"],
                s["bias_correction2_sqrt"], s["eps"], s["clip"], torch.get_num_threads(),
            )  # fmt: skip
            _native.check_status(status, "AdaPM")
            written = [it[0] for it in native] + [it[2] for it in native if it[4] == 1]
            increment_version(written + [it[3] for it in native if it[5]])
        done = {id(it) for it in native}
        by_mode: dict[tuple[int, bool], list] = {}  # the rest: compiled where shapes match, else foreach
        for it in items:
            if id(it) not in done:
                by_mode.setdefault((it[4], it[5]), []).append(it[:4])
        for (mode, full_v), tensors in by_mode.items():
            lerp, mom_g, mom_d = _TORCH_MODES[mode]
            _ADAPM_FAST([list(col) for col in zip(*tensors)], {**self.scalars, "mom_g": mom_g, "mom_d": mom_d},
                        {"lerp": lerp, "full_v": full_v})  # fmt: skip


def _fan_out_layout(shape: torch.Size, fan_out_dim: int) -> tuple[int, int, int]:
    """``(outer, n, inner)``: the tensor as (outer, n, inner) row-major with n the fan-out dim."""
    d = fan_out_dim % len(shape)
    return math.prod(shape[:d]), shape[d], math.prod(shape[d + 1 :])


def _mini_mean_sq(g: torch.Tensor, blocks: Mapping[str, Any]) -> torch.Tensor:
    """:func:`~lowmem.optim.blocks.block_mean_sq` (kinds row, head, qkv, tensor): the native
    reduction for float32 contiguous CPU tensors (one pass, no g-sized temporary), else that one."""
    kind = blocks["block"]
    lib = _dispatch.native_library() if _native.native_ok(g) else None
    if lib is None:
        return block_mean_sq(g, blocks)
    outer, n, inner = (1, 1, g.numel()) if kind == "tensor" else _fan_out_layout(g.shape, blocks["fan_out_dim"])
    out = torch.empty(n, dtype=g.dtype)
    _native.check_status(lib.lowmem_fanout_mean_sq_f32(outer, n, inner, g.data_ptr(), out.data_ptr(),
                                                       torch.get_num_threads()), "AdaPM")  # fmt: skip
    if kind == "tensor":
        return out.view(())
    if kind == "row":
        shape = [1] * g.ndim
        shape[blocks["fan_out_dim"] % g.ndim] = n
        return out.view(shape)
    return block_means_of_rows(out, g.shape, blocks)


def _adapm_fast(
    params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], *, group: Mapping[str, Any],
    second_moment: str, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, clip: float | None,
) -> tuple[list, list, list]:  # fmt: skip
    """The fast AdaPM step (``fused=True``) of the plain, non-empty tensors of one group; returns
    the lists of the others (FSDP2 shards, empty tensors) for the for-loop.

    The same maths as the loop, in fewer passes: the element-wise part of a tensor (v, the
    momentum of "full"/"adamw" blocks, the update, the clip, the decay) is one kernel
    (``lowmem_adapm_f32``, or :func:`_adapm_kernel` compiled or eager); a low-rank block is three
    GEMMs over ``g`` (:func:`_fast_lowrank`) and one n x m temporary, the correction ``t`` that the
    kernel adds to ``g``; AdaPM-mini's block means are one native reduction. One step count read
    per distinct step (``step_groups``), not one ``.item()`` per parameter. Memory: each low-rank
    block's correction lives in one scratch buffer (the group's largest low-rank parameter) reused
    from block to block, freed with the step.
    """
    kind, mini, adamw = group["momentum"], second_moment == "mini", group["momentum"] == "adamw"
    own = [i for i, p in enumerate(params) if not is_sharded(p) and p.numel() > 0]
    if not own:
        return params, grads, states
    dim = group["fan_out_dim"]
    scratch_numel = max((params[i].numel() for i in own), default=0) if kind in ("lowrank", "qkv") else 0
    scratch = None  # the low-rank corrections of one parameter at a time (q and k of a q/k/v side by side)
    for step, positions in step_groups([states[i]["step"] for i in own]).items():
        step = int(step)
        refresh = (step - 1) % group["refresh_every"] == 0
        scalars = dict(
            decay=1.0 - lr * weight_decay, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
            step_size=lr / (1.0 - beta1**step) if adamw else lr, eps=eps,
            bias_correction2_sqrt=math.sqrt(1.0 - beta2**step) if adamw else 1.0,
            clip=math.inf if adamw or clip is None else float(clip),
        )  # fmt: skip
        pieces = _Pieces(scalars)
        for k in positions:
            i = own[k]
            w, state = params[i], states[i]
            exp_avg_sq = state["exp_avg_sq"]
            g = grads[i].to(exp_avg_sq.dtype)
            full_v = not mini or group["block"] == "element" or w.ndim == 0
            den, div, length = exp_avg_sq, 1, 1
            if not full_v:
                exp_avg_sq.mul_(beta2).add_(_mini_mean_sq(g, group), alpha=1 - beta2)
                v = expand_blocks(exp_avg_sq, w.shape, group)
                den = (v.sqrt() / scalars["bias_correction2_sqrt"]).add_(eps) if adamw else v.sqrt() + eps
                if den.numel() == 1:  # one block: the kernel reads den[0] for every element
                    div, length = w.numel(), 1
                else:  # one value per fan-out index (den broadcasts; its memory is that vector)
                    _, length, div = _fan_out_layout(w.shape, dim)
            segments = _segments(w.shape, group)
            if not segments:
                pieces.add(w, g, None, den, 0, full_v, div, length)
                continue
            if segments[0][1] == "full":
                pieces.add(w, g, state["exp_avg"], den, 1, full_v, div, length)
                continue
            factor_dtype = state["factor_L" + segments[0][0]].dtype
            if scratch is None or scratch.dtype != factor_dtype or scratch.device != w.device:
                scratch = torch.empty(scratch_numel, dtype=factor_dtype, device=w.device)
            if kind == "lowrank":
                out = scratch[: g.numel()].view(g.shape)
                mode, t = _fast_lowrank(g, state["factor_L"], state["factor_R"], beta1, refresh, step, out)
                lowrank = _Pieces(scalars)
                lowrank.add(w, g, t, den, mode, full_v, div, length)
                lowrank.flush()  # before the next block reuses the scratch
            elif dim % w.ndim == 0:  # q/k/v rows: three pieces, each its own rows of everything
                parts, offset = _Pieces(scalars), 0
                for suffix, part_kind, (start, rows) in segments:
                    part = [x.narrow(0, start, rows) for x in (w, g)]
                    if full_v:
                        part_den, part_len = exp_avg_sq.narrow(0, start, rows), 1
                    elif den.numel() == 1:  # block "tensor"
                        part_den, part_len = den, 1
                    else:  # AdaPM-mini's q/k/v (or row) blocks: one denominator per row, (n, 1)
                        part_den, part_len = den.narrow(0, start, rows), rows
                    if part_kind == "full":
                        mode, t = 1, state["exp_avg" + suffix]
                    else:
                        L, R = state["factor_L" + suffix], state["factor_R" + suffix]
                        out = scratch[offset : offset + part[1].numel()].view(part[1].shape)
                        offset += part[1].numel()
                        mode, t = _fast_lowrank(part[1], L, R, beta1, refresh, step, out)
                    parts.add(*part, t, part_den, mode, full_v, div, part_len)
                parts.flush()
            else:  # q/k/v columns (a Conv1D's layout): the momentum as one tensor, then the kernel
                mom = torch.empty_like(g, dtype=torch.promote_types(g.dtype, factor_dtype))
                for suffix, part_kind, span in segments:
                    g_part, m_part = g.narrow(dim, *span), mom.narrow(dim, *span)
                    if part_kind == "full":
                        m_part.copy_(state["exp_avg" + suffix].lerp_(g_part, 1 - beta1))
                        continue
                    L, R = state["factor_L" + suffix], state["factor_R" + suffix]
                    out = scratch[: g_part.numel()].view(g_part.shape)
                    mode, t = _fast_lowrank(g_part, L, R, beta1, refresh, step, out)
                    m_part.copy_(t)
                    if mode == 2:
                        m_part.add_(g_part)
                single = _Pieces(scalars)
                single.add(w, g, mom, den, 3, full_v, div, length)
                single.flush()
        pieces.flush()
    done = set(own)
    rest = [i for i in range(len(params)) if i not in done]
    return [params[i] for i in rest], [grads[i] for i in rest], [states[i] for i in rest]


def adapm_param_groups(
    model: nn.Module,
    *,
    n_heads: int | None = None,
    dim: int | None = None,
    n_kv_heads: int | None = None,
    weight_decay: float | None = None,
    overrides: Mapping[str, Role | str] | None = None,
) -> list[dict]:
    """Param groups with AdaPM's partition by role (docs/algorithms.md §4) and Adam-mini's v blocks.

    ``momentum``: token embedding, attention output: ``"none"``; query, key, MLP matrices:
    ``"lowrank"``; value: ``"full"``; fused q/k/v: ``"qkv"``; everything else: ``"adamw"``.
    Block keys for AdaPM-mini as :func:`~lowmem.optim.adam_mini_param_groups`; query/key blocks
    need ``n_heads`` and ``dim`` (AdaPM with a full second moment does not). ``n_kv_heads`` cuts a
    fused grouped-query q/k/v projection; without head counts a fused projection is cut in thirds.
    """
    head_dim, qkv_heads = head_config(n_heads, dim, n_kv_heads)

    def keys_of(info: ParamRole) -> dict[str, Any]:
        kind = _MOMENTUM_BY_ROLE.get(info.role, "adamw")
        if kind in ("lowrank", "qkv") and info.param.ndim != 2:
            kind = "full"
        return dict(block_keys(info, head_dim, qkv_heads), momentum=kind)

    return group_params(model, classify_parameters(model, overrides), keys_of, weight_decay, overrides)
