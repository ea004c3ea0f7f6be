"""Adapter math against the libraries the field trusts: PEFT for LoRA/DoRA, LyCORIS for LoHa/LoKr."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_core.adapters import ALGORITHMS, AdapterError, DoRAAdapter, LoHaAdapter, LoKrAdapter, LoRAAdapter

torch.manual_seed(0)


def make_layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Each supported layer kind with an input for it."""
    return {
        "linear": (nn.Linear(24, 36), torch.randn(2, 5, 24)),
        "conv1x1": (nn.Conv2d(16, 32, 1), torch.randn(2, 16, 6, 6)),
        "conv3x3": (nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.randn(2, 16, 8, 8)),
    }


def randomize(adapter: nn.Module) -> None:
    """Give every adapter parameter non-zero values so that ΔW ≠ 0."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1 + parameter)


def hooked_output(adapter_cls, layer: nn.Module, x: torch.Tensor, multiplier: float = 1.0, **kwargs):
    adapter = adapter_cls(layer, rank=4, alpha=2.0, **kwargs)
    randomize(adapter)
    adapter.multiplier = multiplier
    adapter.attach()
    with torch.no_grad():
        out = layer(x)
    adapter.detach()
    return adapter, out


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_and_dora_match_peft(kind: str, use_dora: bool) -> None:
    from peft import LoraConfig, get_peft_model

    layer, x = make_layers()[kind]
    model = nn.Sequential()
    model.add_module("target", copy.deepcopy(layer))
    adapter, ours = hooked_output(DoRAAdapter if use_dora else LoRAAdapter, layer, x)

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=2.0, target_modules=["target"], use_dora=use_dora))
    peft_layer = peft_model.base_model.model.target
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(adapter.lora_down.weight)
        peft_layer.lora_B["default"].weight.copy_(adapter.lora_up.weight)
        if use_dora:
            magnitude = peft_layer.lora_magnitude_vector["default"].weight
            magnitude.copy_(adapter.dora_scale.reshape(magnitude.shape))
        expected = peft_model(x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, layer(x)), "the adapter must change the output"


def lycoris_module(algorithm: str, layer: nn.Module, adapter: nn.Module):
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls = {"loha": LohaModule, "lokr": LokrModule}[algorithm]
    module = cls("target", layer, 1.0, lora_dim=4, alpha=2.0)
    module.load_state_dict(adapter.state_dict(), strict=False)
    return module


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_loha_and_lokr_match_lycoris(kind: str, algorithm: str) -> None:
    layer, x = make_layers()[kind]
    reference_layer = copy.deepcopy(layer)
    adapter, ours = hooked_output(ALGORITHMS[algorithm], layer, x)
    reference = lycoris_module(algorithm, reference_layer, adapter)
    assert set(adapter.state_dict()) <= set(reference.state_dict()), "key names must be LyCORIS'"
    reference.apply_to()
    with torch.no_grad():
        expected = reference_layer(x)
        # get_weight is what LyCORIS' forward applies (its get_diff_weight multiplies by the scale a second time)
        reference_delta = reference.get_weight(adapter.weight_shape)
        torch.testing.assert_close(adapter.delta_weight(), reference_delta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_lokr_low_rank_w2_matches_lycoris() -> None:
    layer, x = nn.Linear(64, 128), torch.randn(3, 64)
    reference_layer = copy.deepcopy(layer)
    adapter, ours = hooked_output(LoKrAdapter, layer, x)
    assert hasattr(adapter, "lokr_w2_a"), "rank 4 on a 128×64 weight must use a low-rank w2"
    reference = lycoris_module("lokr", reference_layer, adapter)
    reference.apply_to()
    with torch.no_grad():
        torch.testing.assert_close(ours, reference_layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_merged_weight_equals_hooked_forward(algorithm: str, kind: str, strength: float) -> None:
    layer, x = make_layers()[kind]
    original = copy.deepcopy(layer.state_dict())
    adapter, hooked = hooked_output(ALGORITHMS[algorithm], layer, x, multiplier=strength)
    adapter.merge(strength)
    with torch.no_grad():
        merged = layer(x)
    torch.testing.assert_close(merged, hooked, rtol=1e-5, atol=1e-5)
    adapter.unmerge()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, original[key]), "unmerge must restore the exact weight"


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_new_adapter_is_identity_and_strength_zero_is_exact(algorithm: str) -> None:
    layer, x = make_layers()["conv3x3"]
    with torch.no_grad():
        base = layer(x)
        adapter = ALGORITHMS[algorithm](layer, rank=4)
        adapter.attach()
        torch.testing.assert_close(layer(x), base, rtol=0, atol=1e-6)
        randomize(adapter)
        adapter.multiplier = 0.0
        assert torch.equal(layer(x), base)
        adapter.detach()
        assert torch.equal(layer(x), base)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_parameters_stay_fp32_on_a_half_precision_base(algorithm: str) -> None:
    layer = nn.Linear(16, 16).to(torch.bfloat16)
    adapter = ALGORITHMS[algorithm](layer, rank=4)
    randomize(adapter)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    adapter.attach()
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.parameters())


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_bad_rank_is_a_clear_error(rank) -> None:
    with pytest.raises(AdapterError, match="rank must be a whole number"):
        LoRAAdapter(nn.Linear(4, 4), rank=rank)


def test_unsupported_module_is_a_clear_error() -> None:
    with pytest.raises(AdapterError, match="nn.Linear and nn.Conv2d"):
        LoHaAdapter(nn.Embedding(4, 4))
    with pytest.raises(AdapterError, match="groups=1"):
        LoRAAdapter(nn.Conv2d(4, 4, 3, groups=2))


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_from_tensors_rebuilds_the_same_adapter(algorithm: str, kind: str) -> None:
    layer, x = make_layers()[kind]
    adapter, out = hooked_output(ALGORITHMS[algorithm], layer, x)
    rebuilt = type(adapter).from_tensors(layer, adapter.state_dict())
    torch.testing.assert_close(rebuilt.delta_weight(), adapter.delta_weight(), rtol=0, atol=0)
    with pytest.raises(AdapterError, match="shape"):
        type(adapter).from_tensors(nn.Linear(8, 8) if kind == "conv3x3" else nn.Conv2d(24, 36, 3), adapter.state_dict())


class ScaledLinear(nn.Linear):
    """A Linear storing its weight divided by `scale_weight`, as ComfyUI's scaled-fp8 layers do (fp32 here)."""

    def __init__(self, source: nn.Linear, scale: float) -> None:
        super().__init__(source.in_features, source.out_features)
        self.scale_weight = nn.Parameter(torch.tensor(scale), requires_grad=False)
        with torch.no_grad():
            self.weight.copy_(source.weight / scale)
            self.bias.copy_(source.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.scale_weight, self.bias)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_scaled_weights_are_adapted_in_true_units(algorithm: str) -> None:
    """On a layer storing weight / scale_weight, every adapter predicts, merges and unmerges as on the plain layer
    holding the true weight; DoRA's magnitude is the true weight's row norm."""
    plain, x = make_layers()["linear"]
    scaled = ScaledLinear(plain, 0.01)
    stored = scaled.weight.detach().clone()
    outputs = []
    for layer in (plain, scaled):
        torch.manual_seed(0)
        adapter, hooked = hooked_output(ALGORITHMS[algorithm], layer, x, multiplier=1.0)
        outputs.append((adapter, hooked))
    (plain_adapter, plain_output), (scaled_adapter, scaled_output) = outputs
    torch.testing.assert_close(scaled_output, plain_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scaled_adapter.merged_weight(1.0), plain_adapter.merged_weight(1.0))
    if algorithm == "dora":
        torch.testing.assert_close(DoRAAdapter(scaled, rank=4).dora_scale.reshape(-1),
                                   plain.weight.detach().norm(dim=1), rtol=1e-6, atol=0)
    scaled_adapter.merge(1.0)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), scaled_output, rtol=1e-5, atol=1e-5)
    scaled_adapter.unmerge()
    assert torch.equal(scaled.weight, stored)
