"""Optimizer strategies against Lightning's strategies, precisions and clipping; the resumable
sampler; IO-Adam's statistics under gradient accumulation in a real Trainer.

``strategy.check`` is exercised with real Lightning strategy objects. ``DeepSpeedStrategy``
cannot be constructed without the deepspeed package (not installed: its ``__init__`` raises), so
a stub subclass that skips ``__init__`` stands in for it (the check is an ``isinstance`` test).
Lightning refuses ``FSDPStrategy`` on CPU when a Trainer is built, so FSDP1 is checked with the
strategy object in a minimal trainer stand-in; DDP and ModelParallel use real Trainers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from scripts.lightning_harness import STRATEGIES, cnn, digits, max_param_diff, trainer
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.utils.data import DistributedSampler

from lowmem import strategies
from lowmem.lightning_modules.sampling import ResumableSampler
from lowmem.strategies import FoldedMomentumPrecision, StrategyError, capabilities_of

FOLDS = {"HMAdamW", "HMAdam"}
NEEDS_FULL_SHAPES = {"SlimAdamW", "AdaPM", "IOAdam", "AdamMini", "Adafactor"}
NO_DTENSOR: set[str] = set()  # all exact on FSDP2 shards (tests/test_fsdp2.py); torch.optim.Adafactor is not


class StubDeepSpeed(DeepSpeedStrategy):
    def __init__(self) -> None:  # the real one needs the deepspeed package
        pass


def stand_in(strategy, precision_plugin=None, world_size=1, clip_val=None, clip_algorithm=None):
    return SimpleNamespace(strategy=strategy, precision_plugin=precision_plugin or Precision(), world_size=world_size,
                           gradient_clip_val=clip_val, gradient_clip_algorithm=clip_algorithm)  # fmt: skip


def refusal(name, t) -> str | None:
    try:
        STRATEGIES[name]().check(t)
    except StrategyError as err:
        return str(err)
    return None


@pytest.mark.parametrize("name", STRATEGIES)
def test_sharding_strategies(name):
    ds = refusal(name, stand_in(StubDeepSpeed()))
    fsdp1 = refusal(name, stand_in(FSDPStrategy()))
    fsdp2 = refusal(name, trainer(strategy=ModelParallelStrategy()))
    ddp = refusal(name, trainer(strategy=DDPStrategy()))
    assert ddp is None
    if name in FOLDS | NEEDS_FULL_SHAPES:
        assert "DeepSpeed" in ds and "trainer.strategy=ddp" in ds
        assert "FSDP1" in fsdp1 and "trainer.strategy=ddp" in fsdp1
        if name in FOLDS:
            assert "ModelParallelStrategy" in fsdp1 and "momentum lives in .grad" in ds
    else:
        assert ds is None and fsdp1 is None
    if name in NO_DTENSOR:
        assert "FSDP2/ModelParallelStrategy" in fsdp2 and "trainer.strategy=ddp" in fsdp2
    else:
        assert fsdp2 is None


@pytest.mark.parametrize(
    ("hook", "wrapper", "refused"),
    [
        (default_hooks.fp16_compress_hook, None, True),
        (default_hooks.bf16_compress_hook, None, True),
        (powerSGD_hook.powerSGD_hook, None, True),
        (default_hooks.allreduce_hook, default_hooks.fp16_compress_wrapper, True),
        (default_hooks.allreduce_hook, None, False),  # lossless
    ],
    ids=["fp16", "bf16", "powersgd", "fp16-wrapper", "allreduce"],
)
def test_lossy_ddp_comm_hooks_are_refused_for_folded_momentum(hook, wrapper, refused):
    t = trainer(strategy=DDPStrategy(ddp_comm_hook=hook, ddp_comm_wrapper=wrapper))
    for name in STRATEGIES:
        message = refusal(name, t)
        if name in FOLDS and refused:
            assert "comm hook" in message and "quantise the momentum" in message
        else:
            assert message is None, (name, message)


def test_precision_plugins():
    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    folded = FoldedMomentumPrecision("16-mixed", "cpu")
    bf16 = MixedPrecision("bf16-mixed", "cpu")
    for name in STRATEGIES:
        plain, ours = refusal(name, stand_in(None, scaler)), refusal(name, stand_in(None, folded))
        assert refusal(name, stand_in(None, bf16)) is None
        if name in FOLDS:
            assert "FoldedMomentumPrecision" in plain and "bf16-mixed" in plain and ours is None
        elif name == "IOAdam":  # its statistics see the scaled dY: no scaler at all
            assert "bf16-mixed" in plain and "bf16-mixed" in ours
        else:
            assert plain is None and ours is None
    for name in STRATEGIES:
        plugin = STRATEGIES[name]().precision_plugin("16-mixed", "cpu")
        assert isinstance(plugin, FoldedMomentumPrecision) if name in FOLDS else plugin is None
        assert STRATEGIES[name]().precision_plugin("bf16-mixed", "cpu") is None


def test_value_clipping_refused_at_setup_and_fused_ioadam_refused_under_ddp():
    for name in STRATEGIES:
        message = refusal(name, stand_in(None, clip_val=1.0, clip_algorithm="value"))
        assert ("gradient_clip_algorithm=norm" in message) if name in FOLDS else message is None
        assert refusal(name, stand_in(None, clip_val=1.0, clip_algorithm="norm")) is None
    with pytest.raises(StrategyError, match="fused_linear: false"):
        strategies.IOAdam(fused_linear=True).check(stand_in(DDPStrategy(), world_size=2))
    strategies.IOAdam(fused_linear=True).check(stand_in(None))  # one process: fine


def test_capabilities_of_torch_optimizers():
    assert capabilities_of(torch.optim.AdamW).supports_dtensor
    adafactor = capabilities_of(torch.optim.Adafactor)
    assert adafactor.needs_full_shapes and not adafactor.supports_dtensor
    assert capabilities_of(strategies.HMAdamW().optimizer_class).folds_momentum_into_grad
    callable_adamw = strategies.CallableStrategy(torch.optim.AdamW)
    callable_adamw.build(cnn(strategies.AdamW()))
    assert callable_adamw.check(trainer(strategy=ModelParallelStrategy())) is None


# ----------------------------------------------------------------------------- the sampler
def _data(n=103):
    return torch.utils.data.TensorDataset(torch.arange(n))


def test_sampler_without_trainer_is_distributed_sampler_order():
    data = _data()
    for epoch in (0, 3):
        ours = ResumableSampler(data, 4, seed=5)
        ours.set_epoch(epoch)
        ref = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True)
        ref.set_epoch(epoch)
        assert list(ours) == list(ref)
    assert isinstance(ours, DistributedSampler)  # Lightning's use_distributed_sampler keeps it
    assert list(ResumableSampler(data, 4, shuffle=False)) == list(range(103))


def test_sampler_shards_like_one_process_with_the_global_batch():
    data, b = _data(), 5
    single = list(ResumableSampler(data, 2 * b, seed=1, num_replicas=1, rank=0))
    ranks = [list(ResumableSampler(data, b, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    global_batches = len(single) // (2 * b)
    assert global_batches == len(ranks[0]) // b == 10
    for k in range(global_batches):
        union = ranks[0][k * b : (k + 1) * b] + ranks[1][k * b : (k + 1) * b]
        assert sorted(union) == sorted(single[k * 2 * b : (k + 1) * 2 * b])


def test_sampler_resumes_at_the_fit_loops_position():
    """23 batches trained, 103 // 4 = 25 per epoch (``limit_train_batches=1.0``) or 10 (``=10``)."""
    data = _data()

    def fitting(processed, limit):
        progress = SimpleNamespace(total=SimpleNamespace(processed=processed))
        loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
        return SimpleNamespace(training=True, fit_loop=loop, limit_train_batches=limit, world_size=1, global_rank=0)

    epoch0 = ResumableSampler(data, 4, seed=2)
    assert list(ResumableSampler(data, 4, seed=2, trainer=fitting(23, 1.0))) == list(epoch0)[23 * 4 :]
    epoch2 = ResumableSampler(data, 4, seed=2)
    epoch2.set_epoch(2)
    assert list(ResumableSampler(data, 4, seed=2, trainer=fitting(23, 10))) == list(epoch2)[3 * 4 :]
    validating = fitting(23, 10)
    validating.training = False  # not fitting: plain DistributedSampler behaviour
    assert list(ResumableSampler(data, 4, seed=2, trainer=validating)) == list(epoch0)


def test_data_modules_train_with_the_resumable_sampler():
    from scripts.lightning_harness import text

    for dm in (digits(), text()):
        dm.setup()
        assert isinstance(dm.train_dataloader().sampler, ResumableSampler)
        assert not isinstance(dm.val_dataloader().sampler, ResumableSampler)


# ------------------------------------------------------ IO-Adam statistics under accumulation
def _ioadam_fit(batch_size, accumulate, steps=6):
    model = cnn(strategies.IOAdam(lr=1e-2, buffer_size=4))
    t = trainer(max_steps=steps, accumulate_grad_batches=accumulate, limit_val_batches=2, val_check_interval=2)
    t.fit(model, digits(batch_size))
    head = model.net.head.weight
    return {n: p.detach() for n, p in model.named_parameters()}, t.optimizers[0].state[head]


def test_ioadam_statistics_under_accumulation_equal_the_full_batch():
    """4 micro-batches of 8 per step (validation every 2 micro-batches, i.e. mid-window) give
    IO-Adam the same input/output statistics and the same update as one batch of 32: the hooks
    sum over every micro-batch and nothing in Lightning's loop discards them mid-window."""
    params, state = _ioadam_fit(8, 4)
    full_params, full_state = _ioadam_fit(32, 1)
    assert float(state["step"]) == float(full_state["step"]) == 6
    for key in ("in_stats", "out_stats", "exp_avg"):
        torch.testing.assert_close(state[key], full_state[key], rtol=1e-5, atol=1e-7)
    assert max_param_diff(params, full_params) < 1e-5
    # Sensitivity: statistics of single micro-batches are a different run.
    single_params, single_state = _ioadam_fit(8, 1)
    assert not torch.allclose(single_state["in_stats"], full_state["in_stats"], rtol=1e-2)
    assert max_param_diff(single_params, full_params) > 1e-3


# ----------------------------------------------------------------------------- the registry
def test_every_optimizer_argument_is_a_strategy_key_with_the_optimizers_default():
    """Strategies are derived from the optimizers' signatures: same keys, same defaults."""
    import inspect

    from lowmem.strategies.catalog import REGISTRY

    assert set(REGISTRY) == {"AdamW", "Adafactor", "HMAdamW", "HMAdam", "AdamS", "SlimAdamW", "AdaPM", "IOAdam",
                             "AdamMini"}  # fmt: skip
    for name, strategy in REGISTRY.items():
        keys = inspect.signature(strategy).parameters
        optimizer_args = list(inspect.signature(strategy.optimizer_class.__init__).parameters.values())[2:]
        for arg in optimizer_args:
            assert keys[arg.name].default == arg.default, (name, arg.name)


def test_state_in_param_dtype_reaches_the_optimizer_from_a_strategy():
    for name in ("HMAdamW", "AdamS", "SlimAdamW", "AdamMini", "AdaPM"):
        optimizer = getattr(strategies, name)(state_in_param_dtype=True).build(cnn(strategies.AdamW()))
        assert optimizer.defaults["state_in_param_dtype"] is True, name
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['lrr'\\]"):
        strategies.AdamW(lrr=1e-3)


def test_every_registered_lowmem_optimizer_is_in_the_conformance_suite():
    from _optim_registry import SPECS

    from lowmem.strategies.catalog import REGISTRY

    from lowmem import optim

    lowmem_optimizers = {s.optimizer_class for s in REGISTRY.values() if s.optimizer_class.__module__.startswith("lowmem")}
    # lowmem's Adafactor runs torch's step on plain tensors (tests/test_adafactor.py checks it is
    # torch's to the bit); only its FSDP2 path is lowmem's (tests/test_fsdp2.py).
    assert lowmem_optimizers - {optim.Adafactor} <= {spec.cls for spec in SPECS}


def test_the_readmes_support_matrix_is_the_one_the_checks_compute():
    from pathlib import Path

    from lowmem.strategies.support import support_matrix

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert support_matrix() in readme
