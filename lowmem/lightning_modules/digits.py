"""scikit-learn's digits (1797 grey 8x8 images, 10 classes): ships inside the package, no download.

Pixel values 0..16 are scaled to [-1, 1] (the range a diffusion model expects as well); the split
into train/val/test is a fixed permutation drawn from ``split_seed``, so it is the same on every
machine and every rank. The training order comes from ``ResumableSampler``: a function of
(``seed``, epoch) and the fit loop's position, so resumed runs and runs with in-fit validation
see the same batches as an uninterrupted run, and DDP ranks shard it.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lowmem.lightning_modules.sampling import ResumableSampler
from lowmem.lightning_modules.validation import (
    DATA,
    check_a_batch_per_rank,
    check_fraction,
    check_nonnegative_int,
    check_positive_int,
    check_seed,
    config_error,
)

__all__ = ["DigitsDataModule", "load_digits_tensors"]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) float32 in [-1, 1] and labels (N,) int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.as_tensor(data.target, dtype=torch.int64)


class DigitsDataModule(pl.LightningDataModule):
    """Digits as (image, label) batches.

    Args:
        batch_size: samples per batch (per device under DDP).
        val_fraction: fraction of the 1797 images held out for validation.
        test_fraction: fraction held out for testing.
        split_seed: seed of the fixed train/val/test permutation.
        num_workers: DataLoader worker processes (0 = load in the main process; the data is tiny).
        seed: seed of the training order (epoch ``e`` is shuffled with ``seed + e``).

    ``image_channels``, ``image_size`` and ``num_classes`` describe the data; the models check
    their own settings against them when a fit starts.
    """

    image_channels = 1
    image_size = 8
    num_classes = 10
    n_images = 1797

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int(DATA + "batch_size", batch_size, fix="set the samples per batch, e.g. 64")
        split_fix = "hold out a fraction in (0, 1) for validation, e.g. val_fraction: 0.15, test_fraction: 0.15"
        check_fraction(DATA + "val_fraction", val_fraction, fix=split_fix)
        check_fraction(DATA + "test_fraction", test_fraction, low_open=False, fix=split_fix)
        if val_fraction + test_fraction >= 1:
            raise config_error(DATA + "val_fraction", val_fraction, f"plus {DATA}test_fraction={test_fraction} leaves "
                               "no training images", "make them sum to < 1, e.g. 0.15 and 0.15")  # fmt: skip
        if int(self.n_images * val_fraction) < 1:
            raise config_error(DATA + "val_fraction", val_fraction, f"holds out no image of the {self.n_images}",
                               f"set at least {1 / self.n_images:.4f}, e.g. 0.15")  # fmt: skip
        check_seed(DATA + "split_seed", split_seed)
        check_nonnegative_int(DATA + "num_workers", num_workers, fix="set 0 (load in the main process) or more workers")
        check_seed(DATA + "seed", seed)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        images, labels = load_digits_tensors()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.hparams.split_seed))
        n_val = int(len(labels) * self.hparams.val_fraction)
        n_test = int(len(labels) * self.hparams.test_fraction)
        parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        if stage in (None, "fit"):  # evaluation may use batches larger than the training split
            check_a_batch_per_rank(DATA + "batch_size", self.batch_size, len(parts["train"]), self.trainer)
        self.splits = {name: TensorDataset(images[idx], labels[idx]) for name, idx in parts.items()}

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        data = self.splits[split]
        sampler = None
        if train:
            sampler = ResumableSampler(data, self.batch_size, seed=self.hparams.seed, trainer=self.trainer)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=train, persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

