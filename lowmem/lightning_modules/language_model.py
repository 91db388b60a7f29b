"""`LanguageModel`: next-token prediction with a GPT; logs loss and perplexity."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable

from lowmem.lightning_modules.base import LowMemModule, OptimizerArg, default_optimizer
from lowmem.lightning_modules.gpt import GPT, GPTConfig, check_gpt_args
from lowmem.lightning_modules.validation import MODEL, check_matches_data

__all__ = ["LanguageModel"]


class LanguageModel(LowMemModule):
    """A GPT-style decoder trained on token windows ``(x, y)``.

    Args:
        vocab_size: tokens in the vocabulary (256 for bytes).
        block_size: maximum sequence length (positions).
        n_layer, n_head, n_embd: depth, attention heads, width (GPT-2 small: 12, 12, 768).
        dropout: dropout probability (0 for short runs).
        fused_qkv: one ``c_attn`` projection for q, k, v (nanoGPT) or separate ``q_proj/k_proj/v_proj``.
        tie_weights: share the LM head with the token embedding.
        optimizer, lr_scheduler, monitor: see :class:`LowMemModule`.

    Logs ``train/loss`` and ``val/loss`` in nats per token and ``val/ppl`` = exp(loss) per batch
    (the epoch figure is the mean of per-batch perplexities).
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 128,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        fused_qkv: bool = True,
        tie_weights: bool = True,
        optimizer: OptimizerArg = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        monitor: str = "val/loss",
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, monitor=monitor)
        check_gpt_args(MODEL, vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                       n_embd=n_embd, dropout=dropout, fused_qkv=fused_qkv, tie_weights=tie_weights)  # fmt: skip
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                                n_embd=n_embd, dropout=dropout, fused_qkv=fused_qkv, tie_weights=tie_weights)  # fmt: skip
        self.gpt = GPT(self.config)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_matches_data(self, MODEL + "vocab_size", self.hparams.vocab_size, "vocab_size", "a vocabulary of {} tokens",
                           at_least=True)  # fmt: skip

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx)

    def attention_shape(self) -> tuple[int, int]:
        """(heads, width): what head-wise optimizer blocks (Adam-mini, AdaPM-mini) need."""
        return self.config.n_head, self.config.n_embd

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return loss, {"ppl": loss.detach().exp()}

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """Sample ``max_new_tokens`` continuation tokens after ``idx`` (B, T)."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :])[:, -1] / max(temperature, 1e-6)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
