"""The foreach tier: an element-wise kernel run over lists of tensors with ``torch._foreach_*`` ops.

The fast paths write each optimizer's maths once, as a *kernel* on one parameter's tensors
(see :mod:`lowmem.optim._fast`). Where neither the native kernels nor ``torch.compile`` can run
(no C compiler, a platform dynamo does not support, a failed compile), the same kernel runs here:
each tensor argument becomes a :class:`TensorList` holding that argument of many parameters, and
the kernel's arithmetic (``+ - * /``, ``sqrt``, ``.to``, ``.copy_``) maps onto one ``_foreach_*``
call per operation for all of them (on CUDA: a few kernel launches per operation instead of one
per tensor). Operations without a foreach form (``torch.clamp``, reductions) run tensor by tensor
through ``__torch_function__``. The results are those of the eager kernel, bit for bit: the same
operations in the same order on the same dtypes.

Temporaries are bounded: tensors are gathered into chunks of at most :data:`CHUNK_NUMEL`
elements, and a tensor larger than that is cut along dim 0 into slices (views: results land in
place), so a step never allocates more than a few chunk-sized temporaries, whatever the model's
size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["CHUNK_NUMEL", "TensorList", "run_foreach"]

CHUNK_NUMEL = 1 << 20  # elements per foreach chunk: each temporary list holds ~4 MiB of float32


def _lists(a: TensorList, b: Any) -> Any:
    return b.tensors if isinstance(b, TensorList) else b


class TensorList:
    """One kernel argument for many parameters; arithmetic on it is a ``torch._foreach_*`` op.

    The other operand of a binary operation is another ``TensorList`` of the same length (pairs
    by index, broadcasting within each pair), a Python number or a 0-d tensor (the kernels'
    scalars). Anything else a kernel calls (``torch.clamp(x, lo, hi)``, ``x.mean(dim)``) is applied
    index by index and returns a ``TensorList``.
    """

    __slots__ = ("tensors",)

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)

    # --------------------------------------------------------------------- arithmetic
    def __add__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_add(self.tensors, _lists(self, other)))

    __radd__ = __add__

    def __sub__(self, other: Any) -> TensorList:
        if isinstance(other, Tensor):  # no _foreach_sub.Tensor: add with alpha=-1
            return TensorList(torch._foreach_add(self.tensors, other, alpha=-1))
        return TensorList(torch._foreach_sub(self.tensors, _lists(self, other)))

    def __rsub__(self, other: Any) -> TensorList:
        return (-self) + other

    def __mul__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_mul(self.tensors, _lists(self, other)))

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_div(self.tensors, _lists(self, other)))

    def __rtruediv__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_reciprocal(self.tensors)) * other

    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.tensors))

    # --------------------------------------------------------------------- tensor methods
    def sqrt(self) -> TensorList:
        return TensorList(torch._foreach_sqrt(self.tensors))

    def to(self, dtype: torch.dtype) -> TensorList:
        return TensorList([t.to(dtype) for t in self.tensors])

    def copy_(self, src: TensorList) -> TensorList:
        torch._foreach_copy_(self.tensors, src.tensors)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    def __getattr__(self, name: str) -> Callable[..., TensorList]:
        """Any other tensor method, index by index (``x.mean(dim=1, keepdim=True)``)."""

        def per_index(*args: Any, **kwargs: Any) -> TensorList:
            return _per_index(lambda t, *a, **k: getattr(t, name)(*a, **k), (self, *args), kwargs)

        return per_index

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        """``torch.<op>(...)`` with TensorList arguments: applied index by index."""
        return _per_index(func, args, kwargs or {})


def _per_index(func: Callable, args: tuple, kwargs: Mapping) -> TensorList:
    n = next(len(a.tensors) for a in (*args, *kwargs.values()) if isinstance(a, TensorList))

    def at(value: Any, i: int) -> Any:
        return value.tensors[i] if isinstance(value, TensorList) else value

    return TensorList([func(*(at(a, i) for a in args), **{k: at(v, i) for k, v in kwargs.items()}) for i in range(n)])


def _slices(tensors: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """``tensors`` (one parameter's) cut along dim 0 into pieces of at most ``CHUNK_NUMEL`` elements
    of the first. A tensor that broadcasts against the first (size-1 or missing dim 0) goes whole
    into every piece; 0-d tensors are never cut."""
    first = tensors[0]
    if first.dim() == 0 or first.numel() <= CHUNK_NUMEL:
        yield list(tensors)
        return
    rows = max(1, CHUNK_NUMEL * first.shape[0] // first.numel())
    cut = [t.dim() == first.dim() and t.shape[0] == first.shape[0] for t in tensors]
    for start in range(0, first.shape[0], rows):
        yield [t[start : start + rows] if c else t for t, c in zip(tensors, cut)]


def _chunks(items: Sequence[Sequence[Tensor]]) -> Iterator[list[list[Tensor]]]:
    """Groups of pieces (each a list of one parameter's tensors) of at most ``CHUNK_NUMEL`` elements
    in all, on one device: the unit of one foreach pass."""
    chunk: list[list[Tensor]] = []
    size, device = 0, None
    for tensors in items:
        for piece in _slices(tensors):
            n = piece[0].numel()
            if chunk and (size + n > CHUNK_NUMEL or piece[0].device != device):
                yield chunk
                chunk, size = [], 0
            chunk.append(piece)
            size, device = size + n, piece[0].device
    if chunk:
        yield chunk


def run_foreach(
    kernel: Callable[..., None],
    items: Sequence[Sequence[Tensor]],
    scalars: Mapping[str, Any],
    static: Mapping[str, Any],
) -> None:
    """``kernel(*items[i], **scalars, **static)`` for every index ``i``, as foreach ops over chunks.

    ``items[i]`` are one parameter's tensors (same shape, or broadcasting against the first);
    ``scalars`` are 0-d tensors or numbers, passed as they are; ``static`` Python constants.
    """
    for chunk in _chunks(items):
        kernel(*(TensorList(column) for column in zip(*chunk)), **scalars, **static)
