"""Every shipped config parses, resolves its classes and trains a handful of steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lowmem.cli import LowMemCLI, main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
FAMILIES = ("cnn", "lm", "diffusion")
OPTIMIZERS = ("adamw", "hmadamw", "adams", "slimadamw", "adapm", "ioadam", "adammini")
TINY = {  # a few steps of a smaller model: the point is that every config runs, not what it learns
    "cnn": ["--model.init_args.widths=[8,16]"],
    "lm": ["--model.init_args.n_embd=32", "--data.init_args.max_bytes=20000"],
    "diffusion": ["--model.init_args.channels=[8,16]", "--model.init_args.timesteps=4",
                  "--model.init_args.sample_every_n_epochs=1"],  # fmt: skip
}


def test_every_family_has_every_optimizer():
    names = {c.stem for c in CONFIGS}
    assert {f"{f}_{o}" for f in FAMILIES for o in OPTIMIZERS} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["optimizer"]["class_path"].startswith(("lowmem.strategies.", "torch.optim."))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_trains_a_few_steps(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    family = config.stem.split("_")[0]
    cli = LowMemCLI(args=["fit", "--config", str(config), *TINY[family], "--trainer.max_steps=3",
                          "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
                          "--trainer.val_check_interval=null", "--trainer.enable_progress_bar=false",
                          "--trainer.enable_model_summary=false", "--trainer.enable_checkpointing=false"])  # fmt: skip
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    optimizer = cli.trainer.optimizers[0]
    expected = cli.model.optimizer_strategy.optimizer_class
    assert type(optimizer) is expected
