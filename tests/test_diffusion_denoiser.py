"""DiffusionModel with the user's own denoiser: any nn.Module, diffusers' UNet2DModel from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lowmem.cli import main
from lowmem.lightning_modules import ConfigError, DiffusionModel

ROOT = Path(__file__).resolve().parents[1]


class TupleDenoiser(nn.Module):
    """A 1x1 conv conditioned on t, returning a tuple as ``return_dict=False`` models do."""

    def __init__(self, channels: int = 1, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 1)
        self.t_scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.conv(x) + self.t_scale * t.view(-1, 1, 1, 1).float() / 100,)


def test_a_user_denoiser_is_trained_and_sampled():
    torch.manual_seed(0)
    model = DiffusionModel(denoiser=TupleDenoiser(), timesteps=10)
    assert model.unet.__class__ is TupleDenoiser and "denoiser" not in model.hparams
    x0 = torch.randn(4, 1, 8, 8)
    loss = model.noise_loss(x0, torch.Generator().manual_seed(0))
    loss.backward()
    assert model.unet.conv.weight.grad is not None and model.unet.t_scale.grad is not None
    assert model.sample(2, torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)


def test_a_denoiser_with_the_wrong_output_shape_is_one_line():
    model = DiffusionModel(denoiser=TupleDenoiser(out_channels=3))
    with pytest.raises(ConfigError, match=r"model.init_args.denoiser='TupleDenoiser': returned \(2, 3, 8, 8\) for images "
                                          r"of shape \(2, 1, 8, 8\)"):  # fmt: skip
        model.noise_loss(torch.randn(2, 1, 8, 8), torch.Generator().manual_seed(0))


def test_a_denoiser_that_is_no_module_is_refused():
    with pytest.raises(ConfigError, match="model.init_args.denoiser=.*must be a torch.nn.Module"):
        DiffusionModel(denoiser=lambda x, t: x)  # type: ignore[arg-type]


def test_lowmem_fit_trains_the_diffusers_unet_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "examples" / "diffusers_unet.yaml"), "--trainer.max_steps=2",
          "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert "lowmem fit: step 2: val/loss=" in capsys.readouterr().out
    ckpt = next((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("unet.down_blocks.") for k in state)  # diffusers' weights, not lowmem's U-Net
