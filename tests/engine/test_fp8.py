"""An fp8 base in lora_core: Linear and Conv2d weights stored in one byte (scaled per tensor, as ComfyUI's scaled-fp8
files store them) and cast per layer. Oracle: the same layers holding the dequantized weight in the compute dtype —
outputs and input gradients equal; the cast copy of a weight is not kept for the backward; a pipeline stored in fp8
trains and samples, with and without gradient checkpointing and block swap, bit for bit alike."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support.tiny_flow_models import build_tiny_flux, concept_images
from torch import nn

from lora_core import (
    DatasetConfig,
    ImageFolderDataset,
    LoRANetwork,
    TrainingConfig,
    train,
)
from lora_core.adapters.base import dense_weight
from lora_core.families import FamilyError, base_dtype, fp8_storage, load_pipeline
from lora_core.families.flux import FluxBackend
from lora_core.fp8 import Fp8Conv2d, Fp8Linear, store_in_fp8


def layer_pair(kind: str, storage: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """A layer stored in fp8 and its oracle: the same layer holding the dequantized weight."""
    torch.manual_seed(0)
    plain = nn.Linear(24, 40) if kind == "linear" else nn.Conv2d(6, 10, 3, padding=1, stride=2)
    model = nn.Sequential(copy.deepcopy(plain))
    store_in_fp8(model, storage)
    plain.weight.data = dense_weight(model[0])
    return model[0], plain


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_an_fp8_layer_computes_with_its_dequantized_weight_forward_and_backward(kind: str, storage) -> None:
    stored, oracle = layer_pair(kind, storage)
    assert type(stored) is (Fp8Linear if kind == "linear" else Fp8Conv2d)
    assert stored.weight.dtype == storage and not stored.weight.requires_grad and stored.scale_weight.numel() == 1
    x = torch.randn((3, 24) if kind == "linear" else (2, 6, 9, 9), requires_grad=True)
    y = stored(x)
    y.pow(2).sum().backward()
    gradient, x.grad = x.grad, None
    expected = oracle(x)
    expected.pow(2).sum().backward()
    assert torch.equal(y, expected) and torch.equal(gradient, x.grad)
    assert stored.weight.grad is None


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_the_scale_keeps_fp8s_relative_precision_for_small_weights(storage) -> None:
    """Weights of 1e-4 (below e4m3's normal range unscaled) keep fp8's relative step: 2^-3 for e4m3, 2^-2 for e5m2."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 64)
    linear.weight.data = torch.randn(64, 64) * 1e-4 + 2e-4 * torch.sign(torch.randn(64, 64))
    original = linear.weight.detach().clone()
    store_in_fp8(nn.Sequential(linear), storage)
    error = ((dense_weight(linear) - original).abs() / original.abs()).max().item()
    assert error <= {torch.float8_e4m3fn: 2**-4, torch.float8_e5m2: 2**-3}[storage]
    assert error < ((original.to(storage).float() - original).abs() / original.abs()).max().item()


def test_the_backward_keeps_no_wide_copy_of_the_weight() -> None:
    """What autograd saves for the input's gradient: the fp32 cast of the weight would be 4× the fp8 layer."""
    stored, oracle = layer_pair("linear", torch.float8_e4m3fn)
    x = torch.randn(3, 24, requires_grad=True)

    oracle.requires_grad_(False)  # frozen, as the base trains

    def saved_sizes(layer: nn.Module) -> list[int]:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            layer(x).sum()
        return sizes

    assert saved_sizes(oracle) == [40 * 24]  # F.linear keeps its weight, as it would keep a cast copy
    assert saved_sizes(stored) == []


def test_the_layers_kept_in_the_compute_dtype_and_the_models_dtype() -> None:
    """diffusers' layerwise-casting patterns keep the output projection (Flux's `proj_out`) in the compute dtype; the
    modulations inside adaptive norms are stored in fp8 (as ComfyUI and kohya store them); pipelines read the
    model's `dtype` to cast latents and prompts: it is the compute dtype, under the model's own class name."""
    pipeline = build_tiny_flux(seed=0)
    stored, kept = store_in_fp8(pipeline.transformer, torch.float8_e4m3fn)
    transformer = pipeline.transformer
    assert (stored, kept) == (29, 1) and type(transformer.proj_out) is nn.Linear
    assert type(transformer.transformer_blocks[0].norm1.linear) is Fp8Linear
    assert transformer.dtype == torch.float32 and type(transformer).__name__ == "FluxTransformer2DModel"
    image = pipeline("a photo", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_an_fp8_flux_predicts_like_its_dequantized_self_and_trains_alike_with_checkpointing_and_swap(tmp_path) -> None:
    pipeline = build_tiny_flux(seed=0)
    oracle = copy.deepcopy(pipeline.transformer)
    store_in_fp8(pipeline.transformer, torch.float8_e4m3fn)
    for (name, layer), (_, plain) in zip(pipeline.transformer.named_modules(), oracle.named_modules()):
        if isinstance(layer, Fp8Linear):
            plain.weight.data = dense_weight(layer)
    backend = FluxBackend(pipeline)
    dataset = ImageFolderDataset(concept_images(tmp_path, 2), DatasetConfig(resolution=64))
    encoded_latents = torch.randn(1, 16, 8, 8)
    context = backend.encode_text(["a photo"])
    timesteps = torch.tensor([500.0])
    prediction = backend.predict(encoded_latents, timesteps, context)
    plain_backend = FluxBackend(copy.copy(pipeline))
    plain_backend.transformer = oracle
    assert torch.equal(prediction, plain_backend.predict(encoded_latents, timesteps, context))

    runs = []
    for checkpointing, swap in ((False, 0), (True, 0), (True, 1)):
        network = LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 4, seed=1)
        config = TrainingConfig(steps=4, learning_rate=1e-2, validation_every=4, gradient_checkpointing=checkpointing,
                                blocks_to_swap=swap)
        result = train(backend, network, dataset, config)
        runs.append((result.losses, {key: value.clone() for key, value in network.state_dict().items()}))
    (losses, weights), *others = runs
    assert all(p.dtype == torch.float32 for p in weights.values())
    for other_losses, other_weights in others:
        assert other_losses == losses and all(torch.equal(other_weights[k], v) for k, v in weights.items())


def test_load_pipeline_stores_every_denoiser_in_fp8_on_the_host_and_refuses_nf4_with_it(tmp_path) -> None:
    pipeline = build_tiny_flux(seed=0)
    pipeline.save_pretrained(tmp_path / "base")
    assert fp8_storage("fp8") == torch.float8_e4m3fn and fp8_storage("fp8_e5m2") == torch.float8_e5m2
    assert fp8_storage("bf16") is None and base_dtype("fp8", "cpu") == torch.float32
    assert base_dtype("fp8", "cuda") == torch.bfloat16
    loaded = load_pipeline(tmp_path / "base", "cpu", torch.float32, fp8=torch.float8_e5m2)
    dtypes = {p.dtype for p in loaded.transformer.parameters()}
    assert dtypes == {torch.float32, torch.float8_e5m2}
    assert {p.dtype for p in loaded.text_encoder_2.parameters()} == {torch.float32}
    with pytest.raises(FamilyError, match=r"either in NF4 \(--qlora\) or in fp8"):
        load_pipeline(tmp_path / "base", "cpu", quantize_denoiser=True, fp8=torch.float8_e4m3fn)


def test_conv_layers_with_named_padding_stay_in_the_compute_dtype_and_say_so() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding="same"), nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.warns(UserWarning, match=r"fp8: 2 Linear/Conv2d layers stay in the compute dtype.*0 \(Conv2d\)"):
        assert store_in_fp8(model, torch.float8_e4m3fn) == (0, 0)
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(model(x), F.conv2d(F.pad(F.conv2d(x, model[0].weight, model[0].bias, padding="same"),
                                                (1, 1, 1, 1), mode="reflect"), model[1].weight, model[1].bias))


def tiny_pipeline(family: str, seed: int = 0):
    from support.tiny_flow_models import build_tiny_chroma, build_tiny_sd3
    from support.tiny_hidream import build_tiny_hidream
    from support.tiny_hunyuan_video import build_tiny_hunyuan_video
    from support.tiny_lumina2 import build_tiny_lumina2
    from support.tiny_qwen_image import build_tiny_qwen_image
    from support.tiny_sdxl import build_tiny_sdxl
    from support.tiny_wan import build_tiny_wan

    from lora_core.demo.tiny_model import build_tiny_pipeline

    return {"sd1": build_tiny_pipeline, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux,
            "chroma": build_tiny_chroma, "qwen_image": build_tiny_qwen_image, "lumina2": build_tiny_lumina2,
            "hidream": build_tiny_hidream, "wan": build_tiny_wan, "hunyuan_video": build_tiny_hunyuan_video,
            }[family](seed=seed)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux", "chroma", "qwen_image", "lumina2", "hidream", "wan",
                                    "hunyuan_video"])
def test_every_family_trains_on_an_fp8_base_as_on_its_dequantized_weights(family: str, tmp_path) -> None:
    """Two steps on the fp8 base and on the same base holding the dequantized weights in plain layers: the same losses
    and the same LoRA, bit for bit (so the fp8 layers are the layers the family's LoRA targets)."""
    from lora_core.families import backend_class, denoisers

    pipeline, oracle = tiny_pipeline(family), tiny_pipeline(family)
    for model, plain in zip(denoisers(pipeline), denoisers(oracle)):
        store_in_fp8(model, torch.float8_e4m3fn)
        plain_layers = dict(plain.named_modules())
        for name, layer in model.named_modules():
            if isinstance(layer, (Fp8Linear, Fp8Conv2d)):
                plain_layers[name].weight.data = dense_weight(layer)
    dataset = ImageFolderDataset(concept_images(tmp_path, 2), DatasetConfig(resolution=64))
    runs = []
    for each in (pipeline, oracle):
        backend = backend_class(each)(each)
        network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4, seed=1)
        result = train(backend, network, dataset, TrainingConfig(steps=2, learning_rate=1e-2, validation_every=2))
        runs.append((result.losses, result.validation, network.state_dict()))
    (losses, validation, weights), (oracle_losses, oracle_validation, oracle_weights) = runs
    assert losses == oracle_losses and validation == oracle_validation
    assert all(torch.equal(value, oracle_weights[key]) for key, value in weights.items())
    blocks = backend_class(pipeline)(pipeline).checkpoint_blocks()
    assert {type(layer) for block in blocks for layer in block.modules()}.isdisjoint({nn.Linear, nn.Conv2d}), \
        "every Linear and Conv2d of the repeated blocks is stored in fp8"


def test_both_experts_of_wan_22_a14b_are_stored_in_fp8(tmp_path) -> None:
    from support.tiny_wan import build_tiny_wan

    build_tiny_wan(seed=0, experts=True).save_pretrained(tmp_path / "base")
    pipeline = load_pipeline(tmp_path / "base", "cpu", fp8=torch.float8_e4m3fn)
    for model in (pipeline.transformer, pipeline.transformer_2):
        assert torch.float8_e4m3fn in {p.dtype for p in model.parameters()} and model.dtype == torch.float32
