"""Quality benchmark: each optimizer trains each model family's config for a fixed number of steps
with the same seeds and the config's (recommended) hyperparameters; final validation loss
mean ± std against AdamW, and a loss-curve figure per family.

    python -m benchmarks.quality                               # all families, 3 seeds (~20 min, 2 cores)
    python -m benchmarks.quality --families lm --seeds 0 1 2 3 4 --steps lm=600
    python -m benchmarks.quality --quick                       # 3 steps, 1 seed: a run check
    python -m benchmarks.quality -- --trainer.accelerator=gpu  # extra overrides for every run

Each run is ``configs/<family>_<optimizer>.yaml`` through ``LowMemCLI`` with
``--trainer.max_steps=N --trainer.max_epochs=-1 --seed_everything=S`` (diffusion also seeds its
noise generator and its training order with S), then ``trainer.validate`` on the validation set for the final loss.
Variants beyond the configs: HMAdamW's variance corrections ``noise``, ``stationary``, ``none`` and
``hook`` (the config uses the default ``auto``, i.e. ``hook`` in these one-process runs), AdamS with
beta2 0.999 (the config uses 0.95), and SlimAdamW with the rules ``lowmem snr`` measured on the
family's AdamW config (``configs/rules/<family>_snr.json``, docs/snr.md) beside SlimAdamW's
role-table default.

A variant *matches AdamW* when its mean final validation loss is at most AdamW's mean plus the
tolerance ``max(2 * s_AdamW, 1% of AdamW's mean)``: within twice the standard deviation of
AdamW's own final losses over the seeds (how far another AdamW seed may land), and at least 1% (a
single seed has no spread). Lower losses match; a variant's own spread widens nothing.
Runs go to ``--jobs`` worker processes with one intra-op thread each (small models run faster
that way than with two threads per run).

``--grid``: the method of optimizer papers. Every optimizer trains on a log-spaced grid of
learning rates around its config's (``--lr-factors``, default 0.25 0.5 1 2 4 times the config
lr) with the schedule those papers use, linear warm-up over ``--warmup`` of the budget then cosine
decay to ``--min-lr-factor`` of the peak (it replaces the config's scheduler), on the first seed;
the lr with the lowest final validation loss is re-run on every seed. The section
``quality-grid`` reports best-of-grid final losses (mean ± std over the seeds, matched against
AdamW's as above), the steps and seconds each optimizer takes to reach AdamW's final training loss
at AdamW's best lr, the grid itself, and per family an lr-sensitivity figure (final validation
loss against lr, one curve per optimizer) and the loss curves at the best lrs. ``--results FILE``
keeps every finished run as one JSON line and skips runs already in it (resume a long grid)::

    python -m benchmarks.quality --grid --families lm --variants hmadamw-noise hmadamw-hook --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import CONFIGS, DOCS, FAMILIES, load_config, log, markdown_table, section_header, write_section

__all__ = ["VARIANTS", "DEFAULT_STEPS", "run_one", "warmup_cosine", "main"]

_OPT = "--model.init_args.optimizer.init_args"
# key -> (label, config optimizer, extra overrides)
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "adamw": ("AdamW", "adamw", []),
    "hmadamw": ("HMAdamW (auto)", "hmadamw", []),  # the config's variance_correction: auto, the default
    "hmadamw-noise": ("HMAdamW (noise)", "hmadamw", [f"{_OPT}.variance_correction=noise"]),
    "hmadamw-stationary": ("HMAdamW (stationary)", "hmadamw", [f"{_OPT}.variance_correction=stationary"]),
    "hmadamw-none": ("HMAdamW (none)", "hmadamw", [f"{_OPT}.variance_correction=none"]),
    "hmadamw-hook": ("HMAdamW (hook)", "hmadamw", [f"{_OPT}.variance_correction=hook"]),
    "adams": ("AdamS (b2 0.95)", "adams", []),
    "adams-b2-0.999": ("AdamS (b2 0.999)", "adams", [f"{_OPT}.betas=[0.9, 0.999]"]),
    "slimadamw": ("SlimAdamW", "slimadamw", []),
    "slimadamw-snr": ("SlimAdamW (SNR rules)", "slimadamw", []),
    "adapm": ("AdaPM", "adapm", []),
    "adapm-mini": ("AdaPM-mini", "adapm", [f"{_OPT}.second_moment=mini"]),
    "adammini": ("Adam-mini", "adammini", []),
    "ioadam": ("IO-Adam", "ioadam", []),
    "adafactor": ("Adafactor", "adafactor", []),
}
DEFAULT_STEPS = {"cnn": 152, "lm": 300, "diffusion": 190}  # the configs' own lengths (8, -, 10 epochs)
_FAMILY_OVERRIDES = {
    # the noise generator and the training order, both from the run's seed
    "diffusion": lambda seed: ["--model.init_args.sample_every_n_epochs=0", f"--model.init_args.noise_seed={seed}",
                               f"--data.init_args.seed={seed}"],
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


def _warmup_cosine_factor(step: int, *, warmup: int, total: int, min_factor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Any, *, warmup: int, total: int, min_factor: float = 0.1) -> Any:
    """Linear warm-up over ``warmup`` steps to the peak lr, then cosine decay to ``min_factor`` of
    it at step ``total`` (a ``LambdaLR``; stepped once per optimizer step)."""
    import torch

    factor = functools.partial(_warmup_cosine_factor, warmup=max(1, warmup), total=total, min_factor=min_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_one(family: str, variant: str, seed: int, steps: int, extra: Sequence[str] = (), lr_factor: float = 1.0,
            schedule: dict[str, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train one (family, variant, seed) for ``steps`` optimizer steps; losses and wall time.

    ``lr_factor`` multiplies the config's lr; ``schedule`` (``{"warmup": fraction of the budget,
    "min_factor": ...}``) replaces the config's scheduler with :func:`warmup_cosine`."""
    _, config, overrides = VARIANTS[variant]
    by_family = _VARIANT_FAMILY_OVERRIDES.get(variant)
    overrides = [*overrides, *(by_family(family) if by_family else [])]
    start = time.perf_counter()
    family_overrides = _FAMILY_OVERRIDES[family](seed) if family in _FAMILY_OVERRIDES else []
    args = [f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1", f"--seed_everything={seed}",
            "--trainer.num_sanity_val_steps=0", *overrides, *family_overrides, *extra]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lowmem-quality-") as root:
        cli = load_config(CONFIGS / f"{family}_{config}.yaml", args, root=Path(root))
        hparams = cli.model.optimizer_strategy.hparams
        lr = hparams["lr"] = float(hparams["lr"]) * lr_factor
        if schedule is not None:
            cli.model.lr_scheduler_factory = functools.partial(
                warmup_cosine, warmup=round(schedule["warmup"] * steps), total=steps, min_factor=schedule["min_factor"])
        recorder = _recorder()
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        final = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    return {"family": family, "variant": variant, "seed": seed, "final_val": float(final), "train": recorder.train,
            "val": recorder.val, "seconds": time.perf_counter() - start, "lr": lr, "lr_factor": lr_factor,
            "steps": steps, "schedule": schedule}  # fmt: skip


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


def family_table(runs: list[dict], steps: int, lead: dict[str, list[str]] | None = None,
                 lead_headers: Sequence[str] = ()) -> str:  # fmt: skip
    """One row per variant; ``lead`` gives each variant's first columns (headers ``lead_headers``)."""
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
            if hit is None and lead is not None:
                reach += f" (ends {smooth[-1] - base_train:+.4f})"
        delta = f"{statistics.fmean(vals) - base_val:+.4f}" if base_val is not None else "n/a"
        match = "n/a"
        if base is not None and variant != "adamw":
            tolerance = match_tolerance([r["final_val"] for r in base])
            match = f"{'yes' if statistics.fmean(vals) - base_val <= tolerance else 'no'} (≤ +{tolerance:.4f})"
        seconds = statistics.fmean(r["seconds"] for r in group)
        if lead is not None and base_train is not None and hit is not None:
            reach += f" (step {hit}, ~{seconds * hit / steps:.0f} s)"
        table.append([VARIANTS[variant][0], *(lead or {}).get(variant, []), _fmt(vals), delta, match,
                      f"{smooth[-1]:.4f}", reach, f"{seconds:.0f}"])  # fmt: skip
    headers = ["optimizer", *lead_headers, f"final val loss (mean ± std, {len(group)} seeds)", "Δ vs AdamW",
               "matches AdamW (Δ ≤ tolerance)",
               f"final train loss (mean of last {window} steps)", "reaches AdamW's final train loss at",
               "s per run"]  # fmt: skip
    return markdown_table(headers, table)


def plot_family(family: str, runs: list[dict], steps: int, path: Path, note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(13, 4.6))
    window = max(1, steps // 10)
    colors = plt.get_cmap("tab20")
    for i, variant in enumerate(v for v in VARIANTS if any(r["variant"] == v for r in runs)):
        group = [r for r in runs if r["variant"] == variant]
        style = {"color": colors(i % 20), "label": VARIANTS[variant][0],
                 "linestyle": "--" if variant.startswith(("hmadamw-", "adams-", "slimadamw-", "adapm-")) else "-"}  # fmt: skip
        s, v = mean_curve(group)
        ax_train.plot(s, _smooth(v, window), **style)
        s, v = mean_curve(group, "val")
        if s:
            ax_val.plot(s, v, marker="o", ms=3, **style)
    ax_train.set(xlabel="optimizer step", ylabel="train loss",
                 title=f"{family}{note}: train loss (mean of seeds, moving average {window})")
    ax_val.set(xlabel="optimizer step", ylabel="validation loss",
               title=f"{family}{note}: validation loss (mean of seeds)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the lr grid ---------------------------------------------------------------------------------
def best_factors(grid_runs: list[dict]) -> dict[tuple[str, str], float]:
    """(family, variant) -> the lr factor with the lowest final validation loss on the grid seed
    (a diverged run, NaN or inf, never wins)."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for r in grid_runs:
        key, loss = (r["family"], r["variant"]), r["final_val"] if math.isfinite(r["final_val"]) else math.inf
        if key not in best or loss < best[key][1]:
            best[key] = (r["lr_factor"], loss)
    return {key: factor for key, (factor, _) in best.items()}


def grid_table(family: str, runs: list[dict], factors: Sequence[float], grid_seed: int,
               best: dict[tuple[str, str], float]) -> str:  # fmt: skip
    """Final validation loss of every (variant, lr) of the grid seed; the best one in bold."""
    rows = []
    for variant in (v for v in VARIANTS if any(r["variant"] == v and r["family"] == family for r in runs)):
        cells = []
        for f in factors:
            hit = [r for r in runs if (r["family"], r["variant"], r["seed"], r["lr_factor"]) == (family, variant, grid_seed, f)]
            text = f"{hit[0]['final_val']:.4f}" if hit else "—"
            cells.append(f"**{text}**" if hit and best.get((family, variant)) == f else text)
        lr = next(r["lr"] / r["lr_factor"] for r in runs if r["variant"] == variant and r["family"] == family)
        rows.append([VARIANTS[variant][0], f"{lr:g}", *cells])
    return markdown_table(["optimizer", "config lr", *(f"× {f:g}" for f in factors)], rows)


def plot_sensitivity(family: str, runs: list[dict], grid_seed: int, path: Path) -> None:
    """Final validation loss against lr (log axis), one curve per optimizer; the seed-mean at the
    best lr drawn as a point with its standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors = plt.get_cmap("tab20")
    best = best_factors([r for r in runs if r["seed"] == grid_seed])
    for i, variant in enumerate(v for v in VARIANTS if any(r["variant"] == v for r in runs)):
        grid = sorted((r["lr"], r["final_val"]) for r in runs if r["variant"] == variant and r["seed"] == grid_seed)
        ax.plot([x for x, _ in grid], [y for _, y in grid], marker="o", color=colors(i % 20), label=VARIANTS[variant][0])
        at_best = [r for r in runs if r["variant"] == variant and r["lr_factor"] == best.get((family, variant))]
        if len(at_best) > 1:
            vals = [r["final_val"] for r in at_best]
            ax.errorbar([at_best[0]["lr"]], [statistics.fmean(vals)], yerr=[statistics.stdev(vals)], color=colors(i % 20),
                        marker="*", ms=11, capsize=4)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")  # diverged lrs end near the initial loss, orders of magnitude above the best
    ax.set(xlabel="peak learning rate (warm-up + cosine)", ylabel="final validation loss (log scale)",
           title=f"{family}: lr sensitivity (seed {grid_seed}; star: mean ± std over the seeds at the best lr)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load_results(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _job_key(job: tuple) -> tuple:
    family, variant, seed, steps, extra, factor, schedule = job
    return family, variant, seed, steps, tuple(extra), factor, json.dumps(schedule, sort_keys=True)


def _result_key(r: dict) -> tuple:
    return _job_key((r["family"], r["variant"], r["seed"], r["steps"], r.get("extra", []), r["lr_factor"], r["schedule"]))


def _run_jobs(jobs: list[tuple], n_workers: int, results_file: Path | None, done: list[dict]) -> list[dict]:
    """Run the ``jobs`` not already in ``done`` (the results file's runs); each finished run is appended."""
    have = {_result_key(r): r for r in done}
    todo = [job for job in jobs if _job_key(job) not in have]
    out = [have[_job_key(job)] for job in jobs if _job_key(job) in have]

    def keep(result: dict, job: tuple) -> None:
        result["extra"] = list(job[4])
        out.append(result)
        log(f"quality: done {result['family']} {result['variant']} seed {result['seed']} lr x{result['lr_factor']:g} "
            f"({result['seconds']:.0f} s, val {result['final_val']:.4f})")  # fmt: skip
        if results_file is not None:
            results_file.parent.mkdir(parents=True, exist_ok=True)
            with results_file.open("a") as f:
                f.write(json.dumps(result) + "\n")

    if n_workers <= 1:
        if todo:
            _init_worker()  # one intra-op thread, as in the workers
        for job in todo:
            log(f"quality: {job[0]} {job[1]} seed {job[2]} lr x{job[5]:g}")
            keep(_run_job(job), job)
    else:
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(n_workers, mp_context=context, initializer=_init_worker) as pool:
            futures = {pool.submit(_run_job, job): job for job in todo}
            for future in cf.as_completed(futures):
                keep(future.result(), futures[future])
    return out


def main_grid(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """``--grid``: lr grid on the first seed, the best lr on every seed (module docstring)."""
    started = time.perf_counter()
    schedule = {"warmup": args.warmup, "min_factor": args.min_lr_factor}
    done = _load_results(args.results)
    grid_seed = args.seeds[0]
    factors_of = {f: sorted(args.family_lr_factors.get(f, args.lr_factors)) for f in args.families}
    jobs = [(f, v, grid_seed, args.budgets[f], args.extra, k, schedule)
            for f in args.families for v in args.variants for k in factors_of[f]]  # fmt: skip
    grid_runs = _run_jobs(jobs, args.jobs, args.results, done)
    best = best_factors(grid_runs)
    seed_jobs = [(f, v, s, args.budgets[f], args.extra, best[f, v], schedule)
                 for f in args.families for v in args.variants for s in args.seeds[1:]]  # fmt: skip
    seed_runs = _run_jobs(seed_jobs, args.jobs, args.results, done + grid_runs)
    total = time.perf_counter() - started
    runs = grid_runs + seed_runs
    order = {v: i for i, v in enumerate(VARIANTS)}
    runs.sort(key=lambda r: (r["family"], order[r["variant"]], r["lr_factor"], r["seed"]))

    budgets = ", ".join(f"{f} {args.budgets[f]}" for f in args.families)
    computed = sum(r["seconds"] for r in runs)
    parts = [section_header("benchmarks.quality", argv),
             f"lr grid: peak lrs per optimizer of "
             f"{'; '.join(f'{f} ' + ', '.join(f'{k:g}' for k in factors_of[f]) for f in args.families)} × the config's lr, "
             f"on seed {grid_seed}; the best (lowest final val loss) re-run on seeds {args.seeds}. Schedule: linear "
             f"warm-up over {args.warmup:.0%} of the budget, then cosine decay to {args.min_lr_factor:g} × the peak "
             f"(replaces the configs' schedulers). Budgets (optimizer steps): {budgets}. {len(runs)} runs, "
             f"{computed / 60:.1f} min of run time ({total / 60:.1f} min wall in this invocation, {args.jobs} worker "
             f"process(es); runs from --results are reused). A variant matches AdamW when Δ ≤ the larger of twice the "
             f"standard deviation of AdamW's final val losses over the seeds and {MATCH_REL:.0%} of their mean; "
             "\"reaches\" is the first step at which the seed-mean training loss (moving average over a tenth of the "
             "budget) is at or below AdamW's final one at AdamW's best lr, with the seconds that takes at the "
             "variant's mean run time. A best lr at the end of the grid is marked (edge): the optimum may lie beyond.\n"]  # fmt: skip
    for family in args.families:
        fam = [r for r in runs if r["family"] == family]
        at_best = [r for r in fam if r["lr_factor"] == best[family, r["variant"]]]
        lead = {}
        for variant in {r["variant"] for r in fam}:
            factor = best[family, variant]
            lr = next(r["lr"] for r in at_best if r["variant"] == variant)
            edge = " (edge)" if factor in (factors_of[family][0], factors_of[family][-1]) else ""
            lead[variant] = [f"{lr:.3g} (× {factor:g}){edge}"]
        table = family_table(at_best, args.budgets[family], lead=lead, lead_headers=["best lr"])
        sens = args.out / "figures" / f"quality_grid_lr_{family}.png"
        curves = args.out / "figures" / f"quality_grid_{family}.png"
        plot_sensitivity(family, fam, grid_seed, sens)
        plot_family(family, at_best, args.budgets[family], curves, note=" (best lr)")
        parts.append(f"**{family}** (`configs/{family}_*.yaml`, {args.budgets[family]} steps), best of grid:\n\n{table}\n\n"
                     f"The grid (final val loss, seed {grid_seed}; best in bold):\n\n"
                     f"{grid_table(family, fam, factors_of[family], grid_seed, best)}\n\n"
                     f"![{family} lr sensitivity](figures/{sens.name})\n![{family} loss curves at the best lr](figures/{curves.name})\n")  # fmt: skip
    text = "\n".join(parts)
    print(text)
    path = write_section(args.out, "quality-grid", text)
    log(f"quality: wrote {path}")
    return text


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
    parser.add_argument("--grid", action="store_true", help="lr grid + warm-up/cosine schedule, best lr on every seed")
    parser.add_argument("--lr-factors", nargs="+", type=float, default=[0.25, 0.5, 1.0, 2.0, 4.0],
                        help="--grid: peak lrs as multiples of each config's lr (log-spaced, >= 4)")
    parser.add_argument("--family-lr-factors", nargs="*", default=[], metavar="FAMILY=F1,F2,...",
                        help="--grid: another factor list for one family, e.g. cnn=0.5,1,2,4,8,16")
    parser.add_argument("--warmup", type=float, default=0.1, help="--grid: warm-up steps as a fraction of the budget")
    parser.add_argument("--min-lr-factor", type=float, default=0.1, help="--grid: final lr of the cosine / peak")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON-lines file: finished runs are appended, runs already in it are not re-run")
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
        args.seeds, args.jobs = (args.seeds[:2] if args.grid else args.seeds[:1]), 1
        args.extra = ["--trainer.limit_val_batches=2", *args.extra]
        if args.grid:
            args.lr_factors = args.lr_factors[:4]
    per_family = {}
    for item in args.family_lr_factors:
        family, _, values = item.partition("=")
        try:
            per_family[family] = [float(v) for v in values.split(",")]
        except ValueError:
            per_family[family] = []
        if family not in FAMILIES or not per_family[family]:
            parser.error(f"--family-lr-factors takes family=F1,F2,... with family in {FAMILIES}; got {item!r}")
    args.family_lr_factors = per_family
    for factors in (args.lr_factors, *per_family.values()):
        if args.grid and (len(set(factors)) < 4 and not args.quick or any(f <= 0 for f in factors)):
            parser.error("--grid takes at least 4 distinct positive lr factors per family")
    args.budgets = budgets
    if "adamw" not in args.variants:
        args.variants = ["adamw", *args.variants]
    return args


def main(argv: Sequence[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.grid:
        return main_grid(args, argv)
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
