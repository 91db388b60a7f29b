"""Hand-written CPU kernels (``_native_kernels.c``), compiled on first use and called via ctypes.

The fast path of HMAdam(W), AdamS, SlimAdamW and Adam-mini for float32 contiguous CPU tensors
(other dtypes, layouts and devices take their ``torch.compile``'d kernels or for-loops). Two
reasons, both measured at 50M parameters against ``torch.optim.AdamW(fused=True)`` on a 2-core
CPU, in scripts that interleave the two steps round by round:

- element-wise steps: one call and one parallel region for all tensors of a step, split as one
  range of elements with no barrier (torch's fused AdamW opens a region per tensor; a compiled
  call costs ~60 us of guards and wrappers). HMAdamW 0.74x and AdamS 0.65x, against 0.90x and
  0.78x for the Inductor kernels;
- SlimAdamW's column-compressed tensors, whose reduction Inductor walks column strip by strip
  (1.63x; the C kernel 0.79-0.92x).

The library is built with the C compiler Inductor itself needs on CPU (``$CC``, else ``cc``),
``-O3 -march=native -fopenmp``, into ``$LOWMEM_CACHE_DIR`` (default ``~/.cache/lowmem``), keyed by
a hash of the source, the flags, the compiler's version and this CPU's feature flags; later
processes load the cached file (first build and load: ~0.3 s). It links the ``libgomp.so.1`` torch has
already loaded, so its threads are torch's OpenMP pool (``torch.get_num_threads()`` of them).

If no compiler works, :func:`library` warns once and returns ``None``; callers then use their
compiled (Inductor) or for-loop path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.autograd.graph import increment_version

from lowmem.optim._fast import local_tensor

__all__ = [
    "ADAM_SCALARS", "ELEMENTWISE", "check_status", "elementwise", "int64_array", "library", "native_ok", "pointer_array",
]  # fmt: skip

SOURCE = Path(__file__).with_name("_native_kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# The scalar arguments of the AdamW, row and column kernels, in order (keys of _base.adam_scalars).
ADAM_SCALARS = ("param_decay", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size", "bias_correction2_sqrt",
                "eps")  # fmt: skip
_SCALARS = [ctypes.c_float] * len(ADAM_SCALARS)
# Element-wise kernels over many tensors: name -> (tensor lists, scalar names in argument order);
# each scalar name is a key of the scalars dict the optimizer passes to its Inductor kernel.
ELEMENTWISE = {
    "lowmem_hmadam_f32": (3, ("clip_coef", "l2", "one_minus_beta1", "beta2", "v_scale", "param_decay", "step_size",
                              "inv_bias_correction2_sqrt", "eps", "beta1")),
    "lowmem_adams_f32": (3, ("param_decay", "old_m_weight", "one_minus_beta2", "one_minus_beta1", "step_size", "eps")),
    "lowmem_adamw_f32": (4, ADAM_SCALARS),
}  # fmt: skip
_SIGNATURES = {
    "lowmem_slim_rows_f32": [ctypes.c_int64, ctypes.c_int64, *[ctypes.c_void_p] * 4, *_SCALARS, ctypes.c_int],
    "lowmem_slim_cols_f32": [ctypes.c_int64, ctypes.c_int64, *[ctypes.c_void_p] * 4, *_SCALARS, ctypes.c_int],
    **{name: [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), *[ctypes.POINTER(ctypes.c_void_p)] * lists,
              *[ctypes.c_float] * len(names), ctypes.c_int] for name, (lists, names) in ELEMENTWISE.items()},
}  # fmt: skip

_library: ctypes.CDLL | None = None
_failed = False


def _cache_dir() -> Path:
    """``$LOWMEM_CACHE_DIR``, else ``~/.cache/lowmem``, else (home not writable) a temp folder."""
    if "LOWMEM_CACHE_DIR" in os.environ:
        return Path(os.environ["LOWMEM_CACHE_DIR"])
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowmem"
    try:
        default.mkdir(parents=True, exist_ok=True)
        return default
    except OSError:
        return Path(tempfile.gettempdir()) / f"lowmem-{os.getuid()}"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()]))
    target = _cache_dir() / f"lowmem_native_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: concurrent processes never load a half-written file
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; ``None`` (after one warning) if it cannot."""
    global _library, _failed
    if _library is not None or _failed:
        return _library
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    try:
        if compiler is None:
            raise RuntimeError("no C compiler found (set $CC)")
        lib = ctypes.CDLL(str(_build(compiler)))
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _failed = True
        warnings.warn(
            f"lowmem: the native CPU kernels could not be built or loaded ({err}); the fast paths of HMAdamW, "
            "AdamS and SlimAdamW use their torch.compile'd kernels instead (slower).",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _library = lib
    return lib


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def native_ok(*tensors: torch.Tensor) -> bool:
    """Whether the native kernels can take these tensors: plain contiguous float32 CPU tensors."""
    for t in tensors:  # cheapest tests first: this runs for every tensor of every step
        if t.dtype is not torch.float32 or type(t) not in _PLAIN or not t.is_cpu or not t.is_contiguous():
            return False
    return True


def int64_array(values: Iterable[int]) -> ctypes.Array:
    """A C ``int64_t[]`` of ``values``."""
    values = list(values)
    return (ctypes.c_int64 * len(values))(*values)


def pointer_array(tensors: Iterable[torch.Tensor]) -> ctypes.Array:
    """A C array of the tensors' data pointers (the tensors must stay alive during the call)."""
    pointers = [t.data_ptr() for t in tensors]
    return (ctypes.c_void_p * len(pointers))(*pointers)


def check_status(status: int, who: str) -> None:
    """Turn a kernel's non-zero status (its scratch allocation failed) into a MemoryError."""
    if status != 0:
        raise MemoryError(f"{who}: the native kernel could not allocate its scratch memory (column sums)")


def elementwise(name: str, tensor_lists: Sequence[Sequence[torch.Tensor]], scalars: Mapping[str, Any]) -> list[int]:
    """Run the element-wise kernel ``name`` (see :data:`ELEMENTWISE`) in one call over every index
    whose tensors it takes (:func:`native_ok`; DTensors by their local shards); return the other
    indices, for the caller's compiled or for-loop path (all of them if the library is unavailable).
    """
    locals_ = [[local_tensor(t) for t in tensors] for tensors in tensor_lists]
    indices = range(len(locals_[0]))
    ok = [i for i in indices if native_ok(*(tensors[i] for tensors in locals_))]
    lib = library() if ok else None
    if lib is None:
        return list(indices)
    _, names = ELEMENTWISE[name]
    values = [float(scalars[key]) for key in names]
    status = getattr(lib, name)(len(ok), int64_array(locals_[0][i].numel() for i in ok),
                                *(pointer_array(tensors[i] for i in ok) for tensors in locals_), *values,
                                torch.get_num_threads())  # fmt: skip
    check_status(status, name)
    # written through raw pointers: tell autograd, as an in-place op would
    increment_version([tensors[i] for tensors in locals_ for i in ok])
    done = set(ok)
    return [i for i in indices if i not in done]
