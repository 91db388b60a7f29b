"""Capture of IO-Adam's statistics: which weights qualify, the hooks, and the fused linear.

IO-Adam (``lowmem.optim.ioadam``) needs, per step and per Linear weight ``W`` (n_out x n_in;
a Hugging Face ``Conv1D``, which computes ``X W + b``, stores it as n_in x n_out), the per-feature power sums of the layer input ``X`` and of the output gradient ``dY`` over all
tokens (every leading dimension of ``X``/``dY`` counts as tokens)::

    in_sum[j]  = sum_tokens |X[:, j]|^p      (n_in vector)
    out_sum[i] = sum_tokens |dY[:, i]|^q     (n_out vector),   q = p / (p - 1)

How they are captured (``fused_linear=False``):

- a forward hook reduces ``X`` to ``in_sum`` at once (``X`` itself is never kept: only an n_in
  vector lives on) and registers a *pre-hook on the autograd node that made the output* (its
  base's when the output is a view, see :func:`_hook_output`) whose closure holds that vector;
- the node's pre-hook fires in the backward with ``dY``, reduces it to ``out_sum``, and hands
  the pair to the optimizer, which adds it to the statistics *staged* for the coming ``step()``.

So ``in_sum`` is committed only when the matching backward arrives: a forward under
``torch.no_grad()``/``inference_mode`` registers nothing (its output does not require grad), and a
grad-enabled forward whose output never gets a backward (validation loss computed with grad on)
leaves nothing behind: its closure dies with its graph. Every call of a module pairs its own
``X`` with its own ``dY``, so a module called twice, or two Linear modules sharing a weight, add
into the same staged sums, as the gradient does.

Why a hook on the output's node rather than ``register_full_backward_hook``: the full backward
hook wraps the module's outputs in a ``BackwardHookFunction`` that breaks in-place ops on them
(an in-place ReLU after the Linear raises), and it still needs per-call pairing with the
forward. The node that made the output stays in the graph when an in-place op follows, so its
pre-hook receives the gradient of the value the output had in the forward (as a tensor hook
registered there would, at less cost).

``fused_linear=True`` replaces the forward of each qualifying ``nn.Linear`` (an instance attribute,
removed again by :meth:`StatsHooks.remove`) by a custom autograd Function whose backward computes
the input and bias gradients, reduces ``X``/``dY`` to the power sums, adds ``(1-b1) dY^T X``
straight into the momentum, and returns ``None`` for the weight: ``W.grad`` is never created.
It saves exactly what ``F.linear`` saves (``X`` and ``W``).

A weight tied to an ``nn.Embedding`` (a tied LM head) keeps IO-Adam: the embedding gradient is
``G_emb[v, :] = sum_tokens [id = v] dE``, an outer-product sum like the Linear's with the one-hot
token as the vocabulary-side factor. The embedding's forward hook counts the tokens
(``count(v)`` = the sum of the indicator to any power; 0 for the padding row) and the pre-hook
on its output's node reduces ``dE`` to ``sum_tokens |dE|^p``; they are staged apart from the
Linear use's sums (``opt._stage_embedding_stats``), because the optimizer bounds each use by
Hölder on its own statistics and the tied gradient by the sum of the two bounds
(``lowmem.optim.ioadam``). Summing them into the Linear use's sums would also bound ``|G|``, but
with a cross term ``count(v) * sum_tokens |H|^p`` far above either use's bound.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lowmem.optim import _dispatch, _native

__all__ = ["StatsHooks", "io_weights", "is_hf_conv1d", "power_sum", "transposed_layout"]


def tokens_by_features(t: Tensor) -> Tensor:
    """``t`` as a (tokens x features) matrix: every leading dim counts as tokens (also when empty)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


_POWER_SUM_CHUNK = 1 << 16  # elements per chunk of the CPU fallback: its temporaries stay in L2


def power_sum(t: Tensor, p: float) -> Tensor:
    """``sum_tokens |t|^p`` per feature (last dim), in at least fp32, without a t-sized temporary.

    One read of ``t``, and no autograd history (only ``t``'s values are read, so the hooks need
    no ``torch.no_grad()``): float32 contiguous CPU tensors go straight to the native kernel
    (per-thread column sums in double; this path, taken twice per Linear call, does no Python
    beyond the call itself); other CPU tensors are reduced in chunks of rows
    (``torch.linalg.vector_norm`` over the token dim, the strided dim of a row-major (tokens x
    features) matrix, took ~15x the time of a row-contiguous pass on CPU: ~14% of a training step
    of the lm config); on other devices ``vector_norm``.
    """
    t2 = t if t.is_contiguous() else tokens_by_features(t.detach())  # contiguous: (tokens x features) as it is
    n_features, numel = t2.shape[-1], t2.numel()
    lib = _dispatch.native_library() if numel and _native.native_ok(t2) else None
    if lib is not None:
        out = torch.empty(n_features, dtype=torch.float32)
        status = lib.lowmem_power_sum_f32(numel // n_features, n_features, t2.data_ptr(), float(p), out.data_ptr(),
                                          torch.get_num_threads())  # fmt: skip
        if status:
            _native.check_status(status, "IOAdam statistics")
        return out
    t2 = tokens_by_features(t2.detach())
    acc = torch.promote_types(t.dtype, torch.float32)
    if t2.device.type != "cpu" or numel == 0:
        return torch.linalg.vector_norm(t2, ord=p, dim=0, dtype=acc).pow_(p)
    out = torch.zeros(n_features, dtype=acc)
    for chunk in t2.split(max(1, _POWER_SUM_CHUNK // n_features)):
        chunk = chunk.to(acc)
        out += (chunk * chunk if p == 2.0 else chunk.abs().pow_(p)).sum(0)
    return out


def _plain_linear(m: nn.Module) -> bool:
    # A subclass with its own forward (LoRA, quantized...) may not compute X W^T + b from its input.
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def is_hf_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is a Hugging Face ``Conv1D`` (GPT-2's linear layer: ``X W + b`` with ``W`` of
    shape (n_in, n_out) = ``(nx, nf)``), recognised without importing transformers: the class is
    named ``Conv1D``, defines its own ``forward``, and holds a 2-D ``weight`` whose dim 1 is ``nf``
    (and a bias of ``nf`` entries, if any). Subclasses (other names) are not trusted, as for Linear."""
    if type(m).__name__ != "Conv1D" or "forward" not in type(m).__dict__:
        return False
    weight, bias, nf = getattr(m, "weight", None), getattr(m, "bias", None), getattr(m, "nf", None)
    return (
        isinstance(weight, Tensor) and weight.ndim == 2 and isinstance(nf, int) and weight.shape[1] == nf
        and (bias is None or (isinstance(bias, Tensor) and tuple(bias.shape) == (nf,)))
    )  # fmt: skip


def _linear_like(m: nn.Module) -> bool:
    return _plain_linear(m) or is_hf_conv1d(m)


def transposed_layout(modules: list[nn.Module]) -> bool:
    """Whether the weight these (linear-like) users share is stored (n_in, n_out): HF ``Conv1D``."""
    return any(is_hf_conv1d(m) for m in modules)


def io_weights(model: nn.Module) -> tuple[dict[int, list[nn.Linear]], dict[int, list[nn.Embedding]]]:
    """The weights IO-Adam can own, keyed by ``id(param)``: Linear users and Embedding users.

    A trainable 2-D parameter qualifies when at least one plain ``nn.Linear`` (or Hugging Face
    ``Conv1D``, see :func:`is_hf_conv1d`) uses it as its weight and *every* module that registers
    it is such a layer of the same layout or, for Linear weights, a dense, unscaled
    ``nn.Embedding``: any other user could touch the weight without the hooks seeing it, and its
    gradient would then lack the matching statistics. (A ``Conv1D`` weight tied to an embedding
    would put the vocabulary on its input side: such a weight is left to AdamW.) The Linear layers inside
    ``nn.MultiheadAttention`` are excluded: the attention calls ``F.linear`` on ``out_proj.weight``
    itself, never ``out_proj.forward``.
    """
    in_mha = {id(m) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention) for m in mha.modules()}
    users: dict[int, list[nn.Module]] = defaultdict(list)
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            users[id(param)].append(module)
            params[id(param)] = param
    linears, embeddings = {}, {}
    for pid, mods in users.items():
        param = params[pid]
        if not param.requires_grad or param.ndim != 2 or isinstance(param, nn.parameter.UninitializedParameter):
            continue
        lin = [m for m in mods if _linear_like(m) and m.weight is param and id(m) not in in_mha]
        emb = [m for m in mods if isinstance(m, nn.Embedding) and m.weight is param and not m.sparse
               and not m.scale_grad_by_freq]  # fmt: skip
        conv1d = [m for m in lin if is_hf_conv1d(m)]
        if conv1d and (len(conv1d) != len(lin) or emb):
            continue  # mixed layouts
        if lin and len(lin) + len(emb) == len(mods):
            linears[pid], embeddings[pid] = lin, emb
    return linears, {k: v for k, v in embeddings.items() if v}


# The optimizer side of the hooks (implemented by IOAdam; reached through an _OptRef, a weak
# reference, so that hooks never keep a discarded optimizer alive):
#   opt._owns(param) -> bool                         the hooks act only for the optimizer's own weights
#   opt._io_exponents(param) -> (p, q)
#   opt._grad_stat_scale(exponent) -> float         factor of a power sum of output gradients (ranks)
#   opt._stage_stats(param, out_sum, in_sum)         statistics of one Linear forward/backward pair
#   opt._stage_embedding_stats(param, counts, in_sum)  of one Embedding call of a tied weight
#   opt._fused_momentum(param, x2d, dy2d)            fused mode: stats + M += (1-b1) dY^T X


class _OptRef:
    """A weak reference to the optimizer the hooks feed; ``ref()`` is the optimizer or None.

    The hooks live on the model's modules, so they travel with the model: unlike a
    ``weakref.ref`` (which cannot be pickled) this one pickles, as a dead reference, since the
    optimizer is not part of a pickled model: an unpickled model's hooks stay inert.
    ``copy.deepcopy`` keeps it, as it keeps a ``weakref.ref``: a deep copy of the model points at
    the original optimizer, which does not own the copy's parameters (see :func:`_owner`).
    """

    __slots__ = ("_ref",)

    def __init__(self, optimizer: Any = None) -> None:
        self._ref = None if optimizer is None else weakref.ref(optimizer)

    def __call__(self) -> Any:
        return None if self._ref is None else self._ref()

    def __reduce__(self) -> tuple:
        return _OptRef, ()

    def __deepcopy__(self, memo: dict) -> _OptRef:
        return self


def _owner(ref: _OptRef, param: Tensor) -> Any:
    """The live optimizer that owns ``param``, else None. ``copy.deepcopy(model)`` (an EMA copy)
    copies these hooks too, pointing at the original optimizer with the *copy's* parameters:
    they must stay inert there."""
    opt = ref()
    return opt if opt is not None and opt._owns(param) else None


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["input"]


def _hook_output(out: Tensor, hook: Callable[..., None], *hook_args: Any) -> None:
    """Have ``hook(*hook_args, i, grad_outputs)`` receive the gradient of ``out`` (any leading
    shape, features last) as ``grad_outputs[i]``: a pre-hook on the autograd node that made it.

    ``F.linear`` on a 3-D input with a bias (and ``F.embedding``) returns a *view* of a 2-D
    result; the view's node is dropped from the graph if the view is later modified in place (an
    in-place ReLU after the Linear), because autograd rebases the view's history onto its base.
    The base holds the same elements (tokens x features), so hook the base's node instead. A node
    stays in the graph when its output is modified in place later (the in-place op's node is
    added after it), so the hook gets the gradient of the value ``out`` had here, as a tensor
    hook registered now would; a node pre-hook costs less than a tensor hook, registered and
    called (two per Linear call).
    """
    base = out._base if out._is_view() else None
    if base is not None and base.numel() == out.numel() and base.shape[-1] == out.shape[-1]:
        out = base
    out.grad_fn.register_prehook(partial(hook, *hook_args, out.output_nr))


def _linear_forward_hook(ref: _OptRef, param: Tensor, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
    opt = _owner(ref, param)
    if opt is None or not isinstance(out, Tensor) or not out.requires_grad or not param.requires_grad:
        return
    p, q = opt._io_exponents(param)
    _hook_output(out, _linear_backward_hook, ref, param, power_sum(_first_input(args, kwargs), p), q)


def _linear_backward_hook(ref: _OptRef, param: Tensor, in_sum: Tensor, q: float, i: int, grad_outputs: tuple) -> None:
    opt = ref()
    if opt is not None:
        out_sum, scale = power_sum(grad_outputs[i], q), opt._grad_stat_scale(q)
        opt._stage_stats(param, out_sum if scale == 1.0 else out_sum.mul_(scale), in_sum)


def _embedding_forward_hook(ref: _OptRef, param: Tensor, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
    opt = _owner(ref, param)
    if opt is None or not isinstance(out, Tensor) or not out.requires_grad or not param.requires_grad:
        return
    p, _ = opt._io_exponents(param)
    ids = _first_input(args, kwargs).flatten()  # integer ids: no autograd history below
    counts = torch.bincount(ids, minlength=module.num_embeddings).to(torch.float32)
    if module.padding_idx is not None:  # the padding row gets no gradient
        counts[module.padding_idx] = 0.0
    _hook_output(out, _embedding_backward_hook, ref, param, counts, p)


def _embedding_backward_hook(
    ref: _OptRef, param: Tensor, counts: Tensor, p: float, i: int, grad_outputs: tuple
) -> None:
    opt = ref()
    if opt is not None:
        in_sum, scale = power_sum(grad_outputs[i], p), opt._grad_stat_scale(p)
        opt._stage_embedding_stats(param, counts, in_sum if scale == 1.0 else in_sum.mul_(scale))


class _FusedLinear(torch.autograd.Function):
    """``F.linear`` on 2-D ``x`` (tokens x n_in) whose backward feeds IO-Adam and returns no weight
    gradient. Callers flatten and unflatten the tokens outside, so the output is never a view
    made inside the Function (which would forbid an in-place op on it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, sink: Callable) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sink = sink
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_b = grad_out.sum(0) if ctx.needs_input_grad[2] else None
        ctx.sink(x, grad_out)
        return grad_x, None, grad_b, None


def _fused_sink(ref: _OptRef, param: Tensor, x2d: Tensor, dy2d: Tensor) -> None:
    opt = ref()
    if opt is not None:
        opt._fused_momentum(param, x2d, dy2d)


def _fused_forward(ref: _OptRef, param: Tensor, module: nn.Linear, input: Tensor) -> Tensor:
    weight, bias = module.weight, module.bias
    if is_hf_conv1d(module):  # X W + b = F.linear(X, W^T, b); the sink gets X and dY either way
        weight = weight.t()
    if not torch.is_grad_enabled() or not weight.requires_grad or _owner(ref, param) is None:
        return F.linear(input, weight, bias)
    sink = partial(_fused_sink, ref, param)
    x2d, out_shape = tokens_by_features(input), (*input.shape[:-1], weight.shape[0])
    device = input.device.type
    if torch.is_autocast_enabled(device):  # do autocast's cast here, so the backward sees one dtype
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            b = None if bias is None else bias.to(dtype)
            return _FusedLinear.apply(x2d.to(dtype), weight.to(dtype), b, sink).reshape(out_shape)
    return _FusedLinear.apply(x2d, weight, bias, sink).reshape(out_shape)


class StatsHooks:
    """The hooks (or fused forwards) that feed one optimizer; :meth:`remove` detaches them all."""

    def __init__(
        self,
        optimizer: Any,
        linears: dict[int, list[nn.Linear]],
        embeddings: dict[int, list[nn.Embedding]],
        params: dict[int, Tensor],
        fused_linear: bool,
    ) -> None:
        ref = _OptRef(optimizer)
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []
        for pid, modules in linears.items():
            for m in modules:
                if fused_linear:
                    m.forward = partial(_fused_forward, ref, params[pid], m)
                    self._patched.append(m)
                else:
                    hook = partial(_linear_forward_hook, ref, params[pid])
                    self._handles.append(m.register_forward_hook(hook, with_kwargs=True))
        for pid, modules in embeddings.items():
            for m in modules:
                hook = partial(_embedding_forward_hook, ref, params[pid])
                self._handles.append(m.register_forward_hook(hook, with_kwargs=True))
        self.removed = False

    def remove(self) -> None:
        """Remove every hook and restore every patched forward (idempotent)."""
        for handle in self._handles:
            handle.remove()
        for m in self._patched:
            if "forward" in m.__dict__:
                del m.forward
        self._handles, self._patched = [], []
        self.removed = True
