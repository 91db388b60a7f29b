"""Writing a prepared dataset atomically, with a progress bar and a one-line summary.

:class:`PreparedOutput` writes into ``<out>.partial-<pid>`` (a sibling of ``out``), writes the
manifest last and renames the folder to ``out`` only when everything is written; on an error or
Ctrl-C the partial folder is removed. A process killed outright leaves the partial folder, which
has another name and no manifest, so it is never read as a finished dataset.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from lowmem.data.chunks import CHUNK_BYTES, ChunkStats, write_chunks
from lowmem.data.manifest import MANIFEST_NAME, DataError, Manifest, write_manifest

__all__ = ["PreparedOutput", "progress"]

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[T]:
    """``items`` with a tqdm bar on stderr when stderr is a terminal (and tqdm is installed);
    otherwise ``items`` silently (logs and pipes get only the summary line)."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return iter(tqdm(items, total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False,
                             file=sys.stderr, dynamic_ncols=True))  # fmt: skip
    return iter(items)


class PreparedOutput:
    """Context manager: a temporary folder to write splits into, renamed to ``out`` by :meth:`finish`.

    Args:
        out: the dataset folder to create.
        overwrite: replace an existing prepared dataset at ``out`` (an empty folder is used
            without it; any other existing folder is an error, never deleted).
        show_progress: progress bars on a terminal.
    """

    def __init__(self, out: str | Path, overwrite: bool = False, show_progress: bool = True) -> None:
        self.out = Path(out).absolute()
        self.show_progress = show_progress
        self.started = time.perf_counter()
        self.stats: dict[str, ChunkStats] = {}
        if self.out.exists():
            if not self.out.is_dir():
                raise DataError(f"--out {out} is a file; give a folder path for the prepared dataset")
            empty = not any(self.out.iterdir())
            if not empty and not overwrite:
                raise DataError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
            if not empty and not (self.out / MANIFEST_NAME).is_file():
                raise DataError(f"--out {out} exists and is not a prepared dataset (no {MANIFEST_NAME}); refusing to "
                                "replace it: remove it yourself or choose another --out")  # fmt: skip
        if self.out.parent.exists() and not self.out.parent.is_dir():
            raise DataError(f"--out {out}: {self.out.parent} is a file; give a folder path for the prepared dataset")
        self.out.parent.mkdir(parents=True, exist_ok=True)  # as mkdir -p: data/photos in a fresh checkout
        self.path = self.out.with_name(f"{self.out.name}.partial-{os.getpid()}")

    def __enter__(self) -> PreparedOutput:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.path.exists():  # not renamed: an error or an interrupt
            shutil.rmtree(self.path, ignore_errors=True)

    def write_split(
        self, split: str, samples: Iterable[Any], total: int, desc: str, chunk_bytes: str = CHUNK_BYTES
    ) -> ChunkStats:
        """Write one split's samples (``total`` of them, for the bar) as chunks into ``<tmp>/<split>``."""
        bar = progress(samples, total, desc, enabled=self.show_progress)
        self.stats[split] = write_chunks(bar, self.path / split, chunk_bytes)
        return self.stats[split]

    def finish(self, manifest: Manifest) -> Manifest:
        """Fill in the counts, write the manifest, and move the folder to ``out`` (replacing an
        old dataset there); returns the manifest as written."""
        manifest.splits = {split: s.items for split, s in self.stats.items()}
        manifest.chunks = {split: s.chunks for split, s in self.stats.items()}
        manifest.bytes = sum(s.bytes for s in self.stats.values())
        write_manifest(self.path, manifest)
        old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
        if self.out.exists():
            os.rename(self.out, old)
        os.rename(self.path, self.out)
        shutil.rmtree(old, ignore_errors=True)
        return manifest

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def summary(self, manifest: Manifest, what: str) -> str:
        """``lowmem data: wrote <what> to OUT: N train + M val items, B bytes in C chunks, S s``."""
        s = manifest.splits
        return (f"lowmem data: wrote {what} to {self.out}: {s['train']} train + {s['val']} val items, "
                f"{manifest.bytes:,} bytes in {sum(manifest.chunks.values())} chunks, {self.seconds():.2f} s")  # fmt: skip
