"""`lowmem compare`: train several configs side by side and draw the picture to choose from.

    lowmem compare configs/cnn_adamw.yaml configs/cnn_hmadamw.yaml --out runs/compare
    lowmem compare --family cnn --max_steps 100          # every configs/cnn_*.yaml

Each config trains in its own process (so the CPU peak RSS of one run is not another's), with
TensorBoard logs under ``OUT/<config name>/``. Then one figure (``OUT/compare.png``: training loss
vs step, validation loss vs step, optimizer state and peak memory per config) and one markdown
table (``OUT/compare.md``: final losses, optimizer state and gradient-buffer MiB, peak MiB, median
step time) are written from the logs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

__all__ = ["compare_main", "read_scalars", "summarize", "format_table"]

_KEYS = ("train/loss", "val/loss", "memory/optimizer_state_mib", "memory/grad_buffers_mib", "memory/peak_mib",
         "time/step_ms")  # fmt: skip


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of the TensorBoard event files under ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def summarize(name: str, scalars: dict[str, list[tuple[int, float]]]) -> dict[str, float | str]:
    """One table row: last value of losses/memory, median step time, max peak."""
    last = lambda key: scalars[key][-1][1] if scalars.get(key) else float("nan")  # noqa: E731
    steps_ms = [v for _, v in scalars.get("time/step_ms", [])[1:]]  # the first step includes warm-up
    return {
        "config": name,
        "train_loss": last("train/loss"),
        "val_loss": last("val/loss"),
        "state_mib": last("memory/optimizer_state_mib"),
        "grad_buffers_mib": last("memory/grad_buffers_mib"),
        "peak_mib": max((v for _, v in scalars.get("memory/peak_mib", [])), default=float("nan")),
        "step_ms": statistics.median(steps_ms) if steps_ms else float("nan"),
    }


def format_table(rows: list[dict[str, float | str]]) -> str:
    head = "| config | final train loss | final val loss | optimizer state MiB | grad buffers MiB | peak MiB | median step ms |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['state_mib']:.3f} | "
                     f"{r['grad_buffers_mib']:.3f} | {r['peak_mib']:.0f} | {r['step_ms']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def _plot(runs: dict[str, dict[str, list[tuple[int, float]]]], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, scalars in runs.items():
        for ax, key in zip(axes[:2], ("train/loss", "val/loss")):
            if scalars.get(key):
                steps, values = zip(*scalars[key])
                ax.plot(steps, values, label=name, marker="o" if key == "val/loss" else None, ms=3)
    for ax, key in zip(axes[:2], ("train/loss", "val/loss")):
        ax.set(xlabel="optimizer step", ylabel=key, title=key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    names = [r["config"] for r in rows]
    state = [r["state_mib"] for r in rows]
    buffers = [r["grad_buffers_mib"] for r in rows]
    axes[2].barh(names, state, label="optimizer state")
    axes[2].barh(names, buffers, left=state, label="persistent grad buffers")
    axes[2].set(xlabel="MiB", title="optimizer memory")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lowmem compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="config files to train and compare")
    parser.add_argument("--family", help="compare every configs/<family>_*.yaml (cnn, lm, diffusion)")
    parser.add_argument("--configs_dir", default="configs", help="where --family looks (default: configs)")
    parser.add_argument("--out", default="runs/compare", help="output directory (logs, compare.png, compare.md)")
    parser.add_argument("--max_steps", type=int, help="override trainer.max_steps for every run")
    parser.add_argument("--seed", type=int, help="override seed_everything for every run")
    parser.epilog = "Arguments after `--` are passed to every `lowmem fit` run."
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.overrides = extra
    if args.family:
        args.configs += sorted(str(p) for p in Path(args.configs_dir).glob(f"{args.family}_*.yaml"))
    if not args.configs:
        parser.error("give config files or --family")
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        parser.error(f"config file(s) not found: {', '.join(missing)}")
    return args


def compare_main(argv: list[str]) -> int:
    args = _parse(argv)
    out = Path(args.out)
    runs = {}
    for config in args.configs:
        name = Path(config).stem
        cmd = [sys.executable, "-m", "lowmem", "fit", "--config", config, "--trainer.enable_progress_bar=false",
               f"--trainer.logger.class_path=lightning.pytorch.loggers.TensorBoardLogger",
               f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={name}",
               "--trainer.logger.init_args.version=compare", "--trainer.logger.init_args.default_hp_metric=false"]  # fmt: skip
        if args.max_steps:
            cmd += [f"--trainer.max_steps={args.max_steps}", "--trainer.max_epochs=-1"]
        if args.seed is not None:
            cmd.append(f"--seed_everything={args.seed}")
        cmd += args.overrides
        shutil.rmtree(out / name / "compare", ignore_errors=True)  # a rerun must not append to old curves
        print(f"lowmem compare: training {name}", flush=True)
        result = subprocess.run(cmd)
        if result.returncode != 0:
            print(f"lowmem compare: {name} failed with exit code {result.returncode}", file=sys.stderr)
            return result.returncode
        runs[name] = read_scalars(out / name / "compare")
    rows = [summarize(name, scalars) for name, scalars in runs.items()]
    table = format_table(rows)
    (out / "compare.md").write_text(table + "\n")
    _plot(runs, rows, out / "compare.png")
    print(table)
    print(f"lowmem compare: wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return 0
