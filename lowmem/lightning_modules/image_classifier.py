"""`ImageClassifier`: a small ResNet (pre-activation basic blocks, GroupNorm) for image classes.

GroupNorm instead of BatchNorm keeps the maths independent of how a batch is split across
devices, so 2 DDP ranks at batch B train exactly like 1 process at batch 2B.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable
from torch import nn

from lowmem.lightning_modules.base import LowMemModule, OptimizerArg, default_optimizer
from lowmem.lightning_modules.validation import (
    MODEL,
    check_group_norm,
    check_int,
    check_int_list,
    check_matches_data,
    check_positive_int,
)

__all__ = ["ImageClassifier", "ResNet", "BasicBlock"]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), with a 1x1 projection when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if stride != 1 or in_ch != out_ch else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.silu(self.norm1(x)))
        out = self.conv2(F.silu(self.norm2(out)))
        return out + self.shortcut(x)


class ResNet(nn.Module):
    """Stem conv, ``len(widths)`` stages of ``blocks_per_stage`` blocks (stride 2 from the second
    stage on), global average pool, linear classifier ``head``."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...], blocks_per_stage: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks, ch = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(ch, w, stride=2 if (i > 0 and j == 0) else 1))
                ch = w
        self.blocks = nn.Sequential(*blocks)
        self.norm = _norm(ch)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(F.silu(self.norm(x)).mean(dim=(2, 3)))


class ImageClassifier(LowMemModule):
    """Classify images with a ResNet; logs loss and accuracy.

    Args:
        in_channels: image channels (1 for digits).
        num_classes: number of classes.
        widths: channels per stage, e.g. ``[32, 64]``; more/wider stages for bigger images.
        blocks_per_stage: residual blocks in each stage.
        optimizer, lr_scheduler, monitor: see :class:`LowMemModule`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: list[int] = (32, 64),  # type: ignore[assignment]
        blocks_per_stage: int = 1,
        optimizer: OptimizerArg = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        monitor: str = "val/loss",
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, monitor=monitor)
        check_positive_int(MODEL + "in_channels", in_channels, fix="set the image channels, e.g. 1 for digits, 3 for RGB")
        check_int(MODEL + "num_classes", num_classes, 2, problem="a classifier needs num_classes >= 2",
                  fix="set the number of classes in the data, e.g. 10 for digits")  # fmt: skip
        check_int_list(MODEL + "widths", widths, 1, fix="give the channels of each stage, e.g. [32, 64]")
        check_group_norm(MODEL + "widths", widths, list(widths),
                         fix="use multiples of 8 (or widths below 8), e.g. [32, 64]")  # fmt: skip
        check_positive_int(MODEL + "blocks_per_stage", blocks_per_stage, fix="set e.g. 1")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = ResNet(in_channels, num_classes, tuple(widths), blocks_per_stage)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_matches_data(self, MODEL + "in_channels", self.hparams.in_channels, "image_channels", "{}-channel images")
        check_matches_data(self, MODEL + "num_classes", self.hparams.num_classes, "num_classes", "{} classes")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        return loss, {"acc": (logits.argmax(dim=-1) == labels).float().mean()}

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=-1)
