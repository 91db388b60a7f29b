"""Trainer settings Lightning does not check itself, refused in one line before the Trainer exists.

Lightning validates most ``trainer.*`` keys (``max_steps``, ``precision``, ``limit_*_batches``,
``devices``), but a zero ``val_check_interval``, ``accumulate_grad_batches`` or
``check_val_every_n_epoch`` reaches a modulo deep in its loops (``ZeroDivisionError`` after the
first batch), and a negative ``log_every_n_steps`` or ``num_sanity_val_steps`` is taken silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lowmem.lightning_modules.errors import ConfigError

__all__ = ["check_trainer_config"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse(key: str, value: Any, need: str) -> ConfigError:
    return ConfigError(f"trainer.{key}={value!r}: {need}")


def check_trainer_config(trainer: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming ``trainer.<key>``, its value and the fix for a setting
    Lightning would crash on mid-fit or take silently."""
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and (not _is_int(accumulate) or accumulate < 1):
        raise _refuse("accumulate_grad_batches", accumulate, "must be an int >= 1 (micro-batches per optimizer step)")
    interval = trainer.get("val_check_interval")
    if interval is not None:
        if _is_int(interval) and interval < 1:
            raise _refuse("val_check_interval", interval, "must be an int >= 1 (training batches between validations), "
                          "a fraction of an epoch in (0, 1], or null")  # fmt: skip
        if isinstance(interval, float) and not (0.0 < interval <= 1.0):
            raise _refuse("val_check_interval", interval, "a float is a fraction of an epoch and must be in (0, 1]; "
                          "give an int for a number of batches, or null")  # fmt: skip
    every = trainer.get("check_val_every_n_epoch")
    if every is not None and (not _is_int(every) or every < 1):
        raise _refuse("check_val_every_n_epoch", every, "must be an int >= 1, or null to validate by "
                      "val_check_interval only")  # fmt: skip
    log_every = trainer.get("log_every_n_steps")
    if log_every is not None and (not _is_int(log_every) or log_every < 0):
        raise _refuse("log_every_n_steps", log_every, "must be an int >= 1 (steps between logged values), 0 for none")
    sanity = trainer.get("num_sanity_val_steps")
    if sanity is not None and (not _is_int(sanity) or sanity < -1):
        raise _refuse("num_sanity_val_steps", sanity, "must be an int >= 0 (validation batches before training), "
                      "or -1 for the whole validation set")  # fmt: skip
