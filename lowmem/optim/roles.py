"""The single place that decides what a parameter *is*.

Every per-parameter decision in lowmem reads this classifier: which tensors get weight decay,
which SlimAdam compression rule applies, which AdaPM momentum a block keeps, how Adam-mini
partitions a tensor. Nothing else in the code base matches parameter names.

Classification reads structure first and names second:

1. module types (``nn.Embedding``, ``nn.Conv*``, norm layers, ``nn.MultiheadAttention``, HF ``Conv1D``);
2. for a Linear (or ``Conv1D``), the *block* it sits in: the nearest enclosing attention block
   (a module class named ``...Attention``/``...Attn``, or a path component ``attn``, ``attention``,
   ``self_attn``, ``SelfAttention``, ``encoder_attn``, ``attn1``...) or MLP block (classes
   ``...MLP``/``...Mlp``/``FeedForward``/``...DenseReluDense``/``...Intermediate``/``TimestepEmbedding``,
   components ``mlp``, ``ffn``, ``ff``, ``feed_forward``, ``intermediate``, ``time_mlp``...). Inside an
   attention block the q/k/v/fused names pick the projection and every other Linear is the output
   (``o``, ``o_proj``, ``to_out.0``, ``dense``...); inside an MLP block the gate/up/down names
   decide and otherwise the position does: the block's last Linear is the down projection, the
   ones before it up projections (``ff.net.0.proj`` / ``ff.net.2``, ``linear_1`` / ``linear_2``). BERT's
   ``intermediate.dense`` / ``output.dense`` pair is read the same way (an ``output`` block beside
   an ``intermediate`` one is the MLP's down projection; ``attention.output.dense`` is the
   attention output);
3. the Linear's own name (``q_proj``, ``c_attn``, ``fc1``, ``lm_head`` ...) outside any block;
   a Linear inside a ``ModuleList``/``Sequential`` is named by its container (``to_out.0`` is
   ``to_out``);
4. bare parameters by name: ``pos_embed``, ``cls_token``, ``relative_position_bias_table``... are
   position embeddings (no decay; one ``v`` per position: their fan-out is the position dim, the
   one before the features, so a timm ``pos_embed`` of shape (1, N, d) keeps N values).

Names a module lists in its own ``no_weight_decay()`` (timm; read on every submodule, so a
wrapped timm model counts) and ``no_weight_decay_keywords()`` are not decayed.

Each result also carries the *fan-in* and *fan-out* dimensions of the tensor, resolved per
module type, so rules can be stated in those terms and never by raw tensor axis:

=====================  ==============  ===========  ============
module                 weight shape    fan_in dims  fan_out dims
=====================  ==============  ===========  ============
``nn.Linear``          (out, in)       (1,)         (0,)
HF ``Conv1D``          (in, out)       (0,)         (1,)
``nn.Conv{1,2,3}d``    (out, in, *k)   (1, 2, ...)  (0,)
``nn.ConvTranspose*``  (in, out, *k)   (0, 2, ...)  (1,)
``nn.Embedding``       (num, dim)      (1,)         (0,)   (fan_in = the embedding dim)
=====================  ==============  ===========  ============
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from torch import nn

__all__ = ["Role", "ParamRole", "OVERRIDES_KEY", "attention_shape_of", "classify_parameters", "name_matches",
           "unassigned_matrices", "unassigned_warning", "weight_decay_param_groups"]  # fmt: skip

# Where a config sets the overrides (the strategy's ``role_overrides``), named in error messages.
OVERRIDES_KEY = "model.init_args.optimizer.init_args.role_overrides"


class Role(enum.StrEnum):
    """What a parameter is, as far as an optimizer cares."""

    EMBEDDING = "embedding"  # token embedding
    POSITION_EMBEDDING = "position_embedding"
    QUERY = "query"
    KEY = "key"
    VALUE = "value"
    QKV = "qkv"  # fused query/key/value projection (nanoGPT c_attn, nn.MultiheadAttention)
    ATTN_OUT = "attn_out"
    MLP_UP = "mlp_up"
    MLP_GATE = "mlp_gate"
    MLP_DOWN = "mlp_down"
    LM_HEAD = "lm_head"
    CONV = "conv"
    CLASSIFIER = "classifier"  # vision / generic output head
    NORM = "norm"
    BIAS = "bias"
    OTHER = "other"


NO_DECAY_ROLES = frozenset({Role.NORM, Role.BIAS, Role.POSITION_EMBEDDING})

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase, nn.RMSNorm,
)  # fmt: skip
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# Attribute names of Linear layers, by role (module name, last component, lower case).
_LINEAR_NAMES: dict[Role, tuple[str, ...]] = {
    Role.QUERY: ("q_proj", "query", "wq", "to_q", "q", "q_lin"),
    Role.KEY: ("k_proj", "key", "wk", "to_k", "k", "k_lin"),
    Role.VALUE: ("v_proj", "value", "wv", "to_v", "v", "v_lin"),
    Role.QKV: ("c_attn", "qkv", "qkv_proj", "wqkv", "query_key_value", "in_proj", "to_qkv", "w_pack"),
    Role.ATTN_OUT: ("o_proj", "out_proj", "wo", "to_out", "attn_out", "dense", "o", "out_lin"),
    Role.MLP_UP: ("up_proj", "fc1", "c_fc", "w1", "fc_in", "dense_h_to_4h", "up", "wi", "wi_1", "fc1_x", "lin1"),
    Role.MLP_GATE: ("gate_proj", "w3", "gate", "wi_0", "fc1_g"),
    Role.MLP_DOWN: ("down_proj", "fc2", "w2", "fc_out", "dense_4h_to_h", "down", "lin2"),
    Role.LM_HEAD: ("lm_head", "embed_out", "output"),
    Role.CLASSIFIER: ("classifier", "head", "fc", "pooler", "score"),
}
# Inside an attention block every name but q/k/v/qkv is the output; inside an MLP block names
# other than gate/up/down go by position (the last Linear is the down projection).
# A Linear that projects a conditioning embedding (diffusion timestep) into a block's channels:
# the down projection of the (split) time MLP.
_CONDITIONING_NAMES = ("time_emb_proj", "time_proj", "temb_proj", "emb_proj", "cond_proj", "emb_layers")
# `c_proj` / `proj` mean the attention output inside an attention block, the MLP down
# projection inside an MLP block (nanoGPT, GPT-2, timm ViT).
_CONTEXT_NAMES = ("c_proj", "proj")
_ATTN_CONTEXT = ("attn", "attention", "self_attn", "mixer")
_POSITION_NAMES = ("wpe", "pos_emb", "position_embeddings", "pos_embed", "position_embedding", "embed_positions",
                   "pos_embedding", "absolute_pos_embed", "relative_attention_bias", "relative_position_bias_table",
                   "cls_token", "dist_token", "reg_token", "register_tokens", "mask_token", "rel_pos_h", "rel_pos_w")
_SCALE_NAMES = ("gamma", "layer_scale", "ls_gamma", "scale", "alpha")
# Block kinds, read from module classes (lower case, digits stripped) and path components.
_ATTN_CLASS = re.compile(r"(attention|attn)$")
_ATTN_COMPONENT = re.compile(r"^((self|cross|encoder|enc_dec)_?)?(attn|attention)$|^attn_?\d$|^encdecattention$|^mixer$")
_MLP_CLASS = re.compile(r"(mlp|feedforward|densereludense|denseactdense|densegatedactdense|layerff|intermediate|"
                        r"timestepembedding|swiglu|ffn)$")
_MLP_COMPONENT = re.compile(r"(^|_)(mlp|ffn|ff|feed_forward|feedforward|intermediate)$|^densereludense$|"
                            r"^time_(mlp|embedding)$|^time_embed$")


@dataclass(frozen=True)
class ParamRole:
    """One parameter of a model, with its role and fan dimensions.

    ``fan_in_dims``/``fan_out_dims`` are tensor dimensions of the parameter as the optimizer
    sees it (empty for 1-D parameters).
    """

    name: str
    param: nn.Parameter
    module: nn.Module
    role: Role
    fan_in_dims: tuple[int, ...]
    fan_out_dims: tuple[int, ...]
    listed_no_decay: bool = False  # named by a module's no_weight_decay() / no_weight_decay_keywords()
    # (n_heads, n_kv_heads, head_dim) of the attention block of a query/key/fused projection, when
    # that block says (timm num_heads/head_dim, diffusers heads/inner_dim, HF config): head-wise
    # blocks then need no model-wide n_heads, and layers with different heads each get theirs.
    heads: tuple[int, int, int] | None = None

    @property
    def decays(self) -> bool:
        """Whether weight decay applies: matrices and kernels only, never norms/biases/1-D, nor
        what a module's ``no_weight_decay()`` lists."""
        return self.param.ndim >= 2 and self.role not in NO_DECAY_ROLES and not self.listed_no_decay


def _fan_dims(module: nn.Module, param_name: str, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if ndim < 2:
        return (), ()
    rest = tuple(range(2, ndim))
    if isinstance(module, _CONV_T_TYPES):
        return (0, *rest), (1,)
    if isinstance(module, _CONV_TYPES):
        return (1, *rest), (0,)
    if type(module).__name__ == "Conv1D":  # Hugging Face GPT-2 style: weight is (in, out)
        return (0,), (1,)
    return (1, *rest), (0,)  # Linear, Embedding and anything (out, in, ...)-shaped


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _block_kind(name: str, module: nn.Module) -> str | None:
    """``"attn"``, ``"mlp"`` or None for one module of the path (its attribute name and class)."""
    cls = re.sub(r"\d+$", "", type(module).__name__.lower())
    comp = name.lower()
    if "block" in cls or "layer" in cls:  # UNetMidBlock2DCrossAttn, T5LayerFF...: a container of blocks
        cls = ""
    if isinstance(module, nn.MultiheadAttention) or _ATTN_CLASS.search(cls) or _ATTN_COMPONENT.search(comp):
        return "attn"
    if _MLP_CLASS.search(cls) or _MLP_COMPONENT.search(comp):
        return "mlp"
    return None


def _own_name(path: tuple[str, ...]) -> str:
    """The Linear's name: its attribute name, or its container's for a ``ModuleList``/``Sequential`` entry."""
    for part in reversed(path):
        if not part.isdigit():
            return part.lower()
    return ""


def _named_role(name: str, roles: Iterable[Role]) -> Role | None:
    return next((r for r in roles if name in _LINEAR_NAMES[r]), None)


def _out_features(module: nn.Module) -> int | None:
    w = getattr(module, "weight", None)
    if w is None or getattr(w, "ndim", 0) != 2:
        return None
    return int(w.shape[1] if _is_conv1d(module) else w.shape[0])


def _attention_heads(block: nn.Module, role: Role, linear: nn.Module) -> tuple[int, int, int] | None:
    """``(n_heads, n_kv_heads, head_dim)`` an attention block states about itself, else None."""
    config = getattr(block, "config", None)
    n_heads = _int_attr(block, ("num_heads", "heads", "n_head", "num_attention_heads", "n_heads"))
    n_heads = n_heads or (_int_attr(config, _HEADS_KEYS) if config is not None else None)
    if n_heads is None:
        return None
    head_dim = _int_attr(block, ("head_dim", "attention_head_size"))
    head_dim = head_dim or (_int_attr(config, _HEAD_DIM_KEYS) if config is not None else None)
    inner = _int_attr(block, ("inner_dim", "all_head_size"))
    if head_dim is None and inner is not None and inner % n_heads == 0:
        head_dim = inner // n_heads
    n_kv = _int_attr(block, ("num_key_value_heads", "num_kv_heads", "kv_heads", "n_kv_head"))
    n_kv = n_kv or (_int_attr(config, _KV_KEYS) if config is not None else None)
    groups = _int_attr(block, ("num_key_value_groups",))
    if n_kv is None and groups is not None and n_heads % groups == 0:
        n_kv = n_heads // groups
    inner_kv = _int_attr(block, ("inner_kv_dim",))
    if n_kv is None and head_dim and inner_kv is not None and inner_kv % head_dim == 0:
        n_kv = inner_kv // head_dim
    n_kv = n_kv or n_heads
    rows = _out_features(linear)
    if head_dim is None and rows is not None:  # from the projection's own rows
        per = n_heads + 2 * n_kv if role is Role.QKV else (n_heads if role is Role.QUERY else n_kv)
        head_dim = rows // per if rows % per == 0 else None
    return None if head_dim is None else (n_heads, n_kv, head_dim)


def _structural_linear_roles(model: nn.Module) -> tuple[dict[int, Role], dict[int, tuple[int, int, int]]]:
    """``id(module) -> role`` of every Linear/Conv1D that sits in a recognised block (rule 2), and
    ``id(module) -> (n_heads, n_kv_heads, head_dim)`` for the query/key/fused ones whose block says."""
    modules = dict(model.named_modules())
    roles: dict[int, Role] = {}
    heads: dict[int, tuple[int, int, int]] = {}
    for full, module in modules.items():
        if not _linear_like(module) or id(module) in roles:
            continue
        path = tuple(full.split(".")) if full else ()
        name = _own_name(path)
        if name in _CONDITIONING_NAMES:
            roles[id(module)] = Role.MLP_DOWN
            continue
        ancestors = [(path[i - 1] if i else "", modules[".".join(path[:i])]) for i in range(len(path) - 1, -1, -1)]
        # BERT-style: a block named output beside an intermediate block is the MLP's down projection.
        for i, (comp, anc) in enumerate(ancestors[:-1]):
            parent = ancestors[i + 1][1]
            if comp.lower() == "output" and hasattr(parent, "intermediate") and _block_kind("", anc) != "attn":
                roles[id(module)] = Role.MLP_DOWN
                break
            if _block_kind(comp, anc) is not None:
                break
        if id(module) in roles:
            continue
        for i, (comp, anc) in enumerate(ancestors):
            if i == 0 and not path:
                break
            kind = _block_kind(comp, anc)
            if kind is None:
                continue
            if kind == "attn":
                role = _named_role(name, (Role.QUERY, Role.KEY, Role.VALUE, Role.QKV)) or Role.ATTN_OUT
                roles[id(module)] = role
                if role in (Role.QUERY, Role.KEY, Role.QKV) and (found := _attention_heads(anc, role, module)):
                    heads[id(module)] = found
            else:
                named = _named_role(name, (Role.MLP_GATE, Role.MLP_UP, Role.MLP_DOWN))
                if named is None:  # by position (GPT-2's c_fc/c_proj, T5's wi/wo, diffusers' net.0.proj/net.2)
                    block = [m for m in anc.modules() if _linear_like(m)]
                    cls = type(anc).__name__.lower()
                    if comp.lower() == "intermediate" or cls.endswith("intermediate"):
                        named = Role.MLP_UP
                    else:
                        named = Role.MLP_DOWN if len(block) > 1 and block[-1] is module else Role.MLP_UP
                roles[id(module)] = named
            break
    return roles, heads


def _linear_role(path: tuple[str, ...], is_root_child: bool) -> Role:
    leaf = _own_name(path)
    parents = [p.lower() for p in path[:-1]]
    if leaf in _CONDITIONING_NAMES:
        return Role.MLP_DOWN
    if "pooler" in parents:  # BERT's pooler: the first layer of the classification head
        return Role.CLASSIFIER
    if leaf in _CONTEXT_NAMES:
        in_attn = any(any(a in p for a in _ATTN_CONTEXT) for p in parents)
        return Role.ATTN_OUT if in_attn else Role.MLP_DOWN
    for role, names in _LINEAR_NAMES.items():
        if leaf in names:
            if role is Role.LM_HEAD and leaf == "output" and not is_root_child:
                continue
            if role is Role.ATTN_OUT and leaf in ("dense", "o"):
                in_attn = any(any(a in p for a in _ATTN_CONTEXT) for p in parents)
                if not in_attn:
                    continue
            return role
    return Role.OTHER


def _module_role(module: nn.Module, path: tuple[str, ...], param_name: str, ndim: int,
                 structural: Mapping[int, Role] | None = None) -> Role:  # fmt: skip
    if isinstance(module, _NORM_TYPES) or (path and "norm" in path[-1].lower() and ndim <= 1):
        return Role.NORM
    if param_name == "bias" or param_name.endswith("_bias"):
        return Role.BIAS
    if isinstance(module, nn.Embedding):
        leaf = path[-1].lower() if path else ""
        return Role.POSITION_EMBEDDING if leaf in _POSITION_NAMES else Role.EMBEDDING
    if isinstance(module, nn.MultiheadAttention):
        return Role.QKV if param_name == "in_proj_weight" else Role.OTHER
    if isinstance(module, _CONV_TYPES + _CONV_T_TYPES):
        return Role.CONV
    if _linear_like(module):
        if structural and id(module) in structural:
            return structural[id(module)]
        return _linear_role(path, is_root_child=len(path) == 1)
    if param_name.lower() in _POSITION_NAMES or (path and path[-1].lower() in _POSITION_NAMES):
        return Role.POSITION_EMBEDDING
    if ndim <= 1 and (param_name.lower() in _SCALE_NAMES or "layerscale" in type(module).__name__.lower()):
        return Role.NORM  # a per-channel affine scale (ConvNeXt's gamma, timm's LayerScale): treated as a norm weight
    return Role.OTHER


def _position_fan_dims(ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A bare position embedding (1, N, d) / (N, d) / (heads, N, N)...: features last, positions before."""
    return (ndim - 1,), (ndim - 2,)


def _no_decay_names(model: nn.Module, names: list[str]) -> set[str]:
    """Full names listed by any submodule's ``no_weight_decay()`` (relative to that submodule) or
    matched by its ``no_weight_decay_keywords()`` (substrings), timm's conventions."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        keywords = getattr(module, "no_weight_decay_keywords", None)
        if not callable(listed) and not callable(keywords):
            continue
        head = f"{prefix}." if prefix else ""
        if callable(listed):
            out |= {head + n for n in (listed() or ())}
        if callable(keywords):
            words = tuple(keywords() or ())
            out |= {n for n in names if n.startswith(head) and any(w in n[len(head):] for w in words)}
    return out


def _owned_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(full name, owning module, local name, param) for each unique parameter; the first owner wins
    for tied weights (so a tied LM head is classified by its embedding)."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{mod_name}.{local_name}" if mod_name else local_name
            yield full, module, local_name, param


@functools.lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A name pattern as a regex over dotted parameter names (see :func:`name_matches`)."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**.", i) and (i == 0 or pattern[i - 1] == "."):
            out.append(r"(?:[^.]+\.)*")  # zero or more leading components
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif c == "*":
            out.append(r"[^.]*")
            i += 1
        elif c == "?":
            out.append(r"[^.]")
            i += 1
        elif c == "[" and (j := pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)) != -1:
            body = pattern[i + 1 : j]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", r"\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def name_matches(pattern: str, name: str) -> bool:
    """Whether the dotted parameter ``name`` matches ``pattern``, a glob read per name component.

    ``*`` matches within one component (never a dot), ``?`` one character of a component,
    ``[abc]``/``[!abc]`` one character of a set; ``**`` matches any number of components: a whole
    ``**.`` component zero or more of them (``**.output.dense.weight`` matches
    ``output.dense.weight`` and ``encoder.layer.0.output.dense.weight``). So
    ``encoder.layer.*.output.dense.weight`` matches the MLP's ``encoder.layer.3.output.dense.weight``
    but not ``encoder.layer.3.attention.output.dense.weight``, which an ``fnmatch`` ``*`` would.
    A name without wildcards matches only itself.
    """
    return pattern == name or _glob_regex(pattern).match(name) is not None


def _check_overrides_match(patterns: Iterable[str], names: list[str], where: str) -> None:
    """Raise a one-line ``ValueError`` for the first override pattern that matches no parameter name."""
    for pattern in patterns:
        if any(name_matches(pattern, name) for name in names):
            continue
        close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.0)
        hint = ""
        crossing = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if crossing:
            hint = (f"; `*` stops at dots (it matches within one name component): write '**.' for any depth, "
                    f"e.g. '**.{pattern.lstrip('*.')}' (the fnmatch reading would catch {crossing[0]!r})")  # fmt: skip
        raise ValueError(
            f"{where}: pattern {pattern!r} matches no parameter of the model{hint}; closest parameter names: "
            + ", ".join(close)
        )


def classify_parameters(
    model: nn.Module, overrides: Mapping[str, Role | str] | None = None, *, trainable_only: bool = True
) -> list[ParamRole]:
    """Classify every (unique, trainable) parameter of ``model``.

    Args:
        model: the model; wrappers (DDP, compiled modules) should be unwrapped first.
        overrides: ``{pattern on the parameter name: role}``; the first matching pattern wins
            (the strategies' ``role_overrides``). Patterns are globs read per dotted name
            component (:func:`name_matches`: ``*`` never crosses a dot, ``**`` does), e.g.
            ``{"**.my_attn.wq.weight": "query"}``. A model may also define ``lowmem_roles()``
            returning such a mapping (``overrides`` win over it). A pattern that matches no
            parameter name is an error (``ValueError``), as a misspelled key is.
        trainable_only: skip parameters with ``requires_grad=False``.
    """
    model_own = dict(getattr(model, "lowmem_roles", lambda: {})() or {})
    given = dict(overrides or {})
    own = {**given, **{k: v for k, v in model_own.items() if k not in given}}
    unknown = {str(v) for v in own.values()} - {r.value for r in Role}
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)} in overrides; valid roles: {[r.value for r in Role]}")
    owned = list(_owned_parameters(model))
    names = [full for full, *_ in owned]
    if own:
        _check_overrides_match(given, names, f"role override ({OVERRIDES_KEY} in a config)")
        _check_overrides_match(model_own.keys() - given.keys(), names, f"{type(model).__name__}.lowmem_roles()")
    structural, heads = _structural_linear_roles(model)
    no_decay = _no_decay_names(model, names)
    result = []
    for full, module, local, param in owned:
        if trainable_only and not param.requires_grad:
            continue
        mod_path = tuple(full.split(".")[:-1])
        role = next((Role(r) for pat, r in own.items() if name_matches(pat, full)), None)
        if role is None:
            role = _module_role(module, mod_path, local, param.ndim, structural)
        fan_in, fan_out = _fan_dims(module, local, param.ndim)
        if role is Role.POSITION_EMBEDDING and param.ndim >= 2 and not isinstance(module, nn.Embedding):
            fan_in, fan_out = _position_fan_dims(param.ndim)
        result.append(ParamRole(full, param, module, role, fan_in, fan_out, full in no_decay,
                                heads.get(id(module)) if role in (Role.QUERY, Role.KEY, Role.QKV) else None))
    return result


def unassigned_matrices(model: nn.Module, overrides: Mapping[str, Role | str] | None = None) -> list[str]:
    """Names of the trainable matrices and kernels (ndim >= 2) the classifier leaves in ``other``."""
    return [i.name for i in classify_parameters(model, overrides) if i.role is Role.OTHER and i.param.ndim >= 2]


def unassigned_warning(names: list[str], optimizer: str, shown: int = 5) -> str:
    """The one-line fit-start warning for :func:`unassigned_matrices` (empty when there are none)."""
    if not names:
        return ""
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    example = names[0]
    return (
        f"{optimizer} acts by parameter role, and {len(names)} matri{'x' if len(names) == 1 else 'ces'} of this model "
        f"{'has' if len(names) == 1 else 'have'} none (role 'other': no compression, plain Adam blocks/momentum): "
        f"{listed}. Name their roles with {OVERRIDES_KEY}: {{'{example}': mlp_up}} (globs per name component: "
        "'**.fc.weight'; roles: " + ", ".join(r.value for r in Role if r is not Role.OTHER) + "), or a "
        "lowmem_roles() method on the model; `lowmem roles --config X.yaml` lists every parameter's role."
    )


def weight_decay_param_groups(
    model: nn.Module, weight_decay: float | None = None, overrides: Mapping[str, Role | str] | None = None
) -> list[dict]:
    """Two param groups: matrices/kernels with weight decay, norms/biases/1-D params without.

    Names listed by the ``no_weight_decay()`` of the model or of any submodule (timm's convention; a
    wrapped timm model counts) also go without decay.
    With ``weight_decay=None`` the decayed group inherits the optimizer's default. Parameters are
    given as ``(name, param)`` pairs, so torch stores ``param_names`` in every group.
    """
    decay, no_decay = [], []
    for info in classify_parameters(model, overrides):
        (decay if info.decays else no_decay).append(info)
    groups = []
    if decay:
        g = {"params": [(i.name, i.param) for i in decay]}
        if weight_decay is not None:
            g["weight_decay"] = weight_decay
        groups.append(g)
    if no_decay:
        groups.append({"params": [(i.name, i.param) for i in no_decay], "weight_decay": 0.0})
    return groups


# Keys of a model's own config (Hugging Face ``PretrainedConfig``, lowmem's GPTConfig, ...).
_HEADS_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads")
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "embed_dim", "dim")
_KV_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
_HEAD_DIM_KEYS = ("head_dim", "d_kv", "kv_channels")


def _int_attr(obj: object, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(obj, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _shape(n_heads: int, dim: int | None, n_kv: int | None, head_dim: int | None) -> dict[str, int]:
    """The grouping arguments: ``dim`` is the attention width ``n_heads * head_dim`` (which is all the
    builders use it for), so a head_dim other than width/heads still cuts the right blocks."""
    if head_dim is not None:
        dim = n_heads * head_dim
    if dim is None:
        return {}
    out = {"n_heads": n_heads, "dim": dim}
    if n_kv is not None and n_kv != n_heads:
        out["n_kv_heads"] = n_kv
    return out


def _declared_shape(shape: object, owner: str) -> dict[str, int]:
    if isinstance(shape, Mapping):
        unknown = set(shape) - {"n_heads", "dim", "n_kv_heads", "head_dim"}
        if unknown or "n_heads" not in shape:
            raise ValueError(f"{owner}.attention_shape() returned {dict(shape)!r}; a mapping needs n_heads and may give "
                             "dim, n_kv_heads and head_dim")  # fmt: skip
        return _shape(shape["n_heads"], shape.get("dim"), shape.get("n_kv_heads"), shape.get("head_dim"))
    if isinstance(shape, (tuple, list)) and len(shape) in (2, 3):
        return _shape(shape[0], shape[1], shape[2] if len(shape) == 3 else None, None)
    raise ValueError(f"{owner}.attention_shape() returned {shape!r}; return (n_heads, dim), (n_heads, dim, n_kv_heads) "
                     "or {'n_heads': ..., 'dim': ..., 'n_kv_heads': ..., 'head_dim': ...}")  # fmt: skip


def attention_shape_of(model: nn.Module) -> dict[str, int]:
    """``{n_heads, dim[, n_kv_heads]}`` for head-wise optimizer blocks (Adam-mini, AdaPM-mini), read
    from the model itself, or ``{}`` when it does not say (or its attention layers disagree).

    In order: the model's ``attention_shape()`` (``(n_heads, dim)``, ``(n_heads, dim, n_kv_heads)``
    or a mapping with ``n_heads`` and any of ``dim``, ``n_kv_heads``, ``head_dim``); the one config
    of a wrapped model (``config.num_attention_heads``/``n_head``, ``hidden_size``/``n_embd``/``d_model``,
    ``num_key_value_heads``, ``head_dim``/``d_kv``: Hugging Face, lowmem's GPT); the attention
    modules' own ``num_heads``/``head_dim`` (timm, ``nn.MultiheadAttention``) when they all agree.
    ``dim`` is returned as ``n_heads * head_dim``.
    """
    declared = getattr(model, "attention_shape", None)
    if callable(declared):
        return _declared_shape(declared(), type(model).__name__)
    found: set[tuple] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        n_heads = _int_attr(config, _HEADS_KEYS) if config is not None else None
        if n_heads is None:
            continue
        dim = _int_attr(config, _WIDTH_KEYS)
        head_dim = _int_attr(config, _HEAD_DIM_KEYS)
        found.add((n_heads, dim, _int_attr(config, _KV_KEYS), head_dim))
    if not found:
        for module in model.modules():
            n_heads, head_dim = _int_attr(module, ("num_heads",)), _int_attr(module, ("head_dim",))
            if n_heads is not None and head_dim is not None:
                found.add((n_heads, None, _int_attr(module, ("num_kv_heads", "num_key_value_heads")), head_dim))
    if len(found) != 1:
        return {}
    return _shape(*found.pop())

