"""`DiffusionModel`: a DDPM (Ho et al., 2020) with a small U-Net, epsilon-prediction objective.

Forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with a linear beta schedule
beta_1..beta_T and abar_t = prod_{s<=t} (1 - beta_s). Loss: mean squared error of the predicted
eps (per pixel). Sampling: ancestral DDPM with sigma_t^2 = beta_t.

Randomness: training draws timesteps and noise from the module's own generator (seeded by
``noise_seed`` + rank, saved in checkpoints for every rank), validation from a fixed generator per
batch, so in-fit validation never perturbs training and a resumed run draws the same noise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable

from lowmem.lightning_modules.base import LowMemModule, OptimizerArg, default_optimizer
from lowmem.lightning_modules.integration import LowMemCallback, gather_per_rank
from lowmem.lightning_modules.unet import UNet, check_unet_args
from lowmem.lightning_modules.validation import (
    MODEL,
    check_fraction,
    check_matches_data,
    check_nonnegative_int,
    check_positive_int,
    check_seed,
    config_error,
)

__all__ = ["DiffusionModel", "image_grid"]

_RNG_KEY = "lowmem_train_rng_state"


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 1) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> one (C, rows*(H+pad)+pad, nrow*(W+pad)+pad) image in [0, 1]."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images.clamp(-1, 1).add(1).div(2).cpu()):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return grid


class DiffusionModel(LowMemModule):
    """Denoising diffusion on images in [-1, 1].

    Args:
        in_channels: image channels.
        image_size: image side in pixels (8 for digits).
        channels: U-Net channels per resolution level.
        time_dim: width of the timestep embedding.
        timesteps: T, the number of diffusion steps.
        beta_start, beta_end: the linear beta schedule's ends.
        noise_seed: seed of the training noise generator (rank is added under DDP; named apart from
            the data module's ``seed``, the training order, so each can be set alone).
        sample_every_n_epochs: write a grid of ``n_samples`` samples to TensorBoard every n
            validation epochs (0 disables).
        n_samples: samples in that grid.
        denoiser: your noise-prediction network instead of lowmem's U-Net (e.g. a diffusers
            ``UNet2DModel``), called as ``denoiser(x_t, t)`` with ``x_t`` (N, C, H, W) and ``t`` the
            integer timesteps (N,); it returns the predicted noise with ``x_t``'s shape, or an
            output with a ``.sample`` of it (diffusers), or a tuple whose first item it is.
            ``channels`` and ``time_dim`` then do not apply; ``in_channels`` and ``image_size``
            still set the images it gets. In YAML: ``denoiser: {class_path: ..., init_args: ...}``.
        optimizer, lr_scheduler, monitor: see :class:`LowMemModule`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        channels: list[int] = (32, 64),  # type: ignore[assignment]
        time_dim: int = 128,
        timesteps: int = 200,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        noise_seed: int = 0,
        sample_every_n_epochs: int = 1,
        n_samples: int = 16,
        denoiser: torch.nn.Module | None = None,
        optimizer: OptimizerArg = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        monitor: str = "val/loss",
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, monitor=monitor)
        if denoiser is not None and not isinstance(denoiser, torch.nn.Module):
            raise config_error(MODEL + "denoiser", denoiser, "must be a torch.nn.Module",
                               "give {class_path: diffusers.UNet2DModel, init_args: {...}} or null for lowmem's U-Net")  # fmt: skip
        if denoiser is None:
            check_unet_args(MODEL, in_channels, channels, time_dim)
        check_positive_int(MODEL + "image_size", image_size, fix="set the image side in pixels, e.g. 8 for digits")
        levels = 2 ** (len(channels) - 1)
        if denoiser is None and image_size % levels:
            example = levels * max(1, round(image_size / levels))
            raise config_error(MODEL + "image_size", image_size, f"must be divisible by 2**(len(channels)-1)={levels} "
                               f"(model.init_args.channels={list(channels)} halves the image {len(channels) - 1} "
                               f"times)", f"use a multiple of {levels}, e.g. {example}, or fewer channel levels")  # fmt: skip
        check_positive_int(MODEL + "timesteps", timesteps, fix="set the number of diffusion steps, e.g. 200")
        beta_fix = "use a linear schedule inside (0, 1), e.g. beta_start: 0.0001, beta_end: 0.02"
        check_fraction(MODEL + "beta_start", beta_start, fix=beta_fix)
        check_fraction(MODEL + "beta_end", beta_end, fix=beta_fix)
        if beta_start >= beta_end:
            raise config_error(MODEL + "beta_start", beta_start, f"must be smaller than {MODEL}beta_end={beta_end} "
                               "(the noise grows along the schedule)", beta_fix)  # fmt: skip
        check_seed(MODEL + "noise_seed", noise_seed)
        check_nonnegative_int(MODEL + "sample_every_n_epochs", sample_every_n_epochs,
                              fix="set how many validation epochs apart to draw samples (0: never), e.g. 1")  # fmt: skip
        check_positive_int(MODEL + "n_samples", n_samples, fix="set the samples per grid, e.g. 16")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "denoiser"])
        self.unet = UNet(in_channels, tuple(channels), time_dim) if denoiser is None else denoiser
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)
        self._train_rng: torch.Generator | None = None
        self._pending_rng_state: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_matches_data(self, MODEL + "in_channels", self.hparams.in_channels, "image_channels", "{}-channel images")
        size = self.hparams.image_size
        check_matches_data(self, MODEL + "image_size", size, "image_size", "{0}x{0} images")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.unet(x_t, t)
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)  # diffusers' outputs
        if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
            shown = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise config_error(MODEL + "denoiser", type(self.unet).__name__, f"returned {shown} for images of shape "
                               f"{tuple(x_t.shape)}; it must predict the noise, one value per pixel",
                               "set its input and output channels to model.init_args.in_channels and its sample "
                               "size to model.init_args.image_size")  # fmt: skip
        return out

    # --- randomness ----------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        if self._train_rng is None or self._train_rng.device != self.device:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self._train_rng = torch.Generator(device=self.device).manual_seed(self.hparams.noise_seed + rank)
            if self._pending_rng_state is not None:
                self._train_rng.set_state(self._pending_rng_state)
                self._pending_rng_state = None
        return self._train_rng

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[_RNG_KEY] = gather_per_rank(self, self._generator().get_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(_RNG_KEY)
        self._pending_rng_state = LowMemCallback.this_rank(self._trainer, saved) if isinstance(saved, list) else saved
        self._train_rng = None

    # --- objective -----------------------------------------------------------------------------
    def noise_loss(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """E_t,eps || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1-abar_t) eps, t) ||^2 (mean per pixel)."""
        t = torch.randint(0, self.hparams.timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        abar = self.alpha_bar[t].view(-1, 1, 1, 1).to(x0.dtype)
        return F.mse_loss(self(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t), eps)

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.noise_loss(batch[0], self._generator()), {}

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.noise_loss(batch[0], torch.Generator(device=self.device).manual_seed(1_000_003 + batch_idx))
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=batch[0].shape[0], sync_dist=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.noise_loss(batch[0], torch.Generator(device=self.device).manual_seed(2_000_003 + batch_idx))
        self.log("test/loss", loss, on_epoch=True, batch_size=batch[0].shape[0], sync_dist=True)
        return loss

    # --- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` images (n, C, H, W) by ancestral sampling from x_T ~ N(0, I)."""
        c, s = self.hparams.in_channels, self.hparams.image_size
        x = torch.randn(n, c, s, s, device=self.device, generator=generator)
        for t in reversed(range(self.hparams.timesteps)):
            beta, abar = self.betas[t], self.alpha_bar[t]
            eps = self(x, torch.full((n,), t, device=self.device, dtype=torch.long))
            x = (x - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()
            if t > 0:
                x = x + beta.sqrt() * torch.randn(x.shape, device=self.device, generator=generator)
        return x

    def on_validation_epoch_end(self) -> None:
        every = self.hparams.sample_every_n_epochs
        experiment = getattr(self.logger, "experiment", None)
        if (not every or self.trainer.sanity_checking or not self.trainer.is_global_zero
                or (self.current_epoch + 1) % every or not hasattr(experiment, "add_image")):  # fmt: skip
            return
        images = self.sample(self.hparams.n_samples, torch.Generator(device=self.device).manual_seed(7))
        experiment.add_image("samples", image_grid(images), self.global_step)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.sample(batch[0].shape[0], torch.Generator(device=self.device).manual_seed(batch_idx))
