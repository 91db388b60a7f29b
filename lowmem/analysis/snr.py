"""Measuring the SNR of Adam's second moment along a training run (the SlimAdam analysis).

:class:`SNRRecorder` is a Lightning callback for an AdamW run. At every optimizer step ``t`` where
:func:`~lowmem.optim.slim_rules.snr_snapshot_due` holds (1, 100, 200, ..., 900, 1000, 2000, ...) it
reads each parameter's ``exp_avg_sq`` ``V`` and stores, for every candidate set of dims ``K``
(:func:`~lowmem.optim.slim_rules.candidate_dims`)::

    SNR_K(V) = mean over the dims not in K of (mean_K V)^2 / var_K V      (dimensionless)

Only these numbers are kept, never the snapshots: memory is a few floats per parameter and step.
Norms, biases and 0-D parameters are never compressed and are not measured.
:func:`choose_rules` then averages each parameter's SNR over the snapshots and picks its rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl

from lowmem.optim.roles import ParamRole, Role, classify_parameters
from lowmem.optim.slim_rules import (
    Rule, candidate_dims, choose_rule, effective_dims, never_compressed, snr, snr_snapshot_due,
)  # fmt: skip

__all__ = ["ParamSNR", "SNRRecorder", "choose_rules"]

Dims = tuple[int, ...]


@dataclass
class ParamSNR:
    """One parameter's SNR series: ``series[K]`` is ``[(optimizer step, SNR_K(V)), ...]``.

    ``info`` is the parameter's role and fan dims (:func:`~lowmem.optim.roles.classify_parameters`);
    ``element_size`` the bytes per element of AdamW's ``V`` (4 for float32), read at the first
    snapshot. ``series`` is empty for parameters that are never compressed.
    """

    info: ParamRole
    element_size: int = 4
    series: dict[Dims, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def role(self) -> Role:
        return self.info.role

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.info.param.shape)

    @property
    def compressible(self) -> bool:
        return not never_compressed(self.info)

    def mean_snr(self) -> dict[Dims, float]:
        """SNR_K averaged over the snapshots, ``nan`` values (no informative slice) left out."""
        out = {}
        for k, points in self.series.items():
            values = [value for _, value in points if not math.isnan(value)]
            out[k] = sum(values) / len(values) if values else math.nan
        return out

    def label(self, k: Dims) -> str:
        """``K`` as the table names it: ``fan_in``, ``fan_out``, ``all`` (every dim) or the dims
        (size-1 dims aside, which :func:`~lowmem.optim.slim_rules.candidate_dims` leaves out)."""
        if k == effective_dims(self.info.fan_in_dims, self.shape):
            return "fan_in"
        if k == effective_dims(self.info.fan_out_dims, self.shape):
            return "fan_out"
        if k == effective_dims(range(len(self.shape)), self.shape):
            return "all"
        return str(list(k))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SNRRecorder(pl.Callback):
    """Records :class:`ParamSNR` series of every parameter of an AdamW run (see the module docstring).

    Args:
        due: which optimizer steps to snapshot (default: the paper's schedule).
        overrides: role overrides for the classifier, as the SlimAdamW config that will use the
            rules has them (see :func:`~lowmem.optim.roles.classify_parameters`).
    """

    def __init__(self, due: Callable[[int], bool] = snr_snapshot_due,
                 overrides: Mapping[str, Role | str] | None = None) -> None:  # fmt: skip
        self.due = due
        self.overrides = overrides
        self.params: list[ParamSNR] = []
        self.steps: list[int] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params, self.steps = [], []
        for info in classify_parameters(pl_module, self.overrides):
            candidates = [] if never_compressed(info) else candidate_dims(tuple(info.param.shape))
            self.params.append(ParamSNR(info, series={k: [] for k in candidates}))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        step = trainer.global_step  # optimizer steps taken; constant across accumulated micro-batches
        if step < 1 or not self.due(step) or (self.steps and self.steps[-1] == step):
            return
        state = trainer.optimizers[0].state
        for record in self.params:
            v = state.get(record.info.param, {}).get("exp_avg_sq")
            if v is None:  # no gradient yet (unused parameter): nothing to measure
                continue
            record.element_size = v.element_size()
            for k, points in record.series.items():
                points.append((step, snr(v, k)))
        self.steps.append(step)


def choose_rules(params: list[ParamSNR], cutoff: float) -> dict[str, Rule]:
    """Per parameter name, :func:`~lowmem.optim.slim_rules.choose_rule` on its mean SNR: the ``K``
    with the largest mean SNR above ``cutoff``, else ``None``; ``None`` for norms and biases."""
    return {p.name: choose_rule(p.info, p.mean_snr(), cutoff) for p in params}
