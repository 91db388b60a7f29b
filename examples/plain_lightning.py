"""An existing LightningModule trained with a lowmem optimizer: one mixin, nothing else changes.

    PYTHONPATH=examples lowmem fit --config examples/plain_lightning.yaml

The module builds its optimizer itself in ``configure_optimizers`` (here from a strategy given in
the config, so the YAML picks it). ``FoldedMomentumMixin`` keeps Lightning from zeroing the
momentum HMAdam keeps in ``.grad``; ``lowmem fit`` adds ``LowMemCallback`` (fit-start checks,
training RNG stream). With a plain ``Trainer`` pass ``callbacks=[LowMemCallback()]``.
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lowmem import strategies
from lowmem.lightning_modules import FoldedMomentumMixin


class PlainClassifier(FoldedMomentumMixin, pl.LightningModule):
    """An MLP on flattened 8x8 digits, written as any Lightning user writes one."""

    def __init__(self, hidden: int = 64, optimizer: strategies.OptimizerStrategy | None = None) -> None:
        super().__init__()
        self.optimizer = optimizer or strategies.AdamW(lr=3e-3)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val/loss", F.cross_entropy(self(images), labels), sync_dist=True)

    def configure_optimizers(self):
        return self.optimizer.build(self)  # role-based groups: no weight decay on biases
