"""The compiled tier of the fast path: one ``torch.compile``'d kernel over lists of tensors.

An optimizer whose update is element-wise per parameter (HMAdamW, AdamS, ...) writes its maths
once as a *kernel* on one parameter's tensors and hands it to :class:`FusedForeach`, which runs it
on the backends of :mod:`lowmem.optim._dispatch`: the native C kernel named by ``native`` for the
float32 CPU tensors, then the compiled kernel where it can run, then the same kernel as foreach
ops (:mod:`lowmem.optim._foreach`). Inductor fuses the kernel into a single loop per tensor that
reads each input once and writes each output once, with no parameter-sized temporaries, so the
step runs at the memory-bandwidth floor.

Usage in an optimizer module::

    def _adams_kernel(param, grad, exp_avg, *, lr, beta1, beta2, eps, bias_correction1,
                      weight_decay, decoupled: bool) -> None:
        # element-wise maths on ONE parameter; results go back with .copy_() (in place)
        ...

    _ADAMS_FAST = FusedForeach(_adams_kernel, native="lowmem_adams_f32")  # module level

    # in the functional entry point, for tensors sharing the same scalar values:
    _ADAMS_FAST(
        [params, grads, exp_avgs],                     # equal-length lists; index i = one parameter
        scalars={"lr": lr, "beta1": beta1, ...},       # floats or 0-d tensors -> cached 0-d tensors
        static={"decoupled": True},                    # Python constants: one compile per value
    )

What it takes care of:

- *Hyperparameters as 0-d tensors* (cached per device and dtype, refilled in place), so a
  learning-rate schedule never recompiles (Python floats would be baked into the graph).
- *Shape-agnostic compile*: tensors are passed as 1-D aliases (:func:`flat_views`) with dynamic
  sizes and duck sizing off, in groups of exactly ``group_size`` (the last group is padded with
  scratch tensors). One compile (10-30 s on 2 cores; Inductor caches it on disk) per kernel x
  size class (below/above ``SMALL_NUMEL`` elements: single-threaded / parallel kernels) x device
  x dtype combination x ``static`` value, whatever the model's shapes.
- *Fallback*: where the compiled tier cannot run (:func:`lowmem.optim._dispatch.compiled_available`)
  or a compile fails (one warning names the cause), the kernel runs as foreach ops from then on.
  Tensors of fewer than 2 elements (size-1 dims would force a recompile), tensors whose layouts
  differ, and dtype combinations beyond the compile limit also take the foreach tier.

Kernel contract: element-wise across the tensors of one index (they have the same shape and
memory layout, or broadcast against the first), scalars arrive as 0-d tensors in the compute
dtype (float64 if any tensor of the index is float64, else float32), results are written with
``.copy_()`` into the inputs, and only the operations :class:`lowmem.optim._foreach.TensorList`
maps (arithmetic, ``sqrt``, ``.to``, ``.copy_``; anything else runs index by index) are used.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lowmem.optim import _dispatch
from lowmem.optim._foreach import run_foreach

__all__ = ["SMALL_NUMEL", "FusedForeach", "flat_views", "local_tensor"]

SMALL_NUMEL = 1 << 18  # below this, kernels run single-threaded, in groups (see FusedForeach)
_MIN_COMPILED_NUMEL = 2  # dynamo specialises sizes 0 and 1; tinier tensors run eagerly
_MAX_KEYS = 6  # distinct compiles per kernel, kept under dynamo's recompile limit (8)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (element-wise maths on shards is exact), else ``t``."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:  # the common case, checked cheaply
        return t
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def flat_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """1-D aliases of ``tensors`` in memory order, or ``None`` if their layouts differ or have gaps.

    Works for contiguous and permuted-dense tensors (e.g. channels_last) as long as all tensors
    of the index share sizes and strides, so that element ``k`` of every view is the same
    logical element.
    """
    first = tensors[0]
    # .detach() drops the view's link to its base (version counter and storage stay shared):
    # dynamo would otherwise trace every view through its base and specialise on the base's rank.
    if all(t.is_contiguous() and t.shape == first.shape for t in tensors):
        return [t.view(-1).detach() for t in tensors]
    if any(t.shape != first.shape or t.stride() != first.stride() for t in tensors[1:]):
        return None
    order = sorted(range(first.dim()), key=lambda d: first.stride(d), reverse=True)
    permuted = [t.permute(order) for t in tensors]
    if not permuted[0].is_contiguous():
        return None  # overlapping or strided with gaps: no flat view
    return [t.view(-1).detach() for t in permuted]


def _no_duck_sizing() -> contextlib.AbstractContextManager:
    # With duck sizing, equal sizes share a symbol and the graph guards on their equality: every
    # new pattern of equal sizes in a group would recompile.
    try:
        from torch.fx.experimental import _config as fx_config

        return fx_config.patch(use_duck_shape=False)
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


class FusedForeach:
    """Run ``kernel(*tensors_i, **scalars, **static)`` for every index ``i``, compiled and fused.

    Tensors go through the compiled kernel in groups: one call handles ``group_size`` indices
    (the last group padded with 2-element scratch tensors), so the fixed cost of a call (dynamo's
    guards, the wrapper, waking the OpenMP threads: ~60 us on the 2-core CPU this was tuned on)
    is shared. Inside a call every tensor is its own work-sharing loop, all in one parallel
    region. Two size classes, each its own compile:

    - tensors of ``SMALL_NUMEL`` elements or more: parallel loops, ``group_size`` per call.
      Measured at 50M parameters (48 tensors of 1M elements) against fused AdamW: one tensor
      per call 1.00-1.05x, 4 per call 0.94x, 8 per call 0.85-0.91x, 16 per call 0.83-0.88x,
      also with another process busy on one of the two cores;
    - smaller tensors: kernels compiled single-threaded (no barrier at all): their work is too
      small to repay a parallel region.

    Compile time grows with the group (cold, 2 cores: ~10 s for 1 tensor per call, ~18 s for
    16); Inductor caches it on disk. ``name`` only appears in warnings and in the compiled
    functions' names. ``native``: the name of the kernel's native twin in
    :data:`lowmem.optim._native.ELEMENTWISE` (same tensors, same scalar names), if it has one.
    """

    def __init__(
        self, kernel: Callable[..., None], *, native: str | None = None, group_size: int = 16, name: str | None = None
    ) -> None:
        self.kernel = kernel
        self.native = native
        self.group_size = group_size
        self.name = name or kernel.__name__
        self._compiled: dict[bool, Callable[..., None]] = {}  # small size class? -> compiled loop
        self._failed = False
        self._keys: set[tuple] = set()
        self._scalars: dict[tuple, dict[str, torch.Tensor]] = {}
        self._padding: dict[tuple, list[list[torch.Tensor]]] = {}

    # ----------------------------------------------------------------------------------- public
    def __call__(
        self,
        tensor_lists: Sequence[Sequence[torch.Tensor]],
        scalars: Mapping[str, float | torch.Tensor],
        static: Mapping[str, Any] | None = None,
    ) -> None:
        static = dict(static or {})
        if self.native is not None and tensor_lists[0] and _dispatch.native_library() is not None:
            from lowmem.optim import _native  # imported here: _native imports this module

            left = _native.elementwise(self.native, tensor_lists, scalars)
            tensor_lists = [[tensors[i] for i in left] for tensors in tensor_lists]
        static_key = tuple(sorted(static.items()))
        buckets: dict[tuple, list[list[torch.Tensor]]] = {}
        rest: list[list[torch.Tensor]] = []  # for the foreach tier
        for tensors in zip(*tensor_lists):
            tensors = [local_tensor(t) for t in tensors]
            views = flat_views(tensors)
            if views is None or views[0].numel() < _MIN_COMPILED_NUMEL:
                rest.append(views or tensors)
                continue
            small = views[0].numel() < SMALL_NUMEL
            key = (small, views[0].device, tuple(t.dtype for t in views), static_key)
            buckets.setdefault(key, []).append(views)
        for key, items in buckets.items():
            rest.extend(self._run_compiled(key, items, scalars, static) if self._compile_ok(key) else items)
        self._run_foreach(rest, scalars, static)

    # ---------------------------------------------------------------------------------- helpers
    def _compile_ok(self, key: tuple) -> bool:
        if self._failed or not _dispatch.compiled_available(key[1]):
            return False
        small = key[0]
        if small not in self._compiled:
            options = {"cpp.threads": 1} if small else None
            self._compiled[small] = torch.compile(
                self._make_loop("small" if small else "large"), dynamic=True, fullgraph=True, options=options
            )
        if key not in self._keys and sum(k[0] == small for k in self._keys) >= _MAX_KEYS:
            return False  # beyond dynamo's recompile limit it would silently run unfused
        self._keys.add(key)
        return True

    def _make_loop(self, size_class: str) -> Callable[..., None]:
        kernel = self.kernel

        def loop(tensor_lists, scalars, static):  # noqa: ANN001, ANN202 - traced by dynamo
            for tensors in zip(*tensor_lists):
                kernel(*tensors, **scalars, **static)

        # dynamo caches graphs per code object: a private copy per kernel and size class keeps
        # their compiles apart (the recompile limit counts per code object)
        loop.__code__ = loop.__code__.replace(co_name=f"fused_{self.name}_{size_class}")
        return loop

    def _run_compiled(
        self, key: tuple, items: list[list[torch.Tensor]], scalars: Mapping, static: dict
    ) -> list[list[torch.Tensor]]:
        """Run ``items`` through the compiled loop; return those left for the foreach tier."""
        small, device, dtypes, _ = key
        compute = torch.float64 if torch.float64 in dtypes else torch.float32
        scalar_tensors = self._scalar_tensors(device, compute, scalars)
        group_size = self.group_size
        padding = self._padding.get(key)
        if padding is None:
            padding = [[torch.zeros(2, dtype=d, device=device) for d in dtypes] for _ in range(group_size)]
            self._padding[key] = padding
        with _no_duck_sizing():
            for start in range(0, len(items), group_size):
                group = items[start : start + group_size]
                group = group + padding[len(group) :]
                try:
                    self._compiled[small]([list(col) for col in zip(*group)], scalar_tensors, static)
                except Exception as err:  # noqa: BLE001 - a compiler failure falls back, once, loudly
                    self._fail(err)
                    return items[start:]  # a failing group has not written anything yet
        return []

    def _run_foreach(self, items: list[list[torch.Tensor]], scalars: Mapping, static: dict) -> None:
        """The foreach tier for ``items``, one pass per device and compute dtype."""
        classes: dict[tuple, list[list[torch.Tensor]]] = {}
        for tensors in items:
            compute = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
            classes.setdefault((tensors[0].device, compute), []).append(tensors)
        for (device, compute), members in classes.items():
            run_foreach(self.kernel, members, self._scalar_tensors(device, compute, scalars), static)

    def _scalar_tensors(
        self, device: torch.device, dtype: torch.dtype, scalars: Mapping[str, float | torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # Refilled in place: the same 0-d tensors every call, so dynamo sees inputs, not constants.
        cache = self._scalars.setdefault((device, dtype), {})
        for name, value in scalars.items():
            t = cache.get(name)
            if t is None:
                t = cache[name] = torch.zeros((), dtype=dtype, device=device)
            if isinstance(value, torch.Tensor):
                t.copy_(value.detach())
            else:
                t.fill_(value)
        return {name: cache[name] for name in scalars}

    def _fail(self, err: BaseException) -> None:
        self._failed = True
        warnings.warn(
            f"lowmem fast path for {self.name}: torch.compile failed ({type(err).__name__}: {err}). Falling back "
            "to the foreach kernels (same maths, slower). Set LOWMEM_BACKENDS=native,foreach to skip the "
            "compile, or pass fused=False to the optimizer for the plain for-loop.",
            RuntimeWarning,
            stacklevel=3,
        )
