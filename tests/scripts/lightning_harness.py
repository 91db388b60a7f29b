"""Shared pieces of the Lightning integration tests and the DDP script: tiny models, one strategy
per optimizer, a quiet Trainer, and exact snapshots of everything a training run carries.

Imported by ``tests/test_{folded_momentum,resume,strategies}.py`` (as ``scripts.lightning_harness``)
and by ``tests/scripts/ddp_equivalence.py`` (as ``lightning_harness``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from lowmem import strategies
from lowmem.lightning_modules import (
    DiffusionModel, DigitsDataModule, ImageClassifier, LanguageModel, StdlibTextDataModule,
)  # fmt: skip

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")

# One strategy per optimizer, with hyperparameters that exercise the interesting paths within a
# dozen steps (AdaPM refreshes its low-rank factors, IO-Adam wraps its slot buffer).
STRATEGIES: dict[str, Callable[[], strategies.OptimizerStrategy]] = {
    "AdamW": lambda: strategies.AdamW(lr=3e-3),
    "HMAdamW": lambda: strategies.HMAdamW(lr=3e-3),
    "HMAdam": lambda: strategies.HMAdam(lr=3e-3, weight_decay=1e-2),
    "AdamS": lambda: strategies.AdamS(lr=3e-3),
    "SlimAdamW": lambda: strategies.SlimAdamW(lr=3e-3),
    "AdaPM": lambda: strategies.AdaPM(lr=3e-3, refresh_every=4),
    "IOAdam": lambda: strategies.IOAdam(lr=1e-2, buffer_size=3),
    "AdamMini": lambda: strategies.AdamMini(lr=3e-3),
    "Adafactor": lambda: strategies.Adafactor(lr=1e-2),
}

COSINE = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=25)


def cnn(optimizer: Any, seed: int = 0, **kw: Any) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(widths=[4, 8], optimizer=optimizer, **kw)


def lm(optimizer: Any, seed: int = 0, dropout: float = 0.1, **kw: Any) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=dropout, optimizer=optimizer, **kw)


def diffusion(optimizer: Any, seed: int = 0, **kw: Any) -> DiffusionModel:
    torch.manual_seed(seed)
    return DiffusionModel(channels=[4, 8], time_dim=8, timesteps=20, optimizer=optimizer, **kw)


def digits(batch_size: int = 16, **kw: Any) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, **kw)


def text(batch_size: int = 8, **kw: Any) -> StdlibTextDataModule:
    return StdlibTextDataModule(block_size=16, batch_size=batch_size, max_bytes=20_000, **kw)


FAMILIES = {"cnn": (cnn, digits), "lm": (lm, text), "diffusion": (diffusion, digits)}


def trainer(**kw: Any) -> pl.Trainer:
    """A quiet CPU Trainer; no validation, checkpointing or sanity check unless asked for."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    defaults.update(kw)
    return pl.Trainer(**defaults)


class BatchRecorder(pl.Callback):
    """Records (global_step, fingerprint of the batch) for every training batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, tuple[float, ...]]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        weights = [torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape) for t in batch]
        self.batches.append((trainer.global_step, tuple(float((t.double() * w).sum()) for t, w in zip(batch, weights))))


def _plain(value: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples with tensors cloned (for exact comparison)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def snapshot(model: Any, trainer: pl.Trainer) -> dict[str, Any]:
    """Everything a continued run depends on: params, .grad (HMAdam's momentum), the optimizer's
    state dict (v, step, ...), LR schedulers, the step counter, and the module's RNG streams."""
    optimizer = trainer.optimizers[0]
    snap = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "optimizer": _plain(optimizer.state_dict()),
        "schedulers": [_plain(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
        "global_step": trainer.global_step,
        "rng_stream": _plain(model.lowmem_callback.rng_stream),
    }
    if isinstance(model, DiffusionModel):
        snap["diffusion_rng"] = model._generator().get_state().clone()
    return snap


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two snapshots differ (tensors compared bit for bit, dtype included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
