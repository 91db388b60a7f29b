"""Quality benchmark: each optimizer trains each model family's config for a fixed number of steps
with the same seeds and the config's (recommended) hyperparameters; final validation loss
mean ± std against AdamW, and a loss-curve figure per family.

    python -m benchmarks.quality                               # all families, 3 seeds (~20 min, 2 cores)
    python -m benchmarks.quality --families lm --seeds 0 1 2 3 4 --steps lm=600
    python -m benchmarks.quality --quick                       # 3 steps, 1 seed: a run check
    python -m benchmarks.quality -- --trainer.accelerator=gpu  # extra overrides for every run

Each run is ``configs/<family>_<optimizer>.yaml`` through ``LowMemCLI`` with
``--trainer.max_steps=N --trainer.max_epochs=-1 --seed_everything=S`` (diffusion also seeds its
noise generator with S), then ``trainer.validate`` on the validation set for the final loss.
Variants beyond the configs: HMAdamW's variance corrections ``stationary`` and ``none`` (the
config uses ``noise``), AdamS with beta2 0.999 (the config uses 0.95), and SlimAdamW with the
rules ``lowmem snr`` measured on the family's AdamW config (``configs/rules/<family>_snr.json``,
docs/snr.md) beside SlimAdamW's role-table default.

A variant *matches AdamW* when its mean final validation loss is at most AdamW's mean plus the
tolerance ``max(2 * s_AdamW, 1% of AdamW's mean)``: within twice the standard deviation of
AdamW's own final losses over the seeds (how far another AdamW seed may land), and at least 1% (a
single seed has no spread). Lower losses match; a variant's own spread widens nothing.
Runs go to ``--jobs`` worker processes with one intra-op thread each (small models run faster
that way than with two threads per run).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import CONFIGS, DOCS, FAMILIES, load_config, log, markdown_table, section_header, write_section

__all__ = ["VARIANTS", "DEFAULT_STEPS", "run_one", "main"]

_OPT = "--model.init_args.optimizer.init_args"
# key -> (label, config optimizer, extra overrides)
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "adamw": ("AdamW", "adamw", []),
    "hmadamw": ("HMAdamW (noise)", "hmadamw", []),
    "hmadamw-stationary": ("HMAdamW (stationary)", "hmadamw", [f"{_OPT}.variance_correction=stationary"]),
    "hmadamw-none": ("HMAdamW (none)", "hmadamw", [f"{_OPT}.variance_correction=none"]),
    "adams": ("AdamS (b2 0.95)", "adams", []),
    "adams-b2-0.999": ("AdamS (b2 0.999)", "adams", [f"{_OPT}.betas=[0.9, 0.999]"]),
    "slimadamw": ("SlimAdamW", "slimadamw", []),
    "slimadamw-snr": ("SlimAdamW (SNR rules)", "slimadamw", []),
    "adapm": ("AdaPM", "adapm", []),
    "adammini": ("Adam-mini", "adammini", []),
    "ioadam": ("IO-Adam", "ioadam", []),
}
DEFAULT_STEPS = {"cnn": 152, "lm": 300, "diffusion": 190}  # the configs' own lengths (8, -, 10 epochs)
_FAMILY_OVERRIDES = {
    "diffusion": lambda seed: ["--model.init_args.sample_every_n_epochs=0", f"--model.init_args.seed={seed}"],
}
# Overrides of a variant that depend on the family: the SNR rules file measured on its AdamW config,
# written by `lowmem snr --config configs/<family>_adamw.yaml` (the commands are in docs/snr.md).
SNR_RULES = CONFIGS / "rules"
_VARIANT_FAMILY_OVERRIDES = {
    "slimadamw-snr": lambda family: [f"{_OPT}.rules={SNR_RULES / f'{family}_snr.json'}"],
}
MATCH_REL = 0.01  # the tolerance's floor, relative to AdamW's mean final validation loss (see the docstring)


def _recorder() -> Any:
    import lightning.pytorch as pl

    class Recorder(pl.Callback):
        """Training loss of every step and validation loss of every validation run."""

        def __init__(self) -> None:
            self.train: list[tuple[int, float]] = []
            self.val: list[tuple[int, float]] = []

        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.train.append((trainer.global_step, float(loss)))

        def on_validation_end(self, trainer: pl.Trainer, module: Any) -> None:
            if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
                self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

    return Recorder()


def run_one(family: str, variant: str, seed: int, steps: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Train one (family, variant, seed) for ``steps`` optimizer steps; losses and wall time."""
    _, config, overrides = VARIANTS[variant]
    by_family = _VARIANT_FAMILY_OVERRIDES.get(variant)
    overrides = [*overrides, *(by_family(family) if by_family else [])]
    start = time.perf_counter()
    family_overrides = _FAMILY_OVERRIDES[family](seed) if family in _FAMILY_OVERRIDES else []
    args = [f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1", f"--seed_everything={seed}",
            "--trainer.num_sanity_val_steps=0", *overrides, *family_overrides, *extra]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lowmem-quality-") as root:
        cli = load_config(CONFIGS / f"{family}_{config}.yaml", args, root=Path(root))
        recorder = _recorder()
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        final = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    return {"family": family, "variant": variant, "seed": seed, "final_val": float(final), "train": recorder.train,
            "val": recorder.val, "seconds": time.perf_counter() - start}  # fmt: skip


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _run_job(job: tuple) -> dict[str, Any]:
    import logging
    import warnings

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    return run_one(*job)


# --- summaries -----------------------------------------------------------------------------------
def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def mean_curve(runs: list[dict], key: str = "train") -> tuple[list[int], list[float]]:
    """Seed-mean of a per-step curve (steps common to all seeds)."""
    per_seed = [dict(r[key]) for r in runs]
    steps = sorted(set.intersection(*(set(d) for d in per_seed)))
    return steps, [statistics.fmean(d[s] for d in per_seed) for s in steps]


def _fmt(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def match_tolerance(base: list[float]) -> float:
    """How far above AdamW's mean final loss (``base``: one loss per seed) a variant's mean may lie
    and still match AdamW: ``max(2 * std(base), MATCH_REL * mean(base))`` (the module docstring)."""
    spread = statistics.stdev(base) if len(base) > 1 else 0.0
    return max(2 * spread, MATCH_REL * statistics.fmean(base))


def family_table(runs: list[dict], steps: int) -> str:
    by_variant: dict[str, list[dict]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append(r)
    window = max(1, steps // 10)
    base = by_variant.get("adamw")
    base_val = statistics.fmean(r["final_val"] for r in base) if base else None
    base_train = _smooth(mean_curve(base)[1], window)[-1] if base else None
    table = []
    for variant, group in by_variant.items():
        vals = [r["final_val"] for r in group]
        train_steps, train = mean_curve(group)
        smooth = _smooth(train, window)
        reach = "n/a"
        if base_train is not None:
            hit = next((s for s, v in zip(train_steps, smooth) if v <= base_train), None)
            reach = f"{hit / steps:.0%}" if hit is not None else "not reached"
        delta = f"{statistics.fmean(vals) - base_val:+.4f}" if base_val is not None else "n/a"
        match = "n/a"
        if base is not None and variant != "adamw":
            tolerance = match_tolerance([r["final_val"] for r in base])
            match = f"{'yes' if statistics.fmean(vals) - base_val <= tolerance else 'no'} (≤ +{tolerance:.4f})"
        table.append([VARIANTS[variant][0], _fmt(vals), delta, match, f"{smooth[-1]:.4f}", reach,
                      f"{statistics.fmean(r['seconds'] for r in group):.0f}"])  # fmt: skip
    headers = ["optimizer", f"final val loss (mean ± std, {len(group)} seeds)", "Δ vs AdamW",
               "matches AdamW (Δ ≤ tolerance)",
               f"final train loss (mean of last {window} steps)", "reaches AdamW's final train loss at",
               "s per run"]  # fmt: skip
    return markdown_table(headers, table)


def plot_family(family: str, runs: list[dict], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(13, 4.6))
    window = max(1, steps // 10)
    colors = plt.get_cmap("tab10")
    for i, variant in enumerate(v for v in VARIANTS if any(r["variant"] == v for r in runs)):
        group = [r for r in runs if r["variant"] == variant]
        style = {"color": colors(i % 10), "label": VARIANTS[variant][0],
                 "linestyle": "--" if variant.startswith(("hmadamw-", "adams-", "slimadamw-")) else "-"}  # fmt: skip
        s, v = mean_curve(group)
        ax_train.plot(s, _smooth(v, window), **style)
        s, v = mean_curve(group, "val")
        if s:
            ax_val.plot(s, v, marker="o", ms=3, **style)
    ax_train.set(xlabel="optimizer step", ylabel="train loss",
                 title=f"{family}: train loss (mean of seeds, moving average {window})")
    ax_val.set(xlabel="optimizer step", ylabel="validation loss", title=f"{family}: validation loss (mean of seeds)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", nargs="*", default=[], help="budgets as family=N (default: %s)" % DEFAULT_STEPS)
    parser.add_argument("--jobs", type=int, default=2, help="parallel worker processes (1: run in this process)")
    parser.add_argument("--quick", action="store_true", help="3 steps, seed 0, 2 validation batches, in process")
    parser.add_argument("--out", type=Path, default=DOCS, help="directory of benchmarks.md and figures/")
    extra = list(argv[argv.index("--") + 1 :]) if "--" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.extra = extra
    budgets = dict(DEFAULT_STEPS)
    for item in args.steps:
        family, _, n = item.partition("=")
        if family not in FAMILIES or not n.isdigit():
            parser.error(f"--steps takes family=N with family in {FAMILIES}; got {item!r}")
        budgets[family] = int(n)
    if args.quick:
        budgets = dict.fromkeys(FAMILIES, 3)
        args.seeds, args.jobs = args.seeds[:1], 1
        args.extra = ["--trainer.limit_val_batches=2", *args.extra]
    args.budgets = budgets
    if "adamw" not in args.variants:
        args.variants = ["adamw", *args.variants]
    return args


def main(argv: Sequence[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    jobs = [(f, v, s, args.budgets[f], args.extra) for f in args.families for v in args.variants for s in args.seeds]
    started = time.perf_counter()
    results: list[dict] = []
    if args.jobs <= 1:
        for job in jobs:
            log(f"quality: {job[0]} {job[1]} seed {job[2]}")
            results.append(_run_job(job))
    else:
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_init_worker) as pool:
            futures = {pool.submit(_run_job, job): job for job in jobs}
            for future in cf.as_completed(futures):
                result = future.result()
                log(f"quality: done {result['family']} {result['variant']} seed {result['seed']} "
                    f"({result['seconds']:.0f} s, val {result['final_val']:.4f})")  # fmt: skip
                results.append(result)
    total = time.perf_counter() - started
    order = {v: i for i, v in enumerate(VARIANTS)}
    results.sort(key=lambda r: (r["family"], order[r["variant"]], r["seed"]))

    budgets = ", ".join(f"{f} {args.budgets[f]}" for f in args.families)
    parts = [section_header("benchmarks.quality", argv),
             f"Seeds {args.seeds}; {len(jobs)} runs in {total / 60:.1f} min with {args.jobs} worker process(es). "
             f"Budgets (optimizer steps): {budgets}. A variant matches AdamW when Δ ≤ the larger of twice the "
             f"standard deviation of AdamW's final val losses over the seeds and {MATCH_REL:.0%} of their mean.\n"]  # fmt: skip
    for family in args.families:
        runs = [r for r in results if r["family"] == family]
        figure = args.out / "figures" / f"quality_{family}.png"
        plot_family(family, runs, args.budgets[family], figure)
        table = family_table(runs, args.budgets[family])
        parts.append(f"**{family}** (`configs/{family}_*.yaml`, {args.budgets[family]} steps):\n\n{table}\n\n"
                     f"![{family} loss curves](figures/{figure.name})\n")  # fmt: skip
    text = "\n".join(parts)
    print(text)
    path = write_section(args.out, "quality", text)
    log(f"quality: wrote {path}")
    return text


if __name__ == "__main__":
    main()
