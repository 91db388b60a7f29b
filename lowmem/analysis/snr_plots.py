"""The two SNR figures: a heat map of mean SNR per parameter and ``K``, and SNR over steps.

Both draw ``log10 SNR`` (SNR is dimensionless); the cutoff is the colour map's centre in the heat
map and a dashed line in the curves. Only parameters that may be compressed are drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

from lowmem.analysis.snr import ParamSNR
from lowmem.analysis.snr_table import rule_dims
from lowmem.optim.slim_rules import Rule

__all__ = ["plot_heatmap", "plot_over_steps", "pick_layers"]

_COLUMNS = ("fan_in", "fan_out", "all")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(params: list[ParamSNR], rules: dict[str, Rule], cutoff: float, path: Path) -> None:
    """Rows: compressible parameters; columns: ``K`` = fan_in, fan_out, all dims; colour: log10 of
    the mean SNR (blue above the cutoff, red below; ``inf`` drawn at the largest finite value,
    grey where no slice was informative); the chosen ``K`` is boxed and every cell is labelled."""
    import numpy as np

    plt = _pyplot()
    rows = [p for p in params if p.compressible]
    values = np.full((len(rows), len(_COLUMNS)), np.nan)
    for i, p in enumerate(rows):
        by_label = {p.label(k): s for k, s in p.mean_snr().items()}
        for j, label in enumerate(_COLUMNS):
            s = by_label.get(label, math.nan)
            values[i, j] = math.log10(s) if s > 0 else (-math.inf if s == 0 else math.nan)
    finite = values[np.isfinite(values)]
    centre = math.log10(cutoff) if cutoff > 0 else 0.0
    span = max(1.0, float(np.max(np.abs(finite - centre)))) if finite.size else 1.0
    shown = np.clip(values, centre - span, centre + span)
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.32 * len(rows)))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=centre - span, vmax=centre + span, aspect="auto")
    for i, p in enumerate(rows):
        chosen = rule_dims(p, rules.get(p.name))
        for j, label in enumerate(_COLUMNS):
            raw = values[i, j]
            text = "—" if math.isnan(raw) else ("inf" if math.isinf(raw) and raw > 0 else f"{10 ** raw:.2g}")
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
            if chosen is not None and p.label(chosen) == label:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="black"))
    ax.set_xticks(range(len(_COLUMNS)), [f"K = {c}" for c in _COLUMNS])
    ax.set_yticks(range(len(rows)), [f"{p.name} ({p.role.value})" for p in rows], fontsize=7)
    ax.set_title(f"mean SNR of Adam's v per parameter and K (boxed: chosen; cutoff {cutoff:g})", fontsize=9)
    fig.colorbar(image, ax=ax, label="log10 SNR")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pick_layers(params: list[ParamSNR], count: int) -> list[ParamSNR]:
    """``count`` compressible parameters spread evenly over the model's order (first and last included)."""
    rows = [p for p in params if p.compressible]
    if count >= len(rows):
        return rows
    if count == 1:
        return rows[:1]
    return [rows[round(i * (len(rows) - 1) / (count - 1))] for i in range(count)]


def plot_over_steps(params: list[ParamSNR], cutoff: float, path: Path) -> None:
    """One panel per parameter of ``params``: SNR_K at each snapshot step for K = fan_in, fan_out, all."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(4.2 * max(1, len(params)), 3.6), squeeze=False)
    for ax, p in zip(axes[0], params):
        by_label = {p.label(k): points for k, points in p.series.items()}
        for label, color in zip(_COLUMNS, ("tab:blue", "tab:orange", "tab:green")):
            drawable = [(s, v) for s, v in by_label.get(label, []) if v > 0 and math.isfinite(v)]  # log axis
            if drawable:
                ax.plot(*zip(*drawable), marker="o", ms=3, color=color, label=f"K = {label}")
        if cutoff > 0:
            ax.axhline(cutoff, color="black", ls="--", lw=1, label=f"cutoff {cutoff:g}")
        ax.set(xlabel="optimizer step", ylabel="SNR", yscale="log", title=f"{p.name}\n({p.role.value})")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
