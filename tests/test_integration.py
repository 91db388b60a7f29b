"""A user's own LightningModule with a lowmem optimizer: ``FoldedMomentumMixin`` + ``LowMemCallback``.

The module builds HMAdamW itself (``strategies.HMAdamW().build(self)``); what LowMemModule gave
for free must hold here too: in-fit validation does not touch the momentum or the trajectory,
a module without the mixin is refused at fit start with the fix named, ``lowmem fit`` runs such a
module, and errors inside the user's own code keep their traceback.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from scripts.lightning_harness import digits, trainer
from torch import nn

from lowmem import strategies
from lowmem.cli import LowMemCLI, main
from lowmem.lightning_modules import FoldedMomentumMixin, LowMemCallback
from lowmem.strategies import StrategyError

ROOT = Path(__file__).resolve().parents[1]


class PlainMLP(pl.LightningModule):
    """A LightningModule as users write them, with dropout (draws from the global RNG)."""

    def __init__(self, optimizer=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.optimizer = optimizer or strategies.HMAdamW(lr=3e-3)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.2), nn.GELU(), nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return self.optimizer.build(self)


class MixedMLP(FoldedMomentumMixin, PlainMLP):
    pass


def _fit(module: pl.LightningModule, validate: bool, callbacks=None) -> dict[str, torch.Tensor]:
    callbacks = [LowMemCallback()] if callbacks is None else callbacks
    t = trainer(max_steps=6, callbacks=callbacks, limit_val_batches=2 if validate else 0,
                val_check_interval=2 if validate else None)  # fmt: skip
    t.fit(module, digits(16))
    state = {f"param/{n}": p.detach().clone() for n, p in module.named_parameters()}
    return state | {f"grad/{n}": p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_users_module_with_the_mixin_and_callback_is_unchanged_by_in_fit_validation():
    """Momentum (in .grad), params and dropout draws: bit for bit with and without validation."""
    assert _same(_fit(MixedMLP(), validate=True), _fit(MixedMLP(), validate=False))


def test_negative_control_without_the_callback_validation_changes_the_dropout_stream():
    """The mixin alone keeps the momentum (training goes on), but without the callback's RNG
    stream validation's loader draws shift the dropout masks: the trajectory changes."""
    assert not _same(_fit(MixedMLP(), validate=True, callbacks=[]), _fit(MixedMLP(), validate=False, callbacks=[]))


def test_users_module_without_the_mixin_is_refused_with_the_fix_named():
    with pytest.raises(StrategyError, match="must inherit lowmem.lightning_modules.FoldedMomentumMixin"):
        _fit(PlainMLP(), validate=True)
    _fit(PlainMLP(strategies.AdamW(lr=3e-3)), validate=True)  # AdamW needs no mixin


def test_callback_checks_optimizers_a_module_built_itself():
    """The fit-start checks read the optimizer's declared capabilities (no strategy involved)."""

    class BuildsItsOwn(MixedMLP):
        def configure_optimizers(self):
            from lowmem.optim import HMAdamW

            return HMAdamW(self.parameters(), lr=1e-3)

    t = trainer(max_steps=2, callbacks=[LowMemCallback()], gradient_clip_val=1.0, gradient_clip_algorithm="value")
    with pytest.raises(StrategyError, match="gradient_clip_algorithm=norm"):
        t.fit(BuildsItsOwn(), digits(16))


def test_negative_gradient_clip_val_is_refused():
    t = trainer(max_steps=2, callbacks=[LowMemCallback()], gradient_clip_val=-1.0)
    with pytest.raises(StrategyError, match="gradient_clip_val=-1.0 must be a finite number >= 0"):
        t.fit(MixedMLP(), digits(16))


def test_lowmem_fit_trains_a_plain_lightning_module(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    cli = LowMemCLI(args=["fit", "--config", str(ROOT / "examples" / "plain_lightning.yaml"), "--trainer.max_steps=12",
                          "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert type(cli.trainer.optimizers[0]).__name__ == "HMAdamW" and cli.trainer.global_step == 12
    assert any(isinstance(c, LowMemCallback) for c in cli.trainer.callbacks)
    assert "lowmem fit: step 12: val/loss=" in capsys.readouterr().out


def test_lowmem_fit_refuses_a_plain_module_without_the_mixin_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nomixin.py").write_text(textwrap.dedent("""
        import lightning.pytorch as pl, torch.nn.functional as F
        from torch import nn
        from lowmem import strategies

        class NoMixin(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
            def training_step(self, batch, batch_idx):
                return F.cross_entropy(self.net(batch[0]), batch[1])
            def configure_optimizers(self):
                return strategies.HMAdamW().build(self)
    """))  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model=nomixin.NoMixin", "--data=lowmem.lightning_modules.DigitsDataModule",
              "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lowmem: error: HMAdamW keeps its momentum in .grad" in err and "FoldedMomentumMixin" in err
    assert "Traceback" not in err


def test_a_bug_in_the_users_model_keeps_its_traceback(tmp_path, monkeypatch):
    """A TypeError raised in the user's own __init__ is not turned into a one-line config error."""
    (tmp_path / "buggy.py").write_text(textwrap.dedent("""
        from lowmem.lightning_modules import LowMemModule

        class Buggy(LowMemModule):
            def __init__(self, width: int = 8, **kwargs):
                super().__init__(**kwargs)
                self.size = len(width)  # the bug: an int has no len()
    """))  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match="has no len"):
        main(["fit", "--model=buggy.Buggy", "--data=lowmem.lightning_modules.DigitsDataModule"])


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """lr 1e8 on AdamW: the loss turns non-finite after a few steps; `lowmem fit` exits 1 with the
    step named, and every checkpoint on disk holds finite parameters."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "cnn_adamw.yaml"), "--trainer.max_steps=40",
              "--model.init_args.optimizer.init_args.lr=1e8", "--model.init_args.lr_scheduler=null",
              "--model.init_args.widths=[4]", "--trainer.enable_progress_bar=false",
              "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1"])  # fmt: skip
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("lowmem: error:"))
    assert "the loss is not finite at step" in line and "Traceback" not in err
    step = int(line.split("at step ")[1].split()[0])
    checkpoints = sorted(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    assert checkpoints, "no checkpoint was written before the divergence"
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert state["global_step"] <= step
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values()), path.name


def test_validate_without_a_checkpoint_warns_that_the_model_is_untrained(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["validate", "--config", str(ROOT / "configs" / "cnn_adamw.yaml"), "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert "no --ckpt_path given, so this evaluates the model as initialised (untrained)" in capsys.readouterr().err
