"""Speed benchmark: optimizer step time against fused and foreach AdamW and against each
optimizer's own bandwidth floor, for several model sizes; end-to-end training throughput per
optimizer on each model family's config.

    python -m benchmarks.speed                                  # 10M, 50M, GPT-2 small (~8 min)
    python -m benchmarks.speed --sizes 50M --repeats 9
    python -m benchmarks.speed --quick                          # tiny sizes, no compile: a run check
    python -m benchmarks.speed --sizes --families lm            # throughput of the lm configs only

Step time: for each size and optimizer, a fresh model (same seed), the first step timed alone
(state allocation and, for the fast paths, the native build or ``torch.compile`` start-up), then ``--warmup``
untimed and ``--repeats`` timed *rounds*. A round is: a backward pass of the optimizer's model
(a small batch, untimed), ``step()`` of fused AdamW on its own copy of the model and ``step()``
of the optimizer (alternating which goes first), ``zero_grad()`` (untimed: free for AdamW's
``set_to_none``, a no-op after HMAdamW's step, whose decay is fused into it) and a bandwidth
probe. Ratios are medians of the per-round ratios, so that load from other processes on a
shared machine slows both sides of a ratio alike.

Floor: the bytes a step must move if it reads every tensor it uses once and writes every tensor
it updates once, ``2 params + grads + 2 state (+ the momentum buffer written back by HMAdamW)``,
from ``state_bytes`` of the same optimizer (plus, for SlimAdamW, the momentum of its
column-compressed tensors read a second time: see ``reread_bytes``), divided by the bandwidth
probed in the same round (best of an in-place scale and an in-place addcmul on 256 MiB). Per fp32
parameter: AdamW 28 B, HMAdamW 24 B, AdamS 20 B, SlimAdamW 20-24 B (24 B when every tensor is
column-compressed, as in the MLP stacks).

AdaPM's low-rank refresh (a randomized SVD every ``refresh_every`` steps) is in the figures,
amortised: after the rounds above, ``--refresh_rounds`` more rounds step the optimizer with every
group's ``refresh_every`` set to 1 (every step a refresh, timed against fused AdamW in the same
rounds), and the reported ratios are ``((T-1) x the ALS rounds' + the refresh rounds') / T``,
T = ``refresh_every``. Its floor adds the compute floor of the low-rank blocks to the byte floor:
the time of the three GEMMs of an ALS sweep per block (``M Q``, ``L'^T M`` and the n x m
correction ``[L, L'][R; -R']``, 8 n m r multiply-adds), timed on the blocks' gradients in every
round (``lowrank_gemm_probe``).

The compile caches of Inductor and of the native kernels (``lowmem.optim._native``, built once
per process: the first optimizer to use them pays it) are pointed at fresh temporary directories
(unless ``--warm-compile-cache``), so the start-up figure is the cold cost a first use pays.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import BASELINE, CONFIG_OPTIMIZERS, CONFIGS, DOCS, FAMILIES, MLPStack, count_params, gpt2_small
from benchmarks.common import builder_of, load_average, load_config, log, markdown_table, measure_bandwidth
from benchmarks.common import optimizer_builders
from benchmarks.common import section_header, write_section
from lowmem import strategies
from lowmem.optim import SlimAdamW, state_bytes

__all__ = ["main", "step_times", "throughput"]

FOREACH = "AdamW (foreach)"
SPEED_OPTIMIZERS = ("AdamW (fused)", "AdamW (foreach)", "HMAdamW", "HMAdamW (noise)", "AdamS", "SlimAdamW", "Adam-mini",
                    "AdaPM", "AdaPM-mini", "IO-Adam", "Adafactor")  # fmt: skip
# Issue 4's and issue 19's targets: (step time / fused AdamW) and (step time / own floor) upper bounds.
TARGETS = {"HMAdamW": (0.95, 1.25), "HMAdamW (noise)": (0.95, 1.25), "AdamS": (0.85, 1.25), "SlimAdamW": (0.85, 1.25), "AdaPM": (1.5, 2.0),
           "AdaPM-mini": (1.5, 2.0), "IO-Adam": (1.3, 2.0)}  # fmt: skip
MLP_WIDTH = 512


# --- models of a given size ----------------------------------------------------------------------
def sized_model(size: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], str]:
    """(model, loss function, description) for ``"<N>M"`` (an MLP stack of about N million params
    in 2 tensors per block) or ``"gpt2"`` (GPT-2 small, 124M)."""
    if size == "gpt2":
        model = gpt2_small()
        x, y = torch.randint(0, 50304, (1, 16)), torch.randint(0, 50304, (1, 16))
        return model, lambda m: m.compute_loss((x, y))[0], "GPT-2 small shape (embeddings, 12 blocks, norms, biases)"
    match = re.fullmatch(r"(\d+(?:\.\d+)?)M", size)
    if not match:
        raise SystemExit(f"speed: unknown size {size!r}: use <N>M (e.g. 50M) or gpt2")
    blocks = max(1, round(float(match.group(1)) * 1e6 / (8 * MLP_WIDTH**2)))
    model = MLPStack(MLP_WIDTH, blocks)
    x = torch.randn(4, MLP_WIDTH)
    describe = f"MLP stack, width {MLP_WIDTH}, {blocks} blocks ({2 * blocks} tensors of {4 * MLP_WIDTH**2:,} elements)"
    return model, lambda m: m.loss(x), describe


def _backward(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
    loss_fn(model).backward()


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bandwidth_probe(mib: int) -> Callable[[], float]:
    """A quick bandwidth reading (GB/s, best of in-place scale and addcmul on ``mib`` MiB), taken
    between the steps it serves as floor for."""
    n = mib * 2**20 // 4
    a, b, c = (torch.rand(n) for _ in range(3))

    def probe() -> float:
        scale = _timed(lambda: a.mul_(1.0))
        addcmul = _timed(lambda: a.addcmul_(b, c, value=1e-9))
        return max(2 * n * 4 / scale, 4 * n * 4 / addcmul) / 1e9

    return probe


def floor_bytes(row: dict) -> int:
    """Bytes moved by a step that reads each tensor once and writes each updated tensor once,
    plus the tensors an exact step must read twice (``reread_bytes``)."""
    return 2 * row["params"] + row["grads"] + 2 * row["state"] + row["grad_buffers"] + row.get("reread", 0)


def reread_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes an exact step must read a second time, beyond the read-once floor.

    SlimAdamW's tensors compressed over dims that exclude the last one (e.g. ``(0,)`` on a
    Linear weight: one ``v`` per input column, the MLP rule) need ``mean_K(g^2)`` over every row
    before any element can be updated: two passes, so one parameter-sized tensor (its momentum,
    or its gradient) is read twice when the tensor does not fit in cache. Reductions over the
    trailing dims are done row by row in one pass. Every other optimizer here: 0.
    """
    if not isinstance(optimizer, SlimAdamW):
        return 0
    total = 0
    for group in optimizer.param_groups:
        dims = group["compress_dims"]
        for p in group["params"]:
            if dims is not None and p.dim() - 1 not in {d % p.dim() for d in dims}:
                total += p.numel() * optimizer.state[p]["exp_avg"].element_size()
    return total


def refresh_every(optimizer: torch.optim.Optimizer) -> int | None:
    """AdaPM's ``refresh_every`` (the largest over groups with low-rank blocks), else None."""
    values = [g["refresh_every"] for g in optimizer.param_groups
              if "refresh_every" in g and g.get("momentum") in ("lowrank", "qkv")]  # fmt: skip
    return max(values) if values else None


def lowrank_gemm_probe(optimizer: torch.optim.Optimizer) -> Callable[[], float] | None:
    """For AdaPM: a callable timing the three GEMMs of one ALS sweep of every low-rank block (the
    compute floor of its step: ``g Q`` (n x m x r), ``L'^T g`` (r x n x m) and the n x m
    correction ``[L, L'] [R; -R']`` (n x 2r x m), 8 n m r multiply-adds), on the blocks' gradients
    as they are when it is called (each read from memory, as the step reads it) with random
    factors and preallocated outputs (one set per distinct shape); None for other optimizers."""
    from lowmem.optim.adapm import _part, _segments

    blocks: list[tuple[torch.Tensor, int, tuple[int, int] | None, tuple[int, int, int]]] = []
    for group in optimizer.param_groups:
        if group.get("momentum") not in ("lowrank", "qkv"):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for suffix, kind, span in _segments(p.shape, group):
                if kind == "lowrank" and "factor_L" + suffix in state:
                    (n, r), m = state["factor_L" + suffix].shape, state["factor_R" + suffix].shape[1]
                    blocks.append((p, group["fan_out_dim"], span, (n, m, r)))
    if not blocks:
        return None
    tensors = {}
    for n, m, r in {b[3] for b in blocks}:
        tensors[(n, m, r)] = (torch.randn(m, r), torch.randn(n, r), torch.randn(n, 2 * r), torch.randn(2 * r, m),
                              torch.empty(n, r), torch.empty(r, m), torch.empty(n, m))  # fmt: skip

    def probe() -> float:
        start = time.perf_counter()
        for p, dim, span, shape in blocks:
            g = _part(p.grad, dim, span) if p.grad is not None else None
            if g is None:
                continue
            q, L, L2, R2, y, rr, out = tensors[shape]
            torch.mm(g, q, out=y)
            torch.mm(L.T, g, out=rr)
            torch.mm(L2, R2, out=out)
        return time.perf_counter() - start

    return probe


def _summary(name: str, times: list[float], base: list[float], bandwidth: list[float], first: float,
             sizes: dict, gemm: list[float] | None = None, refresh: tuple[list[float], list[float], int] | None = None,
             ) -> dict:  # fmt: skip
    """A table row from per-round step times (optimizer, fused AdamW), bandwidths (GB/s), the
    GEMM probe's times (AdaPM) and the refresh rounds (their step times, fused AdamW's, and T)."""
    row = {"optimizer": name, "first": first, **sizes}
    floors = [floor_bytes(row) / (bw * 1e9) + (gemm[i] if gemm else 0.0) for i, bw in enumerate(bandwidth)]
    row.update(median=statistics.median(times), base_median=statistics.median(base),
               vs_fused=statistics.median(t / b for t, b in zip(times, base)),
               vs_floor=statistics.median(t / f for t, f in zip(times, floors)), floor=statistics.median(floors),
               bandwidth=statistics.median(bandwidth), gemm=statistics.median(gemm) if gemm else None,
               refresh=None)  # fmt: skip
    if refresh:
        r_times, r_base, every = refresh
        floor = row["floor"]
        r_vs_fused = statistics.median(t / b for t, b in zip(r_times, r_base))
        row.update(refresh={"vs_fused": r_vs_fused, "median": statistics.median(r_times), "every": every},
                   als_vs_fused=row["vs_fused"], als_vs_floor=row["vs_floor"],
                   vs_fused=((every - 1) * row["vs_fused"] + r_vs_fused) / every,
                   vs_floor=((every - 1) * row["vs_floor"] + statistics.median(r_times) / floor) / every,
                   median=((every - 1) * row["median"] + statistics.median(r_times)) / every)  # fmt: skip
    return row


def speed_builders(fast: bool) -> dict:
    """The benchmarks' builders plus HMAdamW with ``variance_correction="noise"``, whose step does
    all its work (the default, hook in one process, updates v in the backward)."""
    noise = strategies.HMAdamW(fused=fast, variance_correction="noise")
    return {**optimizer_builders(fast), "HMAdamW (noise)": builder_of(noise)}


def step_times(size: str, names: Sequence[str], fast: bool, repeats: int, warmup: int,
               probe: Callable[[], float], refresh_rounds: int = 3) -> tuple[list[dict], str, int]:  # fmt: skip
    """One row per optimizer, each timed in rounds interleaved with fused AdamW and a bandwidth probe.

    Every round: a backward pass for the optimizer's model (untimed), then ``step()`` of fused
    AdamW (on its own copy of the model, same grads every round) and of the optimizer, in
    alternating order, then the probe. Ratios are medians of the per-round ratios, so a burst of
    load from elsewhere slows both sides of a ratio alike.
    """
    builders = speed_builders(fast)
    torch.manual_seed(0)
    base_model, base_loss, describe = sized_model(size)
    base_opt = builders[BASELINE](base_model)
    _backward(base_model, base_loss)
    base_first = _timed(base_opt.step)
    base_sizes = state_bytes(base_opt)
    base_times: list[float] = []
    base_bandwidth: list[float] = []
    rows = []
    for name in names:
        if name == BASELINE:
            continue
        log(f"speed: {size}: {name}")
        torch.manual_seed(0)
        model, loss_fn, _ = sized_model(size)
        optimizer = builders[name](model)
        _backward(model, loss_fn)
        first = _timed(optimizer.step)
        sizes = {**state_bytes(optimizer), "reread": reread_bytes(optimizer)}  # grads still present: what the step read
        gemm_probe = lowrank_gemm_probe(optimizer)
        optimizer.zero_grad()
        times, base, bandwidth, gemm = [], [], [], []
        for i in range(warmup + repeats):
            _backward(model, loss_fn)
            if i % 2:
                b, t = _timed(base_opt.step), _timed(optimizer.step)
            else:
                t, b = _timed(optimizer.step), _timed(base_opt.step)
            bw = probe()
            g = gemm_probe() if gemm_probe else 0.0
            optimizer.zero_grad()
            if i >= warmup:
                times.append(t)
                base.append(b)
                bandwidth.append(bw)
                gemm.append(g)
        refresh = None
        every = refresh_every(optimizer)
        if every is not None and every > 1 and refresh_rounds > 0:  # every step a refresh, then amortised
            saved = [g["refresh_every"] for g in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["refresh_every"] = 1
            r_times, r_base = [], []
            for i in range(refresh_rounds):
                _backward(model, loss_fn)
                if i % 2:
                    b, t = _timed(base_opt.step), _timed(optimizer.step)
                else:
                    t, b = _timed(optimizer.step), _timed(base_opt.step)
                optimizer.zero_grad()
                r_times.append(t)
                r_base.append(b)
            for group, value in zip(optimizer.param_groups, saved):
                group["refresh_every"] = value
            refresh = (r_times, r_base, every)
        rows.append(_summary(name, times, base, bandwidth, first, sizes, gemm if gemm_probe else None, refresh))
        base_times += base
        base_bandwidth += bandwidth
        del model, optimizer
        gc.collect()
    rows.insert(0, _summary(BASELINE, base_times, base_times, base_bandwidth, base_first, base_sizes))
    return rows, describe, count_params(base_model)


def step_table(rows: list[dict], n_params: int) -> str:
    by = {r["optimizer"]: r for r in rows}
    foreach = by.get(FOREACH)
    headers = ["optimizer", "step ms (median)", "fused AdamW ms, same rounds", "vs fused AdamW", "vs foreach AdamW",
               "floor B/param", "floor ms", "vs own floor", "state vs AdamW", "first step ms"]  # fmt: skip
    notes = []
    for r in rows:
        if r.get("refresh"):
            notes.append(f"{r['optimizer']}: ALS steps {r['als_vs_fused']:.2f}x fused AdamW ({r['als_vs_floor']:.2f}x "
                         f"its floor), refresh steps {r['refresh']['vs_fused']:.2f}x ({r['refresh']['median'] * 1e3:.0f}"
                         f" ms), amortised over refresh_every = {r['refresh']['every']} in the row")  # fmt: skip
        if r.get("gemm"):
            notes.append(f"{r['optimizer']}: floor = bytes / bandwidth + {r['gemm'] * 1e3:.1f} ms of low-rank GEMMs")
        if r["optimizer"] == "HMAdamW":
            notes.append("HMAdamW: variance_correction auto, i.e. hook in this one process: its v update runs in the "
                         "backward (gradient hooks, untimed here; see the throughput table); HMAdamW (noise) updates "
                         "v in the step")  # fmt: skip
    table = [
        [r["optimizer"], f"{r['median'] * 1e3:.1f}", f"{r['base_median'] * 1e3:.1f}", f"{r['vs_fused']:.2f}x",
         f"{r['vs_fused'] / foreach['vs_fused']:.2f}x" if foreach else "n/a",
         f"{floor_bytes(r) / n_params:.1f}", f"{r['floor'] * 1e3:.1f}", f"{r['vs_floor']:.2f}x",
         f"{r['state'] / by[BASELINE]['state']:.1%}", f"{r['first'] * 1e3:.0f}"]
        for r in rows
    ]  # fmt: skip
    text = markdown_table(headers, table)
    return text + ("\n\n" + "; ".join(notes) + "." if notes else "")


def target_table(rows: list[dict]) -> str:
    by = {r["optimizer"]: r for r in rows}
    table = []
    for name, (vs_fused, vs_floor) in TARGETS.items():
        if name not in by:
            continue
        r = by[name]
        ok = r["vs_fused"] <= vs_fused and r["vs_floor"] <= vs_floor
        table.append([name, f"<= {vs_fused:.2f}x", f"{r['vs_fused']:.2f}x", f"<= {vs_floor:.2f}x",
                      f"{r['vs_floor']:.2f}x", "met" if ok else "**missed**"])  # fmt: skip
    headers = ["optimizer", "target vs fused AdamW", "measured", "target vs own floor", "measured", ""]
    return markdown_table(headers, table)


# --- end-to-end throughput -----------------------------------------------------------------------
def throughput(family: str, optimizers: Sequence[str], warmup: int, timed: int) -> list[dict[str, Any]]:
    """Samples/s of forward + backward + step + zero_grad on each config's model, data and optimizer.

    All configs of the family are built first, then trained in rounds of one step each (the
    order rotating every round), so that load from elsewhere hits every optimizer alike.
    """
    runs = []
    for name in optimizers:
        cli = load_config(CONFIGS / f"{family}_{name}.yaml")
        cli.datamodule.setup("fit")
        configured = cli.model.configure_optimizers()
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        batches = list(islice(cycle(cli.datamodule.train_dataloader()), warmup + timed))
        cli.model.train()
        runs.append({"model": cli.model, "opt": optimizer, "batches": batches, "times": []})

    def train_step(run: dict, batch: Any) -> None:
        loss = run["model"].compute_loss(batch)[0]
        loss.backward()
        run["opt"].step()
        run["opt"].zero_grad()

    for i in range(warmup + timed):
        for k in range(len(runs)):
            run = runs[(k + i) % len(runs)]
            elapsed = _timed(lambda: train_step(run, run["batches"][i]))
            if i >= warmup:
                run["times"].append(elapsed)
    return [{"optimizer": type(r["opt"]).__name__, "median": statistics.median(r["times"]),
             "batch": len(r["batches"][0][0]), "params": count_params(r["model"])} for r in runs]  # fmt: skip


def throughput_table(results: dict[str, list[dict]]) -> str:
    headers = ["family (config)", *(r["optimizer"] for r in next(iter(results.values())))]
    table = []
    for family, rows in results.items():
        base = rows[0]["median"]
        table.append([f"{family} ({rows[0]['params'] / 1e3:.0f}K params, batch {rows[0]['batch']})",
                      *(f"{r['batch'] / r['median']:.0f} ({base / r['median']:.2f}x)" for r in rows)])  # fmt: skip
    return markdown_table(headers, table)


# --- main ----------------------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["10M", "50M", "gpt2"],
                        help="<N>M MLP stacks and/or gpt2 (none: skip the step times)")
    parser.add_argument("--optimizers", nargs="+", default=list(SPEED_OPTIMIZERS), help="optimizer names")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per optimizer (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first step")
    parser.add_argument("--refresh_rounds", type=int, default=3,
                        help="AdaPM: rounds with every step a refresh, amortised into its row (0: none)")
    parser.add_argument("--bandwidth_mib", type=int, default=512, help="tensor size of the bandwidth kernels")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), help="throughput families (none: skip)")
    parser.add_argument("--throughput_optimizers", nargs="+", default=list(CONFIG_OPTIMIZERS), help="config names")
    parser.add_argument("--throughput_steps", type=int, default=15, help="timed training steps per config")
    parser.add_argument("--warm-compile-cache", dest="warm_cache", action="store_true",
                        help="keep Inductor's on-disk cache (start-up then shows a cache hit, not a compile)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats, no compiled fast paths")
    parser.add_argument("--out", type=Path, default=DOCS, help="directory of benchmarks.md (default: docs/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = ["1M"] if args.sizes else []
        args.repeats, args.warmup, args.bandwidth_mib, args.throughput_steps = 2, 1, 16, 2
        args.refresh_rounds = min(args.refresh_rounds, 1)
    unknown = set(args.optimizers) - set(SPEED_OPTIMIZERS)
    if unknown:
        parser.error(f"unknown optimizer(s) {sorted(unknown)}; choose from {list(SPEED_OPTIMIZERS)}")
    args.optimizers = [n for n in SPEED_OPTIMIZERS if n in args.optimizers or n in (BASELINE, FOREACH)]
    return args


def plot(results: dict[str, tuple[list[dict], str, int, dict]], path: Path) -> None:
    """Step time relative to fused AdamW and to the own floor, per optimizer, one bar per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["optimizer"] for r in next(iter(results.values()))[0]]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6))
    width = 0.8 / len(results)
    for i, (size, (rows, *_)) in enumerate(results.items()):
        by = {r["optimizer"]: r for r in rows}
        xs = [k + i * width for k in range(len(names))]
        axes[0].bar(xs, [by[n]["vs_fused"] for n in names], width, label=size)
        axes[1].bar(xs, [by[n]["vs_floor"] for n in names], width, label=size)
    titles = ("step time / fused AdamW's (log scale)", "step time / own bandwidth floor (log scale)")
    for ax, title in zip(axes, titles):
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(names))], names, rotation=35, ha="right", fontsize=8)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set(title=title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bandwidth_text(bandwidth: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in bandwidth.items() if k != "best") + " GB/s"


def render_steps(results: dict, args: argparse.Namespace, argv: Sequence[str], load_before: str) -> str:
    parts = [section_header("benchmarks.speed", argv),
             f"Load average (1/5/15 min) before the step timings: {load_before}; after: {load_average()}. "
             f"Each optimizer: the first step timed alone, then {args.warmup} untimed and {args.repeats} timed rounds "
             "(backward untimed; fused AdamW's step and the optimizer's step, alternating order; a bandwidth probe). "
             "*step ms*: median; *vs fused AdamW* and *vs own floor*: medians of the per-round ratios; *vs foreach*: "
             "the ratio of the two medians of ratios.\n"]  # fmt: skip
    for size, (rows, describe, n_params, bandwidth) in results.items():
        probe = statistics.median(r["bandwidth"] for r in rows[1:]) if len(rows) > 1 else bandwidth["best"]
        parts.append(f"**{size}**: {n_params / 1e6:.1f}M fp32 params, {describe}. Bandwidth before the timings: "
                     f"{_bandwidth_text(bandwidth)}; median probe during the rounds {probe:.1f} GB/s."
                     f"\n\n{step_table(rows, n_params)}\n")  # fmt: skip
        targets = target_table(rows)
        if targets:
            parts.append(f"Targets (issue 4) at {size} (AdaPM, AdaPM-mini, IO-Adam: issue 19):\n\n{targets}\n")
    figure = args.out / "figures" / "speed.png"
    plot(results, figure)
    parts.append(f"![step time relative to fused AdamW and to the own floor](figures/{figure.name})\n")
    return "\n".join(parts)


def render_throughput(results: dict, args: argparse.Namespace, argv: Sequence[str], warm: int, load_before: str) -> str:
    return (f"{section_header('benchmarks.speed', argv)}\nLoad average (1/5/15 min) before: {load_before}. "
            f"Samples/s of forward + backward + step + zero_grad, median of {args.throughput_steps} steps after {warm} "
            "warm-up steps, the configs of a family trained in interleaved rounds of one step each; in brackets "
            "relative to AdamW. Each family's config (`configs/<family>_<optimizer>.yaml`): its model, batch size and "
            "optimizer settings, `fused` left at the strategy's default (the for-loop below 2^20 elements).\n\n"
            + throughput_table(results) + "\n")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if not args.warm_cache and not args.quick:  # --quick compiles nothing
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lowmem-bench-inductor-")
        os.environ["LOWMEM_CACHE_DIR"] = tempfile.mkdtemp(prefix="lowmem-bench-native-")
    texts = []
    if args.sizes:
        load_before, results = load_average(), {}
        probe = bandwidth_probe(min(256, args.bandwidth_mib))
        for size in args.sizes:
            bandwidth = measure_bandwidth(args.bandwidth_mib)
            log(f"speed: bandwidth {bandwidth}")
            rows = step_times(size, args.optimizers, not args.quick, args.repeats, args.warmup, probe,
                              args.refresh_rounds)  # fmt: skip
            results[size] = (*rows, bandwidth)
        texts.append(render_steps(results, args, argv, load_before))
        write_section(args.out, "speed", texts[-1])
    if args.families:
        load_before, warm = load_average(), 1 if args.quick else 3
        tp = {f: throughput(f, args.throughput_optimizers, warm, args.throughput_steps) for f in args.families}
        texts.append(render_throughput(tp, args, argv, warm, load_before))
        write_section(args.out, "throughput", texts[-1])
    text = "\n\n".join(texts)
    print(text)
    log(f"speed: wrote {args.out / 'benchmarks.md'}")
    return text


if __name__ == "__main__":
    main()
