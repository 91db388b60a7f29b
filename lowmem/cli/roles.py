"""`lowmem roles --config X.yaml`: every parameter's role and what each optimizer does with it.

    lowmem roles --config configs/lm_slimadamw.yaml

Builds the config's model (no data, no training) and prints one markdown table row per
parameter: name, shape, role (from :mod:`lowmem.optim.roles`: module types and the model's own
structure first, names second), weight decay, and what the role-driven optimizers make of it:
SlimAdamW's compressed dims of ``v`` (``-``: a full ``v``), AdaPM's momentum kind, Adam-mini's
block (one ``v`` per ``row``/``head``/... along the fan-out dim) and whether IO-Adam owns the
weight (``Linear``/HF ``Conv1D`` statistics; the rest is AdamW). The configured optimizer's
column is marked ``*``, and its ``role_overrides`` (and SlimAdamW's ``rules``) apply to every
column. A summary gives the parameter bytes by role, and the matrices left in ``other`` with the
override that names them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from torch import nn

from lowmem.optim.roles import (
    OVERRIDES_KEY,
    ParamRole,
    Role,
    attention_shape_of,
    classify_parameters,
    weight_decay_param_groups,
)

__all__ = ["role_rows", "format_roles_table"]

STRATEGY_COLUMNS = {"SlimAdamW": "SlimAdamW v dims", "AdaPM": "AdaPM momentum", "AdamMini": "Adam-mini block",
                    "IOAdam": "IO-Adam"}  # fmt: skip


def _strategy_of(model: nn.Module) -> Any:
    from lowmem.strategies import OptimizerStrategy

    strategy = getattr(model, "optimizer_strategy", None)
    return strategy if isinstance(strategy, OptimizerStrategy) else None


def _block_text(keys: dict[str, Any], info: ParamRole) -> str:
    kind = keys["block"]
    if kind is None:
        return "head (needs n_heads)"
    if kind in ("element", "tensor"):
        return kind
    if kind == "row":
        return f"row (dim {keys['fan_out_dim']})"
    if kind == "head":
        return f"head ({keys['head_dim']} rows)"
    n_q, n_kv = keys["qkv_heads"]
    return f"qkv ({n_q}:{n_kv}:{n_kv}, {keys['head_dim']} rows)"


def role_rows(model: nn.Module) -> list[dict[str, Any]]:
    """One row per (unique, trainable) parameter of ``model`` with its role and every optimizer's
    treatment, under the model's configured strategy's overrides (if it has one)."""
    from lowmem.optim._io_stats import io_weights
    from lowmem.optim.adapm import adapm_param_groups
    from lowmem.optim.blocks import block_keys, head_config
    from lowmem.optim.slim_rules import slimadam_param_groups

    strategy = _strategy_of(model)
    overrides = strategy.role_overrides if strategy is not None else None
    rules = strategy.grouping_kwargs.get("rules") if strategy is not None and strategy.name == "SlimAdamW" else None
    infos = classify_parameters(model, overrides)
    no_decay = {id(p) for g in weight_decay_param_groups(model, overrides=overrides) if g.get("weight_decay") == 0.0
                for _, p in g["params"]}  # fmt: skip
    slim = {id(p): g["compress_dims"] for g in slimadam_param_groups(model, rules=rules, overrides=overrides)
            for _, p in g["params"]}  # fmt: skip
    shape = attention_shape_of(model)
    adapm = {id(p): g["momentum"] for g in adapm_param_groups(model, **{k: v for k, v in shape.items()},
                                                              overrides=overrides) for _, p in g["params"]}  # fmt: skip
    head_dim, qkv_heads = head_config(shape.get("n_heads"), shape.get("dim"), shape.get("n_kv_heads"))
    linears, _ = io_weights(model)
    tied: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        tied[id(p)].append(name)
    rows = []
    for info in infos:
        pid = id(info.param)
        dims = slim[pid]
        rows.append({
            "name": info.name,
            "shape": tuple(info.param.shape),
            "role": info.role.value,
            "tied": [n for n in tied[pid] if n != info.name],
            "decay": pid not in no_decay,
            "SlimAdamW": "-" if dims is None else ",".join(map(str, dims)),
            "AdaPM": adapm[pid],
            "AdamMini": _block_text(block_keys(info, head_dim, qkv_heads), info),
            "IOAdam": "owned" if pid in linears else "adamw",
            "bytes": info.param.numel() * info.param.element_size(),
            "ndim": info.param.ndim,
        })  # fmt: skip
    return rows


def format_roles_table(rows: list[dict[str, Any]], configured: str | None = None) -> str:
    """The per-parameter table, the bytes by role and the matrices left in ``other`` (markdown)."""
    columns = [(key, title + (" *" if key == configured else "")) for key, title in STRATEGY_COLUMNS.items()]
    lines = ["| parameter | shape | role | decay | " + " | ".join(t for _, t in columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]  # fmt: skip
    for row in rows:
        role = row["role"] + (f" (tied: {', '.join(row['tied'])})" if row["tied"] else "")
        shape = "x".join(map(str, row["shape"])) or "scalar"
        cells = [row["name"], shape, role, "yes" if row["decay"] else "no", *(row[k] for k, _ in columns)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    total = sum(r["bytes"] for r in rows) or 1
    by_role: dict[str, list[int]] = {}
    for row in rows:
        entry = by_role.setdefault(row["role"], [0, 0])
        entry[0] += 1
        entry[1] += row["bytes"]
    lines += ["", "| role | tensors | MiB | share |", "|---|---:|---:|---:|"]
    for role in (r.value for r in Role):
        if role in by_role:
            n, size = by_role[role]
            lines.append(f"| {role} | {n} | {size / 2**20:.3f} | {size / total:.1%} |")
    lines.append(f"| total | {len(rows)} | {total / 2**20:.3f} | 100.0% |")
    other = [r["name"] for r in rows if r["role"] == Role.OTHER.value and r["ndim"] >= 2]
    lines.append("")
    if other:
        what = "1 matrix" if len(other) == 1 else f"{len(other)} matrices"
        lines.append(f"{what} in 'other' (no compression, plain blocks): {', '.join(other)}; name their roles with "
                     f"{OVERRIDES_KEY}: {{'{other[0]}': mlp_up}}")  # fmt: skip
    else:
        lines.append("Every matrix has a role.")
    if configured is not None and configured not in STRATEGY_COLUMNS:
        lines.append(f"The configured {configured} acts by role only through weight decay (the decay column).")
    return "\n".join(lines)


def roles_command(model: nn.Module) -> str:
    """The text ``lowmem roles`` prints for ``model`` (built from a config)."""
    strategy = _strategy_of(model)
    configured = strategy.name if strategy is not None else None
    if strategy is not None and configured == "optimizer":  # a plain optimizer callable: only decay applies
        configured = getattr(getattr(strategy, "factory", None), "__name__", None) or "optimizer"
    return format_roles_table(role_rows(model), configured)
