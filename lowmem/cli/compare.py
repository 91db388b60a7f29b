"""`lowmem compare`: train several configs side by side and draw the picture to choose from.

    lowmem compare configs/cnn_adamw.yaml configs/cnn_hmadamw.yaml --out runs/compare
    lowmem compare --family cnn --max_steps 100          # every configs/cnn_*.yaml

Each config trains in its own process (so the CPU peak RSS of one run is not another's), with
TensorBoard logs under ``OUT/<config name>/``. Then one figure (``OUT/compare.png``: training loss
vs step, validation loss vs step, optimizer state and peak memory per config) and one markdown
table (``OUT/compare.md``: final losses, optimizer state and gradient-buffer MiB, peak MiB, median
step time) are written from the logs. A metric a run's logs lack (no validation ran, no memory
logging) reads ``n/a [k]`` in the table, with footnote ``[k]`` naming the runs and the reason.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["compare_main", "read_scalars", "summarize", "format_table", "missing_notes"]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of the TensorBoard event files under ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# Table columns: row key, header, format, the TensorBoard tag it comes from.
_COLUMNS = (
    ("train_loss", "final train loss", "{:.4f}", "train/loss"),
    ("val_loss", "final val loss", "{:.4f}", "val/loss"),
    ("state_mib", "optimizer state MiB", "{:.3f}", "memory/optimizer_state_mib"),
    ("grad_buffers_mib", "grad buffers MiB", "{:.3f}", "memory/grad_buffers_mib"),
    ("peak_mib", "peak MiB", "{:.0f}", "memory/peak_mib"),
    ("step_ms", "median step ms", "{:.1f}", "time/step_ms"),
)
_NO_MONITOR = ("MemoryMonitor logged nothing (trainer.log_every_n_steps: 0, or MemoryMonitor left out of "
               "trainer.callbacks)")  # fmt: skip


def _why_missing(column: str, tag: str, scalars: dict[str, list[tuple[int, float]]]) -> str:
    """Why a run's logs give no value for ``column``, as far as the logs tell."""
    if column == "train_loss":
        return "train/loss was never logged (no training step ran: trainer.max_steps 0 or an empty training set)"
    if column == "val_loss":
        return "no validation ran, so val/loss was never logged (trainer.limit_val_batches: 0, or no val_dataloader)"
    if not any(t.startswith(("memory/", "time/")) for t in scalars):
        return _NO_MONITOR
    if column == "step_ms" and len(scalars.get(tag, [])) == 1:
        return ("time/step_ms was logged for the first step only, which includes warm-up and is left out (train "
                "more steps than trainer.log_every_n_steps)")  # fmt: skip
    return f"{tag} was never logged"


def summarize(name: str, scalars: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """One table row: last value of losses/memory, median step time, max peak. A metric the logs
    do not have is ``None``, and ``row["missing"]`` maps its column to the reason."""
    series = {column: [v for _, v in scalars.get(tag, [])] for column, _, _, tag in _COLUMNS}
    series["step_ms"] = series["step_ms"][1:]  # the first step includes warm-up
    row: dict[str, Any] = {"config": name, "missing": {}}
    for column, _, _, tag in _COLUMNS:
        values = series[column]
        if not values:
            row[column] = None
            row["missing"][column] = _why_missing(column, tag, scalars)
        elif column == "peak_mib":
            row[column] = max(values)
        elif column == "step_ms":
            row[column] = statistics.median(values)
        else:
            row[column] = values[-1]
    return row


def missing_notes(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(reason, note)`` per distinct reason a metric is missing, in table order; the note names
    the metrics and the runs (``no final val loss for cnn_adamw, cnn_hmadamw: no validation ran...``)."""
    grouped: dict[str, tuple[list[str], list[str]]] = {}
    headers = {column: header for column, header, _, _ in _COLUMNS}
    for row in rows:
        for column, reason in row.get("missing", {}).items():
            columns, runs = grouped.setdefault(reason, ([], []))
            columns += [headers[column]] if headers[column] not in columns else []
            runs += [row["config"]] if row["config"] not in runs else []
    return [(reason, f"no {', '.join(columns)} for {', '.join(runs)}: {reason}")
            for reason, (columns, runs) in grouped.items()]  # fmt: skip


def format_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table; a missing metric reads ``n/a [k]``, with footnote ``[k]`` saying why."""
    notes = missing_notes(rows)
    number = {reason: i for i, (reason, _) in enumerate(notes, start=1)}
    lines = ["| config | " + " | ".join(header for _, header, _, _ in _COLUMNS) + " |",
             "|---|" + "---:|" * len(_COLUMNS)]  # fmt: skip
    for r in rows:
        cells = [fmt.format(r[column]) if r.get(column) is not None else f"n/a [{number[r['missing'][column]]}]"
                 for column, _, fmt, _ in _COLUMNS]  # fmt: skip
        lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"[{number[reason]}] {note}" for reason, note in notes]
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
    state = [r["state_mib"] if r["state_mib"] is not None else float("nan") for r in rows]
    buffers = [r["grad_buffers_mib"] if r["grad_buffers_mib"] is not None else float("nan") for r in rows]
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
    for _, note in missing_notes(rows):
        print(f"lowmem compare: note: {note}", file=sys.stderr)
    print(f"lowmem compare: wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return 0
