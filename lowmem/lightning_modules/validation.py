"""Checks for the values a config can hold: each failure is one :class:`ConfigError` line that names
the key as a user writes it (``model.init_args.n_head``), the value, what is wrong and the fix.

    check_positive_int("model.init_args.n_layer", n_layer)
    -> ConfigError("model.init_args.n_layer=0: must be a whole number >= 1; set e.g. 2")

jsonargparse already refuses values of the wrong type on the command line and in YAML (a string
or ``1.5`` for an ``int``, ``true`` for an ``int``); these checks catch what it lets through
(ranges, NaN/inf floats written ``.nan``/``.inf``, empty lists, values that contradict each other)
and everything a Python caller passes directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

from lowmem.lightning_modules.errors import ConfigError

__all__ = [
    "MODEL",
    "DATA",
    "show",
    "config_error",
    "check_int",
    "check_positive_int",
    "check_nonnegative_int",
    "check_optional_positive_int",
    "check_seed",
    "check_float",
    "check_finite",
    "check_fraction",
    "check_bool",
    "check_int_list",
    "check_str",
    "check_scheduler",
    "check_matches_data",
    "check_group_norm",
    "check_a_batch_per_rank",
    "scheduler_class_and_kwargs",
]

MODEL = "model.init_args."  # the key prefix of a LightningModule's constructor arguments
DATA = "data.init_args."  # ... and of a LightningDataModule's

_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def show(value: Any) -> str:
    """``value`` as a user writes it in YAML or on the command line (``true``, ``null``, ``[8, 16]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def config_error(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    """``key=value: problem; fix`` as a ConfigError (one line)."""
    return ConfigError(f"{key}={show(value)}: {problem}; {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_int(key: str, value: Any, minimum: int | None = None, *, problem: str | None = None,
              fix: str | None = None) -> int:  # fmt: skip
    """A whole number (not a bool, not a float), ``>= minimum`` if given."""
    bound = f" >= {minimum}" if minimum is not None else ""
    problem = problem or f"must be a whole number{bound}"
    fix = fix or f"set a whole number{bound}"
    if not _is_int(value):
        kind = "a bool" if isinstance(value, bool) else f"a {type(value).__name__}"
        raise config_error(key, value, f"{problem}, not {kind}", fix)
    if minimum is not None and value < minimum:
        raise config_error(key, value, problem, fix)
    return int(value)


def check_positive_int(key: str, value: Any, *, problem: str | None = None, fix: str | None = None) -> int:
    return check_int(key, value, 1, problem=problem, fix=fix)


def check_nonnegative_int(key: str, value: Any, *, problem: str | None = None, fix: str | None = None) -> int:
    return check_int(key, value, 0, problem=problem, fix=fix)


def check_optional_positive_int(key: str, value: Any, *, fix: str | None = None) -> int | None:
    """``null`` or a whole number >= 1."""
    if value is None:
        return None
    return check_int(key, value, 1, problem="must be a whole number >= 1 or null", fix=fix)


def check_seed(key: str, value: Any) -> int:
    """A seed: a whole number torch's generators accept."""
    low, high = _SEED_RANGE
    seed = check_int(key, value, problem="a seed must be a whole number", fix="set an integer such as 0")
    if not low <= seed <= high:
        raise config_error(key, value, f"a seed must lie in [{low}, {high}]", "set a smaller integer such as 0")
    return seed


def check_finite(key: str, value: Any, *, fix: str | None = None) -> float:
    """A real number that is neither NaN nor infinite (``.nan``/``.inf`` in YAML pass the parser)."""
    if not _is_real(value):
        kind = "a bool" if isinstance(value, bool) else f"a {type(value).__name__}"
        raise config_error(key, value, f"must be a number, not {kind}", fix or "write a number such as 0.1")
    if not math.isfinite(value):
        raise config_error(key, value, "must be a finite number", fix or "write a finite number (not .nan/.inf)")
    return float(value)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "finite"


def check_float(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, problem: str | None = None,
                fix: str | None = None) -> float:  # fmt: skip
    """A finite real number within the given bounds (closed unless ``*_open``)."""
    interval = _interval(low, high, low_open, high_open)
    fix = fix or f"set a number {interval}"
    number = check_finite(key, value, fix=fix)
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise config_error(key, value, problem or f"must be a number {interval}", fix)
    return number


def check_fraction(key: str, value: Any, *, low_open: bool = True, high_open: bool = True, problem: str | None = None,
                   fix: str | None = None) -> float:  # fmt: skip
    """A fraction or probability in [0, 1], open at either end as asked (default: (0, 1))."""
    return check_float(key, value, 0.0, 1.0, low_open=low_open, high_open=high_open, problem=problem, fix=fix)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise config_error(key, value, "must be true or false", "write true or false")
    return value


def check_int_list(key: str, value: Any, minimum: int = 1, *, fix: str | None = None) -> list[int]:
    """A non-empty list of whole numbers, each ``>= minimum``."""
    fix = fix or f"give a non-empty list of whole numbers >= {minimum}, e.g. [32, 64]"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise config_error(key, value, "must be a list of whole numbers", fix)
    if not value:
        raise config_error(key, value, "must not be empty", fix)
    for item in value:
        if not _is_int(item) or item < minimum:
            raise config_error(key, value, f"every entry must be a whole number >= {minimum} ({show(item)} is not)", fix)
    return [int(v) for v in value]


def check_str(key: str, value: Any, *, fix: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise config_error(key, value, "must be a non-empty string", fix)
    return value


# --- learning-rate schedulers ---------------------------------------------------------------
# torch checks some scheduler arguments (LinearLR's start_factor) but trains silently with others
# (LinearLR total_iters=-5 or 0 never warms up; StepLR step_size=0 and CosineAnnealingLR T_max=0
# divide by zero at the first step; a NaN factor makes every learning rate NaN).
_Check = Callable[[str, Any], Any]


def _nonneg(key: str, value: Any) -> Any:
    return check_float(key, value, 0.0)


def _positive(key: str, value: Any) -> Any:
    return check_float(key, value, 0.0, low_open=True)


def _each(check: _Check) -> _Check:
    """``check`` on a number or on each entry of a list (per-group values such as OneCycleLR's max_lr)."""

    def run(key: str, value: Any) -> Any:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            check(key, item)

    return run


def _steps(example: str) -> _Check:
    """A length in optimizer steps (scheduler steps, which LowMemModule takes every optimizer step)."""

    def check(key: str, value: Any) -> Any:
        return check_positive_int(key, value, problem="must be a whole number of steps >= 1", fix=f"set e.g. {example}")

    return check


def _optional_steps(key: str, value: Any) -> Any:
    return check_optional_positive_int(key, value, fix="set a whole number of steps, e.g. 1000, or null")


def _milestones(key: str, value: Any) -> Any:
    return check_int_list(key, value, 1, fix="give increasing optimizer steps >= 1, e.g. [100, 200]")


_SCHEDULER_RULES: dict[str, dict[str, _Check]] = {
    "LinearLR": {
        "start_factor": lambda k, v: check_float(k, v, 0.0, 1.0, low_open=True, fix="set a factor in (0, 1], e.g. 0.05"),
        "end_factor": lambda k, v: check_float(k, v, 0.0, 1.0, fix="set a factor in [0, 1], e.g. 1.0"),
        "total_iters": _steps("30 (the warm-up length)"),
    },
    "ConstantLR": {
        "factor": lambda k, v: check_float(k, v, 0.0, 1.0, fix="set a factor in [0, 1], e.g. 0.5"),
        "total_iters": _steps("30"),
    },
    "PolynomialLR": {"total_iters": _steps("trainer.max_steps"), "power": _nonneg},
    "StepLR": {"step_size": _steps("100"), "gamma": _positive},
    "MultiStepLR": {"milestones": _milestones, "gamma": _positive},
    "ExponentialLR": {"gamma": _positive},
    "CosineAnnealingLR": {"T_max": _steps("trainer.max_steps"), "eta_min": _nonneg},
    "CosineAnnealingWarmRestarts": {"T_0": _steps("100"), "T_mult": _steps("1 (equal cycles) or 2"), "eta_min": _nonneg},
    "OneCycleLR": {
        "max_lr": _each(_positive), "total_steps": _optional_steps, "epochs": _optional_steps,
        "steps_per_epoch": _optional_steps, "pct_start": lambda k, v: check_fraction(k, v),
        "div_factor": _positive, "final_div_factor": _positive,
    },  # fmt: skip
    "CyclicLR": {"base_lr": _each(_nonneg), "max_lr": _each(_positive), "step_size_up": _steps("2000"),
                 "step_size_down": _optional_steps, "gamma": _positive},  # fmt: skip
    "ReduceLROnPlateau": {
        "factor": lambda k, v: check_fraction(k, v, fix="set a factor in (0, 1), e.g. 0.1"),
        "patience": lambda k, v: check_nonnegative_int(k, v), "cooldown": lambda k, v: check_nonnegative_int(k, v),
        "threshold": _nonneg, "min_lr": _each(_nonneg), "eps": _nonneg,
    },  # fmt: skip
}


def scheduler_class_and_kwargs(factory: Any) -> tuple[type, dict[str, Any]] | None:
    """The scheduler class and keyword arguments of a scheduler callable, when it shows them:
    jsonargparse's ``partial(instantiator, cls, **init_args)`` or ``functools.partial(cls, ...)``."""
    func, args, keywords = getattr(factory, "func", None), getattr(factory, "args", ()), getattr(factory, "keywords", None)
    if not isinstance(keywords, dict):
        return None
    if isinstance(func, type):
        return func, keywords
    if args and isinstance(args[-1], type):
        return args[-1], keywords
    return None


def check_scheduler(key: str, factory: Any) -> None:
    """The init_args of a scheduler callable (``model.init_args.lr_scheduler``): torch's schedulers
    (and their subclasses) by the rules above; for any scheduler ``last_epoch >= -1`` and every
    float finite."""
    found = scheduler_class_and_kwargs(factory)
    if found is None:
        return
    cls, kwargs = found
    # torch's scheduler, or the torch scheduler it subclasses (lightning.pytorch.cli.ReduceLROnPlateau)
    torch_base = next((c for c in cls.__mro__ if c.__module__.startswith("torch.optim") and c.__name__ in _SCHEDULER_RULES),
                      None)  # fmt: skip
    rules = _SCHEDULER_RULES[torch_base.__name__] if torch_base is not None else {}
    for name, value in kwargs.items():
        arg_key = f"{key}.init_args.{name}"
        if name in rules:
            rules[name](arg_key, value)
        elif name == "last_epoch":
            check_int(arg_key, value, -1, fix="leave it at -1 (resume restores the scheduler itself)")
        elif _is_real(value) and not _is_int(value):
            check_finite(arg_key, value)


# --- the model against its data -------------------------------------------------------------
def check_matches_data(module: Any, key: str, value: int, attribute: str, what: str, *, at_least: bool = False) -> None:
    """At ``setup``: the model's ``value`` (config ``key``) against the attached data module's
    ``attribute`` (``DigitsDataModule.image_channels``...), equal or (``at_least``) not smaller.
    Data modules without the attribute (streaming, a user's own) are not checked. ``what`` is
    the data's property in words, with ``{}`` for its value (``"{}-channel images"``)."""
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    expected = getattr(datamodule, attribute, None)
    if not _is_int(expected) or (value >= expected if at_least else value == expected):
        return
    fix = f"set {key} >= {expected}" if at_least else f"set {key}={expected}"
    raise ConfigError(f"{key}={show(value)}, but the data ({type(datamodule).__name__}) has {what.format(expected)}; {fix}")


def check_group_norm(key: str, value: Any, widths: list[int], *, fix: str) -> None:
    """Every width ``n`` the network normalizes is split into ``min(8, n)`` GroupNorm groups."""
    for n in widths:
        if n % min(8, n):
            raise config_error(key, value, f"gives a layer of {n} channels, which GroupNorm's 8 groups do not divide", fix)


def check_a_batch_per_rank(key: str, batch_size: int, n_train: int, trainer: Any) -> None:
    """At ``setup``: the training split gives each rank at least one full batch (the loaders drop
    the last partial one), else every epoch trains zero steps, silently."""
    ranks = getattr(trainer, "world_size", 1) if trainer is not None else 1
    per_rank = n_train // ranks
    if batch_size > per_rank:
        where = f" per rank ({ranks} ranks)" if ranks > 1 else ""
        raise config_error(key, batch_size, f"larger than the {per_rank} training samples{where}, so an epoch has no "
                           "full batch", f"set at most {max(1, per_rank)}, or hold out less for validation")  # fmt: skip
