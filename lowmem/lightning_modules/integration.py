"""What any LightningModule needs to train with a lowmem optimizer: a mixin and a callback.

Lightning's own way: the module says what to compute, cross-cutting concerns are callbacks.
A user's existing module works with every lowmem optimizer through two additions::

    class MyModule(FoldedMomentumMixin, pl.LightningModule):      # the mixin first
        def configure_optimizers(self):
            return lowmem.strategies.HMAdamW(lr=1e-3).build(self)   # or lowmem.optim.HMAdamW(...)

    trainer = pl.Trainer(callbacks=[LowMemCallback()])             # `lowmem fit` adds it itself

:class:`FoldedMomentumMixin` owns the two module hooks a folded-momentum optimizer (HMAdam keeps
its first moment in ``.grad``) must own:

- ``zero_grad()`` is a no-op while an optimizer of the Trainer folds momentum into ``.grad``.
  Lightning calls it at the start of every stage (after restoring a checkpoint) and before every
  in-fit validation; the only code that touches ``.grad`` between steps is then the optimizer's
  own ``zero_grad()``, which decays it;
- ``configure_gradient_clipping``: ``gradient_clip_val`` clips the momentum's global norm
  (:func:`lowmem.strategies.checks.clip_gradients`), never the stored history.

:class:`LowMemCallback` does the rest:

- at ``setup('fit')`` it frees ``.grad`` of every parameter, so a new optimizer's folded momentum
  starts from zero (a checkpoint restore refills it later);
- at fit start it checks each optimizer's declared capabilities against the Trainer's Lightning
  strategy, precision and clipping (:func:`~lowmem.strategies.checks.check_trainer`; a module
  with an ``optimizer_strategy``, such as ``LowMemModule``, runs that strategy's ``check``), and
  refuses a folded-momentum optimizer on a module without the mixin; options an optimizer resolves
  for the loop are resolved there and said in one line on rank 0 (HMAdamW's
  ``variance_correction=auto``: hook in one process, noise under DDP, FSDP2 or fp16 loss scaling);
- the *training RNG stream*: training draws from torch's global RNG (dropout, anything in
  ``training_step``) come from a stream whose state is restored at the start of every training
  batch, captured at its end and saved in checkpoints (one state per rank under DDP). In-fit
  validation, sanity checks and DataLoader iterators (which also draw from the global RNG)
  cannot change the training trajectory, and a resumed run draws exactly what the uninterrupted
  one would have. Draws made while a batch is fetched (augmentation in a Dataset) are not covered;
- a non-finite training loss (on any rank) stops training with :class:`TrainingDiverged`, naming
  the step, before any checkpoint of that step is written (``ModelCheckpoint`` runs after this
  callback), so the checkpoints on disk are the last good ones. Under a scaler that skips
  overflow steps (fp16) this check is off: the scaler handles them. It costs one host sync and,
  under DDP, one all-reduce of a flag per step; ``stop_on_nonfinite_loss=False`` switches it off;
- checkpoints name their optimizers' classes; resuming a fit with another optimizer is refused
  before its state is loaded;
- the step that reaches ``max_steps`` is always checkpointed (when the Trainer checkpoints, without
  a monitored metric);
- it logs ``precision/momentum_resets`` under :class:`~lowmem.strategies.FoldedMomentumPrecision`;
- under an optimizer that acts by parameter role (SlimAdamW, AdaPM, Adam-mini) it warns once, in
  one line, naming the matrices the role classifier left in ``other`` and how to override them.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer

from lowmem.lightning_modules.errors import ConfigError
from lowmem.strategies import FoldedMomentumPrecision, OptimizerStrategy, StrategyError, capabilities_of, folds_momentum
from lowmem.strategies.checks import check_trainer, clip_gradients

__all__ = ["FoldedMomentumMixin", "LowMemCallback", "TrainingDiverged"]

RNG_KEY = "lowmem_rng_stream"  # checkpoint key: the training stream's RNG states, one per rank
OPTIMIZERS_KEY = "lowmem_optimizers"  # checkpoint key: the optimizers' classes, for resume checks


class FoldedMomentumMixin:
    """``zero_grad`` and gradient clipping for folded-momentum optimizers; put it before
    ``LightningModule`` in the bases. Harmless with any other optimizer."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Free/zero gradients, except while an optimizer keeps its momentum in them (a no-op then)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not any(folds_momentum(o) for o in trainer.optimizers):
            super().zero_grad(set_to_none)  # type: ignore[misc]

    def configure_gradient_clipping(self, optimizer: Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:  # fmt: skip
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the CLI prints it as one line (exit code 1)."""


class LowMemCallback(pl.Callback):
    """Fit-start checks, a fresh momentum, the training RNG stream, a stop on a non-finite loss;
    see the module docstring.

    Args:
        stop_on_nonfinite_loss: raise :class:`TrainingDiverged` when a training loss is NaN/inf.
    """

    def __init__(self, stop_on_nonfinite_loss: bool = True) -> None:
        self.stop_on_nonfinite_loss = stop_on_nonfinite_loss
        self.rng_stream: dict[str, torch.Tensor] | None = None  # global RNG state(s) of the training stream
        self._saved_optimizers: list[str] | None = None  # the optimizers of a checkpoint being resumed
        self._in_train_batch = False

    # --- fit start -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # before configure_optimizers and any checkpoint restore
            for p in pl_module.parameters():
                p.grad = None
        _check_shared_hparams(pl_module, trainer.datamodule)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = getattr(pl_module, "optimizer_strategy", None)
        if isinstance(strategy, OptimizerStrategy):  # LowMemModule: its strategy's own checks
            strategy.check(trainer)
        for optimizer in trainer.optimizers:
            caps, name = capabilities_of(optimizer), type(optimizer).__name__
            if not isinstance(strategy, OptimizerStrategy):
                check_trainer(trainer, caps, name, single_process=caps.needs_model and getattr(optimizer, "_fused_linear", False))
            if caps.folds_momentum_into_grad and not isinstance(pl_module, FoldedMomentumMixin):
                raise StrategyError(
                    f"{name} keeps its momentum in .grad, which Lightning zeroes at every stage start and before "
                    f"every in-fit validation: {type(pl_module).__name__} must inherit "
                    "lowmem.lightning_modules.FoldedMomentumMixin, placed before LightningModule in its bases "
                    "(or subclass lowmem.lightning_modules.LowMemModule)."
                )
        self._check_resumed_optimizers(trainer)
        _report_loop_options(trainer)
        _warn_unassigned_roles(trainer, pl_module, strategy)
        if self.rng_stream is None:  # neither restored nor left by an earlier fit: start it here
            self.rng_stream = _rng_state(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lowmem.lightning_modules.sampling import ResumableSampler

        loader = trainer.train_dataloader
        if isinstance(getattr(loader, "sampler", None), ResumableSampler):
            # Lightning's advice for loaders without state_dict; this sampler resumes from the loop's counters.
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")

    # --- the training RNG stream -------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        if self.rng_stream is not None:
            _set_rng_state(self.rng_stream, pl_module.device)
        self._in_train_batch = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self.rng_stream = _rng_state(pl_module.device)
        self._in_train_batch = False
        self._stop_if_diverged(trainer, outputs)
        self._checkpoint_last_step(trainer)
        plugin = trainer.precision_plugin
        if isinstance(plugin, FoldedMomentumPrecision):
            pl_module.log("precision/momentum_resets", float(plugin.momentum_resets), on_step=True, batch_size=1)

    def _checkpoint_last_step(self, trainer: pl.Trainer) -> None:
        """Checkpoint the step that reaches ``max_steps`` if the Trainer's (unmonitored)
        ModelCheckpoint would not: a run that ends before its first validation (``max_steps``
        below ``val_check_interval``) would otherwise leave nothing to resume or evaluate. Saved
        inside the batch, as ``every_n_train_steps`` saves, so the loop state resumes exactly."""
        ckpt = trainer.checkpoint_callback
        last = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        if not last or ckpt is None or ckpt.monitor is not None or ckpt._should_skip_saving_checkpoint(trainer):
            return
        # Lightning 2.6's own unmonitored save (pinned below 2.7): its file name, and with
        # save_top_k=1 the previous file removed, as its next save would do.
        ckpt._save_none_monitor_checkpoint(trainer, ckpt._monitor_candidates(trainer))

    def _check_resumed_optimizers(self, trainer: pl.Trainer) -> None:
        """A resumed fit must train the optimizer(s) the checkpoint holds the state of: another
        one would take that state as its own (dead state, or a KeyError at the first step)."""
        saved, self._saved_optimizers = self._saved_optimizers, None
        configured = [_qualified(o) for o in trainer.optimizers]
        if saved is not None and saved != configured:
            raise ConfigError(
                f"the checkpoint holds the state of {', '.join(saved)}, but this run trains {', '.join(configured)}; "
                "resume with the optimizer the checkpoint was trained with (model.init_args.optimizer), or train "
                "from scratch without --ckpt_path"
            )

    def _stop_if_diverged(self, trainer: pl.Trainer, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not self.stop_on_nonfinite_loss or not isinstance(loss, torch.Tensor):
            return
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16: the GradScaler skips overflow steps and lowers the scale
        diverged = trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss.detach()).all()), all=False)
        if diverged:
            raise TrainingDiverged(
                f"training diverged: the loss is not finite at step {trainer.global_step} (on at least one rank); "
                "training stopped before this step was checkpointed, so the checkpoints on disk are the last good "
                "ones. Lower the learning rate, add warm-up or gradient clipping, or check the inputs for NaN."
            )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[OPTIMIZERS_KEY] = [_qualified(o) for o in trainer.optimizers]
        _mark_epoch_started(trainer, checkpoint)
        # A checkpoint written inside a training batch (before on_train_batch_end) holds the live state.
        stream = _rng_state(pl_module.device) if self._in_train_batch else self.rng_stream
        if stream is not None:
            checkpoint[RNG_KEY] = {name: gather_per_rank(pl_module, state) for name, state in stream.items()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._saved_optimizers = checkpoint.get(OPTIMIZERS_KEY)
        saved = checkpoint.get(RNG_KEY)
        if saved is not None:
            self.rng_stream = {name: LowMemCallback.this_rank(trainer, states) for name, states in saved.items()}

    @staticmethod
    def this_rank(trainer: pl.Trainer | None, states: list[torch.Tensor]) -> torch.Tensor:
        """This rank's entry of a :func:`gather_per_rank` list (rank modulo its length), own storage."""
        rank = trainer.global_rank if trainer is not None else 0
        return states[rank % len(states)].clone()


def _mark_epoch_started(trainer: pl.Trainer, checkpoint: dict) -> None:
    """Every checkpoint of a fit is written inside an epoch, which has started but not completed:
    ``epoch_progress`` must read ``ready = started = completed + 1``. A run resumed from a
    checkpoint of an epoch's last batch (Lightning 2.6 restarts that epoch, finds it empty, and
    does not count the next one as started) writes ``ready = completed`` into its later
    checkpoints; resumed again from one of those, it trains one epoch too many (``max_epochs``
    bound: 4 epochs instead of 3). Written as the uninterrupted run writes it."""
    from lightning.pytorch.trainer.states import TrainerFn

    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
    if trainer.state.fn != TrainerFn.FITTING or not progress:
        return
    for scope in ("total", "current"):
        counts = progress.get(scope, {})
        if "completed" in counts and counts.get("ready", 0) <= counts["completed"]:
            counts["ready"] = counts["started"] = counts["completed"] + 1


def _report_loop_options(trainer: pl.Trainer) -> None:
    """One INFO line (rank 0) per optimizer whose options were resolved for this loop by the
    fit-start check (``loop_note()``, e.g. HMAdamW's ``variance_correction=auto``)."""
    from lightning.pytorch.utilities import rank_zero_info

    for optimizer in trainer.optimizers:
        note = getattr(getattr(optimizer, "optimizer", optimizer), "loop_note", None)
        line = note() if callable(note) else None
        if line:
            rank_zero_info(f"lowmem: {line}")


# The optimizers whose update depends on the parameter roles (lowmem.optim.roles), beyond weight decay.
_ACTS_BY_ROLE = ("SlimAdamW", "AdaPM", "AdamMini")


def _warn_unassigned_roles(trainer: pl.Trainer, pl_module: pl.LightningModule, strategy: Any) -> None:
    """One warning line (rank 0) naming the matrices left in ``Role.OTHER``, for role-driven optimizers."""
    from lightning.pytorch.utilities import rank_zero_warn

    from lowmem.optim.roles import unassigned_matrices, unassigned_warning

    acting = [n for n in (type(getattr(o, "optimizer", o)).__name__ for o in trainer.optimizers) if n in _ACTS_BY_ROLE]
    if not acting:
        return
    overrides = strategy.role_overrides if isinstance(strategy, OptimizerStrategy) else None
    message = unassigned_warning(unassigned_matrices(pl_module, overrides), acting[0])
    if message:
        rank_zero_warn(message, category=UserWarning)


def _qualified(optimizer: Any) -> str:
    optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _check_shared_hparams(module: pl.LightningModule, datamodule: Any) -> None:
    """A hyperparameter both the model and the data module take (``block_size``) must agree:
    Lightning refuses the pair later, deep in its logger, with a traceback."""
    data_hparams = getattr(datamodule, "hparams", None) or {}
    shared = {k for k in module.hparams.keys() & data_hparams.keys() if not k.startswith("_")}  # _class_path: the CLI's
    clashes = [k for k in shared if module.hparams[k] != data_hparams[k]]
    if clashes:
        shown = ", ".join(f"model.init_args.{k}={module.hparams[k]!r} vs data.init_args.{k}={data_hparams[k]!r}"
                          for k in sorted(clashes))  # fmt: skip
        raise ConfigError(f"the model and the data module disagree: {shown}; set both to the same value")


def gather_per_rank(module: pl.LightningModule, state: torch.Tensor) -> list[torch.Tensor]:
    """``state`` of every rank, in rank order (an all-gather under DDP; call it on all ranks).

    For per-rank state (RNG) in ``on_save_checkpoint``: only rank 0 writes the checkpoint."""
    trainer = module._trainer
    if trainer is None or trainer.world_size == 1:
        return [state.cpu()]
    # Each row gets its own storage: torch 2.13's set_rng_state/Generator.set_state segfault on a
    # view with a storage offset (also after a torch.save/load round trip).
    return [s.cpu().clone() for s in module.all_gather(state.to(module.device))]


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global RNG state(s) that training on ``device`` draws from (CPU, and CUDA's)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
