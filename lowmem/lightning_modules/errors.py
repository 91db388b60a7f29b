"""What counts as a configuration error (a one-line message) and what as a bug (a traceback)."""

from __future__ import annotations

import importlib.util
import os
import sysconfig

__all__ = ["ConfigError", "lightning_config_error", "user_code_error"]


class ConfigError(ValueError):
    """A configuration value is invalid; the CLI prints it as a one-line error."""


# Packages whose ValueError/TypeError means "the configuration is wrong" (their validation, or
# jsonargparse calling a class with arguments it does not take). An error with a frame of any
# other code on its stack is the user's: a bug there keeps its traceback.
_LIBRARY_PACKAGES = ("lowmem", "torch", "lightning", "lightning_fabric", "jsonargparse", "torchmetrics")


def _library_roots() -> tuple[str, ...]:
    roots = [os.path.realpath(sysconfig.get_paths()["stdlib"])]
    for package in _LIBRARY_PACKAGES:
        spec = importlib.util.find_spec(package)
        roots += [os.path.realpath(root) for root in (spec.submodule_search_locations or [])] if spec else []
    return tuple(root + os.sep for root in roots)


def _passed_through_user_code(err: BaseException, roots: tuple[str, ...]) -> bool:
    tb = err.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith("<") and not os.path.realpath(filename).startswith(roots):
            return True
        tb = tb.tb_next
    return False


def user_code_error(err: BaseException) -> BaseException | None:
    """The exception of ``err``'s chain (itself, its causes and contexts) that passed through the
    user's own code, if any: a frame of its traceback lies outside lowmem, the libraries it
    configures (torch, Lightning, jsonargparse) and the standard library. jsonargparse wraps an
    error raised in a model's ``__init__`` into its own; the original is found in the chain."""
    roots, seen, chain = _library_roots(), set(), [err]
    while chain:
        current = chain.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if _passed_through_user_code(current, roots):
            return current
        chain += [current.__cause__, current.__context__]
    return None


def lightning_config_error(err: BaseException) -> bool:
    """Whether ``err`` is Lightning refusing a configuration: a ``ValueError`` raised in Lightning's
    own code (``val_check_interval`` larger than an epoch, a bad accelerator...) that did not pass
    through the user's code. Printed as one line, like lowmem's own configuration errors."""
    if not isinstance(err, ValueError) or user_code_error(err) is not None:
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    roots = []
    for package in ("lightning", "lightning_fabric"):
        spec = importlib.util.find_spec(package)
        roots += [os.path.realpath(r) + os.sep for r in (spec.submodule_search_locations or [])] if spec else []
    return os.path.realpath(tb.tb_frame.f_code.co_filename).startswith(tuple(roots))

