"""Every value a config can hold is checked: a bad one is a one-line ConfigError that names the key
as a user writes it, the value and the fix, at construction (cheap) or when a fit starts."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.optim import lr_scheduler as sched

from lowmem.cli import main
from lowmem.lightning_modules import (
    DiffusionModel, DigitsDataModule, GPTConfig, ImageClassifier, LanguageModel, ResumableSampler,
    StdlibTextDataModule, UNet,
)  # fmt: skip
from lowmem.lightning_modules.callbacks import MemoryMonitor
from lowmem.lightning_modules.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")
DATA = list(range(100))  # a dataset for the sampler: only its length counts


def _linear(**kw):
    return functools.partial(sched.LinearLR, **kw)


# (constructor, kwargs, the message's start: the key as a user writes it and the value)
BAD = [
    # ImageClassifier
    (ImageClassifier, {"in_channels": 0}, "model.init_args.in_channels=0"),
    (ImageClassifier, {"in_channels": True}, "model.init_args.in_channels=true"),
    (ImageClassifier, {"num_classes": 1}, "model.init_args.num_classes=1"),
    (ImageClassifier, {"num_classes": 10.0}, "model.init_args.num_classes=10.0"),
    (ImageClassifier, {"widths": []}, "model.init_args.widths=[]"),
    (ImageClassifier, {"widths": [0, 8]}, "model.init_args.widths=[0, 8]"),
    (ImageClassifier, {"widths": [8, -1]}, "model.init_args.widths=[8, -1]"),
    (ImageClassifier, {"widths": [12, 24]}, "model.init_args.widths=[12, 24]"),  # GroupNorm(8, 12)
    (ImageClassifier, {"widths": 8}, "model.init_args.widths=8"),
    (ImageClassifier, {"blocks_per_stage": 0}, "model.init_args.blocks_per_stage=0"),
    # LowMemModule's own arguments, through a subclass
    (ImageClassifier, {"monitor": ""}, "model.init_args.monitor=''"),
    (ImageClassifier, {"optimizer": "adamw"}, "model.init_args.optimizer='adamw'"),
    (ImageClassifier, {"lr_scheduler": 3}, "model.init_args.lr_scheduler=3"),
    (ImageClassifier, {"lr_scheduler": _linear(total_iters=-5)}, "model.init_args.lr_scheduler.init_args.total_iters=-5"),
    (ImageClassifier, {"lr_scheduler": _linear(total_iters=0)}, "model.init_args.lr_scheduler.init_args.total_iters=0"),
    (ImageClassifier, {"lr_scheduler": _linear(start_factor=NAN)}, "model.init_args.lr_scheduler.init_args.start_factor=nan"),
    (ImageClassifier, {"lr_scheduler": _linear(start_factor=0.0)}, "model.init_args.lr_scheduler.init_args.start_factor=0.0"),
    (ImageClassifier, {"lr_scheduler": _linear(end_factor=2.0)}, "model.init_args.lr_scheduler.init_args.end_factor=2.0"),
    (ImageClassifier, {"lr_scheduler": _linear(last_epoch=-2)}, "model.init_args.lr_scheduler.init_args.last_epoch=-2"),
    (ImageClassifier, {"lr_scheduler": functools.partial(sched.StepLR, step_size=0)},
     "model.init_args.lr_scheduler.init_args.step_size=0"),
    (ImageClassifier, {"lr_scheduler": functools.partial(sched.CosineAnnealingLR, T_max=0)},
     "model.init_args.lr_scheduler.init_args.T_max=0"),
    (ImageClassifier, {"lr_scheduler": functools.partial(sched.ExponentialLR, gamma=-1.0)},
     "model.init_args.lr_scheduler.init_args.gamma=-1.0"),
    (ImageClassifier, {"lr_scheduler": functools.partial(sched.MultiStepLR, milestones=[])},
     "model.init_args.lr_scheduler.init_args.milestones=[]"),
    (ImageClassifier, {"lr_scheduler": functools.partial(sched.ReduceLROnPlateau, factor=1.5)},
     "model.init_args.lr_scheduler.init_args.factor=1.5"),
    (ImageClassifier, {"lr_scheduler": functools.partial(sched.OneCycleLR, max_lr=[0.1, INF], total_steps=10)},
     "model.init_args.lr_scheduler.init_args.max_lr=inf"),
    # DiffusionModel and its U-Net
    (DiffusionModel, {"in_channels": -1}, "model.init_args.in_channels=-1"),
    (DiffusionModel, {"image_size": 0}, "model.init_args.image_size=0"),
    (DiffusionModel, {"image_size": 6, "channels": [8, 16, 32]}, "model.init_args.image_size=6"),
    (DiffusionModel, {"channels": []}, "model.init_args.channels=[]"),
    (DiffusionModel, {"channels": [4, 6]}, "model.init_args.channels=[4, 6]"),  # 6 + 6 = 12 channels on the way up
    (DiffusionModel, {"time_dim": 15}, "model.init_args.time_dim=15"),
    (DiffusionModel, {"time_dim": 0}, "model.init_args.time_dim=0"),
    (DiffusionModel, {"timesteps": 0}, "model.init_args.timesteps=0"),
    (DiffusionModel, {"beta_start": NAN}, "model.init_args.beta_start=nan"),
    (DiffusionModel, {"beta_start": 0.0}, "model.init_args.beta_start=0.0"),
    (DiffusionModel, {"beta_end": 1.0}, "model.init_args.beta_end=1.0"),
    (DiffusionModel, {"beta_end": INF}, "model.init_args.beta_end=inf"),
    (DiffusionModel, {"beta_start": 0.05, "beta_end": 0.02}, "model.init_args.beta_start=0.05"),
    (DiffusionModel, {"noise_seed": 1.5}, "model.init_args.noise_seed=1.5"),
    (DiffusionModel, {"noise_seed": False}, "model.init_args.noise_seed=false"),
    (DiffusionModel, {"noise_seed": 2**70}, f"model.init_args.noise_seed={2**70}"),
    (DiffusionModel, {"sample_every_n_epochs": -1}, "model.init_args.sample_every_n_epochs=-1"),
    (DiffusionModel, {"n_samples": 0}, "model.init_args.n_samples=0"),
    (UNet, {"channels": (12,)}, "UNet.channels=[12]"),
    # LanguageModel and its GPT
    (LanguageModel, {"n_embd": 32, "n_head": 3}, "model.init_args.n_head=3"),
    (LanguageModel, {"n_head": 0}, "model.init_args.n_head=0"),
    (LanguageModel, {"n_embd": -8}, "model.init_args.n_embd=-8"),
    (LanguageModel, {"n_layer": 0}, "model.init_args.n_layer=0"),
    (LanguageModel, {"n_layer": True}, "model.init_args.n_layer=true"),
    (LanguageModel, {"vocab_size": 0}, "model.init_args.vocab_size=0"),
    (LanguageModel, {"block_size": 0}, "model.init_args.block_size=0"),
    (LanguageModel, {"dropout": 1.0}, "model.init_args.dropout=1.0"),
    (LanguageModel, {"dropout": -0.1}, "model.init_args.dropout=-0.1"),
    (LanguageModel, {"dropout": NAN}, "model.init_args.dropout=nan"),
    (LanguageModel, {"fused_qkv": 1}, "model.init_args.fused_qkv=1"),
    (LanguageModel, {"tie_weights": "yes"}, "model.init_args.tie_weights='yes'"),
    (GPTConfig, {"n_embd": 30, "n_head": 4}, "GPTConfig.n_head=4"),
    # DigitsDataModule
    (DigitsDataModule, {"batch_size": 0}, "data.init_args.batch_size=0"),
    (DigitsDataModule, {"batch_size": True}, "data.init_args.batch_size=true"),
    (DigitsDataModule, {"val_fraction": 0.0}, "data.init_args.val_fraction=0.0"),
    (DigitsDataModule, {"val_fraction": 1.5}, "data.init_args.val_fraction=1.5"),
    (DigitsDataModule, {"val_fraction": NAN}, "data.init_args.val_fraction=nan"),
    (DigitsDataModule, {"val_fraction": 1e-4}, "data.init_args.val_fraction=0.0001"),  # holds out no image
    (DigitsDataModule, {"test_fraction": -0.1}, "data.init_args.test_fraction=-0.1"),
    (DigitsDataModule, {"val_fraction": 0.5, "test_fraction": 0.5}, "data.init_args.val_fraction=0.5"),
    (DigitsDataModule, {"num_workers": -1}, "data.init_args.num_workers=-1"),
    (DigitsDataModule, {"seed": 1.5}, "data.init_args.seed=1.5"),
    (DigitsDataModule, {"split_seed": None}, "data.init_args.split_seed=null"),
    # StdlibTextDataModule
    (StdlibTextDataModule, {"block_size": 0}, "data.init_args.block_size=0"),
    (StdlibTextDataModule, {"batch_size": -4}, "data.init_args.batch_size=-4"),
    (StdlibTextDataModule, {"max_bytes": 5000}, "data.init_args.max_bytes=5000"),
    (StdlibTextDataModule, {"val_fraction": 1.0}, "data.init_args.val_fraction=1.0"),
    (StdlibTextDataModule, {"val_fraction": INF}, "data.init_args.val_fraction=inf"),
    (StdlibTextDataModule, {"num_workers": -2}, "data.init_args.num_workers=-2"),
    (StdlibTextDataModule, {"seed": "0"}, "data.init_args.seed='0'"),
    # MemoryMonitor and the sampler
    (MemoryMonitor, {"log_every_n_steps": 0}, "trainer.callbacks[MemoryMonitor].init_args.log_every_n_steps=0"),
    (MemoryMonitor, {"log_every_n_steps": 2.5}, "trainer.callbacks[MemoryMonitor].init_args.log_every_n_steps=2.5"),
    (functools.partial(ResumableSampler, DATA), {"batch_size": 0}, "ResumableSampler.batch_size=0"),
    (functools.partial(ResumableSampler, DATA, 4), {"seed": 0.5}, "ResumableSampler.seed=0.5"),
    (functools.partial(ResumableSampler, DATA, 4), {"num_replicas": 2, "rank": 2}, "ResumableSampler.rank=2"),
    (functools.partial(ResumableSampler, DATA, 4), {"num_replicas": 0, "rank": 0}, "ResumableSampler.num_replicas=0"),
]


def _short(value):
    if isinstance(value, functools.partial):
        return value.func.__name__ + "(" + ",".join(f"{k}={v!r}" for k, v in value.keywords.items()) + ")"
    return repr(value)


def _id(case):
    build, kwargs, _ = case
    name = getattr(build, "__name__", None) or build.func.__name__
    return f"{name}-" + "-".join(f"{k}={_short(v)}"[:40] for k, v in kwargs.items())


@pytest.mark.parametrize(("build", "kwargs", "key_value"), BAD, ids=[_id(c) for c in BAD])
def test_bad_value_is_one_line_naming_key_value_and_fix(build, kwargs, key_value):
    with pytest.raises(ConfigError) as info:
        build(**kwargs)
    message = str(info.value)
    assert message.startswith(key_value + ":") or message.startswith(key_value + ","), message
    problem_and_fix = message[len(key_value) + 1 :]
    assert "; " in problem_and_fix and len(problem_and_fix.split("; ")[-1]) > 5, message  # a fix follows
    assert "\n" not in message


GOOD = [
    (ImageClassifier, {"widths": [4], "num_classes": 2}),  # below 8 channels GroupNorm uses one group per channel
    (ImageClassifier, {"lr_scheduler": _linear(start_factor=1.0, end_factor=0.0, total_iters=1)}),
    (ImageClassifier, {"lr_scheduler": functools.partial(sched.OneCycleLR, max_lr=[0.1], total_steps=10)}),
    (DiffusionModel, {"channels": [4, 8], "time_dim": 8, "timesteps": 1, "sample_every_n_epochs": 0, "noise_seed": -3}),
    (DiffusionModel, {"channels": [8], "image_size": 5}),  # one level: any size
    (LanguageModel, {"n_layer": 1, "n_head": 3, "n_embd": 12, "dropout": 0.0, "block_size": 1}),
    (DigitsDataModule, {"test_fraction": 0.0, "val_fraction": 0.999}),
    (StdlibTextDataModule, {"block_size": 1, "max_bytes": 10_000}),
    (MemoryMonitor, {"log_every_n_steps": None}),
    (functools.partial(ResumableSampler, DATA, 4), {"num_replicas": 2, "rank": 1}),
]


@pytest.mark.parametrize(("build", "kwargs"), GOOD, ids=[_id((*c, None)) for c in GOOD])
def test_boundary_values_are_accepted(build, kwargs):
    build(**kwargs)


def _attached(module, datamodule):
    """``module`` as Lightning leaves it at ``setup``: attached to a trainer fitting ``datamodule``."""
    module._trainer = SimpleNamespace(datamodule=datamodule)
    return module


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (ImageClassifier(in_channels=3, widths=[8]), "model.init_args.in_channels=3, but the data (DigitsDataModule) has "
         "1-channel images; set model.init_args.in_channels=1"),
        (ImageClassifier(num_classes=5, widths=[8]), "model.init_args.num_classes=5, but the data (DigitsDataModule) has "
         "10 classes; set model.init_args.num_classes=10"),
        (DiffusionModel(image_size=16, channels=[8]), "model.init_args.image_size=16, but the data (DigitsDataModule) "
         "has 8x8 images"),
        (DiffusionModel(in_channels=3, channels=[8]), "model.init_args.in_channels=3, but the data"),
    ],
    ids=["classifier-channels", "classifier-classes", "diffusion-size", "diffusion-channels"],
)
def test_model_is_checked_against_its_data_at_setup(model, expected):
    with pytest.raises(ConfigError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        _attached(model, DigitsDataModule()).setup("fit")


def test_language_model_vocabulary_must_cover_the_data():
    data = StdlibTextDataModule()
    with pytest.raises(ConfigError, match=r"^model.init_args.vocab_size=100, but the data \(StdlibTextDataModule\) "
                                          r"has a vocabulary of 256 tokens; set model.init_args.vocab_size >= 256"):  # fmt: skip
        _attached(LanguageModel(vocab_size=100, n_layer=1, n_embd=16), data).setup("fit")
    _attached(LanguageModel(vocab_size=300, n_layer=1, n_embd=16), data).setup("fit")  # a larger vocabulary is fine
    _attached(ImageClassifier(widths=[8]), None).setup("fit")  # no data module attached: nothing to check


def test_data_that_gives_no_batch_is_refused_at_setup():
    with pytest.raises(ConfigError, match=r"^data.init_args.batch_size=2000: larger than the 1259 training samples"):
        DigitsDataModule(batch_size=2000).setup()
    text = StdlibTextDataModule(block_size=64, max_bytes=10_000, val_fraction=0.005)  # 50 bytes held out
    with pytest.raises(ConfigError, match=r"^data.init_args.val_fraction=0.005: holds out 50 bytes, less than one window"):
        text.setup()
    ranks = DigitsDataModule(batch_size=700)
    ranks.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ConfigError, match=r"larger than the 629 training samples per rank \(2 ranks\)"):
        ranks.setup()


# --- the command line: one `lowmem: error:` line, exit code 2 ---------------------------------
@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _config(family: str) -> str:
    return str(ROOT / "configs" / f"{family}_adamw.yaml")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # jsonargparse refuses a bool for an int itself
        ([_config("cnn"), "--model.init_args.blocks_per_stage=true"], "model.init_args.blocks_per_stage=True: expected an int"),
        ([_config("cnn"), "--model.init_args.optimizer.init_args.lr=abc"],
         "model.init_args.optimizer.init_args.lr=abc: expected a number"),
        ([_config("cnn"), "--model.init_args.lr_scheduler.init_args.total_iters=abc"],
         "model.init_args.lr_scheduler.init_args.total_iters=abc: expected an int"),
        # the constructor: n_head must divide n_embd
        ([_config("lm"), "--model.init_args.n_head=3"],
         "model.init_args.n_head=3: must divide model.init_args.n_embd=128 (each head gets n_embd / n_head channels); "
         "choose a divisor such as 4"),
        # a scheduler argument torch takes silently; .nan passes the parser as a float
        ([_config("cnn"), "--model.init_args.lr_scheduler.init_args.total_iters=-5"],
         "model.init_args.lr_scheduler.init_args.total_iters=-5: must be a whole number of steps >= 1"),
        ([_config("diffusion"), "--model.init_args.beta_start=.nan"], "model.init_args.beta_start=nan: must be a finite"),
        # at fit start: the model against the data
        ([_config("cnn"), "--model.init_args.in_channels=3", "--model.init_args.widths=[8]"],
         "model.init_args.in_channels=3, but the data (DigitsDataModule) has 1-channel images"),
    ],
    ids=["parser-bool-for-int", "parser-optimizer-lr", "parser-scheduler-arg", "model-n-head", "scheduler-total-iters", "diffusion-nan-beta", "model-vs-data"],
)
def test_command_line_gives_one_error_line_and_exit_code_2(args, expected, in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", *args, "--trainer.max_steps=1", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("lowmem: error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], err
    assert "Traceback" not in err, err
    assert not list(in_tmp.glob("**/*.ckpt"))  # refused before any training


TRAINER_CASES = {  # Lightning would divide by zero mid-fit, or take the value silently
    "val_check_interval=0": "trainer.val_check_interval=0: must be an int >= 1",
    "val_check_interval=0.0": "trainer.val_check_interval=0.0: a float is a fraction of an epoch and must be in (0, 1]",
    "accumulate_grad_batches=0": "trainer.accumulate_grad_batches=0: must be an int >= 1",
    "check_val_every_n_epoch=0": "trainer.check_val_every_n_epoch=0: must be an int >= 1",
    "log_every_n_steps=-1": "trainer.log_every_n_steps=-1: must be an int >= 1",
    "num_sanity_val_steps=-5": "trainer.num_sanity_val_steps=-5: must be an int >= 0",
}


@pytest.mark.parametrize("setting", list(TRAINER_CASES))
def test_trainer_settings_lightning_does_not_check_are_one_line(setting, in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", _config("cnn"), f"--trainer.{setting}", "--trainer.max_steps=1",
              "--trainer.logger=false"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("lowmem: error:")]
    assert len(error_lines) == 1 and error_lines[0].startswith("lowmem: error: " + TRAINER_CASES[setting]), err


def test_a_constructor_error_line_starts_with_the_key(in_tmp, capsys):
    """No wrapper text in front of the key a user has to find in the config."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", _config("lm"), "--model.init_args.n_head=3", "--trainer.max_steps=1"])
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lowmem: error:")]
    assert error_lines == [error_lines[0]] and error_lines[0].startswith("lowmem: error: model.init_args.n_head=3:")


def test_the_diffusion_noise_seed_and_the_data_seed_are_set_independently():
    """The model's noise stream and the data module's training order are different seeds: setting
    one alone is no hyperparameter clash for Lightning's merge of the two modules' hparams."""
    model, data = DiffusionModel(channels=[4, 8], time_dim=8, noise_seed=5), DigitsDataModule(seed=0)
    assert not set(model.hparams) & set(data.hparams)
