"""Memory per rank under FSDP2: optimizer state, grad buffers and params of GPT-2 small, per rank
and in total, at 1, 2 and 8 ranks, for every optimizer.

    python -m benchmarks.sharding            # GPT-2 small (~2 min on 2 cores)
    python -m benchmarks.sharding --quick    # a tiny GPT: checks that it runs

Deterministic: each optimizer takes one real step on the unsharded model (its state exists after
the first step), then ``lowmem.optim.sharded_state_bytes`` splits every tensor by FSDP2's shard
plan (dim 0 in ``torch.chunk`` order; state with one entry per row of dim 0 is split like the
parameter, per-tensor / per-column / per-head state is replicated, and an optimizer may declare
exceptions: ``fsdp2_state_sharded``). ``tests/test_fsdp2.py`` checks this plan against the state
each rank really holds after 20 FSDP2 steps. The per-rank figure is rank 0's, the largest.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from benchmarks.common import BASELINE, DOCS, MIB, gpt2_small, log, markdown_table, optimizer_builders
from benchmarks.common import section_header, write_section
from lowmem.optim import sharded_state_bytes

__all__ = ["main", "measure"]

RANKS = (1, 2, 8)
SINGLE_PROCESS = {"IO-Adam (fused)"}  # refuses a world size above 1: no FSDP2 row


def _model(quick: bool) -> torch.nn.Module:
    from lowmem.lightning_modules import LanguageModel

    return LanguageModel(n_layer=2, n_head=2, n_embd=32, block_size=16) if quick else gpt2_small(block_size=256)


def measure(quick: bool = False, names: Sequence[str] | None = None) -> dict[str, dict[int, list[dict[str, int]]]]:
    """``{optimizer: {ranks: [bytes per rank]}}`` after one step of each optimizer."""
    results = {}
    for name, build in optimizer_builders(fast=False).items():
        if (names and name not in names and name != BASELINE) or name in SINGLE_PROCESS:
            continue
        torch.manual_seed(0)
        model = _model(quick)
        optimizer = build(model)
        tokens = torch.randint(0, model.config.vocab_size, (1, model.config.block_size))
        loss, _ = model.compute_loss((tokens, tokens))
        loss.backward()
        optimizer.step()
        results[name] = {ranks: sharded_state_bytes(optimizer, ranks) for ranks in RANKS}
        log(f"sharding: {name}")
        del model, optimizer
    return results


def render(results: dict[str, dict[int, list[dict[str, int]]]], argv: Sequence[str], quick: bool) -> str:
    base = results[BASELINE]
    headers = ["optimizer", "params + grads per rank, 8 ranks (MiB)"]
    for ranks in RANKS:
        headers += [f"state per rank, {ranks} (MiB)"] + ([f"state total, {ranks} (MiB)"] if ranks > 1 else [])
    headers += ["persistent per rank vs AdamW, 8 ranks"]
    rows = []
    for name, by_ranks in results.items():
        row = [name, f"{(by_ranks[8][0]['params'] + by_ranks[8][0]['grads']) / MIB:.1f}"]
        for ranks in RANKS:
            per_rank = by_ranks[ranks]
            row.append(f"{per_rank[0]['persistent'] / MIB:.1f}")
            if ranks > 1:
                row.append(f"{sum(r['persistent'] for r in per_rank) / MIB:.1f}")
        row.append(f"{by_ranks[8][0]['persistent'] / base[8][0]['persistent']:.1%}")
        rows.append(row)
    model = "a 2-layer width-32 GPT" if quick else "GPT-2 small (124M, tied head)"
    return (
        f"{section_header('benchmarks.sharding', argv)}\n"
        f"Optimizer memory of {model} under FSDP2, computed from the shard plan (state = optimizer "
        "state + persistent grad buffers, HMAdamW's momentum in `.grad` included; per rank = rank 0, the "
        "largest):\n\n" + markdown_table(headers, rows) + "\n"
    )


def main(argv: Sequence[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sharding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model (a run check)")
    parser.add_argument("--optimizers", nargs="*", help="subset of optimizer names (default: all)")
    parser.add_argument("--out", default=str(DOCS), help="directory of benchmarks.md (default: docs/)")
    args = parser.parse_args(argv)
    text = render(measure(args.quick, args.optimizers), argv, args.quick)
    from pathlib import Path

    log(f"sharding: wrote {write_section(Path(args.out), 'sharding', text)}")
    return text


if __name__ == "__main__":
    main()
