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
    """

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
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) and sum to < 1"
            )
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
