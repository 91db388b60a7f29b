"""`lowmem snr --config X.yaml`: SlimAdam's SNR analysis of any training config (docs/snr.md).

    lowmem snr --config configs/lm_adamw.yaml                   # the config's 300 steps, rules in its log dir
    lowmem snr --config configs/lm_slimadamw.yaml --steps 1000 --cutoff 1.0 --out runs/snr --layers 4

The config's model trains with AdamW (``lowmem.strategies.AdamW``) whatever optimizer the config
names: the configured optimizer's ``lr`` (IO-Adam: its ``adamw_lr``), ``betas``, ``eps``,
``weight_decay`` and ``role_overrides`` carry over where it has them, AdamW's defaults fill the
rest; the lr scheduler, trainer and data stay as configured. At the paper's snapshot steps
(1, every 100 below 1000, every 1000 after) :class:`~lowmem.analysis.snr.SNRRecorder` measures
``SNR_K`` of every parameter's ``exp_avg_sq`` for every candidate set of dims ``K``. Per
parameter the ``K`` with the largest mean SNR above ``--cutoff`` is chosen (none above: no
compression; norms and biases: never). Written to ``--out`` (default: the run's log dir, or
``snr/`` without a logger):

- ``rules.json``: a SlimAdamW rules file in fan terms, folded over depth
  (:mod:`lowmem.analysis.depth_patterns`): ``--model.init_args.optimizer.init_args.rules=PATH``;
- ``snr_table.md``: per parameter its role, shape, mean SNR per candidate, the chosen dims and the
  ``v`` bytes saved, and the total ``v bytes: X of Y (Z%)``;
- ``snr_heatmap.png`` (mean SNR per parameter and K) and ``snr_over_steps.png`` (``--layers``
  parameters, SNR at each snapshot).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from lowmem import strategies
from lowmem.analysis.depth_patterns import generalise_over_depth
from lowmem.analysis.snr import SNRRecorder, choose_rules
from lowmem.analysis.snr_plots import pick_layers, plot_heatmap, plot_over_steps
from lowmem.analysis.snr_table import format_snr_table
from lowmem.lightning_modules.base import LowMemModule
from lowmem.lightning_modules.errors import ConfigError
from lowmem.optim.slim_rules import save_slim_rules

__all__ = ["adamw_like", "snr_command"]

_CARRIED = ("betas", "eps", "weight_decay")


def adamw_like(strategy: strategies.OptimizerStrategy) -> strategies.OptimizerStrategy:
    """``lowmem.strategies.AdamW`` with the hyperparameters ``strategy`` shares with AdamW (see the
    module docstring); a plain optimizer callable is built once on a dummy parameter to read them."""
    if isinstance(strategy, strategies.CallableStrategy):
        hparams = dict(strategy([torch.nn.Parameter(torch.zeros(1))]).defaults)
    else:
        hparams = dict(strategy.hparams)
    kwargs: dict[str, Any] = {k: hparams[k] for k in _CARRIED if hparams.get(k) is not None}
    lr = hparams.get("adamw_lr") if hparams.get("adamw_lr") is not None else hparams.get("lr")
    if lr is not None:
        kwargs["lr"] = float(lr)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(float(b) for b in kwargs["betas"])
    return strategies.AdamW(**kwargs, role_overrides=strategy.role_overrides or None)


def _check(trainer: Trainer, model: LightningModule, steps: int | None, cutoff: float, layers: int) -> None:
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps={steps}: the AdamW run needs at least 1 optimizer step; give --steps=N with N >= 1 "
                          "(the paper snapshots at step 1, every 100 steps below 1000, then every 1000)")  # fmt: skip
    if not math.isfinite(cutoff) or cutoff < 0:
        raise ConfigError(f"--cutoff={cutoff}: the SNR cutoff must be a finite number >= 0 (SNR is a ratio >= 0); "
                          "the paper uses --cutoff=1.0")  # fmt: skip
    if layers < 1:
        raise ConfigError(f"--layers={layers}: snr_over_steps.png draws at least one parameter; give --layers=N with "
                          "N >= 1")  # fmt: skip
    if not isinstance(model, LowMemModule):
        raise ConfigError(
            f"lowmem snr needs a LowMemModule (it swaps the injected optimizer for AdamW); model.class_path "
            f"{type(model).__module__}.{type(model).__qualname__} is a plain LightningModule. Subclass "
            "lowmem.lightning_modules.LowMemModule, or record with lowmem.analysis.SNRRecorder in your own AdamW run."
        )
    processes = trainer.num_devices * trainer.num_nodes
    if processes > 1:
        raise ConfigError(f"trainer.devices x trainer.num_nodes = {processes}: lowmem snr measures in one process "
                          "(every rank holds the same v under DDP); set --trainer.devices=1 --trainer.num_nodes=1")  # fmt: skip


def _output_folder(trainer: Trainer, out: str | None) -> Path:
    """``--out``, else the run's log dir, else ``snr/`` (a run without a logger)."""
    if out:
        return Path(out)
    return Path(trainer.log_dir) if trainer.logger is not None and trainer.log_dir else Path("snr")


def snr_command(trainer: Trainer, model: LightningModule, datamodule: LightningDataModule | None,
                steps: int | None = None, cutoff: float = 1.0, out: str | None = None, layers: int = 4) -> Path:  # fmt: skip
    """Run the analysis (see the module docstring); returns the output folder."""
    _check(trainer, model, steps, cutoff, layers)
    configured = model.optimizer_strategy.name
    model.optimizer_strategy = adamw = adamw_like(model.optimizer_strategy)
    if steps is not None:
        trainer.fit_loop.epoch_loop.max_steps = steps
        trainer.fit_loop.max_epochs = -1
    recorder = SNRRecorder(overrides=adamw.role_overrides)
    trainer.callbacks.append(recorder)
    length = f"{steps} steps" if steps is not None else "the config's length"
    swapped = "" if configured == "AdamW" else f" (the config's {configured} replaced by AdamW)"
    print(f"lowmem snr: training {type(model).__name__} with {adamw!r} for {length}{swapped}", flush=True)
    trainer.fit(model, datamodule=datamodule)
    if not recorder.steps:
        raise ConfigError(f"the AdamW run ended after {trainer.global_step} optimizer steps without a snapshot of v "
                          "(the first is at step 1); give --steps=N with N >= 1")  # fmt: skip

    folder = _output_folder(trainer, out)
    folder.mkdir(parents=True, exist_ok=True)
    params = recorder.params
    rules = choose_rules(params, cutoff)
    save_slim_rules(generalise_over_depth(rules, [p.name for p in params]), folder / "rules.json")
    notes = [f"AdamW run of {type(model).__name__}: {trainer.global_step} optimizer steps, {adamw!r}; "
             f"snapshots of v at steps {', '.join(map(str, recorder.steps))}.",
             f"SNR_K = mean over the other dims of (mean_K v)^2 / var_K v (dimensionless), averaged over the "
             f"snapshots. Chosen: the K with the largest mean SNR above the cutoff {cutoff:g}, else none; norms and "
             "biases never. fan_in / fan_out / all: the parameter's fan-in dims, fan-out dims, every dim."]  # fmt: skip
    table = format_snr_table(params, rules, "SNR of Adam's second moment", notes)
    (folder / "snr_table.md").write_text(table)
    plot_heatmap(params, rules, cutoff, folder / "snr_heatmap.png")
    plot_over_steps(pick_layers(params, layers), cutoff, folder / "snr_over_steps.png")

    by_role: dict[str, Counter] = {}
    for p in params:
        by_role.setdefault(p.role.value, Counter())[str(rules[p.name]) if p.compressible else "never"] += 1
    print("lowmem snr: chosen rule per role: " + "; ".join(
        f"{role}: " + ", ".join(f"{rule} x{n}" for rule, n in counts.items()) for role, counts in by_role.items()))
    print("lowmem snr: " + table.rstrip().splitlines()[-1])
    print(f"lowmem snr: wrote {folder / 'rules.json'}, {folder / 'snr_table.md'}, {folder / 'snr_heatmap.png'}, "
          f"{folder / 'snr_over_steps.png'}")  # fmt: skip
    print(f"lowmem snr: train with them: lowmem fit --config <a SlimAdamW config> "
          f"--model.init_args.optimizer.init_args.rules={folder / 'rules.json'}")  # fmt: skip
    return folder
