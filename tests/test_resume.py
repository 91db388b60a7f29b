"""Exact resume and validation-invariance of real Lightning training, for every optimizer.

For each (model family, optimizer) case three real ``Trainer.fit`` runs of 12 optimizer steps
(5 batches per epoch, so the runs cross two epoch ends, with a cosine LR schedule):

- A: uninterrupted, in-fit validation every 3 batches, ``ModelCheckpoint`` writes step 7
  (mid-epoch: epoch 1, batch 2);
- B: resumed from A's step-7 checkpoint;
- C: like A without any validation.

B and C must end bit for bit where A ends: parameters, ``.grad`` (HMAdam's momentum), the whole
optimizer state dict (v, step, factors, ...), scheduler state, global step and the RNG streams,
and B must train on exactly A's remaining batches. Plain Lightning gives none of this (see the
negative controls at the end): its shuffle draws from the global RNG, its mid-epoch resume is one
batch late, and global RNG draws (dropout) are neither checkpointed nor isolated from validation.
"""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from scripts.lightning_harness import (
    COSINE, FAMILIES, STRATEGIES, BatchRecorder, differences, lm, snapshot, text, trainer,
)  # fmt: skip
from torch.utils.data import DataLoader

from lowmem.lightning_modules import DigitsDataModule, LowMemCallback

STEPS, LIMIT, VAL_EVERY = 12, 5, 3

pytestmark = [
    # Lightning's advice for loaders without state_dict; ResumableSampler resumes from the loop's counters.
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create"),
]

CASES = [("cnn", name) for name in STRATEGIES] + [
    ("lm", "HMAdamW"), ("lm", "AdamW"), ("diffusion", "HMAdamW"), ("diffusion", "AdamW"),
]  # fmt: skip


# Where ModelCheckpoint writes: in on_train_batch_end (every n steps), in on_train_epoch_end, or
# in on_validation_end (after an in-fit validation); Lightning restores each differently.
SAVERS = {
    "steps": lambda path, n: ModelCheckpoint(path, "{step}", every_n_train_steps=n, save_top_k=-1),
    "epoch_end": lambda path, n: ModelCheckpoint(path, "{step}", save_top_k=-1, save_on_train_epoch_end=True),
    "validation_end": lambda path, n: ModelCheckpoint(path, "{step}", save_top_k=-1, save_on_train_epoch_end=False),
}


def _fit(family, name, *, validate=True, ckpt_path=None, checkpoint=None, accumulate=1, data=None):
    make_model, make_data = FAMILIES[family]
    model = make_model(STRATEGIES[name](), lr_scheduler=COSINE)
    recorder = BatchRecorder()
    t = trainer(
        max_steps=STEPS, limit_train_batches=LIMIT, accumulate_grad_batches=accumulate,
        callbacks=[recorder] + ([checkpoint] if checkpoint else []), enable_checkpointing=checkpoint is not None,
        limit_val_batches=2 if validate else 0, val_check_interval=VAL_EVERY if validate else None,
    )  # fmt: skip
    t.fit(model, data or make_data(), ckpt_path=ckpt_path)
    return model, t, recorder.batches


def _check_resume_and_validation(tmp_path, family, name, save_at=7, accumulate=1, saver="steps"):
    checkpoint = SAVERS[saver](tmp_path, save_at)
    model_a, trainer_a, batches_a = _fit(family, name, checkpoint=checkpoint, accumulate=accumulate)
    ckpt = tmp_path / f"step={save_at}.ckpt"
    model_b, trainer_b, batches_b = _fit(family, name, ckpt_path=ckpt, accumulate=accumulate)
    model_c, trainer_c, batches_c = _fit(family, name, validate=False, accumulate=accumulate)
    a = snapshot(model_a, trainer_a)
    assert a["global_step"] == STEPS
    assert differences(a, snapshot(model_b, trainer_b)) == [], "resumed run diverged"
    assert differences(a, snapshot(model_c, trainer_c)) == [], "in-fit validation changed the trajectory"
    assert batches_b == [b for b in batches_a if b[0] >= save_at], "resumed run trained on other batches"
    assert batches_c == batches_a


@pytest.mark.parametrize(("family", "name"), CASES, ids=[f"{family}-{name}" for family, name in CASES])
def test_resume_and_validation_are_exact(tmp_path, family, name):
    _check_resume_and_validation(tmp_path, family, name)


RESUME_POINTS = {
    "last-batch-of-epoch": dict(save_at=5),
    "epoch-end-hook": dict(save_at=10, saver="epoch_end"),
    "after-validation": dict(save_at=8, saver="validation_end"),
    "accumulate-2": dict(save_at=4, accumulate=2),
}


@pytest.mark.parametrize("point", RESUME_POINTS)
def test_hmadamw_resume_from_every_kind_of_checkpoint(tmp_path, point):
    """Checkpoints written at an epoch's last batch, in ``on_train_epoch_end`` (Lightning then
    runs an empty epoch and counts one epoch too many), after an in-fit validation, and mid-epoch
    under gradient accumulation with an incomplete window at each epoch end (5 batches, windows
    of 2)."""
    _check_resume_and_validation(tmp_path, "cnn", "HMAdamW", **RESUME_POINTS[point])


# --------------------------------------------------------------------------- negative controls
class GlobalShuffleDigits(DigitsDataModule):
    """Digits with Lightning's usual train loader: shuffle from the global RNG."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, drop_last=True)


def test_negative_control_global_rng_shuffle_does_not_resume(tmp_path):
    """The same resume with a plain ``shuffle=True`` loader trains on other batches after the
    resume, so the exactness above is the sampler's doing, and the check can fail."""
    saver = SAVERS["steps"](tmp_path, 7)
    _, _, batches_a = _fit("cnn", "HMAdamW", checkpoint=saver, data=GlobalShuffleDigits(batch_size=16))
    _, _, batches_b = _fit("cnn", "HMAdamW", ckpt_path=tmp_path / "step=7.ckpt", data=GlobalShuffleDigits(batch_size=16))
    assert batches_b != [b for b in batches_a if b[0] >= 7]


def _lm_run(tmp_path, *, validate, ckpt_path=None, save_at=None):
    model = lm(STRATEGIES["HMAdamW"](), dropout=0.2)
    callbacks = [SAVERS["steps"](tmp_path, save_at)] if save_at else []
    t = trainer(
        max_steps=8, limit_train_batches=LIMIT, limit_val_batches=2 if validate else 0,
        val_check_interval=VAL_EVERY if validate else None, callbacks=callbacks, enable_checkpointing=bool(save_at),
    )  # fmt: skip
    t.fit(model, text(), ckpt_path=ckpt_path)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_negative_control_dropout_without_the_training_rng_stream(tmp_path, monkeypatch):
    """LM with dropout 0.2: with LowMemCallback's training RNG stream validation and resume are
    exact; with the stream switched off (plain Lightning: dropout draws from the global RNG,
    which DataLoader iterators also draw from and checkpoints do not store) both diverge."""
    reference = _lm_run(tmp_path / "on", validate=True, save_at=4)
    assert differences(reference, _lm_run(tmp_path, validate=False)) == []
    assert differences(reference, _lm_run(tmp_path, validate=True, ckpt_path=tmp_path / "on" / "step=4.ckpt")) == []

    monkeypatch.setattr(LowMemCallback, "on_train_batch_start", lambda self, trainer, module, batch, batch_idx: None)
    monkeypatch.setattr(LowMemCallback, "on_load_checkpoint", lambda self, trainer, module, checkpoint: None)
    off = _lm_run(tmp_path / "off", validate=True, save_at=4)
    assert differences(off, _lm_run(tmp_path, validate=False)) != []
    assert differences(off, _lm_run(tmp_path, validate=True, ckpt_path=tmp_path / "off" / "step=4.ckpt")) != []
