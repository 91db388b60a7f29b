"""A GPT-style decoder you can read in one sitting (nanoGPT layout and names).

Names are the ones the role classifier reads: ``wte``/``wpe`` embeddings, per block ``ln_1``,
``attn`` (fused ``c_attn`` or separate ``q_proj``/``k_proj``/``v_proj``) and its output ``c_proj``,
``ln_2``, ``mlp`` (``c_fc`` up, ``c_proj`` down), final ``ln_f`` and ``lm_head`` (optionally tied
to ``wte``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowmem.lightning_modules.validation import check_bool, check_fraction, check_positive_int, config_error

__all__ = ["GPT", "GPTConfig", "check_gpt_args"]


def check_gpt_args(prefix: str, *, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                   dropout: float, **flags: bool) -> None:  # fmt: skip
    """The GPT's sizes, dropout and switches, each error naming ``prefix + name``
    (``model.init_args.`` from a config, ``GPTConfig.`` for the dataclass itself)."""
    check_positive_int(prefix + "vocab_size", vocab_size, fix="set the tokenizer's vocabulary, e.g. 256 for bytes")
    check_positive_int(prefix + "block_size", block_size, fix="set the longest sequence in tokens, e.g. 128")
    check_positive_int(prefix + "n_layer", n_layer, fix="set the number of transformer blocks, e.g. 2")
    check_positive_int(prefix + "n_head", n_head, fix="set the attention heads, e.g. 4")
    check_positive_int(prefix + "n_embd", n_embd, fix="set the width, a multiple of n_head, e.g. 128")
    if n_embd % n_head:
        divisors = [d for d in range(1, n_embd + 1) if n_embd % d == 0]
        nearest = min(divisors, key=lambda d: (abs(d - n_head), -d))
        raise config_error(prefix + "n_head", n_head, f"must divide {prefix}n_embd={n_embd} (each head gets "
                           f"n_embd / n_head channels)", f"choose a divisor such as {nearest}, or make n_embd a "
                           f"multiple of {n_head} (e.g. {n_head * max(1, round(n_embd / n_head))})")  # fmt: skip
    check_fraction(prefix + "dropout", dropout, low_open=False, fix="set a probability in [0, 1), e.g. 0.0 or 0.1")
    for name, value in flags.items():
        check_bool(prefix + name, value)


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    fused_qkv: bool = True
    tie_weights: bool = True

    def __post_init__(self) -> None:
        check_gpt_args("GPTConfig.", **vars(self))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        d = cfg.n_embd
        if cfg.fused_qkv:
            self.c_attn = nn.Linear(d, 3 * d, bias=cfg.bias)
        else:
            self.q_proj = nn.Linear(d, d, bias=cfg.bias)
            self.k_proj = nn.Linear(d, d, bias=cfg.bias)
            self.v_proj = nn.Linear(d, d, bias=cfg.bias)
        self.c_proj = nn.Linear(d, d, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        if hasattr(self, "c_attn"):
            q, k, v = self.c_attn(x).split(C, dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))
