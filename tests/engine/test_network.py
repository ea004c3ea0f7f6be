"""Injection into real diffusers/transformers modules: kohya names, exact removal, loading files' tensors."""
from __future__ import annotations

import pytest
import torch

from lora_core import LoRANetwork, NetworkError
from lora_core.families.sd1 import DiffusersBackend
from lora_core.targets import TargetError, find_targets


def kohya_rule(prefix: str, root: torch.nn.Module, blocks: list[str], conv3x3: bool) -> set[str]:
    """kohya sd-scripts' `create_modules` naming loop (networks/lora.py), transcribed as the oracle."""
    names = set()
    for name, module in root.named_modules():
        if module.__class__.__name__ in blocks:
            for child_name, child in module.named_modules():
                is_linear = child.__class__.__name__ in ("Linear", "LoRACompatibleLinear")
                is_conv2d = child.__class__.__name__ in ("Conv2d", "LoRACompatibleConv")
                is_conv2d_1x1 = is_conv2d and child.kernel_size == (1, 1)
                if is_linear or is_conv2d_1x1 or (is_conv2d and conv3x3):
                    names.add((prefix + "." + name + "." + child_name).replace(".", "_"))
    return names


CLIP_LAYER_LEAVES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def kohya_text_encoder_names(layers: int) -> set[str]:
    """The names kohya sd-scripts writes for a CLIP text encoder's layers (its names come from transformers 4's
    module tree, which transformers 5 flattened), written out as they appear in files."""
    return {f"lora_te_text_model_encoder_layers_{i}_{leaf}" for i in range(layers) for leaf in CLIP_LAYER_LEAVES}


def clip_layer(text_encoder: torch.nn.Module, path: str) -> torch.nn.Module:
    """The layer at transformers-4 `path` (`text_model.encoder.…`), found in this transformers' module tree."""
    return text_encoder.get_submodule(path if hasattr(text_encoder, "text_model") else path[len("text_model."):])


def unet_outputs(pipeline, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return pipeline.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def test_names_equal_kohya_for_every_preset(pipeline) -> None:
    backend = DiffusersBackend(pipeline)
    transformer = kohya_rule("lora_unet", pipeline.unet, ["Transformer2DModel"], conv3x3=False)
    full = kohya_rule("lora_unet", pipeline.unet, ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"], True)
    text = kohya_text_encoder_names(layers=2)
    assert set(backend.adapter_targets("transformer", False)) == transformer
    assert set(backend.adapter_targets("full", False)) == full
    assert set(backend.adapter_targets("transformer", True)) == transformer | text
    attention = set(backend.adapter_targets("attention", False))
    transformers = sum(type(m).__name__ == "Transformer2DModel" for m in pipeline.unet.modules())
    assert attention < transformer and len(attention) == 4 * 2 * transformers  # q/k/v/out × attn1/attn2
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in attention


def test_a_kohya_text_encoder_file_loads_on_every_transformers(pipeline) -> None:
    """A file as kohya writes it (`lora_te_text_model_…`) finds its layers whatever transformers' module tree."""
    shapes = {"mlp_fc1": (64, 32), "mlp_fc2": (32, 64)}
    tensors = {}
    for name in kohya_text_encoder_names(layers=2):
        out_features, in_features = shapes.get(name.split("_", 7)[-1], (32, 32))
        tensors[f"{name}.lora_down.weight"] = torch.full((4, in_features), 0.01)
        tensors[f"{name}.lora_up.weight"] = torch.full((out_features, 4), 0.01)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    network, unmatched = LoRANetwork.from_tensors(tensors, DiffusersBackend(pipeline).loadable_modules())
    assert unmatched == [] and len(network.adapters) == 12
    q_proj = network.adapters["lora_te_text_model_encoder_layers_1_self_attn_q_proj"]
    assert q_proj.base is clip_layer(pipeline.text_encoder, "text_model.encoder.layers.1.self_attn.q_proj")


def test_unknown_preset_is_a_clear_error(pipeline) -> None:
    with pytest.raises(TargetError, match="choose one of"):
        find_targets(pipeline.unet, "everything")
    with pytest.raises(NetworkError, match="no modules"):
        LoRANetwork.create({})


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha", "lokr"])
def test_attach_then_detach_restores_exact_outputs_and_modules(pipeline, algorithm: str) -> None:
    modules_before = dict(pipeline.unet.named_modules())
    state_before = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    base = unet_outputs(pipeline)
    network = LoRANetwork.create(DiffusersBackend(pipeline).adapter_targets("full", False), algorithm, rank=4)
    for adapter in network.adapters.values():
        for parameter in adapter.parameters():
            torch.nn.init.normal_(parameter, std=0.05)
    network.attach()
    changed = unet_outputs(pipeline)
    assert not torch.allclose(changed, base, atol=1e-4)
    network.multiplier = 0.0
    assert torch.equal(unet_outputs(pipeline), base)
    network.multiplier = 1.0
    network.detach()
    assert torch.equal(unet_outputs(pipeline), base)
    assert all(module is modules_before[name] for name, module in pipeline.unet.named_modules())
    assert all(torch.equal(v, state_before[k]) for k, v in pipeline.unet.state_dict().items())

    network.merge(1.0)
    torch.testing.assert_close(unet_outputs(pipeline), changed, rtol=1e-4, atol=1e-5)
    network.unmerge()
    assert torch.equal(unet_outputs(pipeline), base)


def test_from_tensors_strict_and_lenient(pipeline) -> None:
    backend = DiffusersBackend(pipeline)
    network = LoRANetwork.create(backend.adapter_targets("attention", True), rank=4)
    tensors = network.kohya_tensors()
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(4, 32)
    tensors["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(NetworkError, match="1 of .* modules in the file match no layer.*no_such_block"):
        LoRANetwork.from_tensors(tensors, backend.loadable_modules())
    rebuilt, unmatched = LoRANetwork.from_tensors(tensors, backend.loadable_modules(), strict=False)
    assert unmatched == ["lora_unet_no_such_block_to_q"]
    assert set(rebuilt.adapters) == set(network.adapters)
    assert rebuilt.has_text_encoder


def test_wrong_shapes_name_the_module(pipeline) -> None:
    backend = DiffusersBackend(pipeline)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{name}.lora_down.weight": torch.zeros(4, 99), f"{name}.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(NetworkError, match=f"{name}.*shape"):
        LoRANetwork.from_tensors(tensors, backend.loadable_modules())


def widest_useful_rank(layer: torch.nn.Module) -> int:
    """min(out, in · kernel): the highest rank a ΔW of this layer can have (hand computation)."""
    weight = layer.weight
    return min(weight.shape[0], weight[0].numel())


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha"])
def test_a_rank_wider_than_a_layer_is_clamped_per_layer_with_a_warning(pipeline, algorithm: str) -> None:
    """The tiny UNet has 32- and 64-wide layers: rank 48 fits only the 64-wide ones; the others get their width and
    keep the asked scale alpha / rank."""
    targets = DiffusersBackend(pipeline).adapter_targets("full", False)
    with pytest.warns(UserWarning, match=r"rank 48 is more than \d+ of \d+ layers can use"):
        network = LoRANetwork.create(targets, algorithm, rank=48, alpha=24)
    expected = {name: min(48, widest_useful_rank(layer)) for name, layer in targets.items()}
    assert {name: adapter.rank for name, adapter in network.items()} == expected
    assert network.clamped_ranks == {name: rank for name, rank in expected.items() if rank < 48}
    assert 48 in expected.values() and network.clamped_ranks, "the test needs both kinds of layer"
    assert all(float(adapter.scale) == 0.5 for _, adapter in network.items())
    assert (network.rank, network.alpha) == (48, 24.0)
    rebuilt, _ = LoRANetwork.from_tensors(network.kohya_tensors(), targets)
    assert (rebuilt.rank, rebuilt.alpha) == (48, 24.0)


def test_lokr_keeps_lycoris_full_w2_instead_of_clamping(pipeline) -> None:
    """LyCORIS does not clamp LoKr: a rank too large for w2 makes w2 full (scale 1), which is smaller anyway."""
    targets = DiffusersBackend(pipeline).adapter_targets("attention", False)
    network = LoRANetwork.create(targets, "lokr", rank=16, alpha=8)
    assert (network.rank, network.alpha) == (16, 8.0) and network.clamped_ranks == {}
    assert all(hasattr(adapter, "lokr_w2") for _, adapter in network.items())  # 32/64-wide: w2 is at most 8×8
