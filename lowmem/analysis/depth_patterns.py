"""Per-layer SlimAdam rules folded into patterns over depth, so they transfer to deeper models.

Parameters that differ only in their layer index (``gpt.h.0.mlp.c_fc.weight``,
``gpt.h.1.mlp.c_fc.weight``) form one group, named by the glob pattern with every
all-digit name component replaced by ``*`` (``gpt.h.*.mlp.c_fc.weight``; ``*`` stands for one
name component, as everywhere in lowmem: :func:`lowmem.optim.roles.name_matches`). For each group:

- every layer agrees: the pattern alone, with that rule;
- layers disagree: each layer whose rule differs from the group's most common one keeps its exact
  name (exact names win over patterns in a rules file, so the measured model gets exactly its
  measured rules), and the pattern carries the most common rule (on a tie ``None`` if it is
  tied, else the shallowest layer's rule) for the layers a deeper model adds;
- the pattern would be the first match of a parameter outside the group: exact names only.

Rules in fan terms (``"fan_in"``/``"fan_out"``) also carry over to other widths, so a rules file
measured on a small model of a family applies to a larger one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from lowmem.optim.roles import name_matches
from lowmem.optim.slim_rules import Rule

__all__ = ["depth_pattern", "generalise_over_depth"]

_SPECIAL = set("*?[]")


def depth_pattern(name: str) -> str:
    """``name`` with every all-digit component replaced by ``*`` (``h.3.attn.w`` -> ``h.*.attn.w``)."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _key(rule: Rule) -> str:
    return repr(list(rule) if isinstance(rule, tuple) else rule)


def _capturing(patterns: list[str], group_of: Mapping[str, str], names: list[str], exact: set[str]) -> str | None:
    """A pattern that is the first match of a name outside its group, if any."""
    for name in names:
        if name in exact:
            continue
        first = next((p for p in patterns if name_matches(p, name)), None)
        if first is not None and first != group_of.get(name):
            return first
    return None


def generalise_over_depth(rules: Mapping[str, Rule], names: Iterable[str]) -> dict[str, Rule]:
    """``rules`` (parameter name -> rule) as a rules file: exact names first, then depth patterns,
    the longest (most specific) first; a pattern that would be the first match of any name outside
    its group is dropped for its members' exact names.

    Args:
        rules: one rule per parameter name of the measured model.
        names: every parameter name of the model.
    """
    names = list(names)
    groups: dict[str, list[str]] = {}
    for name in rules:
        pattern = depth_pattern(name) if not _SPECIAL & set(name) else name
        groups.setdefault(pattern, []).append(name)
    singles = [p for p, members in groups.items() if p in rules]
    exact: dict[str, Rule] = {m: rules[m] for p in singles for m in groups.pop(p)}
    while True:
        patterns = sorted(groups, key=lambda p: -len(p.split(".")))
        group_of = {m: p for p, members in groups.items() for m in members}
        offender = _capturing(patterns, group_of, names, set(exact))
        if offender is None:
            break
        exact.update((m, rules[m]) for m in groups.pop(offender))
    out_patterns: dict[str, Rule] = {}
    for pattern in patterns:
        members = groups[pattern]
        counts = Counter(_key(rules[m]) for m in members)
        top = max(counts.values())
        first: dict[str, Rule] = {}
        for m in members:
            first.setdefault(_key(rules[m]), rules[m])
        tied = [rule for key, rule in first.items() if counts[key] == top]
        majority = None if None in tied else tied[0]
        exact.update((m, rules[m]) for m in members if _key(rules[m]) != _key(majority))
        out_patterns[pattern] = majority
    return {**exact, **out_patterns}
