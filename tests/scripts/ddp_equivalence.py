"""DDP on CPU (2 processes, gloo) against one process, for every optimizer strategy.

    python tests/scripts/ddp_equivalence.py OUT_DIR

Run by ``tests/test_ddp.py`` under ``timeout -s KILL``. Lightning's script launcher starts rank 1
by re-running this file, so both ranks execute the same sequence of fits. What it measures
(written to ``OUT_DIR/rank{r}.json``):

1. ``equivalence``: for each optimizer, the CNN (GroupNorm, no BatchNorm) trained 8 steps with
   in-fit validation by 2 ranks at batch 8 against 1 process at batch 16: max |param diff|, and
   whether params and ``.grad`` are identical on both ranks; ``control`` is the same single-process
   run at batch 8 (shows the comparison can fail).
2. ``sampler``: the train loader kept ``ResumableSampler`` (Lightning did not swap in its own
   DistributedSampler) with 2 replicas and this rank.
3. ``resume``: the diffusion model (own per-rank noise generator) with HMAdamW under DDP, resumed
   from a mid-epoch checkpoint, against the uninterrupted run, on each rank: params, momentum,
   optimizer state, noise generator and RNG stream identical bit for bit;
   ``resume_with_rank0_rng``: the same resume when every rank restores rank 0's RNG states (what a
   checkpoint written by rank 0 alone holds) differs on rank 1.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning_harness import (  # noqa: E402
    STRATEGIES, cnn, differences, diffusion, digits, max_param_diff, snapshot, trainer,
)  # fmt: skip

from lowmem.lightning_modules import LowMemCallback  # noqa: E402
from lowmem.lightning_modules.sampling import ResumableSampler  # noqa: E402

OUT = Path(sys.argv[1])
IS_LAUNCHED_RANK = "LOCAL_RANK" in os.environ  # rank 1, started by Lightning's launcher
BATCH, STEPS = 8, 8


class Probe(pl.Callback):
    """Sampler facts at the start; at the end, whether params and .grad agree across ranks."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = trainer.train_dataloader.sampler
        self.sampler_ok = (
            isinstance(sampler, ResumableSampler) and sampler.num_replicas == 2 and sampler.rank == trainer.global_rank
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        grads = torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None])
        self.ranks_agree = all(
            bool(torch.equal(t[0], t[1])) for t in (pl_module.all_gather(params), pl_module.all_gather(grads))
        )


def fit(name: str, devices: int, batch_size: int, callbacks=(), **kw):
    strategy = STRATEGIES[name]()
    if name in ("HMAdamW", "HMAdam"):  # the default "auto" is hook in one process, noise on 2 ranks: apart by design
        strategy.hparams["variance_correction"] = "noise"
    model = cnn(strategy)
    strategy = "ddp" if devices > 1 else "auto"
    t = trainer(devices=devices, strategy=strategy, max_steps=STEPS, limit_val_batches=2, val_check_interval=3,
                callbacks=list(callbacks), **kw)  # fmt: skip
    t.fit(model, digits(batch_size))
    return model, t


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def diffusion_run(ckpt_dir: Path, ckpt_path=None):
    model = diffusion(STRATEGIES["HMAdamW"]())
    saver = ModelCheckpoint(ckpt_dir, "{step}", every_n_train_steps=3, save_top_k=-1) if ckpt_path is None else None
    t = trainer(devices=2, strategy="ddp", max_steps=STEPS, limit_train_batches=5, limit_val_batches=2,
                val_check_interval=2, callbacks=[saver] if saver else [], enable_checkpointing=saver is not None)  # fmt: skip
    t.fit(model, digits(BATCH), ckpt_path=ckpt_path)
    return snapshot(model, t)


def main() -> None:
    single, control = {}, None
    if not IS_LAUNCHED_RANK:  # the one-process references, before any process group exists
        single = {name: params_of(fit(name, 1, 2 * BATCH)[0]) for name in STRATEGIES}
        control = params_of(fit("HMAdamW", 1, BATCH)[0])
    report: dict = {"equivalence": {}, "sampler": {}, "ranks_agree": {}}
    for name in STRATEGIES:
        probe = Probe()
        model, t = fit(name, 2, BATCH, callbacks=[probe])
        report["sampler"][name] = probe.sampler_ok
        report["ranks_agree"][name] = probe.ranks_agree
        if t.global_rank == 0:
            report["equivalence"][name] = max_param_diff(params_of(model), single[name])
            if name == "HMAdamW":
                report["control"] = max_param_diff(params_of(model), control)

    ckpt_dir = OUT / "ckpt"
    uninterrupted = diffusion_run(ckpt_dir)
    resumed = diffusion_run(ckpt_dir, ckpt_path=ckpt_dir / "step=3.ckpt")
    report["resume"] = differences(uninterrupted, resumed)
    # Control: what a checkpoint holding only rank 0's RNG states (plain Lightning) resumes to.
    LowMemCallback.this_rank = staticmethod(lambda trainer, states: states[0].clone())
    report["resume_with_rank0_rng"] = differences(uninterrupted, diffusion_run(ckpt_dir, ckpt_dir / "step=3.ckpt"))
    report["rank"] = dist.get_rank()
    (OUT / f"rank{dist.get_rank()}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()  # both files are written before either process exits
    dist.destroy_process_group()  # a live group may abort the exit in gloo's destructors (SIGABRT)


if __name__ == "__main__":
    faulthandler.enable()
    try:
        main()
    except BaseException:  # a launched rank's traceback is otherwise easy to lose
        (OUT / f"error-rank{os.environ.get('LOCAL_RANK', '0')}.txt").write_text(traceback.format_exc())
        raise
