"""The model families and their data: shapes, the maths that matters, and logging keys."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lowmem.lightning_modules import (
    DiffusionModel, DigitsDataModule, ImageClassifier, LanguageModel, StdlibTextDataModule, image_grid,
)  # fmt: skip
from lowmem.lightning_modules.callbacks import MemoryMonitor
from lowmem.optim import Role, classify_parameters


def test_digits_split_is_fixed_disjoint_and_scaled():
    dm = DigitsDataModule(batch_size=16)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["val"] == sizes["test"] == 269
    x, y = dm.splits["train"][:]
    assert x.shape[1:] == (1, 8, 8) and x.min() >= -1 and x.max() <= 1 and set(y.tolist()) == set(range(10))
    again = DigitsDataModule(batch_size=16)
    again.setup()
    assert torch.equal(again.splits["val"][:][0], dm.splits["val"][:][0])


def test_text_windows_are_next_token_shifts():
    dm = StdlibTextDataModule(block_size=32, max_bytes=50_000)
    dm.setup()
    x, y = dm.splits["train"][3]
    assert x.shape == y.shape == (32,) and torch.equal(x[1:], y[:-1])
    assert 0 <= int(x.min()) and int(x.max()) < 256
    assert len(dm.splits["train"]) == (45_000 - 1) // 32


@pytest.mark.parametrize("fused_qkv", [True, False])
def test_gpt_is_causal_and_roles_are_read(fused_qkv):
    torch.manual_seed(0)
    lm = LanguageModel(block_size=16, n_layer=2, n_head=2, n_embd=32, fused_qkv=fused_qkv)
    idx = torch.randint(0, 256, (2, 16))
    logits = lm(idx)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    assert logits.shape == (2, 16, 256)
    assert torch.allclose(lm(changed)[:, :10], logits[:, :10], atol=1e-6)
    assert not torch.allclose(lm(changed)[:, 10:], logits[:, 10:])
    roles = {i.name: i.role for i in classify_parameters(lm)}
    assert roles["gpt.wte.weight"] is Role.EMBEDDING and "gpt.lm_head.weight" not in roles  # tied
    assert roles["gpt.h.0.attn.c_proj.weight"] is Role.ATTN_OUT and roles["gpt.h.0.mlp.c_proj.weight"] is Role.MLP_DOWN
    if fused_qkv:
        assert roles["gpt.h.0.attn.c_attn.weight"] is Role.QKV
    else:
        assert roles["gpt.h.1.attn.k_proj.weight"] is Role.KEY and roles["gpt.h.1.attn.v_proj.weight"] is Role.VALUE


def test_diffusion_loss_uses_the_forward_process():
    torch.manual_seed(0)
    model = DiffusionModel(channels=[8, 16], time_dim=16, timesteps=50)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    # With a network that predicts exactly the noise the loss is 0: check by reconstructing eps.
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t = torch.randint(0, 50, (4,), generator=gen_b)
    eps = torch.randn(x0.shape, generator=gen_b)
    abar = model.alpha_bar[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    model.unet.forward = lambda x, tt: (x - abar.sqrt() * x0) / (1 - abar).sqrt()  # the oracle
    assert model.noise_loss(x0, gen_a).item() == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(model.unet(x_t, t), eps, atol=1e-5)


def test_diffusion_sampling_and_grid_shapes():
    model = DiffusionModel(channels=[8, 16], time_dim=16, timesteps=5)
    samples = model.sample(5, torch.Generator().manual_seed(0))
    assert samples.shape == (5, 1, 8, 8) and torch.isfinite(samples).all()
    grid = image_grid(samples, nrow=3)
    assert grid.shape == (1, 2 * 9 + 1, 3 * 9 + 1) and 0 <= grid.min() and grid.max() <= 1


def test_model_arguments_are_validated():
    with pytest.raises(ValueError, match=r"model.init_args.n_head=4: must divide model.init_args.n_embd=30"):
        LanguageModel(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match=r"model.init_args.image_size=6: must be divisible by 2\*\*\(len\(channels\)-1\)=4"):
        DiffusionModel(image_size=6, channels=[8, 16, 32])
    with pytest.raises(ValueError, match="widths"):
        ImageClassifier(widths=[])


def test_memory_monitor_logs_mib_and_step_time(tmp_path):
    model = ImageClassifier(widths=[8], optimizer=lambda g: torch.optim.AdamW(g, lr=1e-3))
    trainer = pl.Trainer(max_steps=3, log_every_n_steps=1, callbacks=[MemoryMonitor()], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=8))
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    n_params = sum(p.numel() for p in model.parameters())
    assert m["memory/params_mib"] == pytest.approx(n_params * 4 / 2**20)
    # AdamW: exp_avg and exp_avg_sq per parameter, plus one 4-byte step counter per tensor.
    n_tensors = len(list(model.parameters()))
    assert m["memory/optimizer_state_mib"] == pytest.approx((2 * n_params + n_tensors) * 4 / 2**20)
    assert m["memory/grad_buffers_mib"] == 0.0 and m["memory/peak_mib"] > 50 and m["time/step_ms"] > 0
