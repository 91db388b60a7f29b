"""The role classifier (lowmem.optim.roles): override patterns, the fit-start warning for matrices
left in ``other``, structure-first roles on hand-built layouts of common libraries, and the
``lowmem roles`` table. The real transformers / diffusers models are in tests/test_roles_hf.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from scripts.lightning_harness import digits, trainer
from torch import nn

from lowmem import strategies
from lowmem.lightning_modules import ImageClassifier
from lowmem.optim import Role, classify_parameters
from lowmem.optim.roles import OVERRIDES_KEY, name_matches, unassigned_matrices, weight_decay_param_groups


class BertLayerLike(nn.Module):
    """The module tree of a BERT encoder layer (attention.self.query, attention.output.dense,
    intermediate.dense, output.dense), as in transformers' BertLayer."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({"query": nn.Linear(d, d), "key": nn.Linear(d, d), "value": nn.Linear(d, d)}),
            "output": nn.ModuleDict({"dense": nn.Linear(d, d), "LayerNorm": nn.LayerNorm(d)}),
        })  # fmt: skip
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(d, 4 * d)})
        self.output = nn.ModuleDict({"dense": nn.Linear(4 * d, d), "LayerNorm": nn.LayerNorm(d)})


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleDict({"mixer_a": nn.Linear(4, 4), "mixer_b": nn.Linear(4, 4)})
        self.norm = nn.LayerNorm(4)


def test_glob_is_read_per_name_component():
    assert name_matches("encoder.layer.*.output.dense.weight", "encoder.layer.3.output.dense.weight")
    assert not name_matches("encoder.layer.*.output.dense.weight", "encoder.layer.3.attention.output.dense.weight")
    assert not name_matches("*.output.dense.weight", "a.b.output.dense.weight")  # fnmatch would match
    assert name_matches("**.output.dense.weight", "encoder.layer.3.attention.output.dense.weight")
    assert name_matches("**.output.dense.weight", "output.dense.weight")  # ** spans zero components too
    assert name_matches("h.[01].w", "h.1.w") and not name_matches("h.[!01].w", "h.1.w")
    assert not name_matches("h.?.w", "h.12.w") and name_matches("a.**", "a.b.c")


def test_overrides_apply_per_component_and_win_over_lowmem_roles():
    layer = BertLayerLike()
    roles = {i.name: i.role for i in classify_parameters(layer, {"*.dense.weight": "other"})}
    assert roles["output.dense.weight"] is Role.OTHER and roles["intermediate.dense.weight"] is Role.OTHER
    assert roles["attention.output.dense.weight"] is Role.ATTN_OUT  # two components deep: not matched by `*`

    class WithOwn(Custom):
        def lowmem_roles(self):
            return {"block.mixer_a.weight": "query", "block.*.weight": "key"}

    roles = {i.name: i.role for i in classify_parameters(WithOwn(), {"block.mixer_a.weight": "value"})}
    assert roles["block.mixer_a.weight"] is Role.VALUE  # the caller's override beats the model's own
    assert roles["block.mixer_b.weight"] is Role.KEY


def test_an_override_that_matches_nothing_is_a_one_line_error_with_the_closest_names():
    encoder = nn.ModuleDict({"layer": nn.ModuleList([BertLayerLike()])})
    with pytest.raises(ValueError) as err:
        classify_parameters(encoder, {"*.output.dense.weight": "mlp_down"})
    msg = str(err.value)
    assert "\n" not in msg and OVERRIDES_KEY in msg and "'*.output.dense.weight'" in msg
    assert "'**.output.dense.weight'" in msg  # the fnmatch reading is pointed out
    assert "closest parameter names: " in msg and "layer.0.output.dense.weight" in msg
    with pytest.raises(ValueError, match=r"pattern 'blok\.mixer_a\.weight' matches no parameter.*block\.mixer_a"):
        classify_parameters(Custom(), {"blok.mixer_a.weight": "query"})

    class BadOwn(Custom):
        def lowmem_roles(self):
            return {"nothing.here": "query"}

    with pytest.raises(ValueError, match=r"BadOwn\.lowmem_roles\(\): pattern 'nothing\.here' matches no parameter"):
        classify_parameters(BadOwn())


def test_a_strategy_refuses_an_unmatched_override_as_a_config_error():
    model = ImageClassifier(widths=[4, 8], optimizer=strategies.AdamW(role_overrides={"features.*.wieght": "conv"}))
    from lowmem.lightning_modules import ConfigError

    with pytest.raises(ConfigError, match=r"role_overrides.*'features\.\*\.wieght' matches no parameter"):
        model.configure_optimizers()


def test_frozen_parameters_count_as_matched():
    m = Custom()
    m.block["mixer_a"].requires_grad_(False)
    infos = classify_parameters(m, {"block.mixer_a.weight": "query"})
    assert "block.mixer_a.weight" not in {i.name for i in infos}


class OddNames(ImageClassifier):
    """An image classifier with a matrix the classifier cannot read."""

    def __init__(self, **kw):
        super().__init__(widths=[4, 8], **kw)
        self.mystery = nn.Parameter(torch.zeros(3, 3))


@pytest.mark.parametrize("name", ["SlimAdamW", "AdamW"])
def test_fit_start_warns_once_about_matrices_in_other_for_role_driven_optimizers(name):
    model = OddNames(optimizer=getattr(strategies, name)(lr=1e-3))
    assert unassigned_matrices(model) == ["mystery"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=1).fit(model, digits())
    found = [str(w.message) for w in caught if "role 'other'" in str(w.message)]
    if name == "AdamW":  # decay is the only thing a role changes for AdamW: nothing to warn about
        assert found == []
        return
    assert len(found) == 1 and "\n" not in found[0]
    assert "SlimAdamW" in found[0] and "1 matrix" in found[0] and "mystery" in found[0] and OVERRIDES_KEY in found[0]

    model = OddNames(optimizer=strategies.SlimAdamW(lr=1e-3, role_overrides={"mystery": "mlp_up"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=1).fit(model, digits())
    assert not [w for w in caught if "role 'other'" in str(w.message)]


def test_weight_decay_groups_keep_their_order_and_names():
    groups = weight_decay_param_groups(BertLayerLike(), 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert [n for n, _ in groups[0]["params"]][0] == "attention.self.query.weight"


def test_lowmem_roles_prints_every_parameter_with_each_optimizers_treatment(capsys):
    from lowmem.cli import main

    main(["roles", "--config", "configs/lm_slimadamw.yaml", "--model.init_args.n_layer=1",
          '--model.init_args.optimizer.init_args.role_overrides={"gpt.h.0.mlp.c_fc.weight": "other"}'])  # fmt: skip
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| gpt.")]
    from lowmem.lightning_modules import LanguageModel

    names = [i.name for i in classify_parameters(LanguageModel(n_layer=1))]
    assert [line.split(" | ")[0][2:] for line in table] == names  # every parameter, in model order
    row = {line.split(" | ")[0][2:]: line.split(" | ") for line in table}
    assert "SlimAdamW v dims *" in out  # the configured optimizer's column
    # name, shape, role, decay, SlimAdamW dims, AdaPM momentum, Adam-mini block, IO-Adam
    assert row["gpt.h.0.attn.c_attn.weight"][2:8] == ["qkv", "yes", "1", "qkv", "qkv (4:4:4, 32 rows)", "owned |"]
    assert row["gpt.wte.weight"][2] == "embedding (tied: gpt.lm_head.weight)"
    assert row["gpt.wpe.weight"][2:4] == ["position_embedding", "no"]
    assert row["gpt.h.0.mlp.c_fc.weight"][2:5] == ["other", "yes", "-"]  # the override, applied to every column
    assert "| mlp_down | 1 |" in out and "| total | " in out
    assert "1 matrix in 'other'" in out and "gpt.h.0.mlp.c_fc.weight" in out.splitlines()[-1]


class GQA(nn.Module):
    """A fused q/k/v projection with 2 query heads and 1 key/value head of head_dim 8 at width 4."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        self.attn = nn.ModuleDict({"qkv": nn.Linear(4, (2 + 2 * 1) * 8, bias=False), "proj": nn.Linear(16, 4)})

    def attention_shape(self):
        return self.shape


@pytest.mark.parametrize("shape", [(2, 16, 1), {"n_heads": 2, "n_kv_heads": 1, "head_dim": 8}], ids=["tuple", "mapping"])
def test_attention_shape_may_give_kv_heads_and_head_dim(shape):
    groups = strategies.AdamMini(lr=1e-3).param_groups(GQA(shape))
    qkv = next(g for g in groups if g["block"] == "qkv")
    assert qkv["qkv_heads"] == (2, 1) and qkv["head_dim"] == 8
    with pytest.raises(ValueError, match=r"GQA\.attention_shape\(\) returned \(2, 16, 1, 8\)"):
        strategies.AdamMini(lr=1e-3).param_groups(GQA((2, 16, 1, 8)))


class Attention(nn.Module):  # timm's layout: fused qkv and proj, num_heads/head_dim attributes
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)


class Mlp(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)


class TinyViT(nn.Module):
    """timm's VisionTransformer module tree: bare cls_token (1, 1, d) and pos_embed (1, N, d) with
    ``no_weight_decay()``, blocks of norm/attn/LayerScale/mlp, a head."""

    def __init__(self, d: int = 8, n: int = 5) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, n, d))
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, d, 4, 4)})
        block = nn.Module()
        block.norm1, block.attn, block.norm2, block.mlp = nn.LayerNorm(d), Attention(d, 2), nn.LayerNorm(d), Mlp(d)
        block.ls1 = nn.Module()
        block.ls1.gamma = nn.Parameter(torch.ones(d))
        self.blocks = nn.Sequential(block)
        self.head = nn.Linear(d, 3)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token"}


def test_timm_layout_position_embeddings_one_v_per_position_and_no_decay_when_wrapped():
    class Wrapper(nn.Module):  # a LowMemModule holding the timm model
        def __init__(self) -> None:
            super().__init__()
            self.model = TinyViT()

    model = Wrapper()
    infos = {i.name: i for i in classify_parameters(model)}
    roles = {name: i.role.value for name, i in infos.items()}
    assert roles == {
        "model.cls_token": "position_embedding", "model.pos_embed": "position_embedding",
        "model.patch_embed.proj.weight": "conv", "model.patch_embed.proj.bias": "bias",
        "model.blocks.0.norm1.weight": "norm", "model.blocks.0.norm1.bias": "norm",
        "model.blocks.0.attn.qkv.weight": "qkv", "model.blocks.0.attn.qkv.bias": "bias",
        "model.blocks.0.attn.proj.weight": "attn_out", "model.blocks.0.attn.proj.bias": "bias",
        "model.blocks.0.norm2.weight": "norm", "model.blocks.0.norm2.bias": "norm",
        "model.blocks.0.mlp.fc1.weight": "mlp_up", "model.blocks.0.mlp.fc1.bias": "bias",
        "model.blocks.0.mlp.fc2.weight": "mlp_down", "model.blocks.0.mlp.fc2.bias": "bias",
        "model.blocks.0.ls1.gamma": "norm", "model.head.weight": "classifier", "model.head.bias": "bias",
    }  # fmt: skip
    assert not infos["model.pos_embed"].decays and not infos["model.cls_token"].decays
    assert infos["model.pos_embed"].fan_out_dims == (1,) and infos["model.pos_embed"].fan_in_dims == (2,)
    decayed = {n for g in weight_decay_param_groups(model, 0.1) if g["weight_decay"] for n, _ in g["params"]}
    assert "model.pos_embed" not in decayed and "model.head.weight" in decayed
    from lowmem.optim.roles import attention_shape_of

    assert attention_shape_of(model) == {"n_heads": 2, "dim": 8}  # from the attention modules' own attributes
    for name in ("SlimAdamW", "AdamMini"):
        opt = getattr(strategies, name)(lr=1e-3).build(model)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        v = opt.state[model.model.pos_embed]["exp_avg_sq"]
        assert tuple(v.shape) == (1, 5, 1), name  # one value per position, not one for the tensor
        group = next(g for g in opt.param_groups if any(p is model.model.pos_embed for p in g["params"]))
        assert group["weight_decay"] == 0.0


def test_lowmem_models_have_no_matrix_in_other():
    from lowmem.lightning_modules import DiffusionModel, LanguageModel

    for model in (LanguageModel(n_layer=1), DiffusionModel(channels=[4, 8], time_dim=8), ImageClassifier(widths=[4, 8])):
        assert unassigned_matrices(model) == [], type(model).__name__
    roles = {i.name: i.role for i in classify_parameters(DiffusionModel(channels=[4, 8], time_dim=8))}
    assert roles["unet.time_mlp.0.weight"] is Role.MLP_UP and roles["unet.time_mlp.2.weight"] is Role.MLP_DOWN
    assert roles["unet.down_blocks.0.time_proj.weight"] is Role.MLP_DOWN
