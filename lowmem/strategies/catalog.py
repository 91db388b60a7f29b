"""One `OptimizerStrategy` per optimizer, each derived from one declaration: the classes a config selects.

    model:
      init_args:
        optimizer:
          class_path: lowmem.strategies.HMAdamW
          init_args: {lr: 1.0e-3, weight_decay: 0.01}

A strategy's keys are the optimizer's own constructor arguments (names, types and defaults read
from its signature, so the two cannot drift apart and every argument is reachable from YAML),
the extra arguments of its parameter grouping (SlimAdamW's ``rules``) and ``role_overrides``.
``--print_config`` and ``--help`` list them; a misspelled key is an error.

Adding an optimizer is one class in ``lowmem.optim`` (its ``capabilities`` declared on it) and
one :func:`declare` line here; ``REGISTRY`` lists every strategy (the tests check that each of
its optimizers is in the conformance suite).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lowmem import optim
from lowmem.optim.roles import attention_shape_of, weight_decay_param_groups
from lowmem.strategies.base import OptimizerStrategy

__all__ = ["REGISTRY", "AdamW", "Adafactor", "HMAdamW", "HMAdam", "AdamS", "SlimAdamW", "AdaPM", "IOAdam", "AdamMini",
           "declare"]  # fmt: skip

REGISTRY: dict[str, type[OptimizerStrategy]] = {}

# Arguments of a grouping function that the strategy fills in itself, never a config key.
_GROUPING_OWN = ("model", "overrides", "weight_decay", "n_heads", "dim", "n_kv_heads")
_KW = inspect.Parameter.KEYWORD_ONLY


def _attention_shape(module: nn.Module) -> dict[str, Any]:
    """``n_heads``/``dim``/``n_kv_heads`` for head-wise blocks: from the module's ``attention_shape()``
    (``(n_heads, dim)``, ``(n_heads, dim, n_kv_heads)`` or a mapping that may also give ``head_dim``),
    else from the config of the model it wraps (:func:`lowmem.optim.roles.attention_shape_of`)."""
    return attention_shape_of(module)


def _config_type(annotation: Any) -> Any:
    """The annotation without ``torch.Tensor`` alternatives (``lr: float | Tensor`` -> ``float``):
    a config holds numbers; tensors are for code that builds the optimizer itself."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kept = tuple(_config_type(a) for a in args if a is not torch.Tensor)
        return kept[0] if len(kept) == 1 else typing.Union[kept]  # noqa: UP007
    if origin is tuple and args:
        return tuple[tuple(_config_type(a) for a in args)]  # type: ignore[misc]
    return annotation


def _keys(function: Callable, skip: Iterable[str]) -> list[inspect.Parameter]:
    """``function``'s parameters minus ``skip``, keyword-only, with resolved config types."""
    hints = typing.get_type_hints(function)
    return [
        p.replace(kind=_KW, annotation=_config_type(hints.get(name, p.annotation)))
        for name, p in inspect.signature(function).parameters.items()
        if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def declare(optimizer_class: type[Optimizer], doc: str,
            grouping: Callable[..., list[dict]] = weight_decay_param_groups) -> type[OptimizerStrategy]:  # fmt: skip
    """The strategy class of ``optimizer_class``, registered under its name.

    Its ``__init__`` takes, keyword-only: the optimizer's constructor arguments (all but the first,
    ``params`` or ``model``), the extra arguments of ``grouping`` (how the optimizer's parameter
    groups are built from the model), and ``role_overrides`` (not for optimizers built from the
    model, whose ``__init__`` takes ``model``: they group it themselves).
    """
    from_model = list(inspect.signature(optimizer_class.__init__).parameters)[1] == "model"
    optimizer_keys = _keys(optimizer_class.__init__, ("self", "params", "model"))
    grouping_keys = [] if from_model else _keys(grouping, _GROUPING_OWN)
    overrides = [] if from_model else [inspect.Parameter("role_overrides", _KW, default=None,
                                                         annotation=dict[str, str] | None)]  # fmt: skip
    names = {p.name for p in optimizer_keys}
    grouping_names = {p.name for p in grouping_keys}
    takes_heads = "n_heads" in inspect.signature(grouping).parameters

    def __init__(self: OptimizerStrategy, **kwargs: Any) -> None:
        unknown = kwargs.keys() - names - grouping_names - {"role_overrides"}
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments {sorted(unknown)}")
        OptimizerStrategy.__init__(self, kwargs.pop("role_overrides", None),
                                   **{k: v for k, v in kwargs.items() if k in names})  # fmt: skip
        self.grouping_kwargs = {k: v for k, v in kwargs.items() if k in grouping_names}

    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *optimizer_keys, *grouping_keys, *overrides]
    )
    __init__.__doc__ = optimizer_class.__init__.__doc__ or optimizer_class.__doc__

    def param_groups(self: OptimizerStrategy, module: nn.Module) -> list[dict]:
        shape = _attention_shape(module) if takes_heads else {}
        return grouping(module, overrides=self.role_overrides, **self.grouping_kwargs, **shape)

    members: dict[str, Any] = {"__init__": __init__, "__doc__": doc, "__module__": __name__,
                               "__qualname__": optimizer_class.__name__, "optimizer_class": optimizer_class,
                               "param_groups": param_groups}  # fmt: skip
    if from_model:
        members["build"] = lambda self, module: optimizer_class(module, **self.hparams)
        members["__call__"] = _refuse_params
    strategy = type(optimizer_class.__name__, (OptimizerStrategy,), members)
    REGISTRY[strategy.__name__] = strategy
    return strategy


def _refuse_params(self: OptimizerStrategy, params: Any) -> Optimizer:
    raise TypeError(f"{self.name} is built from the model (it hooks its layers), not from parameters")


AdamW = declare(torch.optim.AdamW, "``torch.optim.AdamW``, the baseline: m and v per parameter (8 bytes/param in fp32).")
Adafactor = declare(optim.Adafactor, "``torch.optim.Adafactor``: factored second moment, no first moment (torch's "
                    "defaults); on FSDP2 shards the same maths with explicit all-reduces.")  # fmt: skip
HMAdamW = declare(optim.HMAdamW, "HMAdamW: momentum folded into ``.grad``, v only (4 bytes/param of state, plus the "
                  "persistent gradient buffer). ``gradient_clip_val`` clips the momentum's global norm.")  # fmt: skip
HMAdam = declare(optim.HMAdam, "HMAdam: as HMAdamW with coupled L2 weight decay (``B += wd W`` enters the momentum).")
AdamS = declare(optim.AdamS, "AdamS: momentum as its own normaliser, m only (4 bytes/param). Warm the lr up.")
SlimAdamW = declare(optim.SlimAdamW, "SlimAdamW: v averaged along high-SNR dims by role, or by a rules JSON file "
                    "(``rules``).", grouping=optim.slimadam_param_groups)  # fmt: skip
AdaPM = declare(optim.AdaPM, "AdaPM: no / low-rank / full momentum per block by role; ``second_moment: mini`` for "
                "AdaPM-mini.", grouping=optim.adapm_param_groups)  # fmt: skip
AdamMini = declare(optim.AdamMini, "Adam-mini: one v per block (head, row, norm tensor), m full (~4 bytes/param).",
                   grouping=optim.adam_mini_param_groups)  # fmt: skip
IOAdam = declare(optim.IOAdam, "IO-Adam for ``nn.Linear`` weights (statistics from hooks), AdamW for the rest. Its "
                 "best lr is about 10x AdamW's; ``adamw_lr`` sets the other parameters' lr.")  # fmt: skip
