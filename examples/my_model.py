"""A user's own model trained by `lowmem`: subclass LowMemModule, implement forward and compute_loss.

    PYTHONPATH=examples lowmem fit --config examples/my_model.yaml
"""

import torch
import torch.nn.functional as F
from torch import nn

from lowmem.lightning_modules import LowMemModule


class TinyMLP(LowMemModule):
    """An MLP on flattened 8x8 digits. Every argument of __init__ is a config key."""

    def __init__(self, hidden: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)  # optimizer, lr_scheduler, monitor
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def compute_loss(self, batch):
        images, labels = batch
        logits = self(images)
        return F.cross_entropy(logits, labels), {"acc": (logits.argmax(-1) == labels).float().mean()}
