"""A byte-level text corpus that is on every machine: the Python standard library's own source.

The corpus is the concatenation of the top-level ``*.py`` files of the running interpreter's
standard library, in sorted order, cut at ``max_bytes``; tokens are bytes (vocabulary 256), so
nothing is downloaded or built. The last ``val_fraction`` of the bytes is the validation split
(and the test split), cut into non-overlapping windows of ``block_size + 1`` tokens. The training
order comes from ``ResumableSampler`` (exact resume, DDP sharding; see ``sampling``).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lowmem.lightning_modules.sampling import ResumableSampler
from lowmem.lightning_modules.validation import (
    DATA,
    check_a_batch_per_rank,
    check_fraction,
    check_int,
    check_nonnegative_int,
    check_positive_int,
    check_seed,
    config_error,
)

__all__ = ["StdlibTextDataModule", "TokenWindows", "stdlib_corpus"]

_MIN_BYTES = 10_000  # stdlib_corpus refuses a smaller corpus


def stdlib_corpus(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of Python standard-library source, deterministic for a Python version."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    if len(corpus) < _MIN_BYTES:
        raise RuntimeError(f"found only {len(corpus)} bytes of Python source under {stdlib}")
    return corpus


class TokenWindows(Dataset):
    """Non-overlapping windows: item i is (x, y) with y the next-token shift of x, both (block_size,)."""

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size
        self.n = (len(tokens) - 1) // block_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.tokens[i * self.block_size : (i + 1) * self.block_size + 1]
        return chunk[:-1], chunk[1:]


class StdlibTextDataModule(pl.LightningDataModule):
    """Byte-level language modelling on the standard library's source.

    Args:
        block_size: tokens per training sequence (must not exceed the model's block_size).
        batch_size: sequences per batch (per device under DDP).
        max_bytes: corpus size in bytes (default 1 MB: ~7,000 windows of 128 tokens).
        val_fraction: fraction of the corpus (its end) held out for validation and test.
        num_workers: DataLoader worker processes.
        seed: seed of the training order (epoch ``e`` is shuffled with ``seed + e``).
    """

    vocab_size = 256  # bytes; LanguageModel checks its own vocab_size against it

    def __init__(
        self, block_size: int = 128, batch_size: int = 32, max_bytes: int = 1_000_000, val_fraction: float = 0.1,
        num_workers: int = 0, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        check_positive_int(DATA + "block_size", block_size,
                           fix="set the tokens per sequence, e.g. 128 (the model's block_size)")  # fmt: skip
        check_positive_int(DATA + "batch_size", batch_size, fix="set the sequences per batch, e.g. 32")
        check_int(DATA + "max_bytes", max_bytes, _MIN_BYTES, fix=f"set at least {_MIN_BYTES}, e.g. 1000000")
        check_fraction(DATA + "val_fraction", val_fraction, fix="hold out a fraction in (0, 1), e.g. 0.1")
        check_nonnegative_int(DATA + "num_workers", num_workers, fix="set 0 (load in the main process) or more workers")
        check_seed(DATA + "seed", seed)
        self.save_hyperparameters()
        self.block_size, self.batch_size, self.num_workers = block_size, batch_size, num_workers
        self.splits: dict[str, TokenWindows] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        tokens = torch.frombuffer(bytearray(stdlib_corpus(self.hparams.max_bytes)), dtype=torch.uint8).long()
        cut = int(len(tokens) * (1 - self.hparams.val_fraction))
        splits = {"train": TokenWindows(tokens[:cut], self.block_size), "val": TokenWindows(tokens[cut:], self.block_size)}
        if len(splits["val"]) == 0:
            raise config_error(DATA + "val_fraction", self.hparams.val_fraction, f"holds out {len(tokens) - cut} bytes, "
                               f"less than one window of block_size + 1 = {self.block_size + 1} tokens",
                               "raise val_fraction or max_bytes, or lower block_size")  # fmt: skip
        if stage in (None, "fit"):  # evaluation may use batches larger than the training split
            check_a_batch_per_rank(DATA + "batch_size", self.batch_size, len(splits["train"]), self.trainer)
        self.splits = splits

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        data = self.splits[split]
        sampler = None
        if train:
            sampler = ResumableSampler(data, self.batch_size, seed=self.hparams.seed, trainer=self.trainer)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, drop_last=train,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("val")
