"""A Hugging Face causal LM (built from a config: random weights, nothing downloaded) trained by `lowmem fit`.

    PYTHONPATH=examples lowmem fit --config examples/hf_causal_lm.yaml
    PYTHONPATH=examples lowmem roles --config examples/hf_causal_lm.yaml    # every parameter's role

The model is any ``transformers`` causal LM architecture (``model_type``: gpt2, llama, phi3, ...) with
the config keys you give (``config``). The role classifier reads its structure (GPT-2's Conv1D
layers, Llama's grouped-query attention from ``num_key_value_heads``, the tied LM head) and its
config (heads, key/value heads, head_dim) for head-wise blocks: no ``attention_shape()`` and no
``role_overrides`` are needed. Needs ``pip install -e '.[models]'`` (transformers).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowmem.lightning_modules import LowMemModule


class HFCausalLM(LowMemModule):
    """``AutoModelForCausalLM.from_config`` on (x, y) next-token batches (lowmem's text data modules).

    Args:
        model_type: a transformers architecture name, e.g. ``gpt2`` or ``llama``.
        config: keys of that architecture's config (``n_layer``, ``hidden_size``...).
        vocab_size: tokens of the data (bytes: 256).
        optimizer, lr_scheduler, monitor: see :class:`LowMemModule`.
    """

    def __init__(self, model_type: str = "gpt2", config: dict[str, Any] | None = None, vocab_size: int = 256,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()  # "bos_token_id outside the vocabulary" for byte vocabularies
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                   **(config or {}))  # fmt: skip
        self.model = AutoModelForCausalLM.from_config(cfg)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx).logits

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        return loss, {"ppl": loss.detach().exp()}
