"""Hand-written CPU kernels (``_native_kernels.c``), compiled on first use and called via ctypes.

The fast path of HMAdam(W), AdamS, SlimAdamW, Adam-mini, AdaPM and IO-Adam for float32 contiguous CPU tensors
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
``-O3 -march=native -fopenmp``, into ``$LOWMEM_CACHE_DIR`` (default ``~/.cache/lowmem``, else
``<tmp>/lowmem-<uid>``), keyed by a hash of the source, the flags, the compiler's version and this
CPU's feature flags; later processes load the cached file (first build and load: ~0.3 s). It links
the ``libgomp.so.1`` torch has already loaded, so its threads are torch's OpenMP pool
(``torch.get_num_threads()`` of them).

A cached file is code every training process runs, and ``<tmp>/lowmem-<uid>`` is a name anyone can
create first, so the cache is trusted only as far as it is private:

- the folder is created ``0o700``; one that exists owned by another user or writable by group or
  others is not used: the process builds in a fresh ``tempfile.mkdtemp()`` folder (removed at
  exit) and warns once;
- a file is loaded only if it is a regular file owned by this user, not writable by group or
  others, and its SHA-256 is the one in its name (``lowmem_native_<key>_<sha256>.so``, written at
  build time); any other file is deleted and rebuilt;
- a build goes to a temp folder beside the cache and is ``os.replace``'d in, so a concurrent
  process never loads a half-written file;
- a cached file that will not load (``dlopen`` fails) or lacks a kernel is deleted and rebuilt
  once;
- where there is no ``os.getuid`` (Windows) the owner and mode checks are skipped: there are no
  POSIX owners, and the emulated mode bits mark everything writable as writable by all.

If no compiler works, or a fresh build will not load either, :func:`library` warns once and returns
``None``; callers then use their compiled (Inductor) or for-loop path.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import shutil
import stat
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
    "ADAM_SCALARS", "ELEMENTWISE", "check_status", "elementwise", "float_array", "int32_array", "int64_array", "library",
    "native_ok", "pointer_array",
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
    # AdaPM (lowmem.optim.adapm): n, numel, w, g, m, v, mode, full_v, div, len, 8 scalars, threads
    "lowmem_adapm_f32": [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), *[ctypes.POINTER(ctypes.c_void_p)] * 4,
                         *[ctypes.POINTER(ctypes.c_int)] * 2, *[ctypes.POINTER(ctypes.c_int64)] * 2,
                         *[ctypes.c_float] * 8, ctypes.c_int],
    "lowmem_fanout_mean_sq_f32": [*[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int],
    "lowmem_power_sum_f32": [*[ctypes.c_int64] * 2, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int],
    # IO-Adam (lowmem.optim.ioadam): n, rows, cols, slots, w, g, m, a, bt, m_decay, step_size, root, 3 scalars, threads
    "lowmem_ioadam_f32": [ctypes.c_int, *[ctypes.POINTER(ctypes.c_int64)] * 3, *[ctypes.POINTER(ctypes.c_void_p)] * 5,
                          *[ctypes.POINTER(ctypes.c_float)] * 2, ctypes.POINTER(ctypes.c_int), *[ctypes.c_float] * 3,
                          ctypes.c_int],
}  # fmt: skip

_library: ctypes.CDLL | None = None
_failed = False


def _private(st: os.stat_result) -> bool:
    """Whether only this user can change the file or folder ``st`` describes: owned by them, not
    writable by group or others. True where there is no ``os.getuid`` (Windows): no POSIX owners
    there, and the emulated mode bits would reject every folder."""
    if not hasattr(os, "getuid"):
        return True
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _configured_dir() -> Path:
    """``$LOWMEM_CACHE_DIR``, else ``~/.cache/lowmem``, else (home not writable) ``<tmp>/lowmem-<uid>``;
    created ``0o700``. An existing folder keeps its owner and mode: :func:`_cache_dir` checks them."""
    if "LOWMEM_CACHE_DIR" in os.environ:
        folder = Path(os.environ["LOWMEM_CACHE_DIR"])
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowmem"
    try:
        default.mkdir(mode=0o700, parents=True, exist_ok=True)
        return default
    except OSError:
        uid = f"-{os.getuid()}" if hasattr(os, "getuid") else ""  # Windows: the temp folder is per user
        folder = Path(tempfile.gettempdir()) / f"lowmem{uid}"
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder


def _cache_dir() -> Path:
    """The configured folder if it is private; else a fresh ``mkdtemp`` one (random name, ``0o700``),
    removed at exit, with one warning: a folder others can write may hold their code, so nothing in
    it is loaded, and this process builds its own copy (~0.3 s)."""
    folder = _configured_dir()
    if _private(folder.stat()):
        return folder
    fresh = tempfile.mkdtemp(prefix="lowmem-")
    atexit.register(shutil.rmtree, fresh, ignore_errors=True)
    warnings.warn(
        f"lowmem: the kernel cache {folder} is owned by another user or writable by group/others, so it is "
        f"not used; building in {fresh} instead. Fix: chown it to yourself and chmod 700, or set $LOWMEM_CACHE_DIR.",
        RuntimeWarning,
        stacklevel=2,
    )
    return Path(fresh)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _cache_key(compiler: str) -> str:
    """What the build depends on: the source, the flags, the compiler's version, this CPU's features."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    parts = [SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(path: Path) -> bool:
    """Whether ``path`` may be loaded: a regular file only this user can change, whose SHA-256 is the
    one :func:`_build` put in its name, so a truncated, overwritten or planted file is refused."""
    try:
        st = path.stat()
        return stat.S_ISREG(st.st_mode) and _private(st) and _sha256(path) == path.stem.rsplit("_", 1)[-1]
    except OSError:
        return False


def _cached(folder: Path, key: str) -> Path | None:
    """The verified cached build for ``key``, if any; deletes the ones that fail :func:`_verified`,
    so that a rebuild takes their place instead of sitting beside them."""
    for path in sorted(folder.glob(f"lowmem_native_{key}_*.so")):
        if _verified(path):
            return path
        path.unlink(missing_ok=True)  # missing_ok: a concurrent process may have deleted it first
    return None


def _build(compiler: str, folder: Path, key: str) -> Path:
    """Compile into a temp folder beside the cache, then ``os.replace`` the file in under its
    SHA-256: atomic, so a concurrent process never loads a half-written file. ``chmod 0o700``: the
    umask (e.g. ``002``) must not leave it group-writable, which :func:`_verified` refuses."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / "lowmem_native.so"
        command = [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        built.chmod(0o700)
        target = folder / f"lowmem_native_{key}_{_sha256(built)}.so"
        os.replace(built, target)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    """Load ``path`` and declare the kernels' signatures. OSError if it will not load or lacks a
    kernel (ctypes says AttributeError): either way the file is not our library."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        try:
            kernel = getattr(lib, name)
        except AttributeError as err:
            raise OSError(f"{path} has no kernel {name}") from err
        kernel.argtypes, kernel.restype = argtypes, ctypes.c_int
    return lib


def _load() -> ctypes.CDLL:
    """The bound library: the cached build if it verifies, loads and has every kernel; else (none,
    corrupt, foreign) a fresh build. One rebuild at most: a compiler whose output will not load
    fails once, in :func:`library`, instead of rebuilding forever."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set $CC)")
    key = _cache_key(compiler)  # first: a missing compiler fails before any folder is made
    folder = _cache_dir()
    cached = _cached(folder, key)
    if cached is not None:
        try:
            return _bind(cached)
        except OSError:
            cached.unlink(missing_ok=True)
    return _bind(_build(compiler, folder, key))


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; ``None`` (after one warning) if it cannot."""
    global _library, _failed
    if _library is not None or _failed:
        return _library
    try:
        lib = _load()
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


def int32_array(values: Iterable[int]) -> ctypes.Array:
    """A C ``int[]`` of ``values``."""
    values = list(values)
    return (ctypes.c_int * len(values))(*values)


def float_array(values: Iterable[float]) -> ctypes.Array:
    """A C ``float[]`` of ``values``."""
    values = list(values)
    return (ctypes.c_float * len(values))(*values)


def pointer_array(tensors: Iterable[torch.Tensor | None]) -> ctypes.Array:
    """A C array of the tensors' data pointers (``None``: a null pointer; the tensors must stay
    alive during the call)."""
    pointers = [None if t is None else t.data_ptr() for t in tensors]
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
