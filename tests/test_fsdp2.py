"""SlimAdamW, Adam-mini, AdaPM, IO-Adam and Adafactor on FSDP2 shards (2 processes, gloo): statistics that span dim 0 are global.

``fully_shard`` splits dim 0 of every parameter over the ranks: unevenly where the size does not
divide (7 rows: 4 + 3), with one rank holding nothing for a parameter of one row (smaller than the
world size), and through the middle of an attention head (6 rows of heads of 2: rank 0 holds rows
0-2, so head 1 straddles the boundary). Each case trains 20 steps on 2 ranks at half the batch and
must end where one process at the whole batch ends; the bytes each step sends are counted
(``comm_bytes_per_step``). The control switches the collectives off: the result is then wrong.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lowmem import optim

WORLD, STEPS, BATCH = 2, 20, 8


class Mlp(nn.Module):
    """Linear(7, 5) (uneven rows), Linear(5, 3), Linear(3, 1) (one row: smaller than the world)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TiedMlp(nn.Module):
    """An Embedding(5, 7) (uneven rows: 3 + 2) tied to the head Linear(7, 5), and a Linear(7, 7):
    IO-Adam's head and embedding statistics of the tied weight, R and Re sharded by rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.fc, self.head = nn.Embedding(5, 7), nn.Linear(7, 7), nn.Linear(7, 5, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.bucketize(x[:, 0].contiguous(), torch.tensor([-1.0, -0.3, 0.3, 1.0]))
        return self.head(torch.tanh(self.fc(x + self.wte(ids)))).tanh().sum(1, keepdim=True)


class Conv1D(nn.Module):
    """Hugging Face's Conv1D written out (GPT-2's layer): ``X W + b`` with ``W`` stored (n_in, n_out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class Conv1DMlp(nn.Module):
    """Conv1D weights (7, 5) (uneven rows: dim 0 is n_in, so C is the sharded statistic), (5, 1)
    and (1, 1) (one row: smaller than the world)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(Conv1D(5, 7), nn.Tanh(), Conv1D(1, 5), nn.Tanh(), Conv1D(1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RandomParams(nn.Module):
    """Parameters of ``SHAPES`` (name -> shape), seeded, scaled to 0.5."""

    SHAPES: dict[str, tuple[int, ...]] = {}

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        for name, shape in self.SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape) * 0.5))


class Blocks(RandomParams):
    """One parameter per Adam-mini block kind, each used in the output."""

    SHAPES = {"head": (6, 7), "qkv": (12, 7), "conv1d": (7, 5), "rows": (7, 7), "tiny": (1, 7), "norm": (7,),
              "bias": (3,)}  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.norm
        parts = [h @ self.head.T, h @ self.qkv.T, h @ self.conv1d, h @ self.rows.T, h @ self.tiny.T]
        return torch.cat([p.tanh() for p in parts], dim=1).sum(dim=1, keepdim=True) + self.bias.sum()


class Kernels(nn.Module):
    """Adafactor's three cases: a factored 3-D kernel (dim 0 a leading dim: local statistics), a
    factored 2-D weight of 7 rows (uneven shards: column statistics span them) and 1-D vectors,
    one of 1 element (smaller than the world)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kernel = nn.Parameter(torch.randn(3, 7, 2) * 0.5)
        self.weight = nn.Parameter(torch.randn(7, 6) * 0.5)
        self.scale = nn.Parameter(torch.randn(6) * 0.5)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bi,oik->bo", x, self.kernel).tanh()
        return ((x @ self.weight).tanh() * self.scale).sum(1, keepdim=True) + h.sum(1, keepdim=True) + self.bias


class Momenta(RandomParams):
    """One parameter per AdaPM momentum kind and layout: low-rank with 7 rows (uneven shards), low-rank
    with fan-out dim 1, fused q/k/v cut along dim 0 (the sharded dim: k straddles the ranks) and
    along dim 1, a low-rank row smaller than the world, no momentum, full momentum, a vector."""

    SHAPES = {"low": (7, 6), "low_t": (7, 5), "qkv": (12, 7), "qkv_t": (7, 12), "tiny": (1, 7), "none": (5, 7),
              "full": (5, 7), "norm": (7,)}  # fmt: skip
    FAN_OUT_1 = ("low_t", "qkv_t")  # used as x @ W: dim 1 is the fan-out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.norm
        outs = [h @ self.low_t, h @ self.qkv_t] + [h[:, : w.shape[1]] @ w.T for n, w in self.named_parameters()
                                                   if w.ndim == 2 and n not in self.FAN_OUT_1]  # fmt: skip
        return torch.cat([o.tanh() for o in outs], dim=1).sum(dim=1, keepdim=True)


def adapm_groups(mini: bool):
    momentum = {"low": "lowrank", "low_t": "lowrank", "qkv": "qkv", "qkv_t": "qkv", "tiny": "lowrank", "none": "none",
                "full": "full", "norm": "adamw"}  # fmt: skip
    blocks = {"qkv": dict(block="qkv", head_dim=2), "qkv_t": dict(block="qkv", head_dim=2), "norm": dict(block="tensor")}

    def groups(model: Momenta) -> list[dict]:
        return [{"params": [p], "momentum": momentum[name], "fan_out_dim": int(name in Momenta.FAN_OUT_1),
                 **(blocks.get(name, {"block": "row"}) if mini else {})} for name, p in model.named_parameters()]  # fmt: skip

    return groups


def _adapm(mini: bool):
    return lambda m: optim.AdaPM(adapm_groups(mini)(m), lr=1e-2, rank_fraction=0.3, refresh_every=4,
                                 second_moment="mini" if mini else "full")  # fmt: skip


# AdaPM's last step (20) is an ALS sweep: per sharded low-rank block (n x m, rank r) it gathers
# M orth(R^T) (n x r) and all-reduces L^T M (r x m), fp32. low: r 2; low_t: r 2; qkv_t: q and k
# parts of 7 x 4, r 2 each; tiny: r 1. qkv (cut along the sharded dim 0): its 12 x 7 gradient.
ADAPM_BYTES = 4 * ((7 * 2 + 2 * 6) + (7 * 2 + 2 * 5) + 2 * (7 * 2 + 2 * 4) + (1 + 7) + 12 * 7)
# AdaPM-mini adds Adam-mini's block statistics: low_t's 5 column sums, 12 + 12 q/k/v rows, the norm's mean.
ADAPM_MINI_BYTES = ADAPM_BYTES + 4 * (5 + 12 + 12 + 1)


def slim_groups(dim: int):
    return lambda model: [{"params": [p], "compress_dims": (dim if p.ndim == 2 else None)} for p in model.parameters()]


def mini_groups(model: Blocks) -> list[dict]:
    keys = {"head": dict(block="head", head_dim=2), "qkv": dict(block="qkv", head_dim=2, qkv_heads=(1, 1)),
            "conv1d": dict(block="row", fan_out_dim=1), "rows": dict(block="row"), "tiny": dict(block="row"),
            "norm": dict(block="tensor"), "bias": dict(block="element")}  # fmt: skip
    return [{"params": [p], **keys[name]} for name, p in model.named_parameters()]


CASES = {  # name -> (model, optimizer, bytes one step sends)
    "slim-fan-out-dim0": (Mlp, lambda m: optim.SlimAdamW(slim_groups(0)(m), lr=1e-2, fused=False), 4 * (7 + 5 + 3)),
    "slim-fan-in-dim1": (Mlp, lambda m: optim.SlimAdamW(slim_groups(1)(m), lr=1e-2, fused=False), 0),
    # head: 6 all-gathered row means; qkv: 12; conv1d (fan-out dim 1): 5 all-reduced sums; norm: 1.
    "mini-every-block": (Blocks, lambda m: optim.AdamMini(mini_groups(m), lr=1e-2, fused=False), 4 * (6 + 12 + 5 + 1)),
    # float64 sums: [sum W^2] x 4, [sum row_var, 6 column sums] for the 2-D weight; then [sum u^2] x 4.
    # IO-Adam owns the 3 Linear weights: per step the (n_out + n_in) averaged statistics of each.
    "ioadam": (Mlp, lambda m: optim.IOAdam(m, lr=1e-2, buffer_size=3), 4 * ((5 + 7) + (3 + 5) + (1 + 3))),
    "ioadam-conv1d": (Conv1DMlp, lambda m: optim.IOAdam(m, lr=1e-2, buffer_size=3), 4 * ((5 + 7) + (1 + 5) + (1 + 1))),
    # the tied weight's head and embedding uses (5 + 7 each), fc's (7 + 7)
    "ioadam-tied": (TiedMlp, lambda m: optim.IOAdam(m, lr=1e-2, buffer_size=3), 4 * (2 * (5 + 7) + (7 + 7))),
    "adapm": (Momenta, _adapm(mini=False), ADAPM_BYTES),
    "adapm-mini": (Momenta, _adapm(mini=True), ADAPM_MINI_BYTES),
    "adapm-float64": (Momenta, _adapm(mini=False), 2 * ADAPM_BYTES),  # the factors follow the param dtype
    "adafactor": (Kernels, lambda m: optim.Adafactor(m.parameters(), lr=1e-2, weight_decay=0.1), 8 * (4 + 7 + 4)),
}


# AdaPM's residual correction divides M - L R by 1 - b1 = 0.1, so float32 rounding in the sharded
# QR and products (summed in another order) grows to ~7e-6 in 20 steps; in float64 the sharded run
# ends within 1e-15 of one process (measured), which is the exactness check.
TOLERANCE = {"adapm": 2e-5, "adapm-mini": 2e-5, "adapm-float64": 1e-12}
DTYPE = {"adapm-float64": torch.float64}


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int = 0, world: int = 1) -> None:
    gen = torch.Generator().manual_seed(1)
    n = BATCH // world
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, 7, generator=gen), torch.randn(BATCH, 1, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n]).backward()
        opt.step()


def _worker(rank: int, tmp: str, case: str, without_collectives: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        if without_collectives:  # the control: the optimizers see their own rows only
            _local_statistics_only()
        make_model, make_opt, _ = CASES[case]
        torch.set_default_dtype(DTYPE.get(case, torch.float32))
        model = make_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        opt = make_opt(model)
        _train(model, opt, rank, WORLD)
        full = {name: p.full_tensor().detach() for name, p in model.named_parameters()}
        torch.save(optim.state_bytes(opt)["state"], f"{tmp}/state_bytes_{rank}.pt")
        if rank == 0:
            torch.save({"params": full, "comm_bytes": opt.comm_bytes_per_step}, f"{tmp}/result.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _local_statistics_only() -> None:
    """Switch off the optimizers' collectives (FSDP2's own reduce-scatter and all-gather stay)."""
    from lowmem.optim import _sharded_blocks, _sharding, adapm

    def own_rows(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        start, count = _sharding.local_rows(p)
        full = torch.zeros((p.shape[0], *local.shape[1:]), dtype=local.dtype)
        full[start : start + count] = local
        return full

    dist.all_reduce = lambda tensor, **kw: None
    _sharded_blocks.gather_rows = adapm.gather_rows = own_rows


def _run_sharded(tmp_path, case: str, without_collectives: bool = False) -> dict:
    from scripts.spawn import run_workers

    run_workers(_worker, (str(tmp_path), case, without_collectives), nprocs=WORLD, timeout_s=120)
    return torch.load(tmp_path / "result.pt", weights_only=True)


def _one_process(case: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    make_model, make_opt, _ = CASES[case]
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE.get(case, torch.float32))
    try:
        model = make_model()
        opt = make_opt(model)
        _train(model, opt)
    finally:
        torch.set_default_dtype(default)
    return model, opt


def _max_diff_to_one_process(case: str, sharded: dict[str, torch.Tensor]) -> float:
    model, _ = _one_process(case)
    return max(float((sharded[name] - p.detach()).abs().max()) for name, p in model.named_parameters())


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_optimizer_matches_one_process(case, tmp_path):
    result = _run_sharded(tmp_path, case)
    assert _max_diff_to_one_process(case, result["params"]) < TOLERANCE.get(case, 1e-6)
    assert result["comm_bytes"] == CASES[case][2]


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["slim-fan-out-dim0", "mini-every-block", "adapm", "adapm-mini", "ioadam", "ioadam-conv1d",
                                  "ioadam-tied", "adafactor"])  # fmt: skip
def test_the_shard_plan_predicts_the_state_each_rank_holds(case, tmp_path):
    """``sharded_state_bytes`` (what ``lowmem memory --ranks`` and the sharding benchmark report)
    from the one-process optimizer equals the state bytes each FSDP2 rank really holds."""
    _run_sharded(tmp_path, case)
    held = [torch.load(tmp_path / f"state_bytes_{rank}.pt") for rank in range(WORLD)]
    _, opt = _one_process(case)
    assert [rank["state"] for rank in optim.sharded_state_bytes(opt, WORLD)] == held


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["slim-fan-out-dim0", "mini-every-block", "adafactor", "ioadam", "ioadam-conv1d",
                                  "ioadam-tied", "adapm"])  # fmt: skip
def test_negative_control_without_the_collectives_the_result_is_wrong(case, tmp_path):
    result = _run_sharded(tmp_path, case, without_collectives=True)
    assert _max_diff_to_one_process(case, result["params"]) > 1e-3
