"""Adam-mini's block partition: which entries of a tensor share one second-moment value.

Used by :class:`~lowmem.optim.AdamMini` (docs/algorithms.md §6) and by AdaPM-mini (§4). A block is a
set of entries that gets one learning rate: ``v_block = EMA of mean_block(g^2)``, broadcast over
the block in the update. The partition is stated along the tensor's *fan-out* dimension (resolved
per module type by :func:`lowmem.optim.roles.classify_parameters`), never by raw tensor axis.

Block kinds (param-group key ``"block"``):

==========  ==========================================================  ====================
kind        one v value per                                             v state shape
==========  ==========================================================  ====================
element     entry (plain Adam; biases)                                  param shape
tensor      tensor (norm weights)                                       ``()``
row         index of the fan-out dim ``fan_out_dim``: output neuron,    size 1 except at
            token (embeddings, LM head), output channel (convs)         ``fan_out_dim``
head        attention head: ``head_dim`` consecutive fan-out indices    ``(n_heads,)``
qkv         fused q/k/v projection cut along the fan-out dim in the     ``(n_blocks,)``
            ratio ``n_heads : n_kv : n_kv`` (group key ``qkv_heads``);
            per head for q and k, per row for v
==========  ==========================================================  ====================

The parameter-group builders (:func:`~lowmem.optim.adam_mini_param_groups`,
:func:`~lowmem.optim.adapm_param_groups`) assign kinds by role with :func:`block_keys`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lowmem.optim.roles import ParamRole, Role, weight_decay_param_groups

__all__ = [
    "BLOCK_DEFAULTS", "BLOCK_KINDS", "block_keys", "block_mean_sq", "block_means_of_rows", "block_segments",
    "block_shape", "check_block",
    "expand_blocks", "group_params", "head_config", "qkv_split",
]  # fmt: skip

BLOCK_KINDS = ("element", "tensor", "row", "head", "qkv")
# Without a model to classify, one v per output row of a matrix (Adam-mini's principle for every
# non-attention matrix since v1.1) and per entry of a vector.
BLOCK_DEFAULTS: dict[str, Any] = {"block": "row", "fan_out_dim": 0, "head_dim": 0, "qkv_heads": (1, 1)}

def head_config(n_heads: int | None, dim: int | None, n_kv_heads: int | None) -> tuple[int | None, tuple[int, int]]:
    """``(head_dim, qkv_heads)`` from the model's attention shape (the ``adam-mini`` arguments).

    ``head_dim = dim // n_heads`` (``None`` when ``n_heads`` is not given); ``qkv_heads`` is the ratio
    of query to key/value heads that cuts a fused q/k/v projection, ``(1, 1)`` (thirds) by default.
    """
    if n_heads is None:
        if n_kv_heads is not None:
            raise ValueError("n_kv_heads given without n_heads; pass n_heads and dim as well")
        return None, (1, 1)
    if dim is None:
        raise ValueError("n_heads given without dim; pass dim (the model width, n_heads * head_dim) as well")
    n_kv = n_heads if n_kv_heads is None else n_kv_heads
    for key, value in (("n_heads", n_heads), ("dim", dim), ("n_kv_heads", n_kv)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"invalid {key}={value!r}; it must be a positive int")
    if dim % n_heads or n_heads % n_kv:
        raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}, and n_heads by n_kv_heads={n_kv}")
    return dim // n_heads, (n_heads, n_kv)


def qkv_split(n: int, qkv_heads: tuple[int, int]) -> tuple[int, int, int]:
    """Sizes of the q, k and v parts of a fused projection with ``n`` fan-out indices."""
    n_q, n_kv = qkv_heads
    unit, rest = divmod(n, n_q + 2 * n_kv)
    if rest or unit == 0:
        raise ValueError(
            f"a fused q/k/v projection with {n} outputs cannot be cut in the ratio {n_q}:{n_kv}:{n_kv}; "
            "pass the model's n_heads, dim and n_kv_heads to the param-group builder"
        )
    return n_q * unit, n_kv * unit, n_kv * unit


def block_segments(p_shape: torch.Size, group: dict) -> list[tuple[int, int]]:
    """``[(fan-out indices, indices per block), ...]`` cutting the fan-out dim into blocks (kinds
    ``row``, ``head`` and ``qkv``), in the order of the v state."""
    n, kind, head_dim = p_shape[group["fan_out_dim"]], group["block"], group["head_dim"]
    if kind == "row":
        return [(n, 1)]
    if kind == "head":
        return [(n, head_dim)]
    q, k, v = qkv_split(n, tuple(group["qkv_heads"]))
    return [(q, head_dim), (k, head_dim), (v, 1)]


def check_block(p: torch.Tensor, group: dict, owner: str) -> None:
    """Raise ``ValueError`` (naming the fix) if ``group``'s block keys do not fit ``p``."""
    kind = group.get("block")
    if kind not in BLOCK_KINDS:
        raise ValueError(
            f"{owner}: invalid block={kind!r} for a parameter of shape {tuple(p.shape)}; expected one of "
            f"{BLOCK_KINDS}. Build the groups with adam_mini_param_groups(model, n_heads=..., dim=...) "
            "(AdaPM-mini: adapm_param_groups(model, n_heads=..., dim=...))"
        )
    if kind in ("element", "tensor") or p.ndim == 0:
        return
    d = group["fan_out_dim"]
    if not isinstance(d, int) or not -p.ndim <= d < p.ndim:
        raise ValueError(f"{owner}: fan_out_dim={d} is not a dimension of a parameter of shape {tuple(p.shape)}")
    if kind in ("head", "qkv"):
        head_dim = group["head_dim"]
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"{owner}: block={kind!r} needs head_dim > 0 (pass n_heads and dim to the group builder)")
        for rows, per_block in block_segments(p.shape, group):
            if rows % per_block:
                raise ValueError(
                    f"{owner}: a block={kind!r} part with {rows} fan-out indices of a parameter of shape "
                    f"{tuple(p.shape)} is not a whole number of heads of head_dim={head_dim}"
                )


def _row_view_shape(p_shape: torch.Size, d: int) -> list[int]:
    shape = [1] * len(p_shape)
    shape[d] = p_shape[d]
    return shape


def block_shape(p_shape: torch.Size, group: dict) -> tuple[int, ...]:
    """Shape of the v state for a parameter of shape ``p_shape``."""
    kind = group["block"]
    if kind == "element" or len(p_shape) == 0:
        return tuple(p_shape)
    if kind == "tensor":
        return ()
    if kind == "row":
        return tuple(_row_view_shape(p_shape, group["fan_out_dim"]))
    return (sum(rows // per for rows, per in block_segments(p_shape, group)),)


def block_mean_sq(grad: torch.Tensor, group: dict) -> torch.Tensor:
    """``mean_block(grad^2)`` in :func:`block_shape`; ``grad`` should already be in the state dtype."""
    kind = group["block"]
    grad = grad.contiguous()  # reduce in one memory order, whatever the grad's strides
    sq = grad * grad
    if kind == "element" or grad.ndim == 0:
        return sq
    if kind == "tensor":
        return sq.mean()
    d = group["fan_out_dim"] % grad.ndim
    others = [i for i in range(grad.ndim) if i != d]
    row_mean = sq.mean(dim=others, keepdim=True) if others else sq
    if kind == "row":
        return row_mean
    return block_means_of_rows(row_mean.reshape(-1), grad.shape, group)


def block_means_of_rows(row_mean: torch.Tensor, p_shape: torch.Size, group: dict) -> torch.Tensor:
    """The ``(n_blocks,)`` v values of a ``head``/``qkv`` parameter from the means of g^2 over each
    fan-out index (``row_mean``, all ``n`` of them). Every row of a block has the same size, so
    the block mean is the mean of its row means."""
    out, start = [], 0
    for rows, per_block in block_segments(p_shape, group):
        out.append(row_mean[start : start + rows].view(-1, per_block).mean(dim=1))
        start += rows
    return torch.cat(out)


def expand_blocks(v: torch.Tensor, p_shape: torch.Size, group: dict) -> torch.Tensor:
    """``v`` (in :func:`block_shape`) as a tensor that broadcasts against the parameter."""
    if group["block"] not in ("head", "qkv") or len(p_shape) == 0:
        return v
    parts, start = [], 0
    for rows, per_block in block_segments(p_shape, group):
        n_blocks = rows // per_block
        parts.append(v[start : start + n_blocks].repeat_interleave(per_block))
        start += n_blocks
    return torch.cat(parts).view(_row_view_shape(p_shape, group["fan_out_dim"] % len(p_shape)))


def block_keys(info: ParamRole, head_dim: int | None, qkv_heads: tuple[int, int]) -> dict[str, Any]:
    """Adam-mini block keys for one classified parameter (§6).

    Query/key: per head; fused q/k/v: per head for q, k and per row for v; embeddings, LM head,
    value, attention output, MLP, conv and classifier matrices: per row of the fan-out dim (per token
    for embeddings and the LM head); norm weights: one value per tensor; biases, norm biases
    included: per entry (plain Adam, as the ``adam-mini`` package);
    anything else: per row if it is a matrix, one value per tensor otherwise. Query/key blocks need
    ``head_dim``: the model-wide one given here, else the one the projection's own attention block
    states (``info.heads``, read by the classifier); without either ``block`` is ``None`` and the
    optimizer asks for ``n_heads``/``dim``.
    """
    p, role = info.param, info.role
    if head_dim is None and getattr(info, "heads", None) is not None:  # the projection's own attention block
        n_heads, n_kv, head_dim = info.heads
        qkv_heads = (n_heads, n_kv)
    fan_out = info.fan_out_dims[0] if info.fan_out_dims else 0
    keys = {"fan_out_dim": fan_out, "head_dim": head_dim or 0, "qkv_heads": tuple(qkv_heads)}
    if role in (Role.QUERY, Role.KEY, Role.QKV) and p.ndim >= 2:
        keys["block"] = (None if head_dim is None else "qkv" if role is Role.QKV else "head")
    elif role is Role.BIAS or (role is Role.NORM and p is getattr(info.module, "bias", None)):
        keys["block"] = "element"  # like the adam-mini package, which gives every bias plain Adam
    elif role is Role.NORM or (role is Role.OTHER and p.ndim < 2):
        keys["block"] = "tensor"
    elif p.ndim < 2:
        keys["block"] = "element"
    else:
        keys["block"] = "row"  # embeddings, LM head, value, attn out, MLP, conv, classifier, other
    return keys


def group_params(
    model: torch.nn.Module,
    infos: Iterable[ParamRole],
    keys_of: Any,
    weight_decay: float | None,
    overrides: Any,
) -> list[dict]:
    """Bucket parameters with equal group keys (``keys_of(info) -> dict``) into param groups.

    Weight decay follows :func:`~lowmem.optim.roles.weight_decay_param_groups` (no decay for norms,
    biases, position embeddings, 1-D params and the model's ``no_weight_decay()`` names). Groups keep
    the order of first appearance in the model and hold ``(name, param)`` pairs.
    """
    no_decay = {
        id(p) for g in weight_decay_param_groups(model, overrides=overrides)
        if g.get("weight_decay") == 0.0 for _, p in g["params"]
    }  # fmt: skip
    buckets: dict[tuple, dict] = {}
    for info in infos:
        keys = keys_of(info)
        if id(info.param) in no_decay:
            keys["weight_decay"] = 0.0
        elif weight_decay is not None:
            keys["weight_decay"] = weight_decay
        bucket = buckets.setdefault(tuple(sorted(keys.items())), {"params": [], **keys})
        bucket["params"].append((info.name, info.param))
    return list(buckets.values())
