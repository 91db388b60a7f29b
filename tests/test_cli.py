"""The `lowmem` command end to end: fit/validate/test/predict, configs, logs and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lowmem.cli import LowMemCLI, main

ROOT = Path(__file__).resolve().parents[1]
CNN_CONFIG = str(ROOT / "configs" / "cnn_adamw.yaml")
LM_CONFIG = str(ROOT / "configs" / "lm_adamw.yaml")
FAST = ["--trainer.max_steps=6", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=3"]  # fmt: skip


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _scalars(log_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_fit_trains_logs_tensorboard_and_saves_config(tmp_path, capsys):
    cli = LowMemCLI(args=["fit", "--config", CNN_CONFIG, *FAST])
    assert cli.trainer.global_step == 6
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.parent.name == "lightning_logs" and log_dir.is_relative_to(tmp_path)
    scalars = _scalars(log_dir)
    assert len(scalars["train/loss"]) == 6 and all(v > 0 for v in scalars["train/loss"])
    # The config's LinearLR warm-up (start_factor 0.05 over 30 steps), stepped every optimizer step.
    assert scalars["lr"] == pytest.approx([3e-3 * (0.05 + 0.95 * k / 30) for k in range(6)])
    assert "val/acc" in scalars and "val/loss" in scalars
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["optimizer"]["class_path"] == "lowmem.strategies.AdamW"
    assert "lowmem fit: step 6: val/acc=" in capsys.readouterr().out


def test_second_run_into_same_directory_does_not_crash(tmp_path):
    args = ["fit", "--config", CNN_CONFIG, *FAST, "--trainer.max_steps=1", "--trainer.logger=false"]
    LowMemCLI(args=args)  # config.yaml lands in default_root_dir (cwd) without a logger
    assert (tmp_path / "config.yaml").exists()
    LowMemCLI(args=args)


def test_weight_decay_groups_come_from_the_role_classifier():
    cli = LowMemCLI(args=["fit", "--config", CNN_CONFIG, *FAST, "--trainer.max_steps=1"])
    groups = cli.trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert "net.head.bias" in groups[1]["param_names"] and "net.norm.weight" in groups[1]["param_names"]


def test_validate_test_and_predict_subcommands(capsys):
    for sub in ("validate", "test"):
        LowMemCLI(args=[sub, "--config", CNN_CONFIG, "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
                        "--trainer.enable_progress_bar=false"])  # fmt: skip
    out = capsys.readouterr().out
    assert "lowmem validate: untrained model: val/acc=" in out and "lowmem test: untrained model: test/acc=" in out
    cli = LowMemCLI(args=["predict", "--config", CNN_CONFIG, "--trainer.limit_predict_batches=2",
                          "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert cli.trainer.predict_loop.predictions[0].dtype == torch.int64


def test_print_config_resolves_class_paths(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CNN_CONFIG, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lowmem.lightning_modules.ImageClassifier"
    assert printed["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 3e-3
    assert printed["data"]["class_path"] == "lowmem.lightning_modules.DigitsDataModule"


def test_user_subclass_selected_by_class_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    cli = LowMemCLI(args=["fit", "--config", str(ROOT / "examples" / "my_model.yaml"), *FAST])
    assert type(cli.model).__name__ == "TinyMLP" and cli.trainer.global_step == 6


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fit", "--config", "missing.yaml"], "File does not exist"),
        (["fit", "--config", CNN_CONFIG, "--model.class_path=lowmem.lightning_modules.NoSuchModel"], "NoSuchModel"),
        (["fit", "--config", CNN_CONFIG, "--model.init_args.widthz=[8]"], "'widthz' is not accepted"),
        (["fit", "--config", CNN_CONFIG, "--trainer.max_epochz=1"], "unrecognized arguments: --trainer.max_epochz"),
        (["fit", "--config", CNN_CONFIG, "--model.init_args.optimizer.init_args.lr=-1", *FAST], "Invalid learning rate"),
        (["fit", "--config", CNN_CONFIG, "--model.init_args.num_classes=1"], "num_classes >= 2"),
        (["fitt", "--config", CNN_CONFIG], "invalid choice: 'fitt'"),
        (["fit", "--config", CNN_CONFIG, "--ckpt_path", "nope.ckpt"], "--ckpt_path nope.ckpt: no such file"),
        (["fit", "--config", CNN_CONFIG, "--ckpt_path", "truncated.ckpt"], "is not a readable checkpoint"),
        (["fit", "--config", LM_CONFIG, "--data.init_args.block_size=32", *FAST],
         "model.init_args.block_size=64 vs data.init_args.block_size=32"),
        (["fit", "--config", CNN_CONFIG, "--trainer.gradient_clip_val=-1", *FAST], "gradient_clip_val=-1 must be"),
        (["fit", "--config", CNN_CONFIG, "--trainer.accelerator=gpu", *FAST], "No supported gpu backend found"),
        (["fit", "--config", CNN_CONFIG, *FAST, "--trainer.val_check_interval=1000"],
         "`val_check_interval` (1000) must be less than or equal to the number of the training batches"),
    ],
    ids=["missing-file", "unknown-class", "misspelled-model-key", "misspelled-trainer-key", "bad-lr", "bad-model-arg",
         "bad-subcommand", "missing-ckpt", "truncated-ckpt", "block-size-clash", "negative-clip",
         "lightning-misconfiguration", "lightning-value-error"],  # fmt: skip
)
def test_bad_input_gives_one_clear_line_and_exit_code_2(args, expected, capsys, tmp_path):
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 not a whole archive")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("lowmem: error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], err
    assert "Traceback" not in err and len(err.splitlines()) <= 4, err


def test_help_names_every_subcommand_including_compare(capsys):
    """The fast top-level help (no torch import) lists exactly the parser's subcommands plus the two
    dispatched before LightningCLI: compare (several fits) and data (no Lightning import)."""
    from lowmem.cli import SUBCOMMANDS

    assert set(SUBCOMMANDS) == set(LowMemCLI.subcommands()) | {"compare", "data"}
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in SUBCOMMANDS)
    import subprocess
    import sys

    script = ("import sys, lowmem.cli\ntry:\n    lowmem.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
              "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'imported torch'")
    bare = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert bare.returncode == 0 and "usage: lowmem" in bare.stdout, bare.stderr


def test_memory_subcommand_prints_the_state_table(capsys):
    main(["memory", "--config", CNN_CONFIG])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| AdamW")}
    assert set(rows) == {"AdamW (baseline)", "AdamW"}
    assert rows["AdamW"].rstrip().endswith("100.0% |")


def test_compare_writes_figure_and_table(tmp_path, capsys):
    configs = [str(ROOT / "configs" / f"cnn_{name}.yaml") for name in ("adamw", "hmadamw")]
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *configs, "--max_steps", "3", "--out", str(tmp_path / "cmp"), "--",
              "--model.init_args.widths=[8]", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=3",
              "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"])  # fmt: skip
    assert exit_info.value.code == 0
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line.split("|") for line in table[2:]}
    assert set(rows) == {"cnn_adamw", "cnn_hmadamw"}
    state = {name: float(cells[4]) for name, cells in rows.items()}
    buffers = {name: float(cells[5]) for name, cells in rows.items()}
    assert state["cnn_hmadamw"] == pytest.approx(state["cnn_adamw"] / 2, rel=0.01)  # v only vs m and v
    assert buffers["cnn_hmadamw"] == pytest.approx(state["cnn_hmadamw"], rel=0.01) and buffers["cnn_adamw"] == 0
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000


def test_compare_says_which_metric_a_run_lacks_and_why():
    """A metric missing from a run's logs reads ``n/a [k]``, and footnote ``[k]`` names the metric,
    the runs and the reason; it is never a bare ``nan``."""
    from lowmem.cli.compare import format_table, summarize

    full = {"train/loss": [(1, 2.0), (2, 1.5)], "val/loss": [(2, 1.4)], "memory/optimizer_state_mib": [(1, 0.5)],
            "memory/grad_buffers_mib": [(1, 0.0)], "memory/peak_mib": [(1, 300.0), (2, 310.0)],
            "time/step_ms": [(1, 50.0), (2, 10.0), (3, 12.0)]}  # fmt: skip
    no_val = {k: v for k, v in full.items() if k != "val/loss"}
    no_monitor = {"train/loss": full["train/loss"]}  # neither validation nor MemoryMonitor
    one_timed_step = {**full, "time/step_ms": [(1, 50.0)]}
    rows = [summarize(n, s) for n, s in [("full", full), ("noval", no_val), ("nomon", no_monitor), ("one", one_timed_step)]]
    table = format_table(rows)
    assert "nan" not in table
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:6]}
    assert cells["full"] == ["1.5000", "1.4000", "0.500", "0.000", "310", "11.0"]
    assert cells["noval"][1] == cells["nomon"][1] == "n/a [1]" and cells["noval"][2:] == cells["full"][2:]
    assert cells["nomon"][2:] == ["n/a [2]"] * 4 and cells["one"][5] == "n/a [3]" and cells["one"][:5] == cells["full"][:5]
    notes = table.split("\n\n")[1].splitlines()
    assert notes[0].startswith("[1] no final val loss for noval, nomon: no validation ran") and "limit_val_batches" in notes[0]
    assert notes[1].startswith("[2] no optimizer state MiB, grad buffers MiB, peak MiB, median step ms for nomon: "
                               "MemoryMonitor logged nothing")  # fmt: skip
    assert notes[2].startswith("[3] no median step ms for one: time/step_ms was logged for the first step only")
    assert len(notes) == 3 and rows[0]["missing"] == {}


def test_compare_notes_a_run_without_validation(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", CNN_CONFIG, "--max_steps", "2", "--out", str(tmp_path / "cmp"), "--",
              "--model.init_args.widths=[8]", "--trainer.limit_val_batches=0", "--trainer.enable_model_summary=false",
              "--trainer.log_every_n_steps=1"])  # fmt: skip
    assert exit_info.value.code == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    row = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert row[0] == "cnn_adamw" and row[2] == "n/a [1]" and float(row[3]) > 0 and "nan" not in table
    assert "[1] no final val loss for cnn_adamw: no validation ran" in table
    assert "lowmem compare: note: no final val loss for cnn_adamw: no validation ran" in capsys.readouterr().err


def test_compare_rejects_missing_configs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "nope.yaml"])
    assert exit_info.value.code == 2 and "not found: nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("switch", "lr", "weight_decay"),
    [
        (["--model.init_args.optimizer=lowmem.strategies.Adafactor"], 1e-2, 0.0),
        (['--model.init_args.optimizer={"class_path": "lowmem.strategies.Adafactor", "init_args": {"lr": 0.05}}'],
         0.05, 0.0),
        (["--model.init_args.optimizer=lowmem.strategies.Adafactor", "--model.init_args.optimizer.init_args.weight_decay=0.2"],
         1e-2, 0.2),
        ([], 3e-3, 0.05),  # no switch: the config's own optimizer settings
    ],
    ids=["class-only", "dict-with-lr", "class-then-key", "no-switch"],
)
def test_switching_the_optimizer_on_the_command_line_starts_from_its_defaults(switch, lr, weight_decay):
    """The AdamW config sets lr 3e-3 and weight decay 0.05; Adafactor named on the command line
    must not inherit them (jsonargparse carries over init_args the new class also accepts)."""
    cli = LowMemCLI(args=["fit", "--config", CNN_CONFIG, *switch, *FAST, "--trainer.max_steps=1",
                          "--model.init_args.lr_scheduler=null"])  # fmt: skip
    decayed = cli.trainer.optimizers[0].param_groups[0]
    assert (decayed["lr"], decayed["weight_decay"]) == (pytest.approx(lr), pytest.approx(weight_decay))


def test_memory_subcommand_plans_fsdp2_ranks(capsys):
    main(["memory", "--config", CNN_CONFIG, "--ranks", "4"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| optimizer"))
    assert "persistent_per_rank MiB" in header and "persistent_total MiB" in header
    row = next(line for line in out.splitlines() if line.startswith("| AdamW (baseline)")).split("|")
    persistent, per_rank, total = (float(row[i]) for i in (6, 7, 8))
    assert per_rank < persistent / 2 and total == pytest.approx(persistent, rel=0.01)


@pytest.fixture
def cnn_checkpoint(tmp_path):
    """A 2-step AdamW checkpoint of the CNN config with widths [4]."""
    main(["fit", "--config", CNN_CONFIG, "--model.init_args.widths=[4]", "--trainer.max_steps=2",
          "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"])  # fmt: skip
    return str(next((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.widths=[8]"], "model.init_args.widths: [4] in the checkpoint, [8] in the config"),
        (["--model=lowmem.lightning_modules.DiffusionModel"], "holds a lowmem.lightning_modules.ImageClassifier"),
        (["--model.init_args.widths=[4]", "--model.init_args.optimizer=lowmem.strategies.HMAdamW"],
         "the checkpoint holds the state of torch.optim.adamw.AdamW, but this run trains lowmem.optim.hmadam.HMAdamW"),
    ],
    ids=["other-hyperparameters", "other-model-class", "other-optimizer"],
)
def test_resuming_a_checkpoint_of_another_model_or_optimizer_is_one_line(cnn_checkpoint, args, expected, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CNN_CONFIG, *args, "--ckpt_path", cnn_checkpoint, "--trainer.max_steps=4",
              "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def test_validating_a_checkpoint_with_other_settings_notes_them(cnn_checkpoint, capsys):
    capsys.readouterr()
    main(["validate", "--config", CNN_CONFIG, "--ckpt_path", cnn_checkpoint, "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false"])  # fmt: skip
    captured = capsys.readouterr()
    assert "note: evaluating the checkpoint's model (model.init_args.widths: [4] in the checkpoint" in captured.err
    assert "lowmem validate: checkpoint step 2: val/acc=" in captured.out  # the step it was saved at, not 0


SHORT = ["--config", CNN_CONFIG, "--model.init_args.widths=[4]", "--trainer.val_check_interval=10",
         "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false"]  # fmt: skip


def test_a_run_shorter_than_val_check_interval_is_validated_and_checkpointed(tmp_path, capsys):
    main(["fit", *SHORT, "--trainer.max_steps=5"])
    assert "lowmem fit: step 5: val/acc=" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "lightning_logs" / "version_0" / "checkpoints").iterdir()] == [
        "epoch=0-step=5.ckpt"]  # fmt: skip


def test_ckpt_path_last_resumes_the_newest_checkpoint_of_earlier_runs(tmp_path, capsys):
    """5 steps, then `--ckpt_path last` to 8 (a new version folder, as Lightning makes one per run):
    the same parameters and loop state as 8 uninterrupted steps."""
    main(["fit", *SHORT, "--trainer.max_steps=5", "--trainer.default_root_dir=resumed"])
    main(["fit", *SHORT, "--trainer.max_steps=8", "--trainer.default_root_dir=resumed", "--ckpt_path", "last"])
    assert "--ckpt_path last: resuming from resumed/lightning_logs/version_0/checkpoints/epoch=0-step=5.ckpt" in (
        capsys.readouterr().err)  # fmt: skip
    main(["fit", *SHORT, "--trainer.max_steps=8", "--trainer.default_root_dir=straight"])
    resumed, straight = (torch.load(next((tmp_path / d).glob("lightning_logs/*/checkpoints/*step=8.ckpt")),
                                    weights_only=False) for d in ("resumed", "straight"))  # fmt: skip
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in straight["state_dict"].items())
    assert resumed["loops"] == straight["loops"]


def test_ckpt_path_last_without_a_checkpoint_says_it_starts_from_step_0(tmp_path, capsys):
    main(["fit", *SHORT, "--trainer.max_steps=1", "--ckpt_path", "last"])
    assert "no checkpoint under" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *SHORT, "--ckpt_path", "last", "--trainer.default_root_dir=elsewhere"])
    assert exit_info.value.code == 2 and "--ckpt_path last: no checkpoint under" in capsys.readouterr().err


def test_two_runs_started_together_get_their_own_log_folders(tmp_path):
    """Two runs set up before either has logged (as two jobs started together in one folder):
    each reserves its version folder at start. Lightning alone gives both version_0."""
    args = ["--config", CNN_CONFIG, "--trainer.max_steps=1"]
    first, second = (LowMemCLI(args=args, run=False) for _ in range(2))
    assert (first.trainer.logger.version, second.trainer.logger.version) == (0, 1)
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]


def test_a_resume_chain_bounded_by_max_epochs_trains_exactly_max_epochs(tmp_path):
    """3 epochs of 5 batches with a checkpoint every step; resumed from the end of epoch 0, then
    again from that resumed run's end of epoch 1: 15 steps, as uninterrupted, with the same
    parameters and epoch counters (Lightning alone: 20 steps, one epoch too many)."""
    args = ["fit", "--config", CNN_CONFIG, "--model.init_args.widths=[4]", "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks.filename={step}"]  # fmt: skip
    logs = tmp_path / "lightning_logs"
    main(args)
    main([*args, "--ckpt_path", str(logs / "version_0" / "checkpoints" / "step=5.ckpt")])
    main([*args, "--ckpt_path", str(logs / "version_1" / "checkpoints" / "step=10.ckpt")])
    steps = sorted(int(p.stem.split("=")[1]) for p in (logs / "version_2" / "checkpoints").glob("*.ckpt"))
    assert steps[-1] == 15
    chained, straight = (torch.load(logs / v / "checkpoints" / "step=15.ckpt", weights_only=False)
                         for v in ("version_2", "version_0"))  # fmt: skip
    assert chained["loops"]["fit_loop"]["epoch_progress"] == straight["loops"]["fit_loop"]["epoch_progress"]
    assert all(torch.equal(chained["state_dict"][k], v) for k, v in straight["state_dict"].items())


def test_log_every_n_steps_zero_trains_without_step_logs(tmp_path):
    """`log_every_n_steps: 0` (no step logging) used to divide by zero in the memory monitor."""
    cli = LowMemCLI(args=["fit", "--config", CNN_CONFIG, "--model.init_args.widths=[4]", "--trainer.max_steps=2",
                          "--trainer.log_every_n_steps=0", "--trainer.limit_val_batches=1",
                          "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert cli.trainer.global_step == 2


def test_a_fit_refused_at_setup_leaves_no_empty_log_folder(tmp_path, capsys):
    """The Trainer is built (and its version_N folder reserved) before the optimizer strategy's
    checks refuse it: the refused run removes the folder it reserved, a trained one keeps its own."""
    hmadamw = str(ROOT / "configs" / "cnn_hmadamw.yaml")
    main(["fit", "--config", hmadamw, *FAST, "--trainer.max_steps=1", "--trainer.val_check_interval=1"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", hmadamw, *FAST, "--trainer.gradient_clip_val=1",
              "--trainer.gradient_clip_algorithm=value"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "trainer.gradient_clip_algorithm=value would clip" in err
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints").is_dir()
