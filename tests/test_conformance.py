"""Conformance suite: the behaviours every optimizer in ``tests/_optim_registry.py`` must have.

Modelled on PyTorch's ``OptimizerInfo`` suite (``test/test_optim.py::TestOptimRenewed``):
hyperparameter errors, closures, param groups, ``None``/zero/0-dim/
zero-numel/non-contiguous/sparse gradients, every LR scheduler, LearningRateMonitor keys,
``state_dict`` round trips (``weights_only``, dtype, older checkpoints), deepcopy, repr, bf16
params and ``state_bytes``. ``torch.optim.AdamW`` runs every check too, as the control.

Every optimizer is driven by the canonical loop ``opt.zero_grad(); loss.backward(); opt.step()``
(HMAdam's ``zero_grad`` is its momentum decay): no check zeroes or sets gradients by hand.
Params are compared bit for bit wherever the two runs do the same floating-point operations.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable

import pytest
import torch
import torch.nn.functional as F
from _optim_registry import SPECS, OptimSpec
from torch import nn
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

from lowmem.optim import state_bytes


def marks(spec: OptimSpec) -> tuple:
    """``slow`` for the specs that declare it (see the registry)."""
    return (pytest.mark.slow,) if spec.slow else ()


def param(spec: OptimSpec):  # noqa: ANN201 - a pytest ParameterSet
    return pytest.param(spec, id=spec.name, marks=marks(spec))


ALL = [param(s) for s in SPECS]
# Checks that hand-build param groups; an optimizer built from the model cannot take them.
GROUPED = [param(s) for s in SPECS if not s.needs_model]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]




# --------------------------------------------------------------------------- models and loop


class Net(nn.Module):
    """Embedding + Linear(13, 19) -> Tanh -> Linear(19, 3), with biases.

    The names are ones the role classifier reads (``emb``: token embedding, ``fc1``/``fc2``: MLP
    up/down), so optimizers that group by role get several kinds of groups.

    Args:
        sparse: the embedding produces sparse gradients.
        unused: add a Linear that is never used in ``forward`` (its grads stay ``None``).
        fc1_layout: ``"contiguous"``, ``"transposed"`` (a dense, transposed-strides view) or
            ``"strided"`` (every other column of a wider buffer: not dense); same values.
    """

    def __init__(self, *, sparse: bool = False, unused: bool = False, fc1_layout: str = "contiguous") -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 13, sparse=sparse)
        self.fc1 = nn.Linear(13, 19)
        self.fc2 = nn.Linear(19, 3)
        if unused:
            self.spare = nn.Linear(13, 5)
        w = self.fc1.weight.detach()
        if fc1_layout == "transposed":
            self.fc1.weight = nn.Parameter(w.t().contiguous().t())
        elif fc1_layout == "strided":
            wide = torch.zeros(w.shape[0], 2 * w.shape[1])
            wide[:, ::2] = w
            self.fc1.weight = nn.Parameter(wide[:, ::2])
        elif fc1_layout != "contiguous":
            raise ValueError(fc1_layout)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x + self.emb(ids))))


class ScaleNet(nn.Module):
    """``Net`` times a learnable scale of shape ``()`` or ``(1,)`` (same maths, same grads)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = Net()
        self.scale = nn.Parameter(torch.full(shape, 0.75))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.net(x, ids) * self.scale.reshape(())


class EmptyNet(nn.Module):
    """``Net`` plus (optionally) zero-numel parameters: a ``(0, 5)`` Linear weight, ``(0,)`` biases.

    The empty parts add exactly 0 to the output but take part in the graph, so they get
    (empty) gradients. ``up_proj`` is named so role-based optimizers treat it as a matrix.
    """

    def __init__(self, with_empty: bool) -> None:
        super().__init__()
        self.net = Net()
        self.with_empty = with_empty
        if with_empty:
            self.up_proj = nn.Linear(5, 0)  # weight (0, 5), bias (0,)
            self.empty = nn.Parameter(torch.zeros(0))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = self.net(x, ids)
        if self.with_empty:
            out = out + self.up_proj(x[:, :5]).sum() + self.empty.sum()
        return out


@pytest.fixture(autouse=True)
def _spec_backends(request: pytest.FixtureRequest):
    """Run each check with the fast-path tiers its spec declares (``OptimSpec.backends``)."""
    from lowmem.optim import _dispatch

    spec = getattr(request.node, "callspec", None) and request.node.callspec.params.get("spec")
    if spec is None or spec.backends is None:
        yield
        return
    with _dispatch.only(*spec.backends):
        yield


def make(model_cls: Callable[..., nn.Module] = Net, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """A model with the same initial weights every call."""
    torch.manual_seed(0)
    return model_cls(**kwargs).to(dtype)


def batches(n: int, seed: int = 1) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 13, generator=g), torch.randint(0, 11, (8,), generator=g), torch.randn(8, 3, generator=g))
        for _ in range(n)
    ]


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, ids, y = batch
    dtype = next(model.parameters()).dtype
    return F.mse_loss(model(x.to(dtype), ids).float(), y)


def zero_loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    return loss_fn(model, batch) * 0.0  # a real backward whose gradients are exactly zero


def train(
    model: nn.Module, opts: Optimizer | list[Optimizer], data: Iterable[Batch], *, loss=loss_fn, scheduler=None
) -> None:
    """The canonical loop; with several optimizers, each one's zero_grad and step (like Lightning)."""
    opts = opts if isinstance(opts, list) else [opts]
    for batch in data:
        for opt in opts:
            opt.zero_grad()
        loss(model, batch).backward()
        for opt in opts:
            opt.step()
        if scheduler is not None:
            scheduler.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_equal(a: nn.Module | dict, b: nn.Module | dict) -> None:
    a = snapshot(a) if isinstance(a, nn.Module) else a
    b = snapshot(b) if isinstance(b, nn.Module) else b
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        same = torch.equal(a[name], b[name])  # (kept out of the assert: pytest would print whole tensors)
        assert same, f"{name} differs: max abs diff {(a[name].float() - b[name].float()).abs().max().item():.3g}"


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    """Same groups, same state keys, every tensor equal in value and dtype."""
    assert len(a["param_groups"]) == len(b["param_groups"])
    for i, (ga, gb) in enumerate(zip(a["param_groups"], b["param_groups"])):
        only_a, only_b = ga.keys() - gb.keys(), gb.keys() - ga.keys()
        assert not only_a and not only_b, f"group {i}: keys only in the first {only_a}, only in the second {only_b}"
        assert ga == gb, f"group {i}: values differ: {[(k, ga[k], gb[k]) for k in ga if ga[k] != gb[k]]}"
    assert a["state"].keys() == b["state"].keys()
    for pid, sa in a["state"].items():
        sb = b["state"][pid]
        assert sa.keys() == sb.keys(), pid
        for key, va in sa.items():
            vb = sb[key]
            if isinstance(va, torch.Tensor):
                assert isinstance(vb, torch.Tensor), (pid, key, vb)
                assert va.dtype == vb.dtype, (pid, key, va.dtype, vb.dtype)
                same = torch.equal(va, vb)
                assert same, f"state[{pid}][{key!r}] differs"
            else:
                assert va == vb, (pid, key)


def all_params(opt: Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def assert_state_dtypes(spec: OptimSpec, opt: Optimizer) -> None:
    """Floating state (except ``step``) has the spec's dtype for its param, on the param's device."""
    checked = 0
    for p in all_params(opt):
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step":
                assert value.dtype == spec.state_dtype(p.dtype), f"state {key!r} is {value.dtype} for a {p.dtype} param"
                assert value.device == p.device, key
                checked += 1
    assert checked > 0, "no floating state was created"


def two_groups(groups: list[dict]) -> list[dict]:
    """The groups (copied), with the first one split in two if there is only one."""
    groups = [dict(g) for g in groups]
    if len(groups) == 1:
        params = list(groups[0]["params"])
        assert len(params) >= 2
        half = len(params) // 2
        groups = [{**groups[0], "params": params[:half]}, {**groups[0], "params": params[half:]}]
    return groups


def group_params(group: dict) -> list[torch.Tensor]:
    return [p[1] if isinstance(p, tuple) else p for p in group["params"]]


@pytest.mark.parametrize("spec", ALL)
def test_registry_entry_agrees_with_the_optimizer_capabilities(spec: OptimSpec) -> None:
    """The registry may only exclude checks for reasons the optimizer itself declares."""
    capabilities = getattr(spec.cls, "capabilities", None)
    assert spec.needs_model == (capabilities is not None and capabilities.needs_model)


# --------------------------------------------------------------------------- hyperparameters

# (kwarg, value, the value the message must name, words one of which must name the argument)
BAD_HPARAMS = [
    ("lr", -1e-3, "-0.001", ("lr", "learning rate")),
    ("betas", (1.0, 0.999), "1.0", ("beta",)),
    ("betas", (-0.1, 0.999), "-0.1", ("beta",)),
    ("betas", (0.9, 1.0), "1.0", ("beta",)),
    ("betas", (0.9, -0.5), "-0.5", ("beta",)),
    ("eps", -1e-8, "-1e-08", ("eps", "epsilon")),
    ("weight_decay", -0.1, "-0.1", ("weight_decay", "weight decay")),
]


def _bad_hparam_cases():
    for spec in SPECS:
        for key, value, shown, names in BAD_HPARAMS:
            yield pytest.param(spec, {key: value}, shown, names, id=f"{spec.name}-{key}={value}", marks=marks(spec))
        for kwargs in spec.invalid_kwargs:  # optimizer-specific ones, declared in the registry
            ((key, value),) = kwargs.items()
            yield pytest.param(spec, {key: value}, repr(value), (key,), id=f"{spec.name}-{key}={value}",
                               marks=marks(spec))  # fmt: skip


@pytest.mark.parametrize(("spec", "kwargs", "shown", "names"), list(_bad_hparam_cases()))
def test_invalid_hyperparameter_raises_value_error_naming_it(spec: OptimSpec, kwargs, shown, names) -> None:
    with pytest.raises(ValueError) as info:
        spec.build(make(), **kwargs)
    msg = str(info.value)
    assert shown in msg, f"message does not show the bad value {shown}: {msg!r}"
    assert not names or any(n in msg.lower() for n in names), f"message does not name {list(kwargs)}: {msg!r}"


@pytest.mark.parametrize("spec", ALL)
def test_boundary_hyperparameters_are_accepted(spec: OptimSpec) -> None:
    opt = spec.build(make(), lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0)
    group = opt.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["eps"]) == (0.0, (0.0, 0.0), 0.0)


# --------------------------------------------------------------------------- step and closure


@pytest.mark.parametrize("spec", ALL)
def test_closure_is_called_once_with_grad_enabled_and_its_loss_returned(spec: OptimSpec) -> None:
    data = batches(3)
    model, ref = make(), make()
    opt, ref_opt = spec.build(model), spec.build(ref)
    for batch in data:
        calls, losses = [], []

        def closure():
            calls.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            losses.append(loss)
            return loss

        returned = opt.step(closure)
        assert calls == [True], "closure must be called exactly once, under torch.enable_grad()"
        assert returned is losses[0]
    train(ref, ref_opt, data)
    assert_params_equal(model, ref)  # step(closure) == the canonical loop

    ref_opt.zero_grad()
    loss_fn(ref, data[0]).backward()
    assert ref_opt.step() is None


# --------------------------------------------------------------------------- param groups


@pytest.mark.parametrize("spec", GROUPED)
def test_param_groups_with_per_group_overrides(spec: OptimSpec) -> None:
    model = make()
    groups = two_groups(spec.groups(model))
    groups[0]["lr"] = 0.0  # torch's test_param_groups_lr: this group must not move
    groups[-1]["lr"] = 3e-3
    opt = spec.build_from_groups(groups, lr=1e-3)
    for i, group in enumerate(opt.param_groups):
        assert set(opt.defaults) <= set(group), f"group {i} lacks default keys {set(opt.defaults) - set(group)}"
        assert group["lr"] == (0.0 if i == 0 else 3e-3 if i == len(groups) - 1 else 1e-3)
    frozen = {id(p) for p in group_params(groups[0])}
    before = snapshot(model)
    train(model, opt, batches(3))
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        lr = 0 if id(p) in frozen else "> 0"
        assert moved == (id(p) not in frozen), f"{name}: moved={moved} but its group has lr {lr}"


@pytest.mark.parametrize("spec", GROUPED)
def test_one_optimizer_with_groups_equals_one_optimizer_per_group(spec: OptimSpec) -> None:
    def overridden(model):
        groups = two_groups(spec.groups(model))
        groups[0].update(lr=2e-3, weight_decay=0.0)
        groups[-1].update(lr=5e-4)
        return groups

    data = batches(4)
    joint, split = make(), make()
    opt = spec.build_from_groups(overridden(joint))
    opts = [spec.build_from_groups([g]) for g in overridden(split)]
    train(joint, opt, data)
    train(split, opts, data)
    assert_params_equal(joint, split)


@pytest.mark.parametrize("spec", GROUPED)
def test_add_param_group_mid_training_like_backbone_finetuning(spec: OptimSpec) -> None:
    """Lightning's BackboneFinetuning: train the head, then unfreeze the rest and add_param_group."""
    data = batches(5)

    def setup(model):
        groups = two_groups(spec.groups(model))
        late = [{**g, "lr": 5e-3} for g in groups[1:]]
        for g in late:
            for p in group_params(g):
                p.requires_grad_(False)
        return groups[:1], late

    model, ref = make(), make()
    head, late = setup(model)
    opt = spec.build_from_groups(head)
    ref_head, ref_late = setup(ref)
    ref_opts = [spec.build_from_groups(ref_head)]
    train(model, opt, data[:2])
    train(ref, ref_opts, data[:2])
    for g in late:
        for p in group_params(g):
            p.requires_grad_(True)
        opt.add_param_group(g)
    for g in ref_late:
        for p in group_params(g):
            p.requires_grad_(True)
    ref_opts.append(spec.build_from_groups(ref_late))
    for group in opt.param_groups[1:]:
        assert group["lr"] == 5e-3
        assert set(opt.defaults) <= set(group), f"added group lacks {set(opt.defaults) - set(group)}"
    train(model, opt, data[2:])
    train(ref, ref_opts, data[2:])
    assert_params_equal(model, ref)


# --------------------------------------------------------------------------- unusual gradients and params


@pytest.mark.parametrize("spec", ALL)
def test_params_without_grad_are_skipped(spec: OptimSpec) -> None:
    model = make(unused=True)
    opt = spec.build(model)
    before = snapshot(model)
    train(model, opt, batches(3))
    for name, p in model.named_parameters():
        if name.startswith("spare."):
            assert p.grad is None
            still = torch.equal(p, before[name])
            assert still, f"{name} has no grad but moved"
            assert len(opt.state.get(p, {})) == 0, f"{name} has no grad but got state {list(opt.state[p])}"
        else:
            still = torch.equal(p, before[name])
            assert not still, f"{name} did not move"


@pytest.mark.parametrize("spec", ALL)
def test_step_with_no_grads_at_all_is_a_noop(spec: OptimSpec) -> None:
    model = make()
    opt = spec.build(model)
    before = snapshot(model)
    opt.zero_grad()
    opt.step()
    opt.step()
    assert_params_equal(model, before)
    assert all(len(s) == 0 for s in opt.state.values()), "state was created for params without grads"


@pytest.mark.parametrize("spec", ALL)
def test_zero_grads_do_not_move_params_without_weight_decay(spec: OptimSpec) -> None:
    model = make()
    opt = spec.build(model, weight_decay=0.0)
    before = snapshot(model)
    train(model, opt, batches(3), loss=zero_loss_fn)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters()), "grads must exist and be zero"
    assert_params_equal(model, before)


@pytest.mark.parametrize("spec", ALL)
def test_zero_dim_param_trains_like_a_one_element_param(spec: OptimSpec) -> None:
    data = batches(4)
    scalar, vector = make(ScaleNet, shape=()), make(ScaleNet, shape=(1,))
    opt, ref_opt = spec.build(scalar), spec.build(vector)
    train(scalar, opt, data)
    train(vector, ref_opt, data)
    assert scalar.scale.shape == ()
    assert scalar.scale.item() != 0.75, "the 0-dim param did not move"
    assert len(opt.state[scalar.scale]) > 0
    got = snapshot(scalar)
    got["scale"] = got["scale"].reshape(1)
    assert_params_equal(got, vector)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("spec", ALL)
def test_zero_numel_params_are_harmless(spec: OptimSpec, tmp_path) -> None:
    data = batches(5)
    model, ref = make(EmptyNet, with_empty=True), make(EmptyNet, with_empty=False)
    opt, ref_opt = spec.build(model), spec.build(ref)
    assert model.up_proj.weight.shape == (0, 5) and model.empty.shape == (0,)
    train(model, opt, data[:3])
    train(ref, ref_opt, data[:3])
    assert all(p.grad is not None for p in model.parameters())
    assert model.up_proj.weight.shape == (0, 5) and model.empty.shape == (0,)
    assert_params_equal({k: v for k, v in snapshot(model).items() if k.startswith("net.")}, ref)
    # The state of empty params (FSDP1 gives (0,)-shaped shards) survives a checkpoint.
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed = make(EmptyNet, with_empty=True)  # a fresh model: a deepcopy would copy optimizer hooks too
    resumed.load_state_dict(model.state_dict())
    resumed_opt = spec.build(resumed)
    resumed_opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    train(model, opt, data[3:])
    train(resumed, resumed_opt, data[3:])
    assert_params_equal(model, resumed)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("spec", ALL)
def test_non_contiguous_params_match_contiguous_ones(spec: OptimSpec, layout: str) -> None:
    data = batches(4)
    model, ref = make(fc1_layout=layout), make()
    same_values = torch.equal(model.fc1.weight, ref.fc1.weight)
    assert not model.fc1.weight.is_contiguous() and same_values
    opt, ref_opt = spec.build(model), spec.build(ref)
    train(model, opt, data[:1])
    if layout == "transposed":  # autograd gives a dense param a grad with its strides
        assert not model.fc1.weight.grad.is_contiguous()
    train(model, opt, data[1:])
    train(ref, ref_opt, data)
    assert model.fc1.weight.stride() == make(fc1_layout=layout).fc1.weight.stride(), "the param was replaced"
    # Bit for bit, also for optimizers that reduce over dims: on one thread (see tests/conftest.py) the
    # sums do not depend on the strides here; with several threads they may differ in the last bit.
    # A fast path whose native kernel takes only the contiguous layout: float32 tolerance.
    if spec.layout_exact:
        assert_params_equal(model, ref)
    else:
        for (name, a), b in zip(snapshot(model).items(), snapshot(ref).values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("spec", ALL)
def test_sparse_grads_are_rejected(spec: OptimSpec) -> None:
    model = make(sparse=True)
    opt = spec.build(model)
    opt.zero_grad()
    loss_fn(model, batches(1)[0]).backward()
    assert model.emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="(?i)sparse"):
        opt.step()


# --------------------------------------------------------------------------- LR schedulers and Lightning keys

SCHEDULERS: dict[str, Callable[[Optimizer], object]] = {
    "StepLR": lambda o: lrs.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[1, 3], gamma=0.3),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=5, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.25, total_iters=4),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.5, total_iters=3),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.05, total_steps=8, cycle_momentum=True),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=2, cycle_momentum=False),
    "CyclicLR-momentum": lambda o: lrs.CyclicLR(
        o, base_lr=1e-3, max_lr=1e-2, step_size_up=2, cycle_momentum=True, base_momentum=0.8, max_momentum=0.9
    ),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=5, power=2.0),
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda s: 0.9),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.5, total_iters=2), lrs.ExponentialLR(o, gamma=0.9)], milestones=[2]
    ),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, factor=0.5, total_iters=2), lrs.ExponentialLR(o, gamma=0.9)], optimizer=o
    ),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=0),
}


def _scheduled_trace(model: nn.Module, opt: Optimizer, make_scheduler, data) -> list[list[tuple[float, float]]]:
    """Train under the scheduler; per step, every group's (lr, beta1) as the optimizer sees them."""
    scheduler = make_scheduler(opt)
    trace = []
    for batch in data:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        if isinstance(scheduler, lrs.ReduceLROnPlateau):
            scheduler.step(1.0)  # a plateau: the lr must drop
        else:
            scheduler.step()
        for g in opt.param_groups:
            assert isinstance(g["lr"], float), f"group lr became {type(g['lr']).__name__}"
        trace.append([(g["lr"], float(g["betas"][0])) for g in opt.param_groups])
    return trace


@functools.cache
def _adamw_trace(name: str, betas: tuple[float, float]) -> list[list[tuple[float, float]]]:
    ref = make()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=betas, fused=False)
    return _scheduled_trace(ref, opt, SCHEDULERS[name], batches(6))


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("spec", ALL)
def test_lr_scheduler_drives_the_groups_like_for_adamw(spec: OptimSpec, name: str) -> None:
    model = make()
    opt = spec.build(model, lr=1e-2)
    trace = _scheduled_trace(model, opt, SCHEDULERS[name], batches(6))
    ref_trace = _adamw_trace(name, tuple(opt.defaults["betas"]))
    assert len({lr for step in ref_trace for lr, _ in step}) > 1, "the schedule must change the lr within the test"
    for step, ref_step in zip(trace, ref_trace):
        assert all(value == ref_step[0] for value in step), f"{name}: groups {step} vs AdamW {ref_step[0]}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("spec", ALL)
def test_scheduled_lr_is_the_lr_the_update_uses(spec: OptimSpec) -> None:
    """After LambdaLR sets the lr to 0 every param must stand still (weight decay is lr-scaled too)."""
    model = make()
    opt = spec.build(model, lr=1e-2)
    scheduler = lrs.LambdaLR(opt, lambda s: 1.0 if s < 2 else 0.0)
    data = batches(5)
    before = snapshot(model)
    train(model, opt, data[:2], scheduler=scheduler)
    moved = snapshot(model)
    still = [n for n in before if torch.equal(moved[n], before[n])]
    assert not still, f"params must move while lr > 0: {still}"
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    train(model, opt, data[2:], scheduler=scheduler)
    assert_params_equal(model, moved)


@pytest.mark.parametrize("spec", ALL)
def test_groups_have_the_keys_lightning_learning_rate_monitor_reads(spec: OptimSpec) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor

    opt = spec.build(make(), lr=2e-3, weight_decay=0.05)
    assert "betas" in opt.defaults  # LearningRateMonitor then logs betas[0] as the momentum
    for group in opt.param_groups:
        assert isinstance(group["lr"], float)
        assert isinstance(group["betas"], (tuple, list)) and len(group["betas"]) == 2
        assert all(isinstance(b, float) for b in group["betas"])
        assert isinstance(group["weight_decay"], float)
    monitor = LearningRateMonitor(log_momentum=True, log_weight_decay=True)
    names = [f"lr-{spec.name}/pg{i}" for i in range(len(opt.param_groups))]
    monitor.lrs = {n: [] for n in names}
    stats = monitor._get_optimizer_stats(opt, names)  # what the callback logs every interval
    for name, group in zip(names, opt.param_groups):
        assert stats[name] == group["lr"] == 2e-3
        assert stats[f"{name}-momentum"] == group["betas"][0]
        assert stats[f"{name}-weight_decay"] == group["weight_decay"]
        assert all(math.isfinite(float(torch.tensor(stats[k]))) for k in stats)


# --------------------------------------------------------------------------- state_dict, deepcopy, repr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", ALL)
def test_state_dict_round_trip_continues_bit_for_bit(spec: OptimSpec, dtype: torch.dtype, tmp_path) -> None:
    data = batches(8)
    model = make(dtype=dtype)
    opt = spec.build(model)
    train(model, opt, data[:4])
    saved = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    torch.save(saved, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)

    resumed = make(dtype=dtype)
    resumed.load_state_dict(model.state_dict())
    resumed_opt = spec.build(resumed)
    resumed_opt.load_state_dict(loaded)
    assert_state_dtypes(spec, resumed_opt)
    after_load = copy.deepcopy(resumed_opt.state_dict())

    torch.manual_seed(7)  # optimizers that draw random numbers see the same stream in both runs
    train(model, opt, data[4:])
    torch.manual_seed(7)
    train(resumed, resumed_opt, data[4:])
    assert_params_equal(resumed, model)
    assert_state_dicts_equal(resumed_opt.state_dict(), opt.state_dict())
    assert_state_dicts_equal(after_load, saved)  # the load reproduced the saved state exactly


@pytest.mark.parametrize("spec", ALL)
def test_state_dict_without_later_added_keys_still_loads(spec: OptimSpec) -> None:
    """An older checkpoint lacks group keys added since (at their default): load and continue identically."""
    data = batches(6)
    model = make()
    opt = spec.build(model)
    train(model, opt, data[:3])
    old = copy.deepcopy(opt.state_dict())
    removed = set()
    for group in old["param_groups"]:
        for key, default in opt.defaults.items():
            if key not in ("lr", "betas", "eps", "weight_decay") and key in group and group[key] == default:
                del group[key]
                removed.add(key)
    resumed = make()
    resumed.load_state_dict(model.state_dict())
    resumed_opt = spec.build(resumed)
    resumed_opt.load_state_dict(old)
    for group in resumed_opt.param_groups:
        assert set(opt.defaults) <= set(group), f"keys not restored after load: {set(opt.defaults) - set(group)}"
    torch.manual_seed(7)
    train(model, opt, data[3:])
    torch.manual_seed(7)
    train(resumed, resumed_opt, data[3:])
    assert_params_equal(resumed, model)
    assert removed or set(opt.defaults) <= {"lr", "betas", "eps", "weight_decay"}


@pytest.mark.parametrize("spec", ALL)
def test_deepcopy_is_independent_and_faithful(spec: OptimSpec) -> None:
    """``deepcopy((model, opt))`` trains exactly like the original and leaves it alone.

    Optimizers declared ``deepcopy_can_step=False`` (statistics from hooks on one model): a
    ``deepcopy(opt)`` must hold the same state, load a state dict, and leave the original alone.
    """
    data = batches(6)
    model, ref = make(), make()
    opt, ref_opt = spec.build(model), spec.build(ref)
    train(model, opt, data[:2])
    train(ref, ref_opt, data[:2])
    params_before, state_before = snapshot(model), copy.deepcopy(opt.state_dict())
    if spec.deepcopy_can_step:
        model_copy, opt_copy = copy.deepcopy((model, opt))
        assert {id(p) for p in all_params(opt_copy)} == {id(p) for p in model_copy.parameters()}
        copied = copy.deepcopy(opt_copy.state_dict())
        train(model_copy, opt_copy, data[2:])
    else:
        opt_copy = copy.deepcopy(opt)
        copied = copy.deepcopy(opt_copy.state_dict())
        opt_copy.step()  # its params are copies without grads: nothing to do, nothing shared
        opt_copy.load_state_dict(state_before)
    assert_params_equal(model, params_before)  # the copy's steps left the original alone
    assert_state_dicts_equal(opt.state_dict(), state_before)
    train(model, opt, data[2:])
    train(ref, ref_opt, data[2:])
    assert_params_equal(model, ref)
    if spec.deepcopy_can_step:
        assert_params_equal(model_copy, ref)  # the copy continued exactly like the original
    assert_state_dicts_equal(copied, state_before)  # the copy held the same state


@pytest.mark.parametrize("spec", ALL)
def test_repr_shows_class_and_hyperparameters(spec: OptimSpec) -> None:
    opt = spec.build(make(), lr=0.00123, betas=(0.875, 0.96875), eps=3e-7, weight_decay=0.0625)
    text = repr(opt)
    assert type(opt).__name__ in text
    for shown in ("lr", "0.00123", "betas", "0.875", "0.96875", "eps", "3e-07", "weight_decay", "0.0625"):
        assert shown in text, f"{shown!r} not in repr:\n{text}"


# --------------------------------------------------------------------------- precision and memory


@pytest.mark.parametrize("spec", ALL)
def test_bf16_params_train_with_the_declared_state_dtype(spec: OptimSpec) -> None:
    model = make(dtype=torch.bfloat16)
    opt = spec.build(model)
    before = snapshot(model)
    train(model, opt, batches(4))
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
        assert torch.isfinite(p).all(), name
        still = torch.equal(p, before[name])
        assert not still, f"{name} did not move"
    assert_state_dtypes(spec, opt)


@pytest.mark.parametrize("spec", ALL)
def test_state_bytes_counts_params_grads_and_state(spec: OptimSpec) -> None:
    model = make()
    opt = spec.build(model)
    empty = state_bytes(opt)
    assert empty["state"] == 0
    train(model, opt, batches(1))
    out = state_bytes(opt)
    params = list(model.parameters())
    assert out["params"] == sum(p.numel() * p.element_size() for p in params)
    assert out["grads"] == sum(p.grad.numel() * p.grad.element_size() for p in params) > 0
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert out["state"] == sum(t.numel() * t.element_size() for t in tensors) > 0
    folds = getattr(getattr(opt, "capabilities", None), "folds_momentum_into_grad", False)
    assert out["grad_buffers"] == (out["params"] if folds else 0)
    assert out["persistent"] == out["state"] + out["grad_buffers"]


FUSED = [param(s) for s in SPECS if s.kwargs.get("fused") is True and s.backends is None]
FOREACH = [param(s) for s in SPECS if s.backends == ()]


@pytest.mark.parametrize("spec", FUSED)
def test_fused_specs_run_the_native_kernels(spec: OptimSpec, native_kernels) -> None:
    """The ``-fused`` specs above exercise the hand-written kernels (float32 contiguous params),
    not a silent fallback: every check of this suite then covers the native backend too."""
    model = make()
    train(model, spec.build(model), batches(2))
    assert sum(native_kernels.values()) >= 2, dict(native_kernels)


@pytest.mark.parametrize("spec", FOREACH)
def test_foreach_specs_run_the_foreach_tier(spec: OptimSpec, monkeypatch) -> None:
    """The ``-foreach`` specs exercise the foreach kernels, not the native or compiled ones nor
    a silent fall-through to the for-loop."""
    from lowmem.optim import _fast

    calls, real = [], _fast.run_foreach
    monkeypatch.setattr(_fast, "run_foreach", lambda *a, **kw: (calls.append(1), real(*a, **kw)))
    model = make()
    train(model, spec.build(model), batches(2))
    assert len(calls) >= 2


COMPILED = [param(s) for s in SPECS if s.backends == ("compiled",)]


@pytest.mark.parametrize("spec", COMPILED)
def test_compiled_specs_run_the_compiled_kernels(spec: OptimSpec, monkeypatch) -> None:
    """The ``-compiled`` specs exercise ``torch.compile``'d kernels: a compile failure (which would
    fall back to the foreach tier with a warning) fails here."""
    import warnings

    from lowmem.optim._fast import FusedForeach

    calls, real = [], FusedForeach._run_compiled
    monkeypatch.setattr(FusedForeach, "_run_compiled", lambda self, *a: (calls.append(1), real(self, *a))[1])
    model = make()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lowmem fast path", category=RuntimeWarning)
        train(model, spec.build(model), batches(2))
    assert len(calls) >= 2
