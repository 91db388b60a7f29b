"""Datasets that outgrow memory: write any map-style dataset of tensor tuples to litdata chunks
and stream it back during training.

    python -m lowmem.lightning_modules.streaming digits data/digits     # or: text, with --max_bytes
    lowmem fit --config configs/cnn_adamw.yaml \\
        --data=lowmem.lightning_modules.StreamingDataModule --data.init_args.root=data/digits

``write_chunks`` stores each sample ``(x, y, ...)`` as ``{"0": x, "1": y, ...}`` in
``root/{train,val}`` (``litdata.optimize``, one worker, local files only: nothing leaves the
machine). ``StreamingDataModule`` reads them with ``litdata.StreamingDataset``, which keeps only a
few chunks in memory, shards across DDP ranks itself and drops the uneven tail (an uneven last
batch would deadlock DDP).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset

__all__ = ["StreamingDataModule", "write_chunks"]


def _sample(dataset: Dataset, index: int) -> dict[str, Any]:
    return {str(i): value for i, value in enumerate(dataset[index])}


def write_chunks(dataset: Dataset, output_dir: str | Path, chunk_bytes: str = "16MB") -> Path:
    """Write ``dataset`` (items: tuples of tensors/ints) as litdata chunks into ``output_dir``."""
    import litdata

    output_dir = Path(output_dir).resolve()
    litdata.optimize(fn=functools.partial(_sample, dataset), inputs=list(range(len(dataset))),
                     output_dir=str(output_dir), chunk_bytes=chunk_bytes, num_workers=1, mode="overwrite")  # fmt: skip
    return output_dir


def _as_tuple(item: dict[str, Any]) -> tuple:
    return tuple(item[str(i)] for i in range(len(item)))


def _collate(items: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    columns = zip(*(_as_tuple(item) for item in items))
    return tuple(torch.stack([torch.as_tensor(v) for v in col]) for col in columns)


class StreamingDataModule(pl.LightningDataModule):
    """Batches streamed from litdata chunks written by :func:`write_chunks`.

    Args:
        root: directory holding ``train/`` and ``val/`` chunk directories.
        batch_size: samples per batch (per device under DDP).
        seed: seed of litdata's shuffle of the training stream.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, root: str, batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        for split in ("train", "val"):
            if not (Path(root) / split / "index.json").is_file():
                raise ValueError(
                    f"no litdata chunks in {Path(root) / split}; write them first with "
                    f"`python -m lowmem.lightning_modules.streaming digits {root}` (or write_chunks())"
                )
        self.root, self.batch_size, self.seed, self.num_workers = Path(root), batch_size, seed, num_workers

    def _loader(self, split: str, shuffle: bool) -> Any:
        import litdata

        dataset = litdata.StreamingDataset(str(self.root.resolve() / split), shuffle=shuffle, seed=self.seed, drop_last=True)
        return litdata.StreamingDataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                           collate_fn=_collate)  # fmt: skip

    def train_dataloader(self) -> Any:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> Any:
        return self._loader("val", shuffle=False)


TEXT_BLOCK_SIZE = 64  # the lm configs' block_size: chunks written by default train with them


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a built-in data set as litdata chunks.")
    parser.add_argument("dataset", choices=["digits", "text"])
    parser.add_argument("root", help="output directory (gets train/ and val/)")
    parser.add_argument("--block_size", type=int, default=TEXT_BLOCK_SIZE,
                        help=f"text: tokens per window (default {TEXT_BLOCK_SIZE}, the block size of configs/lm_*.yaml)")  # fmt: skip
    parser.add_argument("--max_bytes", type=int, default=1_000_000, help="text: corpus size")
    args = parser.parse_args(argv)
    if args.dataset == "digits":
        from lowmem.lightning_modules.digits import DigitsDataModule

        dm = DigitsDataModule()
    else:
        from lowmem.lightning_modules.text import StdlibTextDataModule

        dm = StdlibTextDataModule(block_size=args.block_size, max_bytes=args.max_bytes)
    dm.setup()
    for split in ("train", "val"):
        print(f"wrote {write_chunks(dm.splits[split], Path(args.root) / split)}")


if __name__ == "__main__":
    _main()
