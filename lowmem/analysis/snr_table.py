"""The SNR table (markdown) and the second-moment bytes a set of rules keeps.

One row per parameter: name, role, shape, mean SNR per candidate ``K`` (``fan_in``, ``fan_out``,
``all`` = every dim, other candidates of 3+-D tensors listed by their dims), the chosen rule and
the bytes of ``v`` it saves. Bytes of ``v`` (per parameter, ``b`` = bytes per element of AdamW's
``v``, 4 in float32)::

    AdamW:     b * prod(shape)
    SlimAdamW: b * prod(shape with the dims of the rule set to 1)
"""

from __future__ import annotations

import math

from lowmem.analysis.snr import ParamSNR
from lowmem.optim.slim_rules import Rule

__all__ = ["format_snr_table", "rule_dims", "v_bytes"]

_NAMED = ("fan_in", "fan_out", "all")


def rule_dims(p: ParamSNR, rule: Rule) -> tuple[int, ...] | None:
    """The tensor dims ``rule`` reduces for parameter ``p`` (``None``: no compression)."""
    if rule is None:
        return None
    if rule == "fan_in":
        return tuple(sorted(p.info.fan_in_dims)) or None
    if rule == "fan_out":
        return tuple(sorted(p.info.fan_out_dims)) or None
    return tuple(sorted(d % len(p.shape) for d in rule))  # type: ignore[union-attr]


def v_bytes(p: ParamSNR, rule: Rule) -> tuple[int, int]:
    """(bytes of ``v`` under ``rule``, bytes of AdamW's ``v``) for parameter ``p``."""
    dims = set(rule_dims(p, rule) or ())
    kept = math.prod(1 if i in dims else n for i, n in enumerate(p.shape))
    return kept * p.element_size, p.numel * p.element_size


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _rule_text(p: ParamSNR, rule: Rule) -> str:
    if not p.compressible:
        return "none (never compressed)"
    dims = rule_dims(p, rule)
    if dims is None:
        return "none"
    return f"{rule} {list(dims)}" if isinstance(rule, str) else str(list(dims))


def format_snr_table(params: list[ParamSNR], rules: dict[str, Rule], title: str, notes: list[str]) -> str:
    """The markdown table of ``params`` with their chosen ``rules``, under ``title`` and ``notes``,
    ending with the total line ``v bytes: X of Y (Z%)`` (X kept under the rules, Y AdamW's)."""
    lines = [f"# {title}", "", *notes, "",
             "| parameter | role | shape | SNR fan_in | SNR fan_out | SNR all | SNR other candidates | chosen dims "
             "| v bytes saved |",
             "|---|---|---|---:|---:|---:|---|---|---:|"]  # fmt: skip
    kept_total = full_total = 0
    for p in params:
        means = p.mean_snr()
        by_label = {p.label(k): s for k, s in means.items()}
        others = ", ".join(f"{label}: {_fmt(s)}" for label, s in by_label.items() if label not in _NAMED)
        kept, full = v_bytes(p, rules.get(p.name))
        kept_total, full_total = kept_total + kept, full_total + full
        cells = [f"`{p.name}`", p.role.value, "×".join(map(str, p.shape)) or "scalar",
                 *(_fmt(by_label.get(label)) for label in _NAMED), others or "—",
                 _rule_text(p, rules.get(p.name)), f"{full - kept:,}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    share = kept_total / full_total if full_total else 0.0
    lines += ["", f"v bytes: {kept_total:,} of {full_total:,} ({share:.1%}) kept under these rules, "
              f"{full_total - kept_total:,} saved ({1 - share:.1%})."]  # fmt: skip
    return "\n".join(lines) + "\n"
