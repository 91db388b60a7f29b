"""DDP on CPU (gloo, 2 processes): every optimizer strategy trains like one process at the global
batch, Lightning keeps lowmem's sampler, and a resumed DDP run is exact on every rank.

All DDP runs happen in one subprocess (``tests/scripts/ddp_equivalence.py``, rank 1 started by
Lightning's script launcher) to pay the process start-up once; ``timeout -s KILL`` because hung
DDP ranks ignore SIGTERM (Lightning handles it), and ``strategy="ddp"`` inside pytest would leave
a process group behind. Run with ``pytest -m distributed tests/test_ddp.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scripts.lightning_harness import STRATEGIES

SCRIPT = Path(__file__).parent / "scripts" / "ddp_equivalence.py"
KILL_AFTER_S = 180  # ~25 s on an idle 2-core machine


@pytest.fixture(scope="module")
def ddp_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launcher = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        ["timeout", "-s", "KILL", str(KILL_AFTER_S), sys.executable, str(SCRIPT), str(out)],
        capture_output=True, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    errors = "".join(p.read_text() for p in out.glob("error-rank*.txt"))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{errors}\n{proc.stderr[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.distributed
def test_two_ranks_at_batch_b_match_one_process_at_batch_2b(ddp_reports):
    """Per optimizer, max |param difference| after 8 steps with in-fit validation (GroupNorm CNN).
    The control (one process at batch B) shows what a real mismatch looks like."""
    rank0, rank1 = ddp_reports
    equivalence = rank0["equivalence"]
    assert set(equivalence) == set(STRATEGIES)
    assert all(diff < 1e-4 for diff in equivalence.values()), equivalence
    assert rank0["control"] > 100 * max(equivalence.values())
    for report in (rank0, rank1):
        assert all(report["ranks_agree"].values()), report["ranks_agree"]  # params and .grad identical on both ranks


@pytest.mark.distributed
def test_lightning_keeps_the_resumable_sampler_sharded_by_rank(ddp_reports):
    for report in ddp_reports:
        assert report["sampler"] == dict.fromkeys(STRATEGIES, True)


@pytest.mark.distributed
def test_ddp_resume_is_exact_on_every_rank(ddp_reports):
    """Diffusion + HMAdamW: per-rank noise generators and RNG streams are checkpointed per rank.
    Control: restoring rank 0's states on every rank (a rank-0-only checkpoint) gives rank 1 the
    wrong noise, and through the averaged gradients both ranks train differently."""
    rank0, rank1 = ddp_reports
    assert rank0["resume"] == [] and rank1["resume"] == []
    control0, control1 = rank0["resume_with_rank0_rng"], rank1["resume_with_rank0_rng"]
    assert "/diffusion_rng" not in control0 and "/diffusion_rng" in control1
    assert any(d.startswith("/params/") for d in control0) and any(d.startswith("/params/") for d in control1)
