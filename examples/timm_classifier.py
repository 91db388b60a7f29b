"""A timm image classifier (random init, ``pretrained=False``: nothing downloaded) trained by `lowmem fit`.

    PYTHONPATH=examples lowmem fit --config examples/timm_classifier.yaml
    PYTHONPATH=examples lowmem roles --config examples/timm_classifier.yaml

The role classifier reads timm's structure: ``pos_embed`` and ``cls_token`` are position
embeddings (no weight decay, as the model's own ``no_weight_decay()`` says; one SlimAdamW /
Adam-mini ``v`` per position), ``attn.qkv`` is a fused projection cut per head from the attention
modules' ``num_heads``/``head_dim``, ``mlp.fc1``/``fc2`` the MLP. Needs timm, which imports
torchvision: install a torchvision built for your torch (docs/roles.md says why this repository's
CPU machines cannot).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowmem.lightning_modules import LowMemModule


class TimmClassifier(LowMemModule):
    """``timm.create_model(name, pretrained=False, **model_args)`` on (image, label) batches.

    Args:
        name: a timm architecture, e.g. ``vit_tiny_patch16_224`` or ``resnet18``.
        model_args: its keyword arguments (``img_size``, ``patch_size``, ``depth``, ``in_chans``...).
        num_classes: classes of the data.
        optimizer, lr_scheduler, monitor: see :class:`LowMemModule`.
    """

    def __init__(self, name: str = "vit_tiny_patch16_224", model_args: dict[str, Any] | None = None,
                 num_classes: int = 10, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        import timm

        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = timm.create_model(name, pretrained=False, num_classes=num_classes, **(model_args or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}
