"""The ``torch.optim.Optimizer`` contract where lowmem's optimizers broke it (one section each).

1. a loaded state dict whose per-parameter ``step`` is a Python number (older checkpoints);
2. ``state_dict``/``load_state_dict`` hooks: what a pre-hook returns is loaded, post-hooks see
   the final dict (``state_dict``) and the fully loaded optimizer (``load_state_dict``);
3. HMAdam's ``state_dict()`` holds the momentum buffers themselves, not copies;
4. zero-size parameters on every path (for-loop, fast path, ``fused=None`` on a large model);
5. a model with a live IOAdam pickles and deep-copies;
6. NaN/inf hyperparameters are refused with a message naming the argument, value and range.

Every optimizer is driven by the canonical loop ``zero_grad(); backward(); step()`` (HMAdam's
``zero_grad`` is its momentum decay). Params are compared bit for bit.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from lowmem.optim import AdamMini, AdamS, AdaPM, HMAdam, HMAdamW, IOAdam, SlimAdamW
from lowmem.optim._dispatch import FAST_PATH_MIN_NUMEL

# (optimizer class, constructor kwargs): every lowmem class, with each fast path it has. fused=True
# on these small float32 CPU tensors runs the native kernels (lowmem.optim._native), no compile.
SPECS = [
    (HMAdam, {"fused": False}),
    (HMAdam, {"fused": True}),
    (HMAdamW, {"fused": False}),
    (HMAdamW, {"fused": True}),
    (AdamS, {"fused": False}),
    (AdamS, {"fused": True}),
    (SlimAdamW, {"fused": False}),
    (SlimAdamW, {"fused": True}),
    (AdamMini, {"fused": False}),
    (AdamMini, {"fused": True}),
    (AdaPM, {}),
    (IOAdam, {"buffer_size": 2, "fused": False}),
    (IOAdam, {"buffer_size": 2, "fused": True}),
]
CLASSES = [HMAdam, HMAdamW, AdamS, SlimAdamW, AdamMini, AdaPM, IOAdam]


def _spec_id(spec: tuple[type, dict]) -> str:
    cls, kwargs = spec
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in kwargs.items() if k == "fused")


ALL = [pytest.param(s, id=_spec_id(s)) for s in SPECS]
# bf16 tensors on a fast path go to torch.compile'd kernels (no native ones): seconds per compile
NO_COMPILE = [pytest.param(s, id=_spec_id(s)) for s in SPECS if s[0] is IOAdam or not s[1].get("fused")]
HMADAMS = [pytest.param(s, id=_spec_id(s)) for s in SPECS if s[0] in (HMAdam, HMAdamW)]

Batch = tuple[torch.Tensor, torch.Tensor]


def make(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Linear(6, 8) -> Tanh -> Linear(8, 2), the same initial weights every call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def build(spec: tuple[type, dict], model: nn.Module, **hparams: Any) -> Optimizer:
    cls, kwargs = spec
    target = model if cls is IOAdam else list(model.parameters())
    return cls(target, **{**kwargs, **hparams})


def batches(n: int, seed: int = 1) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 2, generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    dtype = next(model.parameters()).dtype
    return F.mse_loss(model(x.to(dtype)).float(), y)


def train(model: nn.Module, opt: Optimizer, data: Iterable[Batch]) -> None:
    for batch in data:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()


def assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        same = torch.equal(pa, pb)  # kept out of the assert: pytest would print whole tensors
        assert same, f"{name} differs: max abs diff {(pa.float() - pb.float()).abs().max().item():.3g}"


def all_params(opt: Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def loaded_state(opt: Optimizer) -> list[dict[str, Any]]:
    """Every param's state (tensors cloned) and its ``.grad`` (HMAdam's momentum), in order."""
    return [
        {
            **{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()},
            "grad": None if p.grad is None else p.grad.clone(),
        }
        for p in all_params(opt)
    ]


def assert_same_state(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for i, (sa, sb) in enumerate(zip(a, b)):
        assert sa.keys() == sb.keys(), i
        for key, va in sa.items():
            vb = sb[key]
            if torch.is_tensor(va):
                assert torch.is_tensor(vb) and va.dtype == vb.dtype, (i, key, va, vb)
                same = torch.equal(va, vb)
                assert same, f"param {i}: {key!r} differs"
            else:
                assert va == vb, (i, key, va, vb)


def resumed_from(spec: tuple[type, dict], model: nn.Module, saved: dict, dtype=torch.float32) -> tuple:
    """A fresh (model, optimizer) with ``model``'s weights and ``saved`` loaded."""
    resumed = make(dtype)
    resumed.load_state_dict(model.state_dict())
    opt = build(spec, resumed)
    opt.load_state_dict(saved)
    return resumed, opt


# ----------------------------------------------------------- 1. Python-number steps in a checkpoint


@pytest.mark.parametrize("spec", ALL)
def test_python_number_steps_in_a_loaded_state_dict_resume_exactly(spec) -> None:
    """torch's own optimizers load ``step`` saved as a float (older checkpoints): so must lowmem's."""
    data = batches(6)
    ref = make()
    ref_opt = build(spec, ref)
    train(ref, ref_opt, data)  # uninterrupted
    model = make()
    opt = build(spec, model)
    train(model, opt, data[:3])
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        entry["step"] = float(entry["step"])
    resumed, resumed_opt = resumed_from(spec, model, saved)
    train(resumed, resumed_opt, data[3:])
    assert_params_equal(resumed, ref)
    for p in all_params(resumed_opt):
        step = resumed_opt.state[p]["step"]
        assert torch.is_tensor(step) and step.dtype == torch.float32 and step.item() == 6.0


# ------------------------------------------------------------------------- 2. state-dict hooks


@pytest.mark.parametrize("in_place", [False, True], ids=["returns", "in_place"])
@pytest.mark.parametrize("spec", ALL)
def test_load_state_dict_loads_what_the_pre_hook_gives(spec, in_place: bool) -> None:
    """A pre-hook that swaps in another run's state (returned, or written into the dict it is
    given) loads that run's state: the resumed run continues exactly like the other run."""
    data_a, data_b = batches(5, seed=1), batches(5, seed=2)
    model_a, model_b = make(), make()
    opt_a, opt_b = build(spec, model_a), build(spec, model_b)
    train(model_a, opt_a, data_a[:3])
    train(model_b, opt_b, data_b[:3])
    state_b = copy.deepcopy(opt_b.state_dict())

    def hook(opt: Optimizer, state_dict: dict) -> dict | None:
        if in_place:
            state_dict["state"] = state_b["state"]
            return None
        return state_b

    resumed = make()
    resumed.load_state_dict(model_b.state_dict())
    resumed_opt = build(spec, resumed)
    resumed_opt.register_load_state_dict_pre_hook(hook)
    resumed_opt.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    train(resumed, resumed_opt, data_b[3:])
    train(model_b, opt_b, data_b[3:])
    assert_params_equal(resumed, model_b)


@pytest.mark.parametrize(
    ("spec", "dtype"),
    [pytest.param(*p.values, torch.float32, id=f"{p.id}-fp32") for p in ALL]
    + [pytest.param(*p.values, torch.bfloat16, id=f"{p.id}-bf16") for p in NO_COMPILE],
)
def test_load_state_dict_post_hook_sees_the_loaded_optimizer(spec, dtype: torch.dtype) -> None:
    """Post-hooks run after everything is loaded: HMAdam's momentum in ``.grad``, fp32 state of
    bf16 params back in fp32."""
    model = make(dtype)
    opt = build(spec, model)
    train(model, opt, batches(3))
    seen = []
    resumed = make(dtype)
    resumed.load_state_dict(model.state_dict())
    resumed_opt = build(spec, resumed)
    resumed_opt.register_load_state_dict_post_hook(lambda o: seen.append(loaded_state(o)))
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert len(seen) == 1
    assert_same_state(seen[0], loaded_state(resumed_opt))


@pytest.mark.parametrize("spec", ALL)
def test_state_dict_post_hook_sees_and_may_replace_the_final_dict(spec) -> None:
    model = make()
    opt = build(spec, model)
    train(model, opt, batches(3))
    def keys(sd: dict) -> list:
        return sorted((i, sorted(entry)) for i, entry in sd["state"].items())

    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(keys(sd)))
    final = opt.state_dict()
    assert seen == [keys(final)]
    if spec[0] in (HMAdam, HMAdamW):
        assert all("momentum_buffer" in entry for entry in final["state"].values())
    wrapped = {"wrapped": True}
    opt.register_state_dict_post_hook(lambda o, sd: wrapped)
    assert opt.state_dict() is wrapped


# --------------------------------------------------------------------- 3. HMAdam's momentum, uncopied


@pytest.mark.parametrize("spec", HMADAMS)
def test_hmadam_state_dict_holds_the_momentum_buffers_without_a_copy(spec) -> None:
    model = make()
    opt = build(spec, model)
    train(model, opt, batches(3))
    state = opt.state_dict()["state"]
    for i, p in enumerate(all_params(opt)):
        buf = state[i]["momentum_buffer"]
        assert buf.untyped_storage().data_ptr() == p.grad.untyped_storage().data_ptr()  # no new allocation
        assert buf.data_ptr() == p.grad.data_ptr() and buf.shape == p.grad.shape


@pytest.mark.parametrize("own", [False, True], ids=["fresh_optimizer", "own_state_dict"])
@pytest.mark.parametrize("spec", HMADAMS)
def test_hmadam_loading_a_live_state_dict_copies_the_momentum(spec, own: bool) -> None:
    """``load_state_dict(opt.state_dict())`` without a save in between: the loading optimizer copies
    the buffers into its own ``.grad``, so neither run disturbs the other."""
    data = batches(6)
    ref, model = make(), make()
    ref_opt, opt = build(spec, ref), build(spec, model)
    train(ref, ref_opt, data[:3])
    train(model, opt, data[:3])
    if own:
        opt.load_state_dict(opt.state_dict())
    else:
        other, other_opt = resumed_from(spec, model, opt.state_dict())
        saved = copy.deepcopy(opt.state_dict())
        train(other, other_opt, batches(3, seed=5))  # steps a run loaded from opt's live tensors
        after = opt.state_dict()
        for i, entry in saved["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    same = torch.equal(after["state"][i][key], value)
                    assert same, f"the other run changed state[{i}][{key!r}] of the saved optimizer"
    train(ref, ref_opt, data[3:])
    train(model, opt, data[3:])
    assert_params_equal(model, ref)


@pytest.mark.parametrize("spec", HMADAMS)
def test_hmadam_saved_and_loaded_state_dict_resumes_exactly(spec, tmp_path) -> None:
    data = batches(6)
    ref, model = make(), make()
    ref_opt, opt = build(spec, ref), build(spec, model)
    train(ref, ref_opt, data)
    train(model, opt, data[:3])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed, resumed_opt = resumed_from(spec, model, torch.load(tmp_path / "opt.pt", weights_only=True))
    train(resumed, resumed_opt, data[3:])
    assert_params_equal(resumed, ref)
    for p, q in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(p.grad, q.grad)  # the momentum too


# ---------------------------------------------------------------------------- 4. zero-size params


class WithEmpty(nn.Module):
    """One parameter of ``FAST_PATH_MIN_NUMEL`` elements (so ``fused=None`` picks the fast path)
    and, optionally, parameters of shapes (0, 16), (16, 0) and (0,)."""

    def __init__(self, with_empty: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.Parameter(torch.randn(FAST_PATH_MIN_NUMEL // 1024, 1024))
        self.empty = nn.ParameterList([torch.zeros(0, 16), torch.zeros(16, 0), torch.zeros(0)] if with_empty else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.big * x).square().mean() + sum(p.sum() for p in self.empty)


ZERO_SIZE = [
    (AdamMini, {"fused": False}),
    (AdamMini, {"fused": True}),
    (AdamMini, {"fused": None}),
    (HMAdamW, {"fused": True}),
    (HMAdamW, {"fused": None}),
    (HMAdam, {"fused": True}),
    (AdamS, {"fused": True}),
    (AdamS, {"fused": None}),
    (SlimAdamW, {"fused": True}),
    (SlimAdamW, {"fused": None}),
]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("spec", [pytest.param(s, id=_spec_id(s)) for s in ZERO_SIZE])
def test_zero_size_params_on_every_path(spec) -> None:
    """Empty params step (their ``step`` counts) without touching the others' maths."""
    model, ref = WithEmpty(with_empty=True), WithEmpty(with_empty=False)
    cls, kwargs = spec
    opt, ref_opt = cls(model.parameters(), **kwargs), cls(ref.parameters(), **kwargs)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(1024, generator=g)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).backward()
            o.step()
    assert torch.equal(model.big, ref.big)
    assert [tuple(p.shape) for p in model.empty] == [(0, 16), (16, 0), (0,)]
    assert all(opt.state[p]["step"].item() == 3.0 for p in model.empty)


# --------------------------------------------------------------------- 5. pickling a hooked model


@pytest.mark.parametrize("fused", [False, True], ids=["hooks", "fused"])
def test_model_with_a_live_ioadam_pickles_and_deep_copies(fused: bool) -> None:
    """The copies carry the hooks but never feed the optimizer: they train as plain models, and the
    original run continues exactly like one that was never copied."""
    data = batches(4)
    model, ref = make(), make()
    opt, ref_opt = IOAdam(model, fused_linear=fused), IOAdam(ref, fused_linear=fused)
    train(model, opt, data[:1])
    train(ref, ref_opt, data[:1])
    clones = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    for clone in clones:
        loss_fn(clone, data[1]).backward()
        assert all(p.grad is not None for p in clone.parameters())  # plain autograd, weights included
    train(model, opt, data[1:])
    train(ref, ref_opt, data[1:])
    assert_params_equal(model, ref)


# ------------------------------------------------------------------ 6. non-finite hyperparameters

NAN, INF = float("nan"), float("inf")
# (class, kwargs, the "key=value" the message must show); betas are named beta1/beta2
_EXTRA = {
    HMAdam: [("max_momentum_norm", "max_momentum_norm")],
    HMAdamW: [("max_momentum_norm", "max_momentum_norm")],
    AdaPM: [("rank_fraction", "rank_fraction"), ("clip", "clip")],
    IOAdam: [("adamw_lr", "adamw_lr"), ("p", "p"), ("buffer_size", "buffer_size")],
}


def _non_finite_cases():
    for cls in CLASSES:
        for value in (NAN, INF, -INF):
            cases = [({"lr": value}, "lr"), ({"eps": value}, "eps"), ({"weight_decay": value}, "weight_decay"),
                     ({"betas": (value, 0.9)}, "beta1"), ({"betas": (0.9, value)}, "beta2")]  # fmt: skip
            cases += [({key: value}, shown) for key, shown in _EXTRA.get(cls, [])]
            for kwargs, shown in cases:
                yield pytest.param(cls, kwargs, f"{shown}={value!r}", id=f"{cls.__name__}-{shown}={value}")
        tensor_lr = torch.tensor(NAN)
        yield pytest.param(cls, {"lr": tensor_lr}, f"lr={tensor_lr!r}", id=f"{cls.__name__}-lr=tensor(nan)")


@pytest.mark.parametrize(("cls", "kwargs", "shown"), list(_non_finite_cases()))
def test_non_finite_hyperparameters_are_refused_naming_key_value_and_range(cls, kwargs, shown: str) -> None:
    with pytest.raises(ValueError) as info:
        build((cls, {}), make(), **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{cls.__name__}: ") and shown in msg, msg
    assert any(r in msg for r in ("finite number >= 0", "finite number > 0", "in [0, 1)", "number > 1")), msg
