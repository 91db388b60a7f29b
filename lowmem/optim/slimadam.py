"""SlimAdamW: AdamW with the second moment averaged over high-SNR dims (docs/algorithms.md §3).

Kalra, Kirchenbauer, Barkeshli, Goldstein, "When Can You Get Away with Low Memory Adam?"
(arXiv 2503.01843); maths as the official ``dayal-kalra/low-memory-adam`` ``utils/slimadam.py``.
Per parameter, with ``K`` the group's ``compress_dims``::

    m = b1 m + (1-b1) g
    v = b2 v + (1-b2) mean_K(g^2)          # v has the dims in K reduced to size 1 (keepdim)
    if W.dim() >= 2: W = W (1 - lr wd)
    W = W - lr (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)

``K = None`` is exactly AdamW. Which ``K`` each parameter gets is decided by
:func:`lowmem.optim.slimadam_param_groups` (the role table or an SNR-derived rules file).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lowmem.optim._base import (
    Capabilities, LowMemOptimizer, adam_scalars, check_grad, check_hparams, state_dtype_for, step_groups,
)  # fmt: skip
from lowmem.optim import _dispatch, _native
from lowmem.optim._sharding import all_reduce_sum, check_fsdp_layout, is_sharded, state_like
from lowmem.optim._adamw import ADAMW_STEP, adam_update
from lowmem.optim._dispatch import check_fused, compiled_available, use_fast_path
from lowmem.optim._fast import _no_duck_sizing, local_tensor

__all__ = ["SlimAdamW", "slimadamw"]


def _is_int(d: Any) -> bool:
    return isinstance(d, int) and not isinstance(d, bool)


def _normalize_dims(compress_dims: Any) -> tuple[int, ...] | None:
    """``compress_dims`` as a tuple of ints (or None); JSON lists and a bare int are accepted."""
    if compress_dims is None:
        return None
    if _is_int(compress_dims):
        return (compress_dims,)
    if isinstance(compress_dims, (tuple, list)) and all(_is_int(d) for d in compress_dims):
        if not compress_dims:
            raise ValueError("SlimAdamW: compress_dims=() is empty; use None for uncompressed (AdamW) second moments")
        return tuple(compress_dims)
    raise ValueError(f"SlimAdamW: invalid compress_dims={compress_dims!r}; expected None or a tuple of tensor dims")


def reduced_shape(shape: Sequence[int], compress_dims: tuple[int, ...] | None) -> tuple[int, ...]:
    """Shape of ``v`` for a parameter of ``shape``: the dims in ``compress_dims`` set to 1."""
    if compress_dims is None:
        return tuple(shape)
    dims = {d % len(shape) for d in compress_dims}
    return tuple(1 if i in dims else n for i, n in enumerate(shape))


def _check_dims(name: str, shape: Sequence[int], compress_dims: tuple[int, ...] | None) -> None:
    if compress_dims is None:
        return
    ndim = len(shape)
    bad = [d for d in compress_dims if not -ndim <= d < ndim]
    if bad or len({d % max(ndim, 1) for d in compress_dims}) != len(compress_dims):
        raise ValueError(
            f"SlimAdamW: compress_dims={compress_dims} does not fit {name} of shape {tuple(shape)} "
            f"(dims must be distinct and in [-{ndim}, {ndim - 1}]); put parameters with different "
            "shapes in separate param groups, or build the groups with lowmem.optim.slimadam_param_groups"
        )


class SlimAdamW(LowMemOptimizer):
    r"""SlimAdamW: AdamW whose ``exp_avg_sq`` is averaged over the dims of ``compress_dims``.

    Update rule (docs/algorithms.md §3; ``K`` = the group's ``compress_dims``, ``t`` from 1)::

        m <- b1 m + (1-b1) g
        v <- b2 v + (1-b2) mean_K(g^2)       # mean over K with keepdim, then the EMA
        W <- W (1 - lr wd)                   # only for parameters with W.dim() >= 2
        W <- W - lr (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)

    Param-group key ``compress_dims``: a tuple of tensor dims to reduce ``v`` over, or ``None``
    (the default) for full AdamW. Every parameter of a group must have those dims; build the
    groups by role with :func:`lowmem.optim.slimadam_param_groups`, which states the rules in
    fan-in/fan-out terms (a Linear weight is (out, in): ``(1,)`` = one ``v`` per output row).

    State per parameter: ``exp_avg`` (full shape), ``exp_avg_sq`` (reduced shape) and ``step``
    (0-d float32). With the role table, ``v`` is about 1-2% of the parameter count, so the
    state is about half of AdamW's.

    Args:
        params: parameters or param groups (use named groups, see ``needs_param_names``).
        lr, betas, eps: as AdamW (defaults 1e-3, ``(0.9, 0.95)``, 1e-8); the paper uses
            AdamW's learning rate unchanged.
        weight_decay: decoupled weight decay (default 0.1), never applied to 1-D parameters.
        fused: ``True`` runs the fast path on the backends of :mod:`lowmem.optim._dispatch`:
            float32 contiguous CPU tensors in hand-written C kernels, others compiled (one
            kernel per compressed tensor); where no compile can run, uncompressed tensors as
            foreach ops and compressed ones by the for-loop's maths. ``False``: the for-loop
            reference; ``None`` (default): the fast path from 2**20 elements on.
        state_in_param_dtype: keep the state of bf16/fp16 parameters in their dtype, not fp32.

    FSDP2: parameters that ``fully_shard`` split along dim 0 (DTensors) step on their local
    shards. ``v`` averaged over dims that exclude dim 0 is sharded like the parameter and needs no
    communication; ``v`` averaged over dim 0 is replicated, and each step all-reduces the ranks'
    row sums once per such parameter (``comm_bytes_per_step`` counts the bytes). Compressed
    shards take the for-loop, uncompressed ones the fast path.
    """

    capabilities = Capabilities(needs_param_names=True, needs_full_shapes=True, supports_dtensor=True)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        fused: bool | None = None,
        state_in_param_dtype: bool = False,
    ) -> None:
        check_hparams("SlimAdamW", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        check_fused("SlimAdamW", fused)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            compress_dims=None,
            fused=fused,
            state_in_param_dtype=state_in_param_dtype,
        )
        super().__init__(params, defaults)
        self.comm_bytes_per_step = 0  # bytes the last step all-reduced (FSDP2 shards; see comm_bytes)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, checking its ``compress_dims`` against every parameter's shape."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["compress_dims"] = _normalize_dims(group["compress_dims"])
        names = group.get("param_names", [f"parameter {i}" for i in range(len(group["params"]))])
        for name, p in zip(names, group["params"]):
            _check_dims(name, p.shape, group["compress_dims"])

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
    ) -> None:
        dims = group["compress_dims"]
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad("SlimAdamW", p)
            state = self.state[p]
            v_shape = reduced_shape(p.shape, dims)
            if len(state) == 0:
                dtype = state_dtype_for(p, group["state_in_param_dtype"])
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = _zeros_reduced(p, dims, v_shape, dtype)
            elif tuple(state["exp_avg_sq"].shape) != v_shape:
                raise RuntimeError(
                    f"SlimAdamW: exp_avg_sq has shape {tuple(state['exp_avg_sq'].shape)} but compress_dims={dims} "
                    f"needs {v_shape} for a parameter of shape {tuple(p.shape)}; the state was created with other "
                    "compress_dims (changed rules or a checkpoint from another configuration): keep the rules "
                    "the state was saved with"
                )
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

    def fsdp2_state_sharded(self, p: Tensor, key: str) -> bool | None:
        """How FSDP2 places ``key`` of ``p`` (for :func:`~lowmem.optim.sharded_state_bytes`): a ``v``
        averaged over dim 0 is whole on every rank (also when ``p`` has a single row)."""
        dims = next(g for g in self.param_groups if any(q is p for q in g["params"]))["compress_dims"]
        return False if key == "exp_avg_sq" and dims and p.ndim and 0 in {d % p.ndim for d in dims} else None

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; returns the closure's loss (if a closure is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        total_numel = sum(p.numel() for g in self.param_groups for p in g["params"])
        self.comm_bytes_per_step = 0
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps)
            beta1, beta2 = group["betas"]
            self.comm_bytes_per_step += comm_bytes(params, exp_avg_sqs, group["compress_dims"])
            slimadamw(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                compress_dims=group["compress_dims"],
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                fused=use_fast_path(group["fused"], total_numel),
            )
        return loss


def _zeros_reduced(p: Tensor, dims: tuple[int, ...] | None, v_shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The zero ``v`` of ``p``: shape ``v_shape``. For an FSDP2 parameter a DTensor sharded along
    dim 0 like ``p`` where dim 0 is kept (each rank holds its rows' v), replicated where dim 0 is
    averaged (every rank holds the one all-reduced mean)."""
    if not is_sharded(p):
        return torch.zeros(v_shape, dtype=dtype, device=p.device)
    return state_like(p, v_shape, dtype, sharded_rows=not dims or 0 not in dims)


def slimadamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    compress_dims: tuple[int, ...] | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fused: bool = False,
) -> None:
    """Functional SlimAdamW step over lists of tensors (see :class:`SlimAdamW` for the maths).

    Increments each ``state_steps`` entry and updates ``params``, ``exp_avgs`` and ``exp_avg_sqs``
    in place; ``fused=True`` runs the fast path, ``False`` the for-loop reference.
    """
    impl = _fused_slimadamw if fused else _single_tensor_slimadamw
    impl(
        params, grads, exp_avgs, exp_avg_sqs, state_steps,
        compress_dims=compress_dims, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
    )  # fmt: skip


def _single_tensor_slimadamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    **hparams: Any,
) -> None:
    """The readable reference: one tensor at a time."""
    for p, grad, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        step_t += 1
        _slimadamw_one(p, grad, m, v, step_t.item(), **hparams)


def _slimadamw_one(
    p: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    step: float,
    *,
    compress_dims: tuple[int, ...] | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One parameter's step ``step`` (already counted), the maths in the state dtype. An FSDP2
    (DTensor) parameter steps on its local shard; see :func:`_mean_sq`."""
    mean_sq = _mean_sq
    if is_sharded(p):
        mean_sq = _sharded_mean_sq(p)
        p, grad, m, v = (local_tensor(t) for t in (p, grad, m, v))
    bc1 = 1.0 - beta1**step
    bc2_sqrt = (1.0 - beta2**step) ** 0.5
    w = p if p.dtype == m.dtype else p.to(m.dtype)  # fp32 maths for low-precision params
    g = grad.to(m.dtype)
    if p.dim() >= 2:
        w.mul_(1.0 - lr * weight_decay)
    m.lerp_(g, 1.0 - beta1)
    if compress_dims is None:
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    else:
        v.mul_(beta2).add_(mean_sq(g, compress_dims), alpha=1.0 - beta2)
    # sqrt(v)/sqrt(bc2) as torch.optim.AdamW writes it, so compress_dims=None matches it closely.
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    w.addcdiv_(m, denom, value=-lr / bc1)
    if w is not p:
        p.copy_(w)


def _mean_sq(g: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``mean(g^2)`` over ``dims``, kept as size-1 dims. contiguous(): the sum order of a
    reduction follows the memory layout; this makes a transposed or channels-last parameter give
    exactly the result of a contiguous one."""
    return (g * g).contiguous().mean(dim=dims, keepdim=True)


def _sharded_mean_sq(p: Tensor) -> Callable[[Tensor, tuple[int, ...]], Tensor]:
    """:func:`_mean_sq` for the local shard of FSDP2 parameter ``p`` (``lowmem.optim._sharding``).
    Averaged dims that exclude dim 0 are complete on every rank: no communication. Where dim 0 is
    averaged, each rank sums its rows and one all-reduce of the sums (``v``'s size) makes the
    global mean."""
    check_fsdp_layout(p, "SlimAdamW")
    full_shape = p.shape

    def mean_sq(g: Tensor, dims: tuple[int, ...]) -> Tensor:
        if 0 not in dims:
            return _mean_sq(g, dims)
        total = all_reduce_sum((g * g).contiguous().sum(dim=dims, keepdim=True), p)
        return total / math.prod(full_shape[d] for d in dims)

    return mean_sq


def comm_bytes(params: Iterable[Tensor], exp_avg_sqs: Iterable[Tensor], dims: tuple[int, ...] | None) -> int:
    """Bytes one SlimAdamW step all-reduces for these parameters (the payload: ``v``-sized sums of
    the FSDP2 parameters whose averaged dims include dim 0); 0 without sharding."""
    if not dims or 0 not in dims:
        return 0
    return sum(v.numel() * v.element_size() for p, v in zip(params, exp_avg_sqs) if is_sharded(p))


# ------------------------------------------------------------------------------ fast path
#
# Uncompressed tensors are element-wise: AdamW's fast path (lowmem.optim._adamw). A compressed tensor is seen as an (R, C) matrix reduced over C
# ("rows") or over R ("cols"):
# - float32 on CPU: the hand-written kernels of _native_kernels.c (rows: one pass, 20 B/param;
#   cols: two row-contiguous passes). Measured at 50M parameters against fused AdamW: rows
#   0.76-0.84x, cols 0.79-0.92x (the Inductor kernel below: 1.18x and 1.63x);
# - other dtypes and devices: one compiled kernel per tensor (FusedForeach needs equal shapes
#   within an index; v here is (R, 1) or (1, C)). Inductor makes it two loops, the reduction of
#   g^2 and then the update, and walks a column reduction strip by strip down all rows;
# - where no compile can run (lowmem.optim._dispatch.compiled_available): the for-loop's maths.


def _reduced_kernel(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    param_decay: Tensor,
    one_minus_beta1: Tensor,
    beta2: Tensor,
    one_minus_beta2: Tensor,
    step_size: Tensor,
    bias_correction2_sqrt: Tensor,
    eps: Tensor,
    rows: bool,
) -> None:
    """One compressed (R, C) tensor; ``exp_avg_sq`` is (R, 1) (``rows``) or (1, C)."""
    g = grad.to(step_size.dtype)
    g_sq = (g * g).mean(dim=1 if rows else 0, keepdim=True)
    adam_update(param, g, exp_avg, exp_avg_sq, g_sq, param_decay, one_minus_beta1, beta2, one_minus_beta2,
                 step_size, bias_correction2_sqrt, eps)  # fmt: skip


class _ReducedRunner:
    """``_reduced_kernel`` compiled once per process with dynamic shapes (one graph per ``rows``
    value and dtype combination). Where the compiled tier cannot run, every call returns False
    (if a compile fails: after one warning): the caller then runs the for-loop's maths for that
    tensor."""

    def __init__(self) -> None:
        self.compiled: Any = None
        self.failed = False
        self.scalars: dict[tuple, dict[str, Tensor]] = {}

    def __call__(self, tensors: tuple[Tensor, ...], scalars: dict[str, float], rows: bool) -> bool:
        """Run the kernel on ``(param, grad, exp_avg, exp_avg_sq)``; False if it could not run."""
        if self.failed or not compiled_available(tensors[0].device):
            return False
        if self.compiled is None:
            # dynamic_threads: with dynamic shapes Inductor picks serial or parallel code from the
            # first call's sizes; a small first tensor would make every later one single-threaded.
            options = {"cpp.dynamic_threads": True}
            self.compiled = torch.compile(_reduced_kernel, dynamic=True, fullgraph=True, options=options)
        # 0-d tensors refilled in place: a learning-rate schedule never recompiles.
        compute = torch.float64 if tensors[3].dtype == torch.float64 else torch.float32
        cache = self.scalars.setdefault((tensors[0].device, compute), {})
        for name, value in scalars.items():
            cache.setdefault(name, torch.zeros((), device=tensors[0].device, dtype=compute)).fill_(value)
        try:
            with _no_duck_sizing():
                self.compiled(*tensors, **cache, rows=rows)
        except Exception as err:  # noqa: BLE001 - a compiler failure falls back, once, loudly
            self._fail(err)  # the graph failed to build: nothing was written
            return False
        return True

    def _fail(self, err: BaseException) -> None:
        self.failed = True
        warnings.warn(
            f"lowmem fast path for SlimAdamW: torch.compile failed ({type(err).__name__}: {err}); compressed "
            "tensors use the for-loop from now on. Set LOWMEM_BACKENDS=native,foreach to skip the compile.",
            RuntimeWarning,
            stacklevel=5,
        )


_REDUCED = _ReducedRunner()


def _matrix_view(shape: torch.Size, dims: tuple[int, ...]) -> tuple[int, int, bool] | None:
    """``(R, C, rows)``: the tensor seen as an (R, C) matrix reduced over C (``rows``) or over R.

    ``None`` if ``dims`` are not the leading or the trailing dims, or if R or C would be 1 (a
    size-1 dim would specialise the compiled graph).
    """
    nd, k = len(shape), sorted(d % len(shape) for d in dims)
    if k == list(range(nd - len(k), nd)):
        split, rows = nd - len(k), True
    elif k == list(range(len(k))):
        split, rows = len(k), False
    else:
        return None
    r, c = math.prod(shape[:split]), math.prod(shape[split:])
    return (r, c, rows) if r > 1 and c > 1 else None


def _run_native(items: list[tuple[Tensor, Tensor, Tensor, Tensor, int, int, bool]], scalars: dict) -> bool:
    """Compressed float32 CPU tensors ``(p, g, m, v, R, C, rows)`` through the hand-written
    kernels (``_native``), one call each. False if the library is unavailable (the caller then
    uses the compiled kernel)."""
    lib = _dispatch.native_library()
    if lib is None:
        return False
    hparams = [scalars[k] for k in _native.ADAM_SCALARS]
    threads = torch.get_num_threads()
    for p, g, m, v, r, c, rows in items:
        kernel = lib.lowmem_slim_rows_f32 if rows else lib.lowmem_slim_cols_f32
        status = kernel(r, c, p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), *hparams, threads)
        _native.check_status(status, "SlimAdamW")
    # written through raw pointers: tell autograd, as an in-place op would
    increment_version([t for item in items for t in (item[0], item[2], item[3])])
    return True


def _fused_slimadamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    **hparams: Any,
) -> None:
    if not params:  # a group whose parameters all have no gradient
        return
    compress_dims, lr, weight_decay = hparams["compress_dims"], hparams["lr"], hparams["weight_decay"]
    beta1, beta2, eps = hparams["beta1"], hparams["beta2"], hparams["eps"]
    for step, indices in step_groups(state_steps).items():
        scalars = adam_scalars(lr, beta1, beta2, eps, weight_decay, step)
        if compress_dims is None:
            for decays in (True, False):  # 1-D parameters are never decayed
                ix = [i for i in indices if (params[i].dim() >= 2) == decays]
                if ix:
                    lists = [[t[i] for i in ix] for t in (params, grads, exp_avgs, exp_avg_sqs)]
                    ADAMW_STEP(lists, scalars if decays else {**scalars, "param_decay": 1.0})
            continue
        native, compiled, loop = [], [], []
        for i in indices:
            p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
            view = None if is_sharded(p) else _matrix_view(p.shape, compress_dims)  # shards: the for-loop
            if view is None or not all(t.is_contiguous() for t in (p, g, m)):
                loop.append((p, g, m, v))
            else:
                (native if _native.native_ok(p, g, m, v) else compiled).append((p, g, m, v, *view))
        if native and not _run_native(native, scalars):
            compiled = native + compiled
        for p, g, m, v, r, c, rows in compiled:  # compressed tensors are >= 2-D: always decayed
            matrices = (p.view(r, c), g.view(r, c), m.view(r, c), v.view((r, 1) if rows else (1, c)))
            if not _REDUCED(matrices, scalars, rows):
                loop.append((p, g, m, v))
        for p, g, m, v in loop:
            _slimadamw_one(p, g, m, v, step, **hparams)
