"""litdata chunks: write samples in this process, read them back by index.

Writing uses litdata's ``BinaryWriter`` directly, in this process: ``litdata.optimize`` would
start a worker process (which re-imports everything), switch the global multiprocessing start
method to ``spawn`` and print an account prompt and raw-escape-code progress bars.

Each sample ``(x, y, ...)`` is stored as ``{"0": x, "1": y, ...}`` (tensors keep dtype and shape,
ints stay ints). :class:`ChunkedSplit` reads one split folder as a map-style dataset through
``litdata.StreamingDataset`` (items are read from the chunk files on demand, one at a time, never
the whole split), so any sampler can order it, e.g. ``ResumableSampler`` for exact resume and
DDP sharding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["ChunkStats", "ChunkedSplit", "decode_images", "decode_samples", "decode_text", "write_chunks"]

CHUNK_BYTES = "16MB"


@dataclass
class ChunkStats:
    """What :func:`write_chunks` wrote: the folder, samples, chunk files and their bytes."""

    path: Path
    items: int
    chunks: int
    bytes: int


def _samples(data: Any) -> Iterable[Any]:
    """A map-style dataset (``len`` and ``[i]``) item by item; any other iterable as it is."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return (data[i] for i in range(len(data)))
    return data


def write_chunks(samples: Iterable[Any], output_dir: str | Path, chunk_bytes: str | int = CHUNK_BYTES) -> ChunkStats:
    """Write ``samples`` (tuples of tensors/ints, or a map-style dataset of them) as litdata
    chunks of at most ``chunk_bytes`` (e.g. ``"16MB"``) plus ``index.json`` into ``output_dir``."""
    from litdata.streaming.writer import BinaryWriter

    output_dir = Path(output_dir).resolve()
    writer = BinaryWriter(str(output_dir), chunk_bytes=chunk_bytes)
    count = 0
    for count, sample in enumerate(_samples(samples), start=1):
        writer[count - 1] = {str(i): value for i, value in enumerate(sample)}
    writer.done()
    writer.merge()
    files = [p for p in output_dir.iterdir() if p.suffix == ".bin"]
    return ChunkStats(output_dir, count, len(files), sum(p.stat().st_size for p in files))


def decode_samples(item: dict[str, Any]) -> tuple:
    """A stored sample as written: ``(item["0"], item["1"], ...)``."""
    return tuple(item[str(i)] for i in range(len(item)))


def decode_images(item: dict[str, Any], pixel_format: str = "uint8") -> tuple[torch.Tensor, int]:
    """(image float32 (C, H, W) in [-1, 1], label): uint8 pixels p become p / 127.5 - 1."""
    image = item["0"]
    if pixel_format == "uint8":
        image = image.float().div_(127.5).sub_(1.0)
    return image, item["1"]


def decode_text(item: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 (block_size,) from a stored block of block_size + 1 tokens: y is x shifted by one."""
    block = item["0"].long()
    return block[:-1], block[1:]


class ChunkedSplit(Dataset):
    """One split folder of litdata chunks as a map-style dataset, decoded by ``decode``.

    The litdata reader is opened on first access in each process (DataLoader workers open their
    own); the length comes from ``index.json``.
    """

    def __init__(self, directory: str | Path, decode: Callable[[dict[str, Any]], Any] = decode_samples) -> None:
        self.directory = Path(directory).resolve()
        self.decode = decode
        index = json.loads((self.directory / "index.json").read_text())
        self._len = sum(chunk["chunk_size"] for chunk in index["chunks"])
        self._reader: Any = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} samples in {self.directory}")
        if self._reader is None:
            import litdata

            # batch_decode=False: decode the one item asked for (litdata's default decodes a run
            # of neighbours, ~10x slower for shuffled access).
            self._reader = litdata.StreamingDataset(str(self.directory), batch_decode=False)
        return self.decode(self._reader[int(index)])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}
