"""Smoke test of the benchmarks: each one runs on tiny sizes and writes its table and figures.

Benchmarks are not tests: nothing here checks a timing or a memory figure, only that every
benchmark completes, writes its generated section (between markers, keeping the text around it)
and its figures.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks/` is a top-level folder of the repository, not installed
    sys.path.insert(0, str(REPO))

from benchmarks import memory, quality, sharding, speed  # noqa: E402
from benchmarks.common import write_section  # noqa: E402


def _section(text: str, name: str) -> str:
    begin, end = f"<!-- BEGIN GENERATED {name} -->", f"<!-- END GENERATED {name} -->"
    assert text.count(begin) == 1 and text.count(end) == 1, f"section {name} missing or duplicated"
    return text.split(begin)[1].split(end)[0]


def test_write_section_replaces_only_its_block(tmp_path):
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\nprose before\n")
    write_section(tmp_path, "speed", "old table")
    write_section(tmp_path, "memory", "memory table")
    write_section(tmp_path, "speed", "new table")
    text = (tmp_path / "benchmarks.md").read_text()
    assert "prose before" in text and "old table" not in text
    assert _section(text, "speed").strip() == "new table"
    assert _section(text, "memory").strip() == "memory table"


def test_memory_benchmark_runs(tmp_path):
    memory.main(["--quick", "--optimizers", "HMAdamW", "IO-Adam (fused)", "--out", str(tmp_path)])
    section = _section((tmp_path / "benchmarks.md").read_text(), "memory")
    assert "Command: `python -m benchmarks.memory --quick" in section and "torch " in section
    for model in ("GPT (tiny)", "CNN (tiny)", "U-Net (tiny)"):
        assert f"**{model}**" in section
    assert "| HMAdamW |" in section and "| AdamW (fused) |" in section and "| IO-Adam (fused) |" in section
    assert "paper's headline" in section
    assert (tmp_path / "figures" / "memory.png").read_bytes()[:4] == b"\x89PNG"


def test_speed_benchmark_runs(tmp_path):
    speed.main(["--quick", "--optimizers", "HMAdamW", "--families", "cnn", "--throughput_optimizers", "adamw",
                "hmadamw", "--out", str(tmp_path)])  # fmt: skip
    text = (tmp_path / "benchmarks.md").read_text()
    steps, throughput = _section(text, "speed"), _section(text, "throughput")
    assert "Bandwidth before the timings" in steps and "Targets (issue 4)" in steps
    assert "| HMAdamW |" in steps and "| AdamW (foreach) |" in steps and "| AdamW (fused) |" in steps
    assert (tmp_path / "figures" / "speed.png").read_bytes()[:4] == b"\x89PNG"
    assert "| cnn (" in throughput and "| AdamW | HMAdamW |" in throughput


def test_quality_benchmark_runs(tmp_path):
    quality.main(["--quick", "--families", "cnn", "--variants", "hmadamw", "hmadamw-noise", "--out", str(tmp_path)])
    section = _section((tmp_path / "benchmarks.md").read_text(), "quality")
    assert "| AdamW |" in section and "| HMAdamW (auto) |" in section and "| HMAdamW (noise) |" in section
    figure = tmp_path / "figures" / "quality_cnn.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](figures/quality_cnn.png)" in section


def test_quality_grid_runs_and_reuses_finished_runs(tmp_path):
    """--grid: the lr grid on seed 0, the best lr re-run on the other seeds, the tables and the lr
    sensitivity figure; a second invocation with --results re-runs nothing."""
    argv = ["--quick", "--grid", "--families", "cnn", "--variants", "hmadamw", "--results", str(tmp_path / "r.jsonl"),
            "--out", str(tmp_path)]  # fmt: skip
    quality.main(argv)
    runs = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(runs) == 2 * (4 + 1)  # AdamW and HMAdamW: 4 lrs on seed 0, the best on seed 1
    section = _section((tmp_path / "benchmarks.md").read_text(), "quality-grid")
    assert "| HMAdamW (auto) |" in section and "best lr" in section
    assert (tmp_path / "figures" / "quality_grid_lr_cnn.png").read_bytes()[:4] == b"\x89PNG"
    quality.main(argv)
    assert (tmp_path / "r.jsonl").read_text().splitlines() == runs


def test_floor_counts_the_second_read_of_column_compressed_tensors():
    import torch

    from lowmem.optim import HMAdamW, SlimAdamW

    def opt(cls, **group):
        params = [torch.nn.Parameter(torch.zeros(6, 4)) for _ in range(3)]
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer = cls([{"params": params, **group}])
        optimizer.step()
        return optimizer

    per_tensor = 6 * 4 * 4  # fp32 momentum of one (6, 4) weight
    assert speed.reread_bytes(opt(SlimAdamW, compress_dims=(0,))) == 3 * per_tensor  # per input column: 2 passes
    assert speed.reread_bytes(opt(SlimAdamW, compress_dims=(1,))) == 0  # per output row: one pass
    assert speed.reread_bytes(opt(SlimAdamW, compress_dims=None)) == 0
    assert speed.reread_bytes(opt(HMAdamW)) == 0


def test_sharding_benchmark_runs_and_splits_by_the_shard_plan(tmp_path):
    sharding.main(["--quick", "--optimizers", "AdamS", "SlimAdamW", "--out", str(tmp_path)])
    section = _section((tmp_path / "benchmarks.md").read_text(), "sharding")
    assert "| AdamW (fused) |" in section and "| AdamS |" in section and "| SlimAdamW |" in section


def test_sharded_state_bytes_follows_fsdp2_chunks():
    """Rows of dim 0 in torch.chunk order; state per row split, per-column state replicated."""
    import torch

    from lowmem.optim import SlimAdamW, sharded_state_bytes
    from lowmem.optim.memory import fsdp2_rows

    assert fsdp2_rows(7, 2) == [4, 3] and fsdp2_rows(1, 2) == [1, 0] and fsdp2_rows(10, 8) == [2, 2, 2, 2, 2, 0, 0, 0]
    p = torch.nn.Parameter(torch.zeros(7, 5))
    opt = SlimAdamW([{"params": [p], "compress_dims": (0,)}])  # v: (1, 5), replicated
    p.grad = torch.ones_like(p)
    opt.step()
    ranks = sharded_state_bytes(opt, 2)
    # m: 4 and 3 rows of 5 floats; v: 5 floats on both; step: one float on both.
    assert [r["state"] for r in ranks] == [4 * (4 * 5 + 5 + 1), 4 * (3 * 5 + 5 + 1)]
    assert [r["params"] for r in ranks] == [4 * 20, 4 * 15]
