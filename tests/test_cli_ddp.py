"""DDP and FSDP2 through the door users use: ``lowmem fit`` started as a command with 2 ranks (gloo, CPU).

For every optimizer strategy, the command with ``--trainer.devices=2 --trainer.strategy=ddp`` at
per-rank batch B must exit 0, write one set of logs (one version folder, one event file, one
checkpoint, one config), print its end-of-fit report once, and end where one process at the
global batch 2B ends: the checkpointed parameters agree to float tolerance, and the synced
``val/loss`` equals the one-process value (without ``sync_dist`` it is rank 0's half only).

The one-process references run in this process through ``LowMemCLI``; the DDP runs are the
``lowmem`` console script under ``timeout -s KILL`` (a hung Lightning rank ignores SIGTERM).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lowmem.cli import LowMemCLI

ROOT = Path(__file__).resolve().parents[1]
KILL_AFTER_S = 150  # ~10 s on an idle 2-core machine
BATCH, STEPS = 8, 6

# Hyperparameters that exercise each optimizer's interesting paths within STEPS steps. HMAdam(W)'s
# variance_correction is named: the default "auto" is "hook" in the one-process reference and "noise"
# on two ranks, which end apart by design (the auto tests below run the default).
OPTIMIZERS: dict[str, dict] = {
    "AdamW": {"lr": 3e-3},
    "HMAdamW": {"lr": 3e-3, "variance_correction": "noise"},
    "HMAdam": {"lr": 3e-3, "weight_decay": 1e-2, "variance_correction": "noise"},
    "AdamS": {"lr": 3e-3},
    "SlimAdamW": {"lr": 3e-3},
    "AdaPM": {"lr": 3e-3, "refresh_every": 4},
    "IOAdam": {"lr": 1e-2, "buffer_size": 3},
    "AdamMini": {"lr": 3e-3},
    "Adafactor": {"lr": 1e-2},
}


def lowmem_command() -> list[str]:
    """The installed ``lowmem`` console script of this interpreter's environment."""
    script = shutil.which("lowmem", path=str(Path(sys.executable).parent))
    assert script is not None, "the lowmem console script is not installed (pip install -e .)"
    return [script]


# The models, shrunk to seconds. The language model (fused q/k/v of 36 rows: the 2 ranks' shards
# of 18 rows cut the key rows 12-23 in two; a tied embedding and head) is the one with attention
# heads, low-rank AdaPM blocks and IO-Adam's tied-embedding statistics.
MODELS = {
    "cnn": {"widths": [4, 8]},
    "lm": {"n_layer": 1, "n_head": 2, "n_embd": 12, "block_size": 16},
}


def write_config(path: Path, optimizer: str, family: str = "cnn") -> Path:
    """An overlay of a shipped base config (``base:``, as the shipped configs do, so the DDP
    launcher's re-run of the command resolves it too), shrunk to seconds, with ``optimizer``,
    constant lr and in-fit validation."""
    config = {
        "base": str(ROOT / "configs" / "base" / f"{family}.yaml"),
        "model": {"init_args": {
            **MODELS[family],
            "lr_scheduler": None,  # full lr from step 1: the params move ~lr per step
            "optimizer": {"class_path": f"lowmem.strategies.{optimizer}", "init_args": OPTIMIZERS[optimizer]},
        }},
        "trainer": {"accelerator": "cpu", "max_steps": STEPS, "val_check_interval": 3, "limit_val_batches": 2,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
    }  # fmt: skip
    if family == "lm":
        config["data"] = {"init_args": {"block_size": MODELS["lm"]["block_size"]}}
    path.write_text(yaml.safe_dump(config))
    return path


def scalars(log_dir: Path, tag: str) -> list[float]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def val_losses(log_dir: Path) -> list[float]:
    return scalars(log_dir, "val/loss")


# How the two-rank command runs: DDP, or FSDP2 (LowMemModule.configure_model shards each child
# with fully_shard; widths 3 and 5 give shards of uneven size, e.g. 2 + 1 output channels).
LAUNCHES = {
    "ddp": ["--trainer.strategy=ddp"],
    "fsdp2": ["--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
              "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
              "--trainer.strategy.save_distributed_checkpoint=false", "--model.init_args.widths=[3,5]"],
}  # fmt: skip
# HMAdamW's momentum is the sharded .grad FSDP2 reduce-scatters into: with 2 micro-batches per step
# it must still be B = b1 B + mean(g) on every shard.
LAUNCHES["fsdp2-accumulate"] = [*LAUNCHES["fsdp2"], "--trainer.accumulate_grad_batches=2"]
LAUNCHES["fsdp2-lm"] = LAUNCHES["fsdp2"][:-1]  # the language model (FAMILY), without the CNN's widths
LAUNCHES["ddp-lm"] = LAUNCHES["ddp"]
FAMILY = {"fsdp2-lm": "lm", "ddp-lm": "lm"}
FSDP2_OPTIMIZERS = ("AdamW", "HMAdamW", "HMAdam", "AdamS", "SlimAdamW", "AdamMini", "Adafactor", "IOAdam", "AdaPM")
CASES = [("ddp", name) for name in OPTIMIZERS] + [("fsdp2", name) for name in FSDP2_OPTIMIZERS] + [
    ("fsdp2-accumulate", "HMAdamW"), ("fsdp2-accumulate", "SlimAdamW"),
    ("fsdp2-lm", "AdaPM"), ("fsdp2-lm", "IOAdam"), ("fsdp2-lm", "AdamMini"),
    # IO-Adam's tied embedding sums token counts with output gradients: only exact statistics
    # (not averaged ones) give one process's run here.
    ("ddp-lm", "IOAdam")]  # fmt: skip


def same_maths_args(launch: str) -> list[str]:
    """The arguments of a launch that the one-process reference takes too (model size, accumulation)."""
    return [arg for arg in LAUNCHES[launch] if arg.startswith(("--model.", "--trainer.accumulate"))]


# Variables a launcher sets for its ranks: a test process that has them must not pass them on.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_two_ranks(config: Path, cwd: Path, launch: str, *extra: str) -> subprocess.CompletedProcess:
    env = child_env()
    command = [*lowmem_command(), "fit", "--config", str(config), "--trainer.devices=2", *LAUNCHES[launch],
               f"--data.init_args.batch_size={BATCH}", *extra]  # fmt: skip
    return subprocess.run(["timeout", "-s", "KILL", str(KILL_AFTER_S), *command], cwd=cwd, env=env,
                          capture_output=True, text=True, start_new_session=True)  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize(("launch", "optimizer"), CASES, ids=[f"{launch}-{name}" for launch, name in CASES])
def test_lowmem_fit_on_two_ranks_matches_one_process_at_the_global_batch(launch, optimizer, tmp_path, monkeypatch):
    config = write_config(tmp_path / "config.yaml", optimizer, FAMILY.get(launch, "cnn"))
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single_dir.mkdir(), ddp_dir.mkdir()

    monkeypatch.chdir(single_dir)
    reference = LowMemCLI(args=["fit", "--config", str(config), f"--data.init_args.batch_size={2 * BATCH}",
                                *same_maths_args(launch)])  # fmt: skip
    reference_params = {k: v.detach().clone() for k, v in reference.model.state_dict().items()}
    reference_val = val_losses(Path(reference.trainer.log_dir))

    proc = run_two_ranks(config, ddp_dir, launch)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"

    versions = sorted((ddp_dir / "lightning_logs").iterdir())
    assert [v.name for v in versions] == ["version_0"], versions
    log_dir = versions[0]
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    checkpoints = list((log_dir / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in checkpoints] == [f"epoch=0-step={STEPS}.ckpt"]
    assert (log_dir / "config.yaml").exists()
    assert proc.stdout.count("lowmem fit: logs in") == 1 and proc.stdout.count("lowmem fit: step 6:") == 1

    state = torch.load(checkpoints[0], map_location="cpu", weights_only=False)["state_dict"]
    assert state.keys() == reference_params.keys()
    diff = max(float((state[k].double() - reference_params[k].double()).abs().max()) for k in state)
    assert diff < 1e-4, f"{optimizer} ({launch}): max |param difference| {diff:.3g} between 2 ranks and 1 process"
    # State per rank and in total: DDP replicates the state, FSDP2 splits it (replicated parts aside).
    per_rank, total = scalars(log_dir, "memory/optimizer_state_mib"), scalars(log_dir, "memory/state_total_mib")
    if launch == "ddp":
        assert total == pytest.approx([2 * r for r in per_rank])
    else:
        # rank 0 holds the larger part (uneven shards) or both hold replicated parts: r < t <= 2r
        assert per_rank and all(r < t <= 2 * r for r, t in zip(per_rank, total)), (per_rank, total)
    ddp_val = val_losses(log_dir)
    assert len(ddp_val) == len(reference_val) >= 2
    assert ddp_val == pytest.approx(reference_val, rel=1e-5, abs=1e-6)


@pytest.mark.distributed
def test_fsdp2_refuses_an_optimizer_that_cannot_run_on_shards_in_one_line(tmp_path):
    """Every lowmem optimizer runs on FSDP2; torch's own Adafactor, named directly, fails on
    DTensors (DTensor refuses its in-place ops on sharded norms): refused at fit start."""
    config = yaml.safe_load(write_config(tmp_path / "config.yaml", "Adafactor").read_text())
    config["model"]["init_args"]["optimizer"] = {"class_path": "torch.optim.Adafactor", "init_args": {"lr": 1e-2}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_two_ranks(tmp_path / "config.yaml", tmp_path, "fsdp2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lowmem: error:")]
    assert errors and all("FSDP2/ModelParallelStrategy" in line and "trainer.strategy=ddp" in line for line in errors)
    assert "Traceback" not in proc.stderr


@pytest.mark.distributed
def test_ddp_refuses_ioadam_fused_linear_in_one_line_and_leaves_no_log_folder(tmp_path):
    """IOAdam(fused_linear=True) is single-process only: on 2 ranks the strategy's check refuses it
    in configure_optimizers, before the optimizer's own guard would raise from deep inside the
    setup, and the version folder the refused run reserved is removed again."""
    config = yaml.safe_load(write_config(tmp_path / "config.yaml", "IOAdam").read_text())
    config["model"]["init_args"]["optimizer"]["init_args"]["fused_linear"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_two_ranks(tmp_path / "config.yaml", tmp_path, "ddp")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lowmem: error:")]
    assert errors and all("fused_linear" in line and "world size is 2" in line for line in errors), errors
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "lightning_logs").glob("version_*"))


@pytest.mark.distributed
def test_one_process_at_half_the_batch_ends_elsewhere(tmp_path, monkeypatch):
    """The control of the equivalence test: at the per-rank batch, one process trains differently,
    so the 1e-4 tolerance above does detect a wrong global batch."""
    config = write_config(tmp_path / "config.yaml", "HMAdamW")
    runs = {}
    for batch in (BATCH, 2 * BATCH):
        (tmp_path / str(batch)).mkdir()
        monkeypatch.chdir(tmp_path / str(batch))
        cli = LowMemCLI(args=["fit", "--config", str(config), f"--data.init_args.batch_size={batch}",
                              "--trainer.logger=false", "--trainer.enable_checkpointing=false"])  # fmt: skip
        runs[batch] = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
    diff = max(float((runs[BATCH][k] - runs[2 * BATCH][k]).abs().max()) for k in runs[BATCH])
    assert diff > 100 * 1e-4, diff


# ------------------------------------------------------------------- FSDP2 distributed checkpoints
def _checkpointed_config(path: Path, optimizer: str, family: str = "cnn") -> Path:
    """``write_config`` plus a ModelCheckpoint every 3 steps (distributed checkpoints: one folder
    with a shard file per rank, the default of ModelParallelStrategy)."""
    config = yaml.safe_load(write_config(path, optimizer, family).read_text())
    config["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"every_n_train_steps": 3, "save_top_k": -1, "filename": "{step}"}}]  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def _consolidated(folder: Path, out: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, out)
    return torch.load(out, map_location="cpu", weights_only=False)


def _tensor_differences(a, b, path="") -> list[str]:
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [f"{path} keys"]
        return [d for k in a for d in _tensor_differences(a[k], b[k], f"{path}/{k}")]
    return [] if a == b else [path]


FSDP2_SHARDED = ["--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
                 "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
                 "--model.init_args.widths=[3,5]"]  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize(("optimizer", "family"), [("HMAdamW", "cnn"), ("AdamMini", "cnn"), ("Adafactor", "cnn"),
                                                  ("AdaPM", "lm"), ("IOAdam", "lm")])  # fmt: skip
def test_fsdp2_distributed_checkpoint_resumes_bit_for_bit_on_two_ranks(optimizer, family, tmp_path):
    """Uninterrupted 6 steps against a resume from the step-3 checkpoint (both on 2 ranks): the
    parameters, HMAdamW's momentum (saved from the sharded .grad), v, the step counts, the RNG
    stream and the loop state in the final distributed checkpoints are identical."""
    config = _checkpointed_config(tmp_path / "config.yaml", optimizer, family)
    LAUNCHES["fsdp2-sharded"] = FSDP2_SHARDED if family == "cnn" else FSDP2_SHARDED[:-1]  # no CNN widths
    try:
        assert run_two_ranks(config, tmp_path, "fsdp2-sharded").returncode == 0
        ckpts = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
        assert (ckpts / "step=3.ckpt" / ".metadata").is_file()  # a distributed checkpoint folder
        resumed = run_two_ranks(config, tmp_path, "fsdp2-sharded", "--ckpt_path", str(ckpts / "step=3.ckpt"))
        assert resumed.returncode == 0, resumed.stderr[-4000:]
    finally:
        del LAUNCHES["fsdp2-sharded"]
    final = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "step=6.ckpt"
    a, b = (_consolidated(folder, tmp_path / f"{i}.pt") for i, folder in enumerate((ckpts / "step=6.ckpt", final)))
    assert _tensor_differences(a, b) == []
    state = a["optimizer_0"]["state"]
    if optimizer == "HMAdamW":
        buffers = [entry["momentum_buffer"] for entry in state.values()]
        assert len(buffers) == len(a["state_dict"]) and all(bool(buf.abs().sum() > 0) for buf in buffers)
    if optimizer == "AdaPM":  # the low-rank factors (sharded L, whole R) and the q/k/v parts were saved
        keys = {key for entry in state.values() for key in entry}
        assert {"factor_L", "factor_R", "factor_L_q", "factor_R_k", "exp_avg_v"} <= keys, keys
    meta = torch.load(ckpts / "step=6.ckpt" / "meta.pt", weights_only=False)
    assert meta["global_step"] == STEPS and len(meta["lowmem_rng_stream"]["cpu"]) == 2  # one RNG state per rank


@pytest.mark.distributed
def test_fsdp2_checkpoint_of_two_ranks_resumes_on_one_process_at_the_global_batch(tmp_path):
    """Another world size: the 2-rank distributed checkpoint, resumed by one process at the same
    global batch, ends where the 2-rank run ends (to float rounding: the sums run in another order)."""
    config = _checkpointed_config(tmp_path / "config.yaml", "HMAdamW")
    LAUNCHES["fsdp2-sharded"] = FSDP2_SHARDED
    try:
        assert run_two_ranks(config, tmp_path, "fsdp2-sharded").returncode == 0
    finally:
        del LAUNCHES["fsdp2-sharded"]
    ckpts = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    # The command, not LowMemCLI in this process: Lightning would leave MASTER_PORT and a process
    # group here, which later subprocess tests inherit.
    one = subprocess.run(["timeout", "-s", "KILL", str(KILL_AFTER_S), *lowmem_command(), "fit", "--config", str(config),
                          "--trainer.devices=1", "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
                          "--trainer.strategy.data_parallel_size=1", "--trainer.strategy.tensor_parallel_size=1",
                          "--model.init_args.widths=[3,5]", f"--data.init_args.batch_size={2 * BATCH}",
                          "--ckpt_path", str(ckpts / "step=3.ckpt")],
                         cwd=tmp_path, capture_output=True, text=True, start_new_session=True,
                         env=child_env())  # fmt: skip
    assert one.returncode == 0, one.stderr[-4000:]
    two = _consolidated(ckpts / "step=6.ckpt", tmp_path / "two.pt")["state_dict"]
    one = _consolidated(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "step=6.ckpt", tmp_path / "one.pt")
    diff = max(float((two[k] - one["state_dict"][k]).abs().max()) for k in two)
    assert diff < 1e-6, diff


# ------------------------------------------- HMAdamW's default variance_correction="auto" per loop
AUTO_NOTE = "lowmem: HMAdamW: variance_correction=auto resolved to {}"


def _hmadamw_config(path: Path, correction: str | None = None, checkpointed: bool = False) -> Path:
    """The HMAdamW config with the default variance_correction (``auto``) or ``correction``."""
    config = yaml.safe_load((_checkpointed_config if checkpointed else write_config)(path, "HMAdamW").read_text())
    init_args = config["model"]["init_args"]["optimizer"]["init_args"]
    init_args.pop("variance_correction")
    if correction is not None:
        init_args["variance_correction"] = correction
    path.write_text(yaml.safe_dump(config))
    return path


def _optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["optimizer_states"][0]


def _is_hook_state(state: dict) -> bool:
    """Whether a saved HMAdamW state was stepped with hooks (they save their micro-batch count)."""
    entries = list(state["state"].values())
    assert entries
    return all("variance_micro_batches" in entry for entry in entries)


@pytest.mark.distributed
@pytest.mark.parametrize("launch", ["ddp", "fsdp2"])
def test_auto_variance_correction_is_noise_on_two_ranks_where_hook_is_refused(launch, tmp_path):
    """``lowmem fit`` on 2 ranks with HMAdamW's default: it trains, says once (rank 0) that auto is
    noise there, and saves the requested "auto" with noise's state; the same run with an explicit
    "hook" ends at fit start with the one-line refusal."""
    (tmp_path / "auto").mkdir()
    proc = run_two_ranks(_hmadamw_config(tmp_path / "auto.yaml"), tmp_path / "auto", launch)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
    assert proc.stderr.count(AUTO_NOTE.format("noise (world size 2)")) == 1, proc.stderr[-3000:]
    (checkpoint,) = (tmp_path / "auto" / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    state = _optimizer_state(checkpoint)
    assert [g["variance_correction"] for g in state["param_groups"]] == ["auto"] * len(state["param_groups"])
    assert not any("variance_mode" in g for g in state["param_groups"]) and not _is_hook_state(state)
    if launch == "ddp":
        (tmp_path / "hook").mkdir()
        hook = run_two_ranks(_hmadamw_config(tmp_path / "hook.yaml", "hook"), tmp_path / "hook", launch)
        assert hook.returncode == 2, hook.stderr[-3000:]
        errors = [line for line in hook.stderr.splitlines() if line.startswith("lowmem: error:")]
        assert errors and all("variance_correction='hook'" in e and "world size 2" in e for e in errors), errors
        assert "Traceback" not in hook.stderr


@pytest.mark.distributed
def test_a_one_process_auto_checkpoint_resumes_on_two_ranks_as_noise(tmp_path, monkeypatch):
    """The step-3 checkpoint of a one-process run (auto resolved to hook: hook's state saved, with the
    requested "auto") resumes under DDP on 2 ranks without a refusal, as noise, to step 6."""
    config = _hmadamw_config(tmp_path / "config.yaml", checkpointed=True)
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    one = LowMemCLI(args=["fit", "--config", str(config), f"--data.init_args.batch_size={2 * BATCH}"])
    assert one.trainer.optimizers[0].variance_mode == "hook"
    saved = Path(one.trainer.log_dir) / "checkpoints" / "step=3.ckpt"
    state = _optimizer_state(saved)
    assert _is_hook_state(state) and {g["variance_correction"] for g in state["param_groups"]} == {"auto"}
    proc = run_two_ranks(config, tmp_path / "two", "ddp", "--ckpt_path", str(saved))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
    assert proc.stderr.count(AUTO_NOTE.format("noise (world size 2)")) == 1, proc.stderr[-3000:]
    final = _optimizer_state(tmp_path / "two" / "lightning_logs" / "version_0" / "checkpoints" / f"step={STEPS}.ckpt")
    assert {g["variance_correction"] for g in final["param_groups"]} == {"auto"} and not _is_hook_state(final)
    assert all(float(entry["step"]) == STEPS for entry in final["state"].values())


def test_auto_variance_correction_is_noise_under_fp16_and_hook_in_fp32_through_the_cli(tmp_path, monkeypatch, capsys):
    """``lowmem fit`` in one process on CPU: with ``precision=16-mixed`` (the CLI swaps in
    FoldedMomentumPrecision, whose GradScaler the fit-start check reports) auto is noise, no hooks,
    and the fit trains; at 32-true it is hook; an explicit hook under fp16 is refused in one line."""
    from lowmem.cli import main
    from lowmem.strategies import FoldedMomentumPrecision

    config = _hmadamw_config(tmp_path / "config.yaml")
    quiet = ["--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
             "--trainer.limit_val_batches=1"]  # fmt: skip
    seen = {}
    for precision in ("16-mixed", "32-true"):
        (tmp_path / precision).mkdir()
        monkeypatch.chdir(tmp_path / precision)
        cli = LowMemCLI(args=["fit", "--config", str(config), f"--trainer.precision={precision}", *quiet])
        opt = cli.trainer.optimizers[0]
        hooked = any(p._backward_hooks for p in cli.model.parameters())
        seen[precision] = (opt.variance_mode, opt.loop_note(), hooked, cli.trainer.global_step)
        assert isinstance(cli.trainer.precision_plugin, FoldedMomentumPrecision) == (precision == "16-mixed")
    assert seen["16-mixed"] == ("noise", "HMAdamW: variance_correction=auto resolved to noise (fp16 loss scaling)",
                                False, 3), seen  # fmt: skip
    assert seen["32-true"][0] == "hook" and seen["32-true"][2], seen
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(_hmadamw_config(tmp_path / "hook.yaml", "hook")), "--trainer.precision=16-mixed",
              *quiet])  # fmt: skip
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lowmem: error:")]
    assert exit_info.value.code == 2 and len(errors) == 1, err
    assert "variance_correction='hook'" in errors[0] and "an fp16 GradScaler" in errors[0], errors
