"""Every shipped config parses, resolves its classes and trains a handful of steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lowmem.cli import LowMemCLI, main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
FAMILIES = ("cnn", "lm", "diffusion")
OPTIMIZERS = ("adamw", "hmadamw", "adams", "slimadamw", "adapm", "ioadam", "adammini", "adafactor")
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


# ------------------------------------------------------------------- family bases and overlays
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_each_shipped_config_states_only_its_optimizer_over_the_family_base(config):
    """No near copies: a config is ``base: base/<family>.yaml`` plus its optimizer (and comments)."""
    family = config.stem.split("_")[0]
    own = yaml.safe_load(config.read_text())
    assert own.pop("base") == f"base/{family}.yaml"
    if own:
        assert set(own) == {"model"} and set(own["model"]) == {"init_args"}
        assert set(own["model"]["init_args"]) == {"optimizer"}


def test_an_overlay_with_another_class_does_not_inherit_the_bases_init_args(tmp_path):
    from lowmem.cli.config_files import load_with_bases

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"widths": [4], "optimizer": {
        "class_path": "lowmem.strategies.AdamW", "init_args": {"lr": 0.1, "weight_decay": 0.5}}}}}))  # fmt: skip
    (tmp_path / "same.yaml").write_text("base: base.yaml\nmodel: {init_args: {optimizer: {init_args: {lr: 0.2}}}}\n")
    (tmp_path / "other.yaml").write_text(
        "base: base.yaml\nmodel: {init_args: {optimizer: {class_path: lowmem.strategies.HMAdamW, init_args: {lr: 0.3}}}}\n"
    )
    same = load_with_bases(tmp_path / "same.yaml")["model"]["init_args"]
    other = load_with_bases(tmp_path / "other.yaml")["model"]["init_args"]
    assert same == {"widths": [4], "optimizer": {"class_path": "lowmem.strategies.AdamW",
                                                 "init_args": {"lr": 0.2, "weight_decay": 0.5}}}  # fmt: skip
    assert other["optimizer"] == {"class_path": "lowmem.strategies.HMAdamW", "init_args": {"lr": 0.3}}
    assert other["widths"] == [4]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.yaml": "base: missing.yaml\n"}, "base: missing.yaml does not exist"),
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "its bases form a cycle"),
    ],
    ids=["missing-base", "cycle"],
)
def test_a_bad_base_is_one_line_and_exit_code_2(files, expected, tmp_path, capsys):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "a.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lowmem: error:") and expected in err and "Traceback" not in err


def test_family_base_and_optimizer_overlay_compose_on_the_command_line(capsys):
    """`--config configs/base/lm.yaml --config configs/lm_hmadamw.yaml` is the same config."""
    outs = []
    for args in (["--config", str(ROOT / "configs" / "lm_hmadamw.yaml")],
                 ["--config", str(ROOT / "configs" / "base" / "lm.yaml"), "--config",
                  str(ROOT / "configs" / "lm_hmadamw.yaml")]):  # fmt: skip
        with pytest.raises(SystemExit):
            main(["fit", *args, "--print_config"])
        outs.append(yaml.safe_load(capsys.readouterr().out))
    assert outs[0] == outs[1]
    assert outs[0]["model"]["init_args"]["optimizer"]["class_path"] == "lowmem.strategies.HMAdamW"
