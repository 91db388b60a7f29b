"""The native kernels' on-disk cache (lowmem.optim._native): only a private folder is used, only a
file that verifies is loaded, and a corrupt or foreign file is rebuilt once, never raised.

The kernels are built once per module (~0.3 s) and copied into each test's cache: a copy, at a new
path, because dlopen hands back the library it already loaded for a path it has seen, which would
hide what a new process finds on disk. "Another user" is simulated (folder modes, a shifted
``os.getuid``): the tests need no second account.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from _native_state import library_files, new_process, quiet_library

from lowmem.optim import _native

# A valid shared library without the kernels; its constructor creates $LOWMEM_TEST_MARKER, so a
# test can tell whether it ever ran.
FOREIGN_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void mark(void) {
    const char *path = getenv("LOWMEM_TEST_MARKER");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) fclose(f);
}
int lowmem_unrelated(void) { return 0; }
"""
NOT_PRIVATE = r"kernel cache .* is owned by another user or writable by group/others.*Fix: chown"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """A shared library with no kernels (see FOREIGN_C)."""
    folder = tmp_path_factory.mktemp("foreign")
    (folder / "foreign.c").write_text(FOREIGN_C)
    command = [_native.c_compiler(), "-shared", "-fPIC", str(folder / "foreign.c"), "-o", str(folder / "foreign.so")]
    subprocess.run(command, check=True, capture_output=True)
    return folder / "foreign.so"


@pytest.fixture
def cache(monkeypatch, tmp_path, native_build) -> Path:
    """A new process's private cache holding a copy of the build; temp folders (mkdtemp's fallback,
    ``<tmp>/lowmem-<uid>``) go under ``tmp_path/"tmp"``, and the marker to ``tmp_path/"marker"``."""
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    shutil.copy2(native_build, folder / native_build.name)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("LOWMEM_TEST_MARKER", str(tmp_path / "marker"))
    new_process(monkeypatch, folder)
    return folder


def _plant(folder: Path, content: bytes, *, hash_in_name: bool) -> Path:
    """Replace the cached build by ``content``: under the build's own name (its hash no longer
    matches) or under the name that carries the content's SHA-256 (the hash check passes)."""
    (path,) = library_files(folder)
    if hash_in_name:
        path.unlink()
        path = path.with_name(f"{path.stem.rsplit('_', 1)[0]}_{hashlib.sha256(content).hexdigest()}.so")
    path.write_bytes(content)
    path.chmod(0o700)
    return path


def _assert_kernels(lib) -> None:
    assert lib is not None
    for name, argtypes in _native._SIGNATURES.items():
        assert list(getattr(lib, name).argtypes) == argtypes


# ------------------------------------------------------------------------ what stays as it was
def test_a_verified_cached_library_is_loaded_as_is(cache, native_build):
    (path,) = library_files(cache)
    inode = path.stat().st_ino
    _assert_kernels(quiet_library())
    assert sorted(cache.iterdir()) == [path] and path.stat().st_ino == inode  # not rebuilt, nothing beside it
    assert path.name == native_build.name  # the cache key: same source, flags, compiler, CPU


def test_new_cache_folder_and_library_are_private_whatever_the_umask(monkeypatch, tmp_path):
    folder = tmp_path / "new" / "cache"
    new_process(monkeypatch, folder)
    old = os.umask(0o002)  # a common default (user private groups): group-writable files
    try:
        _assert_kernels(quiet_library())
        (path,) = library_files(folder)
        inode = path.stat().st_ino
        new_process(monkeypatch, folder)
        _assert_kernels(quiet_library())
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o077 == 0
    assert path.stat().st_mode & 0o022 == 0 and path.stat().st_ino == inode  # the next process reuses it
    assert path.name.endswith(f"_{_sha256(path)}.so")


# ----------------------------------------------------------------- folders others can change
@pytest.mark.parametrize("problem", ["group-writable", "world-writable", "another user's"])
def test_a_cache_folder_others_can_change_is_not_used(cache, foreign, monkeypatch, tmp_path, problem):
    _plant(cache, foreign.read_bytes(), hash_in_name=True)  # would pass the file checks
    if problem == "another user's":
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    else:
        cache.chmod(0o770 if problem == "group-writable" else 0o777)
    before = sorted(cache.iterdir())
    with pytest.warns(RuntimeWarning, match=NOT_PRIVATE) as caught:
        _assert_kernels(_native.library())
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert not (tmp_path / "marker").exists()  # the planted library never ran
    assert sorted(cache.iterdir()) == before  # nothing read, written or deleted there
    assert len(list((tmp_path / "tmp").glob("lowmem-*/lowmem_native_*.so"))) == 1  # built in a fresh folder
    _assert_kernels(quiet_library())  # warned once


def test_a_planted_predictable_temp_folder_is_not_used(cache, foreign, monkeypatch, tmp_path):
    """Home not writable: the fallback ``<tmp>/lowmem-<uid>``, which anyone can create first."""
    (tmp_path / "file").touch()
    monkeypatch.delenv("LOWMEM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))  # under a file: mkdir fails
    planted = tmp_path / "tmp" / f"lowmem-{os.getuid()}"
    shutil.copytree(cache, planted)
    _plant(planted, foreign.read_bytes(), hash_in_name=True)
    planted.chmod(0o777)
    before = sorted(planted.iterdir())
    with pytest.warns(RuntimeWarning, match=NOT_PRIVATE):
        _assert_kernels(_native.library())
    assert not (tmp_path / "marker").exists()
    assert sorted(planted.iterdir()) == before


@pytest.mark.parametrize("configured", ["LOWMEM_CACHE_DIR", "temp fallback"])
def test_without_getuid_the_ownership_check_is_skipped(cache, monkeypatch, tmp_path, configured):
    """Windows: no os.getuid, no POSIX owners; its emulated modes must not reject every folder."""
    monkeypatch.delattr(os, "getuid")
    if configured == "LOWMEM_CACHE_DIR":
        cache.chmod(0o777)
    else:
        (tmp_path / "file").touch()
        monkeypatch.delenv("LOWMEM_CACHE_DIR")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    _assert_kernels(quiet_library())
    folder = cache if configured == "LOWMEM_CACHE_DIR" else tmp_path / "tmp" / "lowmem"
    assert len(library_files(folder)) == 1


# ----------------------------------------------------------------- files that must not load
@pytest.mark.parametrize(
    "content, hash_in_name",
    [("garbage", False), ("truncated", False), ("foreign", False), ("garbage", True), ("foreign", True)],
    ids=["garbage", "truncated", "foreign", "garbage, hash matches", "foreign, hash matches"],
)
def test_a_corrupt_or_foreign_cached_library_is_rebuilt(cache, native_build, foreign, tmp_path, content, hash_in_name):
    """Hash mismatch: refused unread (a truncated ELF must never reach dlopen, which can kill the
    process with SIGBUS). Hash matches, so the file came from a build: dlopen fails, or a kernel is
    missing. Either way it is deleted and rebuilt once, quietly."""
    data = {"garbage": b"\x7fELF not really" * 64, "truncated": native_build.read_bytes()[:4096],
            "foreign": foreign.read_bytes()}[content]  # fmt: skip
    _plant(cache, data, hash_in_name=hash_in_name)
    _assert_kernels(quiet_library())
    (path,) = library_files(cache)  # the bad file is gone
    assert path.name.endswith(f"_{_sha256(path)}.so") and path.read_bytes() != data
    if not hash_in_name:
        assert not (tmp_path / "marker").exists()  # refused by its hash, never loaded


def test_a_cached_library_whose_permissions_others_can_change_is_rebuilt(cache):
    (path,) = library_files(cache)
    path.chmod(0o777)
    inode = path.stat().st_ino
    _assert_kernels(quiet_library())
    (rebuilt,) = library_files(cache)
    assert rebuilt.stat().st_ino != inode and rebuilt.stat().st_mode & 0o022 == 0


def test_a_rebuild_that_fails_again_warns_once_and_returns_none(cache, foreign, monkeypatch, tmp_path):
    """A compiler whose output has no kernels: each process builds once, warns once, and the
    optimizers take their fallbacks; nothing raises and nothing loops."""
    log = tmp_path / "builds.log"
    fake = tmp_path / "fake-cc"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "--version" ]; then echo "fake-cc 1.0"; exit 0; fi
echo build >> "{log}"
while [ $# -gt 0 ]; do
    if [ "$1" = "-o" ]; then cp "{foreign}" "$2"; fi
    shift
done
""")
    fake.chmod(0o700)
    monkeypatch.setenv("CC", str(fake))
    for process in range(2):  # the second finds the first's (verified) build, loads it, rebuilds once
        new_process(monkeypatch, cache)
        with pytest.warns(RuntimeWarning, match="could not be built or loaded.*has no kernel") as caught:
            assert _native.library() is None
            assert _native.library() is None
        assert len(caught) == 1
        assert log.read_text().count("build") == process + 1
