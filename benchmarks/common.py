"""Shared pieces of the benchmarks: optimizers built the way users get them, models, timing,
bandwidth, machine facts, markdown tables and the generated sections of ``docs/benchmarks.md``.

Every optimizer is built from a model through its ``lowmem.strategies`` class
(``strategy.build(module)``), so parameter groups (no-decay groups, SlimAdam rules, AdaPM and
Adam-mini blocks, IO-Adam hooks) are exactly what a config gets.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lowmem import strategies

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MIB = float(2**20)

Builder = Callable[[nn.Module], Optimizer]


# --- optimizers ----------------------------------------------------------------------------------
def builder_of(strategy: strategies.OptimizerStrategy, **extra: Any) -> Builder:
    """``strategy.build``, or the strategy's groups and hyperparameters plus ``extra`` keywords."""
    if not extra:
        return strategy.build
    return lambda module: strategy.optimizer_class(strategy.param_groups(module), **strategy.hparams, **extra)


def optimizer_builders(fast: bool = True) -> dict[str, Builder]:
    """Name -> builder for every optimizer the benchmarks compare, with the strategies' defaults.

    ``fast`` selects the fast path (``fused=True``: the backends of ``lowmem.optim._dispatch``) of
    every lowmem optimizer; ``False`` runs their for-loop reference (what ``--quick`` uses).
    The baseline of every ratio is ``"AdamW (fused)"``: ``torch.optim.AdamW(fused=True)``.
    """
    return {
        "AdamW (fused)": builder_of(strategies.AdamW(fused=True)),
        "AdamW (foreach)": builder_of(strategies.AdamW(), foreach=True),
        "HMAdamW": builder_of(strategies.HMAdamW(fused=fast)),
        "AdamS": builder_of(strategies.AdamS(fused=fast)),
        "SlimAdamW": builder_of(strategies.SlimAdamW(fused=fast)),
        "Adam-mini": builder_of(strategies.AdamMini(fused=fast)),
        "AdaPM": builder_of(strategies.AdaPM(fused=fast)),
        "AdaPM-mini": builder_of(strategies.AdaPM(second_moment="mini", fused=fast)),
        "IO-Adam": builder_of(strategies.IOAdam(fused=fast)),
        "IO-Adam (fused)": builder_of(strategies.IOAdam(fused_linear=True, fused=fast)),
        "Adafactor": builder_of(strategies.Adafactor()),
    }


BASELINE = "AdamW (fused)"


# --- models --------------------------------------------------------------------------------------
class MLPStack(nn.Module):
    """``blocks`` MLP blocks (``up_proj`` d -> 4d, ``down_proj`` 4d -> d, no biases, GELU, residual).

    A transformer's MLP half: 2 tensors of 4 d^2 elements per block, classified as MLP up/down
    by the role classifier (so SlimAdamW, AdaPM and Adam-mini apply their MLP rules).
    """

    def __init__(self, d: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up_proj": nn.Linear(d, 4 * d, bias=False), "down_proj": nn.Linear(4 * d, d, bias=False)})
            for _ in range(blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["down_proj"](nn.functional.gelu(block["up_proj"](x)))
        return x

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self(batch).square().mean()


def gpt2_small(block_size: int = 1024) -> nn.Module:
    """GPT-2 small's shape (12 layers, 12 heads, width 768, vocab 50304, tied head): 124M params."""
    from lowmem.lightning_modules import LanguageModel

    return LanguageModel(n_layer=12, n_head=12, n_embd=768, block_size=block_size, vocab_size=50304)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --- timing and bandwidth ------------------------------------------------------------------------
def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_bandwidth(mib: int = 512, repeats: int = 7) -> dict[str, float]:
    """Memory bandwidth in GB/s (1e9 bytes/s, every byte read or written counted once) of streaming
    kernels on ``mib``-MiB fp32 tensors; ``"best"`` is the largest, the rate floors are computed with.

    The in-place kernels write where they read, as an optimizer step does (no extra read of a
    destination line before writing it); ``copy`` writes to another buffer.
    """
    n = mib * 2**20 // 4
    a, b, c, dst = (torch.rand(n) for _ in range(4))  # rand touches every page: no first-touch faults
    kernels = {
        "copy (1R+1W)": (lambda: dst.copy_(a), 2),
        "in-place scale (1R+1W)": (lambda: a.mul_(1.0), 2),
        "in-place add (2R+1W)": (lambda: a.add_(b, alpha=1e-9), 3),
        "in-place addcmul (3R+1W)": (lambda: a.addcmul_(b, c, value=1e-9), 4),
    }
    rates = {name: streams * n * 4 / median_seconds(fn, repeats) / 1e9 for name, (fn, streams) in kernels.items()}
    rates["best"] = max(rates.values())
    return rates


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_facts(bandwidth: dict[str, float] | None = None) -> str:
    """One markdown paragraph: date, torch, threads, CPU, load average, bandwidth of this run."""
    facts = [
        f"measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"torch {torch.__version__}",
        f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}",
        f"CPU: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} logical cores)",
        f"Python {platform.python_version()}",
        f"load average (1/5/15 min) at the end: {load_average()}",
    ]
    text = "Machine: " + "; ".join(facts) + "."
    if bandwidth:
        rates = ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth.items() if k != "best")
        text += f" Memory bandwidth in this run: {rates}; floors use the best, {bandwidth['best']:.1f} GB/s."
    return text


# --- output --------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one character per column (``l`` or ``r``, default: l then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(module: str, argv: Sequence[str]) -> str:
    return " ".join(["python -m", module, *(shlex.quote(a) for a in argv)])


def write_section(out_dir: Path, name: str, body: str) -> Path:
    """Put ``body`` between the ``name`` markers of ``out_dir/benchmarks.md`` (appended if absent).

    Text outside the markers (the explanations) is left as it is.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "benchmarks.md"
    begin, end = f"<!-- BEGIN GENERATED {name} -->", f"<!-- END GENERATED {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + f"\n\n{block}\n"
    path.write_text(text)
    return path


def section_header(module: str, argv: Sequence[str], bandwidth: dict[str, float] | None = None) -> str:
    """The command and machine facts every generated section starts with."""
    return f"Command: `{command_line(module, argv)}`\n\n{machine_facts(bandwidth)}\n"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- configs -------------------------------------------------------------------------------------
CONFIGS = REPO / "configs"
FAMILIES = ("cnn", "lm", "diffusion")
CONFIG_OPTIMIZERS = ("adamw", "hmadamw", "adams", "slimadamw", "adapm", "ioadam", "adammini", "adafactor")


def load_config(path: Path, overrides: Sequence[str] = (), root: Path | None = None) -> Any:
    """The ``LowMemCLI`` of a config, instantiated but not run (``cli.model``, ``cli.datamodule``,
    ``cli.trainer``); ``overrides`` are command-line arguments such as ``--trainer.max_steps=50``.
    No logger, checkpoints or progress bar; files Lightning writes (``config.yaml``) go to ``root``
    (default: a directory under the system's temp dir), never into the working directory."""
    from lowmem.cli import LowMemCLI

    root = root or Path(tempfile.gettempdir()) / "lowmem-benchmarks"
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             "--trainer.enable_checkpointing=false", "--trainer.logger=false",
             f"--trainer.default_root_dir={root}"]  # fmt: skip
    return LowMemCLI(args=["--config", str(path), *quiet, *overrides], run=False)
