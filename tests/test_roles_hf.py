"""Roles of every parameter of tiny random-initialised models of transformers, diffusers and timm
(built from configs: nothing is downloaded). Skipped where the library is not installed
(``pip install -e '.[models]'``; timm needs a torchvision that matches the installed torch, see
docs/roles.md)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowmem.optim import Role, classify_parameters
from lowmem.optim.roles import attention_shape_of, name_matches

warnings.filterwarnings("ignore", message=".*token_id.*")


def assert_roles(model: torch.nn.Module, expected: dict[str, str], decay_off: set[str] = frozenset()) -> None:
    """Every parameter matches one pattern of ``expected`` (first match; then :data:`COMMON`) and has
    that role; none is in ``other``; ``decay_off`` patterns name the matrices that must not be decayed."""
    expected = {**expected, **COMMON}
    wrong, unmatched = [], []
    for info in classify_parameters(model):
        role = next((r for pattern, r in expected.items() if name_matches(pattern, info.name)), None)
        if role is None:
            unmatched.append(info.name)
        elif info.role is not Role(role):
            wrong.append(f"{info.name}: {info.role.value} (expected {role})")
        if info.param.ndim >= 2 and any(name_matches(p, info.name) for p in decay_off) == info.decays:
            wrong.append(f"{info.name}: decays={info.decays}")
    assert not unmatched and not wrong, (unmatched, wrong)


# Norm layers' weights and biases are norms; every other bias a bias.
COMMON = {"**.*norm*.*": "norm", "**.*LayerNorm.*": "norm", "**.ln_*.*": "norm", "**.bias": "bias"}


@pytest.fixture(scope="module")
def T():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    return transformers


def test_gpt2_conv1d_roles_and_tied_head(T):
    m = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=8,
                                       bos_token_id=0, eos_token_id=0))  # fmt: skip
    assert_roles(m, {"transformer.wte.weight": "embedding", "transformer.wpe.weight": "position_embedding",
                     "**.attn.c_attn.weight": "qkv", "**.attn.c_proj.weight": "attn_out",
                     "**.mlp.c_fc.weight": "mlp_up", "**.mlp.c_proj.weight": "mlp_down"},
                 decay_off={"transformer.wpe.weight"})  # fmt: skip
    assert attention_shape_of(m) == {"n_heads": 2, "dim": 16}
    infos = {i.name: i for i in classify_parameters(m)}
    assert infos["transformer.h.0.attn.c_attn.weight"].fan_out_dims == (1,)  # Conv1D: (in, out)


def test_llama_gqa_with_a_head_dim_of_its_own(T):
    cfg = T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, vocab_size=50, tie_word_embeddings=False)  # fmt: skip
    m = T.LlamaForCausalLM(cfg)
    assert_roles(m, {"model.embed_tokens.weight": "embedding", "**.q_proj.weight": "query",
                     "**.k_proj.weight": "key", "**.v_proj.weight": "value", "**.o_proj.weight": "attn_out",
                     "**.gate_proj.weight": "mlp_gate", "**.up_proj.weight": "mlp_up", "**.down_proj.weight": "mlp_down",
                     "lm_head.weight": "lm_head"})  # fmt: skip
    # head_dim 8 != 16 / 4: dim is passed as heads * head_dim, so Adam-mini cuts 8-row heads
    assert attention_shape_of(m) == {"n_heads": 4, "dim": 32, "n_kv_heads": 2}
    from lowmem import strategies

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = m

    groups = strategies.AdamMini(lr=1e-3).param_groups(Wrapped())
    q = next(g for g in groups if any(n.endswith("q_proj.weight") for n, _ in g["params"]))
    assert q["block"] == "head" and q["head_dim"] == 8


def test_fused_gqa_qkv_is_cut_by_the_configs_kv_heads(T):
    cfg = T.Phi3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=50, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    m = T.Phi3ForCausalLM(cfg)
    assert_roles(m, {"model.embed_tokens.weight": "embedding", "**.self_attn.qkv_proj.weight": "qkv",
                     "**.self_attn.o_proj.weight": "attn_out", "**.mlp.gate_up_proj.weight": "mlp_up",
                     "**.mlp.down_proj.weight": "mlp_down", "lm_head.weight": "lm_head"})  # fmt: skip
    assert attention_shape_of(m) == {"n_heads": 4, "dim": 16, "n_kv_heads": 2}
    from lowmem import strategies
    from lowmem.optim.blocks import qkv_split

    for name in ("AdamMini", "AdaPM"):
        groups = strategies.AdamMini(lr=1e-3).param_groups(m) if name == "AdamMini" else \
            strategies.AdaPM(lr=1e-3, second_moment="mini").param_groups(m)
        qkv = next(g for g in groups if any(n.endswith("qkv_proj.weight") for n, _ in g["params"]))
        assert qkv["qkv_heads"] == (4, 2) and qkv["head_dim"] == 4, name
    assert qkv_split(4 * 4 + 2 * 2 * 4, (4, 2)) == (16, 8, 8)  # not three equal thirds of 32


def test_bert_mlp_is_read_from_its_intermediate_output_pair(T):
    m = T.BertForSequenceClassification(T.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=32, vocab_size=50, max_position_embeddings=16))
    assert_roles(m, {"bert.embeddings.word_embeddings.weight": "embedding",
                     "bert.embeddings.token_type_embeddings.weight": "embedding",
                     "bert.embeddings.position_embeddings.weight": "position_embedding",
                     "**.attention.self.query.weight": "query", "**.attention.self.key.weight": "key",
                     "**.attention.self.value.weight": "value", "**.attention.output.dense.weight": "attn_out",
                     "bert.encoder.layer.*.intermediate.dense.weight": "mlp_up",
                     "bert.encoder.layer.*.output.dense.weight": "mlp_down",
                     "bert.pooler.dense.weight": "classifier", "classifier.weight": "classifier"},
                 decay_off={"bert.embeddings.position_embeddings.weight"})  # fmt: skip


def test_encoder_decoders_t5_and_bart(T):
    t5 = T.T5ForConditionalGeneration(T.T5Config(d_model=16, d_ff=32, d_kv=4, num_layers=1, num_decoder_layers=1,
                                                 num_heads=2, vocab_size=50, feed_forward_proj="gated-gelu"))
    assert_roles(t5, {"shared.weight": "embedding", "**.q.weight": "query", "**.k.weight": "key",
                      "**.v.weight": "value", "**.o.weight": "attn_out",
                      "**.relative_attention_bias.weight": "position_embedding",
                      "**.DenseReluDense.wi_0.weight": "mlp_gate", "**.DenseReluDense.wi_1.weight": "mlp_up",
                      "**.DenseReluDense.wo.weight": "mlp_down",
                      "lm_head.weight": "lm_head"},
                 decay_off={"**.relative_attention_bias.weight"})  # fmt: skip
    assert attention_shape_of(t5) == {"n_heads": 2, "dim": 8}  # d_kv = 4 per head, not 16 / 2
    bart = T.BartForConditionalGeneration(T.BartConfig(d_model=16, encoder_layers=1, decoder_layers=1,
                                                       encoder_attention_heads=2, decoder_attention_heads=2,
                                                       encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50,
                                                       max_position_embeddings=16))  # fmt: skip
    assert_roles(bart, {"model.shared.weight": "embedding", "**.embed_positions.weight": "position_embedding",
                        "**.q_proj.weight": "query", "**.k_proj.weight": "key", "**.v_proj.weight": "value",
                        "**.out_proj.weight": "attn_out", "**.fc1.weight": "mlp_up", "**.fc2.weight": "mlp_down",
                        "**.layernorm_embedding.*": "norm"},
                 decay_off={"**.embed_positions.weight"})  # fmt: skip


def test_diffusers_unets_attention_outputs_feed_forwards_and_time_embeddings():
    D = pytest.importorskip("diffusers")
    unet_roles = {"conv_in.weight": "conv", "conv_out.weight": "conv", "**.conv[12].weight": "conv",
                  "**.conv_shortcut.weight": "conv", "**.conv.weight": "conv", "**.proj_in.weight": "conv",
                  "**.proj_out.weight": "conv", "time_embedding.linear_1.weight": "mlp_up",
                  "time_embedding.linear_2.weight": "mlp_down", "**.time_emb_proj.weight": "mlp_down",
                  "**.to_q.weight": "query", "**.to_k.weight": "key", "**.to_v.weight": "value",
                  "**.to_out.0.weight": "attn_out", "**.ff.net.0.proj.weight": "mlp_up",
                  "**.ff.net.2.weight": "mlp_down"}  # fmt: skip
    plain = D.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)
    assert_roles(plain, unet_roles)
    cond = D.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                  layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                  norm_num_groups=4, attention_head_dim=2)  # fmt: skip
    assert_roles(cond, unet_roles)
    # head_dim differs per block (2 heads of 8 channels, then of 16): each projection gets its own block's.
    varied = D.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                    layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                    norm_num_groups=4, attention_head_dim=(2, 2))  # fmt: skip
    from lowmem import strategies

    assert attention_shape_of(varied) == {}  # no one model-wide shape
    groups = strategies.AdamMini(lr=1e-3).param_groups(varied)
    head_dims = {n: g["head_dim"] for g in groups if g["block"] == "head" for n, _ in g["params"]}
    assert head_dims["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == 8 // 2
    assert head_dims["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == 16 // 2
    assert head_dims["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == 16 // 2


def test_timm_vit_resnet_convnext():
    timm = pytest.importorskip("timm")  # needs a torchvision built for the installed torch
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10)
    assert_roles(vit, {"cls_token": "position_embedding", "pos_embed": "position_embedding",
                       "patch_embed.proj.weight": "conv", "**.attn.qkv.weight": "qkv", "**.attn.proj.weight": "attn_out",
                       "**.mlp.fc1.weight": "mlp_up", "**.mlp.fc2.weight": "mlp_down", "head.weight": "classifier"},
                 decay_off={"cls_token", "pos_embed"})  # fmt: skip
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert_roles(resnet, {"**.conv*.weight": "conv", "**.downsample.0.weight": "conv",
                          "**.bn*.*": "norm", "**.downsample.1.*": "norm", "fc.weight": "classifier"})
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    assert_roles(convnext, {"stem.0.weight": "conv", "**.conv_dw.weight": "conv", "**.mlp.fc*.weight": "conv",
                            "**.downsample.1.weight": "conv", "**.downsample.0.*": "norm", "**.gamma": "norm",
                            "stem.1.*": "norm", "head.fc.weight": "classifier"})  # fmt: skip


def test_the_hf_causal_lm_example_trains_under_lowmem_fit(T, monkeypatch, tmp_path, capsys):
    from pathlib import Path

    from lowmem.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", "examples/hf_causal_lm.yaml", "--trainer.max_steps=3", "--trainer.val_check_interval=3",
              "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert "step 3: val/loss=" in capsys.readouterr().out
    assert not [w for w in caught if "role 'other'" in str(w.message)]
