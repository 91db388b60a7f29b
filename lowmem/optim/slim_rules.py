"""Which dims SlimAdamW averages ``v`` over: the role table, rules files and the SNR tool (docs/algorithms.md §3).

A *rule* says how to compress one parameter's second moment:

- ``"fan_in"`` / ``"fan_out"``: reduce the parameter's fan-in / fan-out dims, resolved per module
  type by the role classifier (a Linear weight (out, in) has fan_in ``(1,)``; an HF ``Conv1D``
  weight (in, out) has fan_in ``(0,)``; a conv kernel has fan_in ``(1, 2, ...)``);
- ``None``: no compression (plain AdamW);
- a list of tensor dims, e.g. ``[0, 2]``: used as is.

A *rules file* is a JSON object mapping parameter names, or glob patterns on them, to
rules: ``{"transformer.h.0.attn.c_attn.weight": "fan_in", "*.mlp.*.weight": "fan_out"}``.
An exact name wins over patterns; among patterns the first match (in file order) wins.
Parameters no rule matches get the role table's rule.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from lowmem.optim.roles import ParamRole, Role, classify_parameters, name_matches

__all__ = [
    "ROLE_RULES",
    "candidate_dims",
    "choose_rule",
    "effective_dims",
    "load_slim_rules",
    "never_compressed",
    "save_slim_rules",
    "slimadam_param_groups",
    "snr",
    "snr_rules",
    "snr_snapshot_due",
]

Rule = Union[str, list[int], tuple[int, ...], None]

# docs/algorithms.md §3 table, in fan terms. The "embedding dim" of an Embedding and of an LM head is
# their fan-in, so "one v per token" is "fan_in" for both (and for a tied head, classified as
# the embedding it shares).
#
# Fused q/k/v (Role.QKV: nanoGPT c_attn, nn.MultiheadAttention.in_proj_weight): the table wants
# fan_in for q and k but fan_out for v, and one compress_dims cannot do both. "fan_in" (one v per
# output row) is the safe choice: every row belongs to exactly one of q, k, v, so their very
# different scales are never averaged together, which "fan_out" (one v per input column, a mean
# over all 3d rows) would do. For the value rows it means one v per output neuron, which is
# Adam-mini's partition for the value matrix. Override with a rule (e.g. ``null``) if in doubt.
ROLE_RULES: dict[Role, str | None] = {
    Role.QUERY: "fan_in",
    Role.KEY: "fan_in",
    Role.QKV: "fan_in",
    Role.VALUE: "fan_out",
    Role.ATTN_OUT: "fan_out",
    Role.MLP_UP: "fan_out",
    Role.MLP_GATE: "fan_out",
    Role.MLP_DOWN: "fan_out",
    Role.EMBEDDING: "fan_in",
    Role.POSITION_EMBEDDING: "fan_in",
    Role.LM_HEAD: "fan_in",
    Role.CONV: "fan_in",
    Role.CLASSIFIER: "fan_in",
    Role.NORM: None,
    Role.BIAS: None,
    Role.OTHER: None,  # unknown layers: no compression rather than a guess
}


def _resolve(info: ParamRole, rule: Rule) -> tuple[int, ...] | None:
    """A rule as concrete, sorted, non-negative tensor dims of ``info.param`` (None = no compression)."""
    ndim = info.param.ndim
    if rule is None or ndim == 0:
        return None
    if rule in ("fan_in", "fan_out"):
        dims = info.fan_in_dims if rule == "fan_in" else info.fan_out_dims
        return tuple(sorted(dims)) or None  # 1-D tensors have no fan dims: leave them uncompressed
    if isinstance(rule, (list, tuple)) and rule and all(isinstance(d, int) and not isinstance(d, bool) for d in rule):
        if any(not -ndim <= d < ndim for d in rule):
            raise ValueError(f"rule {list(rule)} for {info.name} of shape {tuple(info.param.shape)}: dims out of range")
        return tuple(sorted({d % ndim for d in rule}))
    raise ValueError(f"invalid SlimAdam rule {rule!r} for {info.name}; use 'fan_in', 'fan_out', null or a list of dims")


def _rule_for(name: str, rules: Mapping[str, Rule], used: set[str]) -> tuple[bool, Rule]:
    if name in rules:
        used.add(name)
        return True, rules[name]
    for pattern, rule in rules.items():
        if name_matches(pattern, name):
            used.add(pattern)
            return True, rule
    return False, None


def slimadam_param_groups(
    model: nn.Module,
    rules: Mapping[str, Rule] | str | os.PathLike | None = None,
    weight_decay: float | None = None,
    overrides: Mapping[str, Role | str] | None = None,
) -> list[dict]:
    """SlimAdamW param groups for ``model``: one group per (compress dims, decays) combination.

    Each parameter's ``compress_dims`` come from ``rules`` (a mapping or a rules-file path, see the
    module docstring) if one matches its name, else from :data:`ROLE_RULES` via the role classifier.
    Norms, biases and 1-D parameters are never compressed and never decayed; names in the model's
    ``no_weight_decay()`` are not decayed either. Groups hold ``(name, param)`` pairs.

    Args:
        model: the (unwrapped) model.
        rules: per-name rules overriding the role table, or a path to a rules JSON file.
        weight_decay: decay of the decayed groups; ``None`` inherits the optimizer's default.
        overrides: role overrides for the classifier (see :func:`classify_parameters`).
    """
    if isinstance(rules, (str, os.PathLike)):
        rules = load_slim_rules(rules)
    rules = dict(rules or {})
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    used: set[str] = set()
    groups: dict[tuple, list[tuple[str, nn.Parameter]]] = {}
    for info in classify_parameters(model, overrides):
        found, rule = _rule_for(info.name, rules, used)
        dims = _resolve(info, rule if found else ROLE_RULES[info.role])
        decays = info.decays and info.name not in skip
        groups.setdefault((dims, decays), []).append((info.name, info.param))
    unused = [k for k in rules if k not in used]
    if unused:
        warnings.warn(f"SlimAdam rules matched no parameter of the model: {unused}", stacklevel=2)
    out = []
    for (dims, decays), named in groups.items():
        group = {"params": named, "compress_dims": dims}
        if not decays:
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        out.append(group)
    return out


def save_slim_rules(rules: Mapping[str, Rule], path: str | os.PathLike) -> None:
    """Write ``rules`` (name or pattern -> rule) as a JSON rules file."""
    clean = {str(k): list(v) if isinstance(v, (list, tuple)) else v for k, v in rules.items()}
    with open(path, "w") as f:
        json.dump(clean, f, indent=2)
        f.write("\n")


def load_slim_rules(path: str | os.PathLike) -> dict[str, Rule]:
    """Read a JSON rules file, checking that every value is a valid rule."""
    with open(path) as f:
        rules = json.load(f)
    if not isinstance(rules, dict):
        raise ValueError(f"{path}: a SlimAdam rules file must hold a JSON object {{name: rule}}")
    for name, rule in rules.items():
        ok = rule in (None, "fan_in", "fan_out") or (
            isinstance(rule, list) and rule and all(isinstance(d, int) and not isinstance(d, bool) for d in rule)
        )
        if not ok:
            raise ValueError(
                f"{path}: invalid rule {rule!r} for {name!r}; use 'fan_in', 'fan_out', null or a list of dims"
            )
    return rules


def snr_snapshot_due(step: int) -> bool:
    """The paper's SNR schedule: step 1, every 100 steps below 1000, then every 1000 steps."""
    return step == 1 or (step % 100 == 0 if step < 1000 else step % 1000 == 0)


def snr(v: Tensor, dims: tuple[int, ...]) -> float:
    """``SNR_K(V) = mean over the other dims of (mean_K V)^2 / var_K V`` (population variance).

    ``V`` is Adam's second moment (units of gradient squared), so ``SNR_K`` is dimensionless and
    unchanged by any scalar factor, bias correction included. ``SNR_K > 1`` means the slices along
    ``K`` vary less (standard deviation) than their mean: replacing them by their mean loses little.

    Slices with zero mean and zero variance (``v`` never updated there) carry no information and are
    left out; a slice with zero variance and a non-zero mean is perfectly compressible and counts
    as ``inf``. (The reference code drops both kinds of non-finite values.) Returns ``nan`` if no
    slice is informative. Computed in float64.
    """
    v = v.detach().to(torch.float64)
    mean = v.mean(dim=dims)
    var = v.var(dim=dims, correction=0)
    ratio = mean.square() / var
    keep = ~torch.isnan(ratio)
    return ratio[keep].mean().item() if keep.any() else math.nan


def candidate_dims(shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty set ``K`` of the dims of size > 1 of a tensor of ``shape``, smallest first.

    ``2**n - 1`` candidates for ``n`` dims of size > 1: ``(0,)`` for a 1-D tensor (one ``v`` for
    the whole tensor); ``(0,), (1,), (0, 1)`` for a matrix; 15 for a 2-D conv kernel, among them
    its fan-in ``(1, 2, 3)``, its fan-out ``(0,)`` and the kernel window alone ``(2, 3)``. A dim of
    size 1 is left out: averaging over it changes nothing (and its zero variance would read as
    ``SNR = inf``), so ``K`` with it is the same compression as ``K`` without it.
    """
    dims = [d for d, n in enumerate(shape) if n > 1]
    return [k for r in range(1, len(dims) + 1) for k in itertools.combinations(dims, r)]


def effective_dims(dims: Iterable[int], shape: Sequence[int]) -> tuple[int, ...]:
    """``dims`` sorted, without those of size 1 in ``shape`` (the same compression)."""
    return tuple(sorted(d for d in dims if shape[d] > 1))


def _mean_snr(snapshots: Iterable[Tensor], shape: Sequence[int]) -> dict[tuple[int, ...], float]:
    """Mean :func:`snr` over the snapshots for every candidate K, streaming (one snapshot at a time)."""
    candidates = candidate_dims(shape)
    sums, counts = dict.fromkeys(candidates, 0.0), dict.fromkeys(candidates, 0)
    for v in snapshots:
        for k in candidates:
            value = snr(v, k)
            if not math.isnan(value):  # skip nan, as the reference's pandas mean does
                sums[k] += value
                counts[k] += 1
    return {k: sums[k] / counts[k] if counts[k] else math.nan for k in candidates}


def never_compressed(info: ParamRole) -> bool:
    """Norms, biases and 0-D parameters keep a full ``v`` whatever their SNR."""
    return info.role in (Role.NORM, Role.BIAS) or info.param.ndim == 0


def choose_rule(info: ParamRole, scores: Mapping[tuple[int, ...], float], cutoff: float = 1.0) -> Rule:
    """The rule for one parameter from its mean SNR per candidate ``K`` (``{K: mean SNR}``).

    The ``K`` with the largest mean SNR above ``cutoff`` (ties, e.g. two ``inf``: the larger ``K``),
    else ``None``; ``None`` for :func:`never_compressed` parameters. A ``K`` equal to the
    parameter's fan-in or fan-out dims (size-1 dims aside) is named ``"fan_in"``/``"fan_out"``,
    others stay dim lists.
    """
    if never_compressed(info):
        return None
    passing = {k: s for k, s in scores.items() if s > cutoff}  # nan never passes
    if not passing:
        return None
    best = max(passing, key=lambda k: (passing[k], len(k)))
    shape = tuple(info.param.shape)
    named = {effective_dims(info.fan_out_dims, shape): "fan_out", effective_dims(info.fan_in_dims, shape): "fan_in"}
    return named.get(best, list(best))


def snr_rules(
    model: nn.Module,
    v_snapshots: Mapping[str, Iterable[Tensor]] | Callable[[str], Iterable[Tensor]],
    cutoff: float = 1.0,
    overrides: Mapping[str, Role | str] | None = None,
) -> dict[str, Rule]:
    """Derive per-parameter SlimAdam rules from snapshots of Adam's second moment (docs/algorithms.md §3).

    For each parameter and every candidate set of dims ``K`` (:func:`candidate_dims`), average
    :func:`snr` over its snapshots (skipping ``nan`` values); pick the rule with
    :func:`choose_rule` (the largest mean SNR above ``cutoff``, else no compression). Take the snapshots of
    ``exp_avg_sq`` from an AdamW (or uncompressed SlimAdamW) run at the steps where
    :func:`snr_snapshot_due` is true. Norms and biases always get ``None``.

    Args:
        model: the model whose parameter names key the snapshots and the result.
        v_snapshots: ``{name: [v, ...]}``, or a callable ``name -> iterable of v`` (e.g. loading
            them from disk one at a time). Names missing from the dict get no rule (the role
            table then decides for them).
        cutoff: minimum mean SNR for a compression to be chosen.

    Returns:
        A rules mapping for :func:`slimadam_param_groups` / :func:`save_slim_rules`; a chosen ``K``
        equal to the parameter's fan-in or fan-out dims is written as ``"fan_in"``/``"fan_out"``.
    """
    get = v_snapshots if callable(v_snapshots) else v_snapshots.__getitem__
    rules: dict[str, Rule] = {}
    for info in classify_parameters(model, overrides):
        if not callable(v_snapshots) and info.name not in v_snapshots:
            continue  # not measured: the role table decides
        scores = {} if never_compressed(info) else _mean_snr(get(info.name), tuple(info.param.shape))
        rules[info.name] = choose_rule(info, scores, cutoff)
    return rules
