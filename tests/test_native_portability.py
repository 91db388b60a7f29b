"""The native kernels (lowmem.optim._native) build, or fall back cleanly, wherever there is a C
compiler of some kind: a compiler that rejects -fopenmp or -march=native gets a reduced build that
computes what the full one does; one that builds nothing, or none at all, gives ``library() is
None`` after one warning; the file's suffix follows the platform.

"Another compiler" is the real one behind a shell script that rejects some flags, as Apple clang
without libomp rejects -fopenmp and some arm64 clang builds reject -march=native.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from _native_state import library_files, new_process, quiet_library
import torch

from lowmem.optim import _native

THREADS = 2  # the full build splits its work in two; the single-threaded one must cover it all
# param_decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps
ADAM = (0.999, 0.1, 0.9, 0.1, 1e-3, 0.5, 1e-8)
SIZES = [1000, 37, 4099]


def _script(tmp_path: Path, body: str) -> Path:
    """An executable shell script ``tmp_path/"fake-cc"`` running ``body``."""
    path = tmp_path / "fake-cc"
    path.write_text(f"#!/bin/sh\n{body}")
    path.chmod(0o700)
    return path


def _log(tmp_path: Path) -> list[str]:
    """The flags of each build the fake compiler was asked for, in order."""
    path = tmp_path / "builds.log"
    return path.read_text().splitlines() if path.exists() else []


def _rejecting_cc(tmp_path: Path, rejects: Sequence[str]) -> Path:
    """The real compiler, except that it exits 1 when given any flag of ``rejects``."""
    real = _native.c_compiler()
    checks = "".join(
        f'    [ "$arg" = "{flag}" ] && {{ echo "fake-cc: error: unsupported option \'{flag}\'" >&2; exit 1; }}\n'
        for flag in rejects
    )
    return _script(tmp_path, f"""[ "$1" = "--version" ] && exec "{real}" --version
echo "$*" >> "{tmp_path / "builds.log"}"
for arg in "$@"; do
{checks}done
exec "{real}" "$@"
""")


# ------------------------------------------------------------------ the kernels, run on a library
def _adamw(lib, gen) -> list[torch.Tensor]:
    """Element-wise (FOR_EACH_SHARE): one range of elements split across the threads, across tensors."""
    w, g, m, v = ([torch.randn(n, generator=gen) for n in SIZES] for _ in range(4))
    v = [t.abs() for t in v]
    tensors = (w, g, m, v)
    status = lib.lowmem_adamw_f32(len(SIZES), _native.int64_array(SIZES), *map(_native.pointer_array, tensors), *ADAM,
                                  THREADS)  # fmt: skip
    _native.check_status(status, "adamw")
    return [*w, *m, *v]


def _slim(lib, gen) -> list[torch.Tensor]:
    """The rows kernel (parallel for) and the cols kernel (per-thread column sums over hand-split
    rows, a barrier, a worksharing loop)."""
    rows, cols = 101, 33
    out = []
    for kernel, moments in ((lib.lowmem_slim_rows_f32, rows), (lib.lowmem_slim_cols_f32, cols)):
        w, g, m = (torch.randn(rows, cols, generator=gen) for _ in range(3))
        v = torch.rand(moments, generator=gen)
        _native.check_status(kernel(rows, cols, *(t.data_ptr() for t in (w, g, m, v)), *ADAM, THREADS), "slim")
        out += [w, m, v]
    return out


def _fanout(lib, gen) -> list[torch.Tensor]:
    """Both paths: runs per fan-out index (inner > 1) and per-thread column sums (inner = 1)."""
    out = []
    for outer, n, inner in ((6, 17, 9), (50, 17, 1)):
        g, means = torch.randn(outer, n, inner, generator=gen), torch.empty(n)
        _native.check_status(lib.lowmem_fanout_mean_sq_f32(outer, n, inner, g.data_ptr(), means.data_ptr(), THREADS),
                             "fanout")  # fmt: skip
        out.append(means)
    return out


def _power_sum(lib, gen) -> list[torch.Tensor]:
    """Per-thread float block sums added in double (2^20 elements or more: below, one thread)."""
    rows, cols = 1100, 1000
    x, sums = torch.randn(rows, cols, generator=gen), torch.empty(cols)
    _native.check_status(lib.lowmem_power_sum_f32(rows, cols, x.data_ptr(), 2.0, sums.data_ptr(), THREADS), "sum")
    return [sums]


def _ioadam(lib, gen) -> list[torch.Tensor]:
    """Rows split across the threads by elements; tiles of 64 columns (AVX + FMA with
    -march=native on x86) and a remainder; the second weight tied (a second factor pair)."""
    shapes = [(13, 70, 4, 0), (5, 130, 3, 2)]  # rows, cols, slots, slots of the second pair
    w, g, m = ([torch.randn(r, c, generator=gen) for r, c, _, _ in shapes] for _ in range(3))
    a = [torch.rand(r, b, generator=gen) for r, _, b, _ in shapes]
    bt = [torch.rand(b, c, generator=gen) for _, c, b, _ in shapes]
    a2 = [torch.rand(r, b2, generator=gen) if b2 else None for r, _, _, b2 in shapes]
    bt2 = [torch.rand(b2, c, generator=gen) if b2 else None for _, c, _, b2 in shapes]
    rows, cols, slots, slots2 = (_native.int64_array(s[k] for s in shapes) for k in range(4))
    status = lib.lowmem_ioadam_f32(len(shapes), rows, cols, slots, slots2,
                                   *map(_native.pointer_array, (w, g, m, a, bt, a2, bt2)),
                                   _native.float_array([0.9, 0.95]), _native.float_array([1e-3, 2e-3]),
                                   _native.int32_array([1, 0]), 0.999, 0.1, 1e-8, THREADS)  # fmt: skip
    _native.check_status(status, "ioadam")
    return [*w, *m]


def _run_kernels(lib) -> list[torch.Tensor]:
    """Every output of the kernels above on the same random inputs."""
    gen = torch.Generator().manual_seed(0)
    return [t for case in (_adamw, _slim, _fanout, _power_sum, _ioadam) for t in case(lib, gen)]


# ------------------------------------------------------------------------------ reduced flags
@pytest.mark.parametrize("rejects", [("-fopenmp",), ("-march=native",), ("-fopenmp", "-march=native")])
def test_a_rejected_flag_is_dropped_with_one_warning_same_results(monkeypatch, tmp_path, native_build, rejects):
    monkeypatch.setenv("CC", str(_rejecting_cc(tmp_path, rejects)))
    new_process(monkeypatch, tmp_path / "cache")
    with pytest.warns(RuntimeWarning, match="native CPU kernels are built without") as caught:
        lib = _native.library()
        assert _native.library() is lib
    assert lib is not None and len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message
    for flag, cost in _native._DROPPABLE.items():
        assert (flag in message) == (flag in rejects) and (cost in message) == (flag in rejects)
    builds = _log(tmp_path)  # the flag sets in order, up to the first the compiler accepts
    assert len(builds) == _native._RETRIES.index(rejects) + 1
    assert not any(flag in builds[-1].split() for flag in rejects)
    (path,) = library_files(tmp_path / "cache")
    assert path.name != native_build.name  # its own cache key: the flags used
    if "-fopenmp" in rejects:  # really built without OpenMP: no calls into libgomp or libomp
        assert b"GOMP_" not in path.read_bytes() and b"__kmpc_" not in path.read_bytes()

    full = _native._bind(native_build)
    for reduced, expected in zip(_run_kernels(lib), _run_kernels(full), strict=True):
        torch.testing.assert_close(reduced, expected, rtol=1e-6, atol=1e-7)


def test_a_reduced_build_is_loaded_from_the_cache_without_retrying(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(_rejecting_cc(tmp_path, ["-fopenmp"])))
    for process in range(2):
        new_process(monkeypatch, tmp_path / "cache")
        with pytest.warns(RuntimeWarning, match="without -fopenmp") as caught:
            assert _native.library() is not None
        assert len(caught) == 1  # each process warns: each runs single-threaded kernels
        assert len(_log(tmp_path)) == 2  # the second process compiled nothing
        assert len(library_files(tmp_path / "cache")) == 1


# -------------------------------------------------------------------- nothing builds: no library
@pytest.mark.parametrize("compiler", ["fails every build", "fails even --version", "does not exist"])
def test_a_compiler_that_builds_nothing_gives_none_with_one_warning(monkeypatch, tmp_path, compiler):
    fail = 'echo "fake-cc: error: cannot compile" >&2; exit 1\n'
    if compiler == "fails every build":
        cc = _script(tmp_path, f'[ "$1" = "--version" ] && {{ echo "fake-cc 1.0"; exit 0; }}\n'
                               f'echo "$*" >> "{tmp_path / "builds.log"}"\n{fail}')  # fmt: skip
    elif compiler == "fails even --version":
        cc = _script(tmp_path, fail)
    else:
        cc = tmp_path / "no-such-cc"
    monkeypatch.setenv("CC", str(cc))
    new_process(monkeypatch, tmp_path / "cache")
    with pytest.warns(RuntimeWarning, match="native CPU kernels could not be built or loaded") as caught:
        assert _native.library() is None
        assert _native.library() is None
        assert not _native.available()
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert len(_log(tmp_path)) == (len(_native._RETRIES) if compiler == "fails every build" else 0)
    if compiler == "does not exist":
        assert _native.c_compiler() is None and "is not an executable" in str(caught[0].message)
    assert not list((tmp_path / "cache").glob("**/lowmem_native*"))  # nothing built, nothing left behind


# ----------------------------------------------------------------------------------- platforms
@pytest.mark.parametrize(
    "platform, suffix", [("linux", ".so"), ("freebsd14", ".so"), ("darwin", ".dylib"), ("win32", ".dll"),
                         ("cygwin", ".dll")],
)  # fmt: skip
def test_the_library_suffix_and_flags_follow_the_platform(monkeypatch, platform, suffix):
    monkeypatch.setattr(sys, "platform", platform)
    assert _native._suffix() == suffix
    flags = _native._flags(())
    assert ("-fPIC" in flags) == (suffix != ".dll") and "-fopenmp" in flags and "-march=native" in flags


def test_a_macos_named_build_is_verified_and_reloaded_from_the_cache(monkeypatch, tmp_path):
    """The platform decides the name only (the file is this platform's): the glob and the
    SHA-256 check must find it under ``.dylib``."""
    monkeypatch.setattr(sys, "platform", "darwin")
    cache = tmp_path / "cache"
    new_process(monkeypatch, cache)
    assert quiet_library() is not None
    (path,) = library_files(cache, ".dylib")
    assert path.name.endswith(f"_{_native._sha256(path)}.dylib") and not library_files(cache)
    inode = path.stat().st_ino
    new_process(monkeypatch, cache)
    assert quiet_library() is not None
    assert library_files(cache, ".dylib") == [path] and path.stat().st_ino == inode


@pytest.mark.parametrize("found, why", [("nothing", "no C compiler"), ("MSVC cl", "takes MSVC's options")])
def test_windows_without_gcc_or_clang_gives_none_with_one_warning(monkeypatch, tmp_path, found, why):
    monkeypatch.setattr(sys, "platform", "win32")
    cl = r"C:\Program Files\Microsoft Visual Studio\VC\bin\cl.exe"
    if found == "MSVC cl":
        monkeypatch.setenv("CC", "cl")
        monkeypatch.setattr(shutil, "which", lambda name: cl if name == "cl" else None)
    else:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setattr(shutil, "which", lambda name: None)
    new_process(monkeypatch, tmp_path / "cache")
    with pytest.warns(RuntimeWarning, match=f"could not be built or loaded \\(.*{why}.*gcc or clang") as caught:
        assert _native.library() is None
        assert _native.library() is None
    assert len(caught) == 1
    assert _native.c_compiler() == (cl if found == "MSVC cl" else None)


# ------------------------------------------------------------------------------- the public probe
def test_c_compiler_is_the_named_one_else_the_first_on_path(monkeypatch, tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name in ("gcc", "clang"):
        (bin_ / name).write_text("#!/bin/sh\n")
        (bin_ / name).chmod(0o700)
    monkeypatch.setenv("PATH", str(bin_))
    monkeypatch.delenv("CC", raising=False)
    assert _native.c_compiler() == str(bin_ / "gcc")  # no cc: gcc before clang
    monkeypatch.setenv("CC", "clang")
    assert _native.c_compiler() == str(bin_ / "clang")
    monkeypatch.setenv("CC", "cc")
    assert _native.c_compiler() is None  # the named one or nothing: never another
    monkeypatch.setenv("CC", "")
    assert _native.c_compiler() == str(bin_ / "gcc")  # an empty $CC is unset


def test_available_is_whether_the_library_loads(monkeypatch, tmp_path, native_build):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    shutil.copy2(native_build, cache / native_build.name)
    new_process(monkeypatch, cache)
    assert _native.available() and _native.library() is not None
