"""Memory benchmark: params, grads, optimizer state, persistent grad buffers and the peak of a full
training step, per optimizer, relative to AdamW, for a GPT-2-small-shaped transformer, a
ResNet-style CNN and the diffusion U-Net.

    python -m benchmarks.memory                 # the three models at full size (~5 min on 2 cores)
    python -m benchmarks.memory --quick         # tiny models: checks that it runs

Static bytes come from ``lowmem.optim.state_bytes`` right after ``step()`` (before ``zero_grad``).
The peak is measured, not computed: the second training step (forward, backward, ``step()``,
``zero_grad()``; the first one creates the state and compiles fast paths) runs under
``torch.profiler`` with ``profile_memory=True``, which records every allocation and free of the
CPU allocator in order. Peak = bytes of the tensors alive when the step starts (params, buffers,
surviving grads, optimizer state, the batch) + the largest running sum of the step's
allocations minus frees. That is tensor bytes, the CPU analogue of
``torch.cuda.max_memory_allocated``: no allocator caching, fragmentation or interpreter overhead
(which an RSS figure would mix in).

Regimes (section ``memory-regimes``, also ``--regimes`` alone): the same peak on GPT-2 small in
the settings that decide whether a folded momentum shows at the peak. HMAdamW holds ``P + B + v``
from the first backward to ``step()`` where AdamW holds ``P + grads + m + v``: the same bytes when
the backward starts (AdamW has no gradient yet), one parameter-sized tensor more for AdamW when it
ends. So the saving is hidden when the activations make the peak early in the backward (a larger
batch), and shows when the peak comes at its end: small micro-batches beside the 124M parameters,
activation checkpointing (every transformer block recomputed in the backward,
``torch.utils.checkpoint``, non-reentrant), and gradient accumulation (AdamW's gradients live
through the next micro-batches' forward and backward). Each regime's peak is measured by ``lowmem.cli.memory.peak_step_bytes``
(the same function ``lowmem fit``'s memory summary uses).
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from benchmarks.common import BASELINE, DOCS, MIB, Builder, count_params, gpt2_small, log, markdown_table
from benchmarks.common import optimizer_builders, section_header, write_section
from lowmem.cli.memory import peak_step_bytes

__all__ = ["ModelSpec", "Regime", "model_specs", "regimes", "measure", "measure_regime", "peak_step_bytes", "main"]


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], Any]  # a batch for module.compute_loss
    describe: str


def _warm_up(model: Any, optimizer: Any, batch: Any) -> None:
    """One training step before measuring: creates the optimizer state and compiles fast paths."""
    loss = model.compute_loss(batch)[0]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def model_specs(quick: bool = False) -> list[ModelSpec]:
    from lowmem.lightning_modules import DiffusionModel, ImageClassifier, LanguageModel

    def tokens(b: int, t: int, vocab: int) -> Callable[[], Any]:
        return lambda: (torch.randint(0, vocab, (b, t)), torch.randint(0, vocab, (b, t)))

    def images(b: int, c: int, s: int, labels: bool) -> Callable[[], Any]:
        return lambda: (torch.randn(b, c, s, s), torch.randint(0, 10, (b,))) if labels else (torch.randn(b, c, s, s),)

    if quick:
        return [
            ModelSpec("GPT (tiny)", lambda: LanguageModel(n_layer=2, n_head=2, n_embd=32, block_size=16),
                      tokens(2, 16, 256), "2 layers, width 32, batch 2 x 16 tokens"),
            ModelSpec("CNN (tiny)", lambda: ImageClassifier(widths=[8, 16]), images(4, 1, 8, True),
                      "widths 8, 16; 4 images 8x8"),
            ModelSpec("U-Net (tiny)", lambda: DiffusionModel(channels=[8, 16], time_dim=16), images(4, 1, 8, False),
                      "channels 8, 16; 4 images 8x8"),
        ]  # fmt: skip
    return [
        ModelSpec("GPT-2 small", gpt2_small, tokens(1, 256, 50304),
                  "12 layers, 12 heads, width 768, vocab 50304, tied head; batch 1 x 256 tokens"),
        ModelSpec("ResNet-18-style CNN",
                  lambda: ImageClassifier(in_channels=3, widths=[64, 128, 256, 512], blocks_per_stage=2),
                  images(32, 3, 32, True), "widths 64-512, 2 blocks per stage, GroupNorm; 32 images 3x32x32"),
        ModelSpec("Diffusion U-Net", lambda: DiffusionModel(in_channels=3, image_size=32, channels=[64, 128, 256]),
                  images(16, 3, 32, False), "channels 64, 128, 256; 16 images 3x32x32"),
    ]  # fmt: skip


def measure(spec: ModelSpec, builders: dict[str, Builder]) -> list[dict[str, Any]]:
    rows = []
    for name, build in builders.items():
        log(f"memory: {spec.name}: {name}")
        torch.manual_seed(0)
        model, batch = spec.build(), spec.batch()
        optimizer = build(model)
        _warm_up(model, optimizer, batch)
        peak, where, sizes = peak_step_bytes(model, optimizer, batch)
        rows.append({"optimizer": name, "n_params": count_params(model), "peak": peak, "peak_phase": where, **sizes})
        del model, optimizer, batch
        gc.collect()
    return rows


# --- regimes where the folded momentum shows at the peak -------------------------------------------
@dataclass
class Regime:
    name: str
    micro_batch: tuple[int, int]  # (sequences, tokens) of one micro-batch
    micro_batches: int = 1
    checkpointing: bool = False


def regimes(quick: bool = False) -> list[Regime]:
    t = 16 if quick else 256
    return [
        Regime(f"1 x {t} tokens (the table above)", (1, t)),
        Regime(f"4 x {t}: activations dominate", (4, t)),
        Regime(f"4 x {t}, activation checkpointing", (4, t), checkpointing=True),
        Regime(f"the same {4 * t} tokens as 4 micro-batches of 1 x {t} (accumulation)", (1, t), micro_batches=4),
        Regime(f"4 micro-batches of 1 x {t} + checkpointing", (1, t), micro_batches=4, checkpointing=True),
    ]


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute every transformer block in the backward (non-reentrant ``torch.utils.checkpoint``);
    parameter names are unchanged (the blocks' ``forward`` is wrapped in place)."""
    import functools

    from torch.utils.checkpoint import checkpoint

    for block in model.gpt.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _regime_model(quick: bool) -> tuple[Callable[[], nn.Module], int]:
    from lowmem.lightning_modules import LanguageModel

    if quick:
        return (lambda: LanguageModel(n_layer=2, n_head=2, n_embd=32, block_size=16)), 256
    return gpt2_small, 50304


def measure_regime(regime: Regime, builders: dict[str, Builder], quick: bool = False) -> list[dict[str, Any]]:
    build_model, vocab = _regime_model(quick)
    rows = []
    for name, build in builders.items():
        log(f"memory: regime {regime.name}: {name}")
        torch.manual_seed(0)
        model = build_model()
        if regime.checkpointing:
            _checkpoint_blocks(model)
        b, t = regime.micro_batch
        batch = (torch.randint(0, vocab, (b, t)), torch.randint(0, vocab, (b, t)))
        optimizer = build(model)
        _warm_up(model, optimizer, batch)
        peak, where, sizes = peak_step_bytes(model, optimizer, batch, micro_batches=regime.micro_batches)
        rows.append({"optimizer": name, "n_params": count_params(model), "peak": peak, "peak_phase": where, **sizes})
        del model, optimizer, batch
        gc.collect()
    return rows


REGIME_OPTIMIZERS = ("AdamW (fused)", "HMAdamW", "AdamS", "SlimAdamW", "Adam-mini", "AdaPM-mini", "IO-Adam (fused)",
                     "Adafactor")  # fmt: skip


def regimes_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Rows: optimizers; columns: each regime's peak in MiB and as a share of AdamW's."""
    names = [r["optimizer"] for r in next(iter(results.values()))]
    table = []
    for name in names:
        cells = []
        for rows in results.values():
            row, base = next(r for r in rows if r["optimizer"] == name), next(r for r in rows if r["optimizer"] == BASELINE)
            cells.append(f"{row['peak'] / MIB:.1f} ({_ratio(row['peak'], base['peak'])}, {row['peak_phase']})")
        table.append([name, *cells])
    return markdown_table(["optimizer (peak MiB, vs AdamW, phase)", *results], table)


def render_regimes(results: dict[str, list[dict[str, Any]]], argv: Sequence[str], quick: bool) -> str:
    n = next(iter(results.values()))[0]["n_params"]
    model = "GPT (tiny)" if quick else "GPT-2 small"
    return "\n".join([
        section_header("benchmarks.memory", argv),
        f"**Peak of one training step by regime** ({model}, {n / 1e6:.1f}M params; fp32; tensor bytes measured "
        "by `lowmem.cli.memory.peak_step_bytes`; ratios against `AdamW (fused)` in the same regime; the phase "
        "is where the peak was reached):\n",
        regimes_table(results),
        "",
    ])  # fmt: skip


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.1%}" if base else "n/a"


def results_table(rows: list[dict[str, Any]]) -> str:
    base = next(r for r in rows if r["optimizer"] == BASELINE)
    n = base["n_params"]
    headers = ["optimizer", "params MiB", "grads MiB", "state MiB", "grad buffers MiB", "state B/param",
               "state vs AdamW", "persistent vs AdamW", "peak MiB", "peak vs AdamW", "peak during"]  # fmt: skip
    table = [
        [r["optimizer"], f"{r['params'] / MIB:.1f}", f"{r['grads'] / MIB:.1f}", f"{r['state'] / MIB:.1f}",
         f"{r['grad_buffers'] / MIB:.1f}", f"{r['state'] / n:.2f}", _ratio(r["state"], base["state"]),
         _ratio(r["persistent"], base["persistent"]), f"{r['peak'] / MIB:.1f}", _ratio(r["peak"], base["peak"]),
         r["peak_phase"]]
        for r in rows
    ]  # fmt: skip
    return markdown_table(headers, table)


# (paper claim, measured quantity, function of the rows by name -> measured fraction or None)
def _claims() -> list[tuple[str, str, Callable[[dict[str, dict]], float | None]]]:
    def state_ratio(name: str) -> Callable[[dict], float | None]:
        return lambda r: r[name]["state"] / r[BASELINE]["state"] if name in r else None

    def saved(name: str, key: str) -> Callable[[dict], float | None]:
        return lambda r: 1 - r[name][key] / r[BASELINE][key] if name in r else None

    def persistent(name: str) -> Callable[[dict], float | None]:
        return lambda r: r[name]["persistent"] / r[BASELINE]["persistent"] if name in r else None

    def v_saved(r: dict) -> float | None:
        if "SlimAdamW" not in r:
            return None
        half = r[BASELINE]["state"] / 2  # AdamW's v (= its m) in bytes
        return 1 - (r["SlimAdamW"]["state"] - half) / half

    return [
        ("HMAdamW: state is 50% of AdamW's", "state / AdamW state", state_ratio("HMAdamW")),
        ("(HMAdamW, same run)", "(state + persistent grad buffer) / AdamW state", persistent("HMAdamW")),
        ("(HMAdamW, same run)", "peak of a training step saved vs AdamW", saved("HMAdamW", "peak")),
        ("AdamS: state is 50% of AdamW's", "state / AdamW state", state_ratio("AdamS")),
        ("SlimAdam: up to 98% of second moments saved", "1 - SlimAdamW v / AdamW v", v_saved),
        ("AdaPM: ~46% of optimizer state saved", "1 - state / AdamW state", saved("AdaPM", "state")),
        ("AdaPM-mini: ~94% of optimizer state saved", "1 - state / AdamW state", saved("AdaPM-mini", "state")),
        ("Adam-mini: ~50% of optimizer state saved", "1 - state / AdamW state", saved("Adam-mini", "state")),
        ("IO-Adam: 30-40% of total training memory saved", "peak of a training step saved vs AdamW",
         saved("IO-Adam", "peak")),
        ("(IO-Adam fused: no W.grad)", "peak of a training step saved vs AdamW", saved("IO-Adam (fused)", "peak")),
        ("(IO-Adam, same run)", "1 - state / AdamW state", saved("IO-Adam", "state")),
        ("Adafactor (no paper claim here)", "1 - state / AdamW state", saved("Adafactor", "state")),
    ]  # fmt: skip


def claims_table(results: dict[str, list[dict[str, Any]]]) -> str:
    by_model = {model: {r["optimizer"]: r for r in rows} for model, rows in results.items()}
    table = []
    for claim, quantity, value in _claims():
        cells = [value(rows) for rows in by_model.values()]
        table.append([claim, quantity, *("n/a" if c is None else f"{c:.1%}" for c in cells)])
    return markdown_table(["paper's headline", "measured quantity", *by_model], table, align="ll" + "r" * len(by_model))


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """One panel per model: params, grads, state and persistent grad buffers (stacked) and the peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.8), squeeze=False)
    parts = (("params", "params"), ("grads", "grads (after backward)"), ("state", "optimizer state"),
             ("grad_buffers", "persistent grad buffers"))  # fmt: skip
    for ax, (model, rows) in zip(axes[0], results.items()):
        names = [r["optimizer"] for r in rows]
        left = [0.0] * len(rows)
        for key, label in parts:
            # a folded-momentum optimizer's grads *are* its persistent buffers: draw them once
            values = [max(0, r[key] - (r["grad_buffers"] if key == "grads" else 0)) / MIB for r in rows]
            ax.barh(names, values, left=left, label=label)
            left = [a + b for a, b in zip(left, values)]
        ax.scatter([r["peak"] / MIB for r in rows], names, color="black", marker="|", s=200, label="peak of a step")
        ax.invert_yaxis()
        ax.set(xlabel="MiB", title=model)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(results: dict[str, list[dict[str, Any]]], specs: Sequence[ModelSpec], argv: Sequence[str]) -> str:
    parts = [section_header("benchmarks.memory", argv)]
    for spec in specs:
        rows = results[spec.name]
        parts.append(f"**{spec.name}** ({rows[0]['n_params'] / 1e6:.1f}M params; {spec.describe}); "
                     f"ratios against `{BASELINE}` (HMAdamW's *grads* and *grad buffers* are the same tensors):"
                     f"\n\n{results_table(rows)}\n")  # fmt: skip
    parts.append("![memory per optimizer](figures/memory.png)\n")
    parts.append("**Paper headlines against the same runs** (fractions of the bytes AdamW needs for the same "
                 f"quantity):\n\n{claims_table(results)}\n")  # fmt: skip
    return "\n".join(parts)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and no compiled fast paths (a run check)")
    parser.add_argument("--optimizers", nargs="*", help="subset of optimizer names (default: all)")
    parser.add_argument("--out", type=Path, default=DOCS, help="directory of benchmarks.md (default: docs/)")
    parser.add_argument("--regimes", action="store_true",
                        help="only the peak by regime (accumulation, small micro-batch, checkpointing)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    builders = optimizer_builders(fast=not args.quick)
    if args.optimizers:
        builders = {k: v for k, v in builders.items() if k == BASELINE or k in args.optimizers}
    text = ""
    if not args.regimes:
        specs = model_specs(args.quick)
        results = {spec.name: measure(spec, builders) for spec in specs}
        plot(results, args.out / "figures" / "memory.png")
        text = render(results, specs, argv)
        print(text)
        path = write_section(args.out, "memory", text)
        log(f"memory: wrote {path}")
    chosen = {k: v for k, v in builders.items() if k in REGIME_OPTIMIZERS or args.optimizers}
    by_regime = {r.name: measure_regime(r, chosen, args.quick) for r in regimes(args.quick)}
    regimes_text = render_regimes(by_regime, argv, args.quick)
    print(regimes_text)
    path = write_section(args.out, "memory-regimes", regimes_text)
    log(f"memory: wrote {path}")
    return text + "\n" + regimes_text


if __name__ == "__main__":
    main()
