"""HMAdam's momentum lives in ``.grad``: it must survive every path of real Lightning training.

Lightning frees ``.grad`` at every stage start (``_run_stage``) and before every in-fit
validation (``on_validation_model_zero_grad``); ``GradScaler.unscale_`` divides the whole buffer
by the loss scale; ``gradient_clip_val`` clips ``.grad``. Each test below runs real ``Trainer``
fits and, where plain Lightning would break the momentum, a negative control showing that it
does (so the check is sensitive).
"""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from scripts.lightning_harness import cnn, digits, max_param_diff, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem.lightning_modules import ImageClassifier, LowMemModule
from lowmem.lightning_modules.sampling import ResumableSampler
from lowmem.strategies import AdamW, FoldedMomentumPrecision, HMAdamW, StrategyError

B1 = 0.9

pytestmark = [
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class UncheckedHMAdamW(HMAdamW):
    """HMAdamW without the setup checks: to run the configurations lowmem refuses."""

    def check(self, trainer) -> None:
        pass


def plain_zero_grad(cls):
    """``cls`` with Lightning's own ``zero_grad`` (frees .grad): lowmem's protection switched off."""
    return type(f"Plain{cls.__name__}", (cls,), {"zero_grad": pl.LightningModule.zero_grad})


# ------------------------------------------------------------ 1. validation and stage starts
class MomentumWatch(pl.Callback):
    """Asserts that each in-fit validation leaves .grad exactly as the last training batch left it."""

    def __init__(self) -> None:
        self.after_batch, self.validations = {}, 0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after_batch = grads(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            assert self.after_batch and same(grads(pl_module), self.after_batch), "in-fit validation touched .grad"
            self.validations += 1


class RestoredMomentum(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.at_start = grads(pl_module)


def test_validation_between_fits_and_stage_starts_never_touch_the_momentum(tmp_path):
    dm, watch = digits(), MomentumWatch()
    model = cnn(HMAdamW(lr=3e-3))
    kw = dict(limit_val_batches=2, limit_test_batches=2, limit_predict_batches=2)
    t = trainer(max_steps=10, val_check_interval=4, callbacks=[watch], **kw)
    t.fit(model, dm)
    assert watch.validations == 2
    momentum = grads(model)
    assert len(momentum) == len(list(model.parameters())) and all(g.abs().sum() > 0 for g in momentum.values())
    t.save_checkpoint(tmp_path / "a.ckpt")
    t.validate(model, dm)
    t.test(model, dm)
    t.predict(model, dm)
    assert same(grads(model), momentum), "validate/test/predict touched the momentum"

    # A new fit resumed from the checkpoint: the restored momentum survives the stage-start zero_grad.
    restored = RestoredMomentum()
    resumed = cnn(HMAdamW(lr=3e-3))
    trainer(max_steps=12, callbacks=[restored], **kw).fit(resumed, dm, ckpt_path=tmp_path / "a.ckpt")
    assert same(restored.at_start, momentum)

    # Negative control: with Lightning's own zero_grad, validate() frees the momentum ...
    plain = plain_zero_grad(type(model))(widths=[4, 8], optimizer=HMAdamW(lr=3e-3))
    t = trainer(max_steps=3, **kw)
    t.fit(plain, dm)
    t.validate(plain, dm)
    assert grads(plain) == {}
    # ... and in-fit validation frees it too (HMAdamW's guard then stops the run).
    plain = plain_zero_grad(type(model))(widths=[4, 8], optimizer=HMAdamW(lr=3e-3))
    with pytest.raises(RuntimeError, match="keeps its momentum in .grad"):
        trainer(max_steps=10, val_check_interval=4, **kw).fit(plain, dm)


# ----------------------------------------- 2 + 3. accumulation, and Lightning == plain PyTorch
BATCH, EPOCH_BATCHES, STEPS = 16, 40, 52


def _plain_pytorch_loop(accumulate: int, correction: str = "noise") -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same model, optimizer, data order and loss scaling as the Lightning run, no Lightning."""
    model = cnn(HMAdamW(lr=3e-3, variance_correction=correction))
    optimizer = model.optimizer_strategy.build(model)
    dm = digits(BATCH)
    dm.setup()
    sampler = ResumableSampler(dm.splits["train"], BATCH)
    steps = 0
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        loader = DataLoader(dm.splits["train"], batch_size=BATCH, sampler=sampler, drop_last=True)
        for i, batch in enumerate(itertools.islice(loader, EPOCH_BATCHES)):
            if i % accumulate == 0:
                optimizer.zero_grad()
            (model.compute_loss(batch)[0] / accumulate).backward()
            if (i + 1) % accumulate == 0 or i + 1 == EPOCH_BATCHES:
                optimizer.step()
                steps += 1
                if steps == STEPS:
                    return model, optimizer
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("accumulate", "correction"), [(1, "noise"), (2, "noise"), (4, "noise"), (4, "hook")])
def test_lightning_matches_a_plain_pytorch_loop(accumulate, correction):
    """52 optimizer steps, validation every 6 batches (mid-window for accumulate=4): Lightning +
    LowMemModule + HMAdamW equals HMAdamW driven by hand, so the decay happens once per optimizer
    step whatever the number of micro-batches, and validation does not disturb it (nor, with
    variance_correction="hook", the gradient hooks: validation runs no backward)."""
    model = cnn(HMAdamW(lr=3e-3, variance_correction=correction))
    t = trainer(max_steps=STEPS, limit_train_batches=EPOCH_BATCHES, accumulate_grad_batches=accumulate,
                limit_val_batches=2, val_check_interval=6, callbacks=[MomentumWatch()])  # fmt: skip
    t.fit(model, digits(BATCH))
    ref_model, ref_opt = _plain_pytorch_loop(accumulate, correction)
    params = dict(model.named_parameters())
    ref = dict(ref_model.named_parameters())
    assert max_param_diff({k: v.detach() for k, v in params.items()}, {k: v.detach() for k, v in ref.items()}) <= 1e-6
    assert max_param_diff(grads(model), grads(ref_model)) <= 1e-6  # the momentum
    opt = t.optimizers[0]
    for p, q in zip(params.values(), ref.values()):
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]) == STEPS
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_negative_control_lightning_zero_grad_breaks_the_run():
    """Same Lightning run with the module's protection off: validation frees the momentum."""
    model = plain_zero_grad(ImageClassifier)(widths=[4, 8], optimizer=HMAdamW(lr=3e-3))
    t = trainer(max_steps=STEPS, limit_train_batches=EPOCH_BATCHES, limit_val_batches=2, val_check_interval=6)
    with pytest.raises(RuntimeError, match="keeps its momentum in .grad"):
        t.fit(model, digits(BATCH))


# ------------------------------------------------------------------------------ 5. precision
def _scaler(init_scale: float = 2.0**10) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10_000)


def _dummy_batches(n: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


class ConstantGradient(LowMemModule):
    """``loss = sum(W x)`` for a fixed x whose entries are exact in fp16/bf16: the gradient is x
    at every step, so HMAdam's buffer after N steps is known in closed form."""

    def __init__(self, optimizer, n: int = 24) -> None:
        super().__init__(optimizer=optimizer)
        self.lin = nn.Linear(n, 1, bias=False)
        self.register_buffer("x", ((torch.arange(n) % 7) - 3).float() / 8)

    def compute_loss(self, batch):
        return self.lin(self.x[None]).sum(), {}


PRECISIONS = {
    "32-true": (dict(precision="32-true"), 1e-6),
    "bf16-mixed": (dict(precision="bf16-mixed"), 1e-6),
    "bf16-true": (dict(precision="bf16-true"), 3e-2),  # the buffer itself is bf16
    "16-mixed-folded": (dict(plugins=[FoldedMomentumPrecision("16-mixed", "cpu", scaler=_scaler())]), 1e-6),
}


@pytest.mark.parametrize("kind", PRECISIONS)
def test_momentum_units_under_every_precision(kind):
    """After N steps of gradient x the buffer holds ``b1 x (1 - b1^N) / (1 - b1)`` (decayed at the
    end of step N), in gradient units whatever the precision plugin."""
    kwargs, rtol = PRECISIONS[kind]
    model = ConstantGradient(HMAdamW(lr=1e-3, betas=(B1, 0.999)))
    steps = 12
    trainer(max_steps=steps, **kwargs).fit(model, _dummy_batches())
    expected = B1 * model.x.float() * (1 - B1**steps) / (1 - B1)
    got = model.lin.weight.grad[0].float()
    assert torch.isfinite(model.lin.weight).all()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0)


def test_negative_control_plain_grad_scaler_divides_the_history():
    model = ConstantGradient(UncheckedHMAdamW(lr=1e-3, betas=(B1, 0.999)))
    steps = 12
    trainer(max_steps=steps, plugins=[MixedPrecision("16-mixed", "cpu", scaler=_scaler())]).fit(model, _dummy_batches())
    expected = B1 * model.x * (1 - B1**steps) / (1 - B1)
    relative_error = (model.lin.weight.grad[0] - expected).norm() / expected.norm()
    assert relative_error > 0.5  # the history was divided by the scale: the buffer is ~ b1 x


def test_plain_grad_scaler_is_refused_with_hmadamw():
    model = ConstantGradient(HMAdamW())
    t = trainer(max_steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=_scaler())])
    with pytest.raises(StrategyError, match="FoldedMomentumPrecision"):
        t.fit(model, _dummy_batches())


class TwoBranches(LowMemModule):
    """Regression with two independent heads; at ``poison_step`` head b's loss is multiplied by
    inf, so only head b's gradients overflow."""

    def __init__(self, optimizer, poison_step: int) -> None:
        super().__init__(optimizer=optimizer)
        self.a, self.b, self.poison_step = nn.Linear(8, 4), nn.Linear(8, 4), poison_step
        self.losses: list[float] = []

    def compute_loss(self, batch):
        x, y = batch
        loss_b = F.mse_loss(self.b(x).float(), y)
        if self.training and self.global_step == self.poison_step:
            loss_b = loss_b * float("inf")
        loss = F.mse_loss(self.a(x).float(), y) + loss_b
        if self.training and self.global_step != self.poison_step:
            self.losses.append(float(loss.detach()))
        return loss, {}


class StepWatch(pl.Callback):
    """Parameters before every step, .grad after the poisoned step, the scale after every step."""

    def __init__(self) -> None:
        self.params, self.scales, self.grads_after_poison = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.scales.append(trainer.precision_plugin.scaler.get_scale())
        if trainer.global_step == pl_module.poison_step + 1:
            self.grads_after_poison = grads(pl_module)


def _regression_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    return DataLoader(TensorDataset(x, x @ torch.randn(8, 4, generator=g) / 3), batch_size=32)


def _overflow_run(strategy, plugin, poison_step=10, steps=40):
    torch.manual_seed(0)
    model, watch = TwoBranches(strategy, poison_step), StepWatch()
    t = trainer(max_steps=steps, plugins=[plugin], callbacks=[watch])
    t.fit(model, _regression_data())
    return model, t, watch


def test_overflow_skips_one_step_and_resets_only_the_poisoned_momentum():
    poison, init = 10, 2.0**10
    model, t, watch = _overflow_run(HMAdamW(lr=1e-2), FoldedMomentumPrecision("16-mixed", "cpu", scaler=_scaler(init)))
    plugin = t.precision_plugin
    # One skipped step: the scale halves once, the weights do not move at the poisoned step.
    assert watch.scales[: poison] == [init] * poison and watch.scales[poison:] == [init / 2] * (40 - poison)
    assert same(watch.params[poison], watch.params[poison + 1])
    assert not same(watch.params[poison + 1], watch.params[poison + 2])
    # Only head b's two tensors (weight, bias) held non-finite momentum: reset, counted, logged.
    assert (plugin.overflow_steps, plugin.momentum_resets) == (1, 2)
    assert float(t.callback_metrics["precision/momentum_resets"]) == 2.0
    after = watch.grads_after_poison
    assert all(float(after[f"b.{n}"].abs().max()) == 0.0 for n in ("weight", "bias"))
    assert all(torch.isfinite(after[f"a.{n}"]).all() and after[f"a.{n}"].abs().sum() > 0 for n in ("weight", "bias"))
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # Training recovers as AdamW does under Lightning's MixedPrecision with the same overflow: the
    # loss at the end is within a few percent of the same run without the overflow, for both.
    adamw, _, watch_adamw = _overflow_run(AdamW(lr=1e-2), MixedPrecision("16-mixed", "cpu", scaler=_scaler(init)))
    assert watch_adamw.scales[-1] == init / 2  # AdamW also skipped exactly one step
    clean, _, _ = _overflow_run(HMAdamW(lr=1e-2), FoldedMomentumPrecision("16-mixed", "cpu", scaler=_scaler(init)), -1)
    clean_adamw, _, _ = _overflow_run(AdamW(lr=1e-2), MixedPrecision("16-mixed", "cpu", scaler=_scaler(init)), -1)
    for run, reference in ((model, clean), (adamw, clean_adamw)):
        final, final_clean = sum(run.losses[-5:]) / 5, sum(reference.losses[-5:]) / 5
        assert final < 0.75 * run.losses[0] and final < 1.2 * final_clean, (run.losses[0], final, final_clean)


def test_negative_control_plain_scaler_never_recovers_from_an_overflow():
    """HMAdamW under Lightning's MixedPrecision (the check bypassed): the inf stays in .grad, so
    every later step is skipped and the scale halves on every step."""
    model, t, watch = _overflow_run(UncheckedHMAdamW(lr=1e-2), MixedPrecision("16-mixed", "cpu", scaler=_scaler()))
    assert watch.scales[-1] <= 2.0**10 / 2**25
    assert same(watch.params[11], watch.params[-1])  # frozen since the overflow


# ------------------------------------------------------------------------------- 6. clipping
class LinearLoss(LowMemModule):
    """``loss = sum(W * g)``: a constant gradient g (norm G) at every step."""

    def __init__(self, optimizer) -> None:
        super().__init__(optimizer=optimizer)
        self.lin = nn.Linear(5, 7, bias=False)
        self.register_buffer("g", torch.randn(7, 5, generator=torch.Generator().manual_seed(3)))
        self.momentum_norms: list[float] = []

    def compute_loss(self, batch):
        return (self.lin.weight * self.g).sum(), {}

    def on_train_batch_end(self, *args) -> None:
        super().on_train_batch_end(*args)
        grad = self.lin.weight.grad  # after step(): b1 B, so m = (1 - b1) B = (1 - b1) grad / b1
        if isinstance(self.optimizer_strategy, HMAdamW):
            self.momentum_norms.append(float((1 - B1) / B1 * grad.norm()))


def _clip_run(strategy, clip=None, steps=60, module=LinearLoss):
    torch.manual_seed(0)
    model = module(strategy)
    trainer(max_steps=steps, gradient_clip_val=clip).fit(model, _dummy_batches(steps))
    return model


def _hm(**kw):
    return HMAdamW(lr=1e-2, betas=(B1, 0.999), weight_decay=0.0, **kw)


def test_clipping_above_the_gradient_norm_never_clips_the_history():
    """An AdamW user's threshold above the gradient norm (2G) never bites AdamW; with lowmem it
    never bites HMAdamW either (the momentum's norm tends to G). Lightning's own clipping of
    .grad would clip HMAdamW's history, whose norm tends to G / (1 - b1) = 10 G (negative control)."""
    G = float(LinearLoss(_hm()).g.norm())
    unclipped, clipped = _clip_run(_hm()), _clip_run(_hm(), clip=2 * G)
    assert torch.equal(unclipped.lin.weight, clipped.lin.weight)
    assert torch.equal(unclipped.lin.weight.grad, clipped.lin.weight.grad)
    assert clipped.momentum_norms[-1] == pytest.approx(G, rel=1e-2)

    hook = {"configure_gradient_clipping": pl.LightningModule.configure_gradient_clipping}
    lightning_clipping = type("LightningClipping", (LinearLoss,), hook)
    history_clipped = _clip_run(_hm(), clip=2 * G, module=lightning_clipping)
    assert history_clipped.momentum_norms[-1] < 0.25 * G


def test_clipping_below_the_gradient_norm_gives_adamw_s_clipped_momentum():
    """Threshold c = G/2 below the gradient norm: AdamW's exp_avg tends to the clipped gradient
    (norm c, direction g); HMAdamW's momentum reaches exactly that and never exceeds c."""
    G = float(LinearLoss(_hm()).g.norm())
    c = G / 2
    hm = _clip_run(_hm(), clip=c)
    adamw = _clip_run(AdamW(lr=1e-2, betas=(B1, 0.999), weight_decay=0.0), clip=c)
    assert max(hm.momentum_norms) <= c * (1 + 1e-5)
    m_hm = (1 - B1) / B1 * hm.lin.weight.grad
    exp_avg = adamw.trainer.optimizers[0].state[adamw.lin.weight]["exp_avg"]
    assert float((m_hm - exp_avg).norm()) <= 5e-3 * c  # AdamW's is (1 - b1^60) of the limit
    assert float((m_hm - c * hm.g / G).norm()) <= 1e-5 * c


def test_value_clipping_is_refused_for_hmadamw_and_allowed_for_adamw():
    model = LinearLoss(_hm())
    t = trainer(max_steps=2, gradient_clip_val=0.5, gradient_clip_algorithm="value")
    with pytest.raises(StrategyError, match="element-wise"):
        t.fit(model, _dummy_batches())
    adamw = LinearLoss(AdamW())
    trainer(max_steps=2, gradient_clip_val=0.5, gradient_clip_algorithm="value").fit(adamw, _dummy_batches())


# ------------------------------------------------- 7. variance_correction="hook" at fit start
def test_hook_variance_is_refused_at_fit_start_where_its_hooks_cannot_see_the_gradient():
    """One process, no loss scaling: DDP (world size 2), FSDP2 and an fp16 GradScaler are each a
    one-line StrategyError naming the option and the fix; the default correction passes them."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    def check(correction, strategy=None, world_size=1, plugin=None):
        model = cnn(HMAdamW(lr=3e-3, variance_correction=correction))
        opt = model.optimizer_strategy.build(model)
        stand_in = SimpleNamespace(strategy=strategy, precision_plugin=plugin or Precision(), world_size=world_size,
                                   gradient_clip_val=None, gradient_clip_algorithm=None, optimizers=[opt])  # fmt: skip
        model.optimizer_strategy.check(stand_in)

    fp16 = FoldedMomentumPrecision("16-mixed", device="cpu")
    for kwargs, needle in [
        (dict(strategy=DDPStrategy(), world_size=2), "world size 2"),
        (dict(strategy=ModelParallelStrategy()), r"FSDP2 \(ModelParallelStrategy\)"),
        (dict(plugin=fp16), "an fp16 GradScaler"),
    ]:
        with pytest.raises(StrategyError, match=r"HMAdamW\(variance_correction='hook'\).*" + needle) as info:
            check("hook", **kwargs)
        assert "\n" not in str(info.value)
        assert "model.init_args.optimizer.init_args.variance_correction to noise" in str(info.value)
        check("noise", **kwargs)
    check("hook", strategy=DDPStrategy(), world_size=1)


# ------------------------------------------------------------- 8. the end-of-fit memory summary
def test_fit_memory_summary_counts_the_grad_buffer_and_shows_the_accumulation_saving():
    """What `lowmem fit` prints last: HMAdamW's state is half of AdamW's, its persistent .grad
    buffer makes state + buffers equal, and under accumulation (AdamW holds grads, m and v through
    the next micro-batch's forward) HMAdamW's peak of tensor bytes is below AdamW's by about one
    parameter-sized tensor."""
    from lowmem.cli.memory import fit_memory_rows, fit_memory_summary

    model = cnn(HMAdamW(lr=3e-3))
    t = trainer(max_steps=2, accumulate_grad_batches=2, limit_val_batches=0)
    dm = digits(BATCH)
    t.fit(model, dm)
    ours, adamw, k = fit_memory_rows(t, model, dm)
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert k == 2 and ours["name"] == "HMAdamW" and adamw["name"] == "AdamW"
    assert ours["params"] == adamw["params"] == n_bytes
    assert ours["grad_buffers"] == n_bytes and adamw["grad_buffers"] == 0
    assert adamw["state"] - ours["state"] == n_bytes  # AdamW's m (both: v and 0-d step counters)
    assert ours["persistent"] == adamw["persistent"]
    assert 0.9 * n_bytes <= adamw["peak"] - ours["peak"] <= 1.1 * n_bytes
    text = fit_memory_summary(t, model, dm)
    lines = text.splitlines()
    assert len(lines) == 4 and all(line.startswith("lowmem fit:") for line in lines)
    assert "2 micro-batches" in lines[0] and "HMAdamW vs AdamW: optimizer state 50." in lines[3]


def test_fit_memory_summary_of_an_adamw_run_is_one_row():
    """No comparison of AdamW with itself (and no second replay)."""
    from lowmem.cli.memory import fit_memory_summary

    model = cnn(AdamW(lr=3e-3))
    t = trainer(max_steps=1, limit_val_batches=0)
    dm = digits(BATCH)
    t.fit(model, dm)
    lines = fit_memory_summary(t, model, dm).splitlines()
    assert len(lines) == 2 and "AdamW on the same" not in lines[0] and lines[1].split()[2] == "AdamW"
