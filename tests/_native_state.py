"""Helpers for the tests of how lowmem.optim._native builds, caches and loads its kernels."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from lowmem.optim import _native


def new_process(mp: pytest.MonkeyPatch, cache: Path) -> None:
    """What library() sees in a new process using ``cache``: nothing loaded, nothing failed."""
    mp.setattr(_native, "_library", None)
    mp.setattr(_native, "_failed", False)
    mp.setenv("LOWMEM_CACHE_DIR", str(cache))


def library_files(folder: Path, suffix: str = ".so") -> list[Path]:
    """The built libraries in the cache ``folder``."""
    return sorted(folder.glob(f"lowmem_native_*{suffix}"))


def quiet_library():
    """library(), failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return _native.library()
