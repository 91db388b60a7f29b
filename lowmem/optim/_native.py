"""Hand-written CPU kernels (``_native_kernels.c``), compiled on first use and called via ctypes.

The fast path of HMAdam(W), AdamS, SlimAdamW, Adam-mini, AdaPM and IO-Adam for float32 contiguous CPU tensors
(other dtypes, layouts and devices take the other tiers of :mod:`lowmem.optim._dispatch`). Two
reasons, both measured at 50M parameters against ``torch.optim.AdamW(fused=True)`` on a 2-core
CPU, in scripts that interleave the two steps round by round:

- element-wise steps: one call and one parallel region for all tensors of a step, split as one
  range of elements with no barrier (torch's fused AdamW opens a region per tensor; a compiled
  call costs ~60 us of guards and wrappers). HMAdamW 0.74x and AdamS 0.65x, against 0.90x and
  0.78x for the Inductor kernels;
- SlimAdamW's column-compressed tensors, whose reduction Inductor walks column strip by strip
  (1.63x; the C kernel 0.79-0.92x).

The library is built with the C compiler Inductor itself needs on CPU (:func:`c_compiler`: ``$CC``,
else ``cc``, ``gcc`` or ``clang`` on ``PATH``; MSVC's ``cl`` is not supported), ``-O3 -march=native
-fopenmp``, into ``$LOWMEM_CACHE_DIR`` (default ``~/.cache/lowmem``, else ``<tmp>/lowmem-<uid>``) as
``lowmem_native_<key>_<sha256>`` with the platform's suffix (``.so``, ``.dylib``, ``.dll``), keyed by
a hash of the source, the flags used, the compiler's version and this CPU's feature flags; later
processes load the cached file (first build and load: ~0.3 s). It links the OpenMP runtime torch has
already loaded (``libgomp.so.1`` on Linux), so its threads are torch's OpenMP pool
(``torch.get_num_threads()`` of them).

A compiler that rejects ``-fopenmp`` (Apple clang without libomp) or ``-march=native`` (some clang
builds on arm64) gets retries: without ``-fopenmp``, then without ``-march=native``, then without
both (:data:`_RETRIES`). The kernels compute the same results single-threaded or for a generic
ISA, only slower, and :func:`library` warns once per process naming what was dropped. The reduced
build is cached under its own key and later processes look for the builds in the same order, so
they load it without retrying the rejected flags.

A cached file is code every training process runs, and ``<tmp>/lowmem-<uid>`` is a name anyone can
create first, so the cache is trusted only as far as it is private:

- the folder is created ``0o700``; one that exists owned by another user or writable by group or
  others is not used: the process builds in a fresh ``tempfile.mkdtemp()`` folder (removed at
  exit) and warns once;
- a file is loaded only if it is a regular file owned by this user, not writable by group or
  others, and its SHA-256 is the one in its name (written at build time); any other file is
  deleted and rebuilt;
- a build goes to a temp folder beside the cache and is ``os.replace``'d in, so a concurrent
  process never loads a half-written file;
- a cached file that will not load (``dlopen`` fails) or lacks a kernel is deleted and rebuilt
  once;
- where there is no ``os.getuid`` (Windows) the owner and mode checks are skipped: there are no
  POSIX owners, and the emulated mode bits mark everything writable as writable by all.

If there is no compiler lowmem can use, it accepts no flag set, or a fresh build will not load
either, :func:`library` warns once and returns ``None`` (it never raises); callers then use the
other tiers of :mod:`lowmem.optim._dispatch` (compiled, foreach). :func:`available` says which, for other modules.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PureWindowsPath
from typing import Any

import torch
from torch.autograd.graph import increment_version

from lowmem.optim._fast import local_tensor

__all__ = [
    "ADAM_SCALARS", "ELEMENTWISE", "available", "c_compiler", "check_status", "elementwise", "float_array",
    "int32_array", "int64_array", "library", "native_ok", "pointer_array",
]  # fmt: skip

SOURCE = Path(__file__).with_name("_native_kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# The flags a compiler may reject (Apple clang without libomp: -fopenmp; some clang builds on
# arm64: -march=native) and what a build without them costs.
_DROPPABLE = {"-fopenmp": "single-threaded kernels", "-march=native": "generic ISA, no code for this CPU's extensions"}
# The flag sets tried, in order, by what each drops from FLAGS.
_RETRIES = ((), ("-fopenmp",), ("-march=native",), ("-fopenmp", "-march=native"))
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
    # IO-Adam (lowmem.optim.ioadam): n, rows, cols, slots, slots2, w, g, m, a, bt, a2, bt2, m_decay, step_size, root,
    # 3 scalars, threads
    "lowmem_ioadam_f32": [ctypes.c_int, *[ctypes.POINTER(ctypes.c_int64)] * 4, *[ctypes.POINTER(ctypes.c_void_p)] * 7,
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


def _windows() -> bool:
    """Windows, native or Cygwin: DLLs, no ``-fPIC``, no separate libm."""
    return sys.platform in ("win32", "cygwin")


def _suffix() -> str:
    """This platform's shared-library suffix: ``.dll`` (Windows), ``.dylib`` (macOS), else ``.so``."""
    if _windows():
        return ".dll"
    return ".dylib" if sys.platform == "darwin" else ".so"


def _flags(dropped: Sequence[str]) -> list[str]:
    """:data:`FLAGS` without ``dropped``; on Windows also without ``-fPIC``: every DLL is
    position-independent there, and clang's MSVC target rejects the flag."""
    skip = {*dropped, *(["-fPIC"] if _windows() else [])}
    return [flag for flag in FLAGS if flag not in skip]


def c_compiler() -> str | None:
    """The C compiler lowmem builds with: ``$CC`` if set (its path; ``None`` if it is not an
    executable: a compiler the user named is never swapped for another), else the first of ``cc``,
    ``gcc``, ``clang`` on ``PATH``; ``None`` if none. Not tried: :func:`available` says whether it
    builds (MSVC's ``cl`` is returned, but lowmem cannot build with it)."""
    named = os.environ.get("CC")
    if named:
        return shutil.which(named)
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _usable_compiler() -> str:
    """:func:`c_compiler`, or a one-line RuntimeError saying why there is none lowmem can use."""
    compiler = c_compiler()
    if compiler is None and os.environ.get("CC"):
        raise RuntimeError(f"$CC={os.environ['CC']} is not an executable: set $CC to gcc or clang, or unset it")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH: install gcc or clang, or set $CC")
    if PureWindowsPath(compiler).stem.lower() in ("cl", "clang-cl"):  # either separator, any platform
        raise RuntimeError(f"{compiler} takes MSVC's options, which lowmem does not support: set $CC to gcc or clang")
    return compiler


def _cache_key(version: str, flags: Sequence[str]) -> str:
    """What the build depends on: the source, the flags used, the compiler's version, this CPU's features."""
    parts = [SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(), _cpu_flags().encode()]
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
    for path in sorted(folder.glob(f"lowmem_native_{key}_*{_suffix()}")):
        if _verified(path):
            return path
        path.unlink(missing_ok=True)  # missing_ok: a concurrent process may have deleted it first
    return None


def _first_error(stderr: str) -> str:
    """The compiler's first error line (else its last line), for a one-line message."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "no output")[:300]


def _build(compiler: str, flags: Sequence[str], folder: Path, key: str) -> Path:
    """Compile with ``flags`` into a temp folder beside the cache, then ``os.replace`` the file in
    under its SHA-256: atomic, so a concurrent process never loads a half-written file. ``chmod
    0o700``: the umask (e.g. ``002``) must not leave it group-writable, which :func:`_verified`
    refuses. No ``-lm`` on Windows: the maths is in the C runtime there."""
    suffix = _suffix()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / f"lowmem_native{suffix}"
        libm = [] if _windows() else ["-lm"]
        command = [compiler, *flags, str(SOURCE), "-o", str(built), *libm]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} {' '.join(flags)} failed: {_first_error(result.stderr)}")
        built.chmod(0o700)
        target = folder / f"lowmem_native_{key}_{_sha256(built)}{suffix}"
        os.replace(built, target)
    return target


def _build_first(
    compiler: str, folder: Path, candidates: Sequence[tuple[tuple[str, ...], str]]
) -> tuple[Path, tuple[str, ...]]:
    """Build with the first of ``candidates`` (what it drops, its cache key) the compiler accepts;
    return the file and what was dropped. RuntimeError (the last failure) if it accepts none."""
    for dropped, key in candidates:
        try:
            return _build(compiler, _flags(dropped), folder, key), dropped
        except RuntimeError as err:
            failure = err
    raise failure


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


def _load() -> tuple[ctypes.CDLL, tuple[str, ...]]:
    """The bound library and the flags its build dropped. The cached build of the first flag set
    (in :data:`_RETRIES` order) that has one, if it verifies, loads and has every kernel; else (none,
    corrupt, foreign) a fresh build with the first flag set the compiler accepts. A reduced build
    is cached under its own key, so later processes load it without retrying the rejected flags.
    One rebuild at most: a compiler whose output will not load fails once, in :func:`library`,
    instead of rebuilding forever."""
    compiler = _usable_compiler()
    # first: a broken compiler fails before any folder is made
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    candidates = [(dropped, _cache_key(version, _flags(dropped))) for dropped in _RETRIES]
    folder = _cache_dir()
    for dropped, key in candidates:
        cached = _cached(folder, key)
        if cached is None:
            continue
        try:
            return _bind(cached), dropped
        except OSError:
            cached.unlink(missing_ok=True)
            break
    path, dropped = _build_first(compiler, folder, candidates)
    return _bind(path), dropped


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; ``None`` (after one warning) if it cannot.
    A build with reduced flags loads, with one warning naming what was dropped and what it costs."""
    global _library, _failed
    if _library is not None or _failed:
        return _library
    try:
        lib, dropped = _load()
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _failed = True
        warnings.warn(
            f"lowmem: the native CPU kernels could not be built or loaded ({err}); the optimizers' fast paths "
            "use their torch.compile'd kernels or for-loops instead (slower).",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    if dropped:
        costs = " and ".join(f"{flag} ({_DROPPABLE[flag]})" for flag in dropped)
        warnings.warn(
            f"lowmem: the native CPU kernels are built without {costs}, which the C compiler rejected. "
            "Fix: set $CC to a compiler that accepts it (e.g. gcc).",
            RuntimeWarning,
            stacklevel=2,
        )
    _library = lib
    return lib


def available() -> bool:
    """Whether the native kernels can be used here (:func:`library` is not ``None``; builds them if needed)."""
    return library() is not None


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
