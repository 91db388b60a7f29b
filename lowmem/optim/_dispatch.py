"""Which backend runs an optimizer's step: one decision, made here, for every lowmem optimizer.

``fused`` (every fast-path optimizer's argument) picks between the readable reference and the
fast path; within the fast path each tensor goes to the first backend that takes it:

==========  =============================================================  =======================
backend     what runs                                                      takes
==========  =============================================================  =======================
native      hand-written C kernels (:mod:`lowmem.optim._native`), one      plain contiguous
            call for all tensors of a step                                 float32 CPU tensors,
                                                                           a C compiler at hand
compiled    the optimizer's kernel through ``torch.compile``               where dynamo runs; on
            (:mod:`lowmem.optim._fast`): one fused loop per tensor         CPU only with the C++
                                                                           compiler Inductor needs
foreach     the same kernel as ``torch._foreach_*`` ops over chunks of     everything
            tensors (:mod:`lowmem.optim._foreach`), bit for bit the
            eager kernel's result
for-loop    ``fused=False``: one tensor at a time, the reference           everything
==========  =============================================================  =======================

``fused=None`` (the default) takes the fast path when the optimizer holds at least
:data:`FAST_PATH_MIN_NUMEL` elements (below that the step is too small to repay it), and the
for-loop inside a ``torch.compile``'d training step (dynamo traces the loop, not the kernels).

``$LOWMEM_BACKENDS`` (e.g. ``native,foreach``) limits the fast tiers a process may use (default:
all three); ``foreach`` is always allowed, the last resort. Tests and benchmarks use
:func:`only`, a context manager, to pin one tier.

Why the native kernels are plain C called through ctypes rather than ``torch.library`` custom
ops: the fast path never runs inside a ``torch.compile``'d graph (there dynamo traces the
for-loop, which Inductor fuses by itself), so a custom op's visibility to the compiler would not
be used; dtype dispatch is the tier order above (float32 CPU tensors to C, the rest to the other
tiers); and a C++ extension would need torch's headers and a C++ toolchain where a plain C
compiler (with a clean fallback when there is none) suffices. The kernels bump the version
counters of the tensors they write, as an in-place op would, and a test holds the Python
argument tables against the C definitions.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import torch

__all__ = [
    "FAST_PATH_MIN_NUMEL", "Backend", "check_fused", "compiled_available", "enabled", "native_library", "only",
    "use_fast_path",
]  # fmt: skip

FAST_PATH_MIN_NUMEL = 1 << 20  # fused=None takes the fast path from this many elements on


class Backend(StrEnum):
    """The backends of an optimizer step, fastest first (see the module docstring)."""

    NATIVE = "native"
    COMPILED = "compiled"
    FOREACH = "foreach"
    FOR_LOOP = "for-loop"


_FAST_TIERS = (Backend.NATIVE, Backend.COMPILED, Backend.FOREACH)


def _from_environment() -> frozenset[Backend]:
    value = os.environ.get("LOWMEM_BACKENDS", "")
    if not value.strip():
        return frozenset(_FAST_TIERS)
    names = {part.strip() for part in value.split(",") if part.strip()}
    unknown = names - {b.value for b in _FAST_TIERS}
    if unknown:
        raise ValueError(
            f"invalid LOWMEM_BACKENDS={value!r}: unknown {sorted(unknown)}; use a comma list of "
            f"{', '.join(b.value for b in _FAST_TIERS)} (or unset it for all)"
        )
    return frozenset(Backend(n) for n in names) | {Backend.FOREACH}


_enabled = _from_environment()


def enabled(backend: Backend) -> bool:
    """Whether fast tier ``backend`` may run in this process (``$LOWMEM_BACKENDS``, :func:`only`)."""
    return backend in _enabled


@contextlib.contextmanager
def only(*backends: Backend | str) -> Iterator[None]:
    """Within the block, the fast path uses only these tiers (plus ``foreach``, always there)."""
    global _enabled
    previous = _enabled
    _enabled = frozenset(Backend(b) for b in backends) | {Backend.FOREACH}
    try:
        yield
    finally:
        _enabled = previous


def check_fused(name: str, fused: object) -> None:
    """Validate an optimizer's ``fused`` argument: True, False or None (automatic)."""
    if fused not in (None, True, False):
        raise ValueError(f"{name}: invalid fused={fused!r}; expected True, False or None (automatic)")


def use_fast_path(fused: bool | None, total_numel: int) -> bool:
    """Resolve ``fused``: ``None`` takes the fast path for optimizers holding at least
    ``FAST_PATH_MIN_NUMEL`` elements. Inside a ``torch.compile``'d training step the for-loop is
    traced instead, whatever ``fused`` says."""
    if torch.compiler.is_compiling():
        return False
    if fused is None:
        return total_numel >= FAST_PATH_MIN_NUMEL
    return bool(fused)


def native_library() -> Any:
    """The native kernel library (``ctypes.CDLL``), or ``None`` if the tier is off or unavailable
    (no C compiler, a failed build: :func:`lowmem.optim._native.library` warns once)."""
    if not enabled(Backend.NATIVE):
        return None
    from lowmem.optim import _native  # imported here: _native imports this package's _fast

    return _native.library()


@functools.cache
def _inductor_cpu_compiler() -> bool:
    """Whether Inductor finds the C++ compiler it builds CPU kernels with (without one, a compile
    fails only after ~20 s of tracing and lowering)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure to find one means: no compiled CPU kernels
        return False
    return True


def compiled_available(device: torch.device) -> bool:
    """Whether the compiled tier can run on ``device``: the tier is enabled, dynamo supports this
    Python and platform, and on CPU Inductor has a C++ compiler."""
    if not enabled(Backend.COMPILED) or not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        return False
    return device.type != "cpu" or _inductor_cpu_compiler()
