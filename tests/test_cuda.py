"""The optimizers and the fp16 plugin on a CUDA device (``cuda`` marker; skipped without a GPU).

On a GPU the fast path is the ``torch.compile``'d kernels (the native C kernels are CPU-only), or
the foreach tier where there is no ``torch.compile``, so each fast-path optimizer is held on
CUDA, on each of the two, against the CPU for-loop.
``scripts/gpu_check.sh`` runs these and the multi-GPU (NCCL) ``lowmem fit`` checks on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem import optim

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

OPTIMIZERS = {
    "HMAdamW": lambda params, fused: optim.HMAdamW(params, lr=1e-2, fused=fused),
    "AdamS": lambda params, fused: optim.AdamS(params, lr=1e-2, fused=fused),
    "SlimAdamW": lambda params, fused: optim.SlimAdamW(
        [{"params": params[:1], "compress_dims": (1,)}, {"params": params[1:2], "compress_dims": (0,)},
         {"params": params[2:]}], lr=1e-2, fused=fused),  # fmt: skip
    "AdamMini": lambda params, fused: optim.AdamMini(params, lr=1e-2, fused=fused),
    "AdaPM": lambda params, fused: optim.AdaPM(params, lr=1e-2, fused=fused),
}
SHAPES = [(64, 33), (17, 128), (257,)]


def _run(name: str, device: str, fused: bool, steps: int = 10) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]
    opt = OPTIMIZERS[name](params, fused)
    for _ in range(steps):
        opt.zero_grad()
        for p in params:
            g = torch.randn(p.shape, generator=gen).to(device)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)  # HMAdamW's zero_grad decays: accumulate as backward would
        opt.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("backend", ["for-loop", "compiled", "foreach"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_matches_the_cpu_for_loop(name, backend):
    from lowmem.optim import _dispatch

    with _dispatch.only("native", "compiled") if backend != "foreach" else _dispatch.only():
        got = _run(name, "cuda", backend != "for-loop")
    for a, b in zip(got, _run(name, "cpu", False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lowmem_fit_hmadamw_fp16_on_one_gpu(tmp_path, monkeypatch):
    """fp16 mixed precision with HMAdamW on a GPU: the CLI swaps in FoldedMomentumPrecision."""
    from pathlib import Path

    from lowmem.cli import LowMemCLI
    from lowmem.strategies import FoldedMomentumPrecision

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "cnn_hmadamw.yaml"
    cli = LowMemCLI(args=["fit", "--config", str(config), "--trainer.accelerator=gpu", "--trainer.devices=1",
                          "--trainer.precision=16-mixed", "--trainer.max_steps=10", "--trainer.limit_val_batches=2",
                          "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert isinstance(cli.trainer.precision_plugin, FoldedMomentumPrecision)
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
