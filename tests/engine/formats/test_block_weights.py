"""lora_core.formats.block_weights: specs parsed to each block's weight, and each family's module names mapped to the block
the LoRA Block Weight layouts number them by (LDM input_blocks/output_blocks indices, Flux/SD3 block indices)."""
from __future__ import annotations

import pytest

from lora_core.formats.block_weights import BlockWeightError, key_weights, layouts, module_block, parse

SD1_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
          "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")


def test_sd1_presets_have_the_lora_block_weight_values() -> None:
    assert tuple(parse("INS", "SD1.x")) == SD1_17
    assert len(parse("ALL", "SD1.x")) == 26 and len(parse("NONE", "SDXL")) == 20  # every block
    assert set(parse("all", "SD1.x").values()) == {1.0}
    assert set(parse("NONE", "SD1.x").values()) == {0.0}
    assert set(parse("ALL0.5", "SD1.x").values()) == {0.5}
    on = {name: [block for block, weight in parse(name, "SD1.x").items() if weight == 1.0]
          for name in ("INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL")}
    assert on["INS"] == ["BASE", "IN01", "IN02", "IN04"]
    assert on["IND"] == ["BASE", "IN05", "IN07", "IN08"]
    assert on["INALL"] == list(SD1_17[:7])
    assert on["MIDD"] == ["BASE", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06"]
    assert on["OUTD"] == ["BASE", "OUT03", "OUT04", "OUT05", "OUT06"]
    assert on["OUTS"] == ["BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
    assert on["OUTALL"] == ["BASE", *SD1_17[8:]]


def test_vectors_of_each_layout_length() -> None:
    weights = parse(" 0.5, 1,0,0,0,0,0, -2 ,0,0,0,0,0,0,0,0,1e-1", "SD1.x")
    assert weights["BASE"] == 0.5 and weights["IN01"] == 1.0 and weights["MID"] == -2.0 and weights["OUT11"] == 0.1
    assert list(parse(",".join(["1"] * 26), "SD1.x"))[1:3] == ["IN00", "IN01"]
    assert list(parse(",".join(["1"] * 12), "SDXL")) == ["BASE", "IN04", "IN05", "IN07", "IN08", "MID",
                                                          "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
    assert len(parse(",".join(["1"] * 20), "SDXL")) == 20
    assert list(parse("1,2,3,4,5", "Flux", (2, 2))) == ["BASE", "D00", "D01", "S00", "S01"]
    assert len(layouts("Flux", (19, 38))[0]) == 58
    assert parse("0,1,2", "SD3", (2,)) == {"BASE": 0.0, "J00": 1.0, "J01": 2.0}


@pytest.mark.parametrize(("spec", "family", "depth", "message"), [
    ("1,1,1", "SD1.x", (), "SD1.x take 17 (BASE, IN01, …, OUT11) or 26 (BASE, IN00, …, OUT11) values, one per block; "
                           "got 3"),
    (",".join(["1"] * 17), "SDXL", (), "SDXL take 12 (BASE, IN04, …, OUT05) or 20"),
    ("1,1,1,1", "Flux", (2, 2), "Flux take 5 (BASE, D00, …, S01) values, one per block; got 4"),
    ("MIDD", "SDXL", (), "'MIDD' is neither a number nor a SDXL preset (NONE, ALL, ALL0.5)"),
    ("FACE", "SD1.x", (), "'FACE' is neither a number nor a SD1.x preset (NONE, ALL, ALL0.5, INS, IND"),
    ("1,x,1", "SD1.x", (), "'x' is neither a number"),
    ("ALL", "SD3", (), "not 'SD3' with depth ()"),
])
def test_bad_specs_name_family_expected_length_and_offender(spec, family, depth, message) -> None:
    with pytest.raises(BlockWeightError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(spec, family, depth)


@pytest.mark.parametrize(("key", "block"), [
    # SD1.x, diffusers naming (kohya's SD1 files) and LDM naming
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "BASE"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", "IN01"),
    ("lora_unet_down_blocks_0_attentions_1_proj_in.alpha", "IN02"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight", "IN03"),
    ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k.lora_down.weight", "IN08"),
    ("lora_unet_down_blocks_3_resnets_1_conv1.lora_down.weight", "IN11"),
    ("lora_unet_mid_block_attentions_0_proj_out.lora_down.weight", "MID"),
    ("lora_unet_up_blocks_0_resnets_2_conv2.lora_down.weight", "OUT02"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight", "OUT02"),
    ("lora_unet_up_blocks_1_attentions_0_proj_in.lora_down.weight", "OUT03"),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2.lora_down.weight", "OUT11"),
    ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight", "IN01"),
    ("lora_unet_input_blocks_11_0_in_layers_2.lora_down.weight", "IN11"),
    ("lora_unet_middle_block_1_proj_in.lora_down.weight", "MID"),
    ("lora_unet_output_blocks_10_1_transformer_blocks_0_attn2_to_v.lora_down.weight", "OUT10"),
])
def test_sd1_module_blocks(key, block) -> None:
    assert module_block(key, "SD1.x") == block


@pytest.mark.parametrize(("key", "block"), [
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "BASE"),
    ("lora_te2_text_model_encoder_layers_31_self_attn_out_proj.alpha", "BASE"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight", "IN04"),
    ("lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2.lora_up.weight", "IN08"),
    ("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0.lora_down.weight", "MID"),
    ("lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_k.lora_down.weight", "OUT00"),
    ("lora_unet_output_blocks_5_1_proj_out.lora_down.weight", "OUT05"),
    # diffusers' SDXL naming: down_blocks.1/2 hold attention, LDM input_blocks 4,5 and 7,8
    ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight", "IN04"),
    ("lora_unet_down_blocks_2_attentions_1_proj_in.lora_down.weight", "IN08"),
    ("lora_unet_up_blocks_1_attentions_2_proj_in.lora_down.weight", "OUT05"),
])
def test_sdxl_module_blocks(key, block) -> None:
    assert module_block(key, "SDXL") == block


@pytest.mark.parametrize(("key", "family", "block"), [
    ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "Flux", "D00"),
    ("lora_unet_double_blocks_18_txt_mlp_2.alpha", "Flux", "D18"),
    ("lora_unet_single_blocks_37_linear1.lora_up.weight", "Flux", "S37"),
    ("lora_te1_text_model_encoder_layers_3_self_attn_v_proj.lora_down.weight", "Flux", "BASE"),
    ("transformer.transformer_blocks.3.attn.to_q.lora_A.weight", "Flux", "D03"),
    ("transformer.single_transformer_blocks.12.proj_out.lora_B.weight", "Flux", "S12"),
    ("lora_unet_final_layer_linear.lora_down.weight", "Flux", None),
    ("transformer.transformer_blocks.23.attn.add_k_proj.lora_A.weight", "SD3", "J23"),
    ("transformer.transformer_blocks.0.ff.net.2.lora_B.weight", "SD3", "J00"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", "SD3", "BASE"),
    ("lora_unet_joint_blocks_5_x_block_attn_qkv.lora_down.weight", "SD3", "J05"),
    ("transformer.pos_embed.proj.lora_A.weight", "SD3", None),
    ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "SD3", None),
])
def test_transformer_module_blocks(key, family, block) -> None:
    assert module_block(key, family) == block


def test_a_zero_block_zeroes_exactly_that_blocks_tensors() -> None:
    keys = ["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight",
            "lora_unet_down_blocks_1_attentions_0_proj_in.alpha",
            "lora_unet_input_blocks_4_1_proj_out.lora_up.weight",
            "lora_unet_down_blocks_1_attentions_1_proj_in.lora_down.weight",
            "lora_unet_output_blocks_11_1_proj_in.lora_down.weight"]
    weights = parse("0.5,1,1,0,1,1,1,1,1,1,1,1,1,1,1,1,3", "SD1.x")  # IN04 zero
    assert key_weights(keys, "SD1.x", weights) == dict(zip(keys, [0.5, 0.0, 0.0, 0.0, 1.0, 3.0]))


def test_a_module_outside_the_layout_is_named() -> None:
    conv = "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"
    with pytest.raises(BlockWeightError, match="lora_unet_down_blocks_0_downsamplers_0_conv is in block IN03, which "
                                               "the 17-value SD1.x layout has no weight for"):
        key_weights([conv], "SD1.x", parse("INALL", "SD1.x"))
    assert key_weights([conv], "SD1.x", parse(",".join(["1"] * 26), "SD1.x")) == {conv: 1.0}
    with pytest.raises(BlockWeightError, match=r"LoRA module transformer\.pos_embed\.proj is in no SD3 block"):
        key_weights(["transformer.pos_embed.proj.lora_A.weight"], "SD3", parse("ALL", "SD3", (2,)))
