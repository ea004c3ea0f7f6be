"""Memory savers: gradient checkpointing, mixed precision, QLoRA over a 4-bit base."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_core import DatasetConfig, ImageFolderDataset, LoRANetwork, TrainingConfig, TrainingError, train
from lora_core.demo.tiny_model import build_tiny_pipeline
from lora_core.families.sd1 import DiffusersBackend
from lora_core.training.encoded import EncodedDataset
from lora_core.training.loop import diffusion_loss
from lora_core.training.objectives import DiscreteObjective
from support.training_runs import make, snapshot


def saved_activation_bytes(backend, network, dataset, checkpointing: bool) -> tuple[int, float]:
    """Bytes autograd keeps for backward in one training forward, and the loss."""
    from lora_core.training.loop import checkpointed

    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    encoded = EncodedDataset(backend, dataset, 0, cache_text=True)
    batch = next(dataset.batches(2, torch.Generator().manual_seed(0)))
    objective = DiscreteObjective(backend.alphas_cumprod(), backend.prediction_type)
    with network.applied(1.0), checkpointed(backend.checkpoint_blocks() if checkpointing else []):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = diffusion_loss(backend, objective, encoded.batch_latents(batch), encoded.batch_conditioning(batch),
                                  torch.Generator().manual_seed(0))
        loss.backward()
    return sum(saved), loss.item()


def test_gradient_checkpointing_keeps_less_for_backward_and_the_same_loss(pipeline, concept_dir) -> None:
    backend, dataset, network = make(pipeline, concept_dir)
    plain_bytes, plain_loss = saved_activation_bytes(backend, network, dataset, checkpointing=False)
    grads = {name: p.grad.clone() for name, p in network.named_parameters()}
    network.zero_grad()
    checkpointed_bytes, checkpointed_loss = saved_activation_bytes(backend, network, dataset, checkpointing=True)
    assert checkpointed_bytes < 0.5 * plain_bytes
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, parameter in network.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-4, atol=1e-7)

    result = train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1,
                                                              gradient_checkpointing=True))
    assert result.steps == 2 and not any("forward" in block.__dict__ for block in backend.checkpoint_blocks())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_adapters_and_a_close_loss(pipeline, concept_dir, precision: str) -> None:
    losses = {}
    for mode in ("no", precision):
        backend, dataset, network = make(pipeline, concept_dir)
        result = train(backend, network, dataset, TrainingConfig(steps=3, gradient_accumulation=1, seed=5,
                                                                  mixed_precision=mode))
        losses[mode] = result.losses
        assert all(p.dtype == torch.float32 for p in network.parameters())
    assert np.isfinite(losses[precision]).all()
    assert losses[precision] == pytest.approx(losses["no"], rel=0.05)


def test_qlora_trains_fp32_adapters_over_a_4bit_base(concept_dir) -> None:
    from lora_core.quantize import quantize_linear_layers

    pipeline = build_tiny_pipeline(0)
    full_bytes = sum(m.weight.numel() * m.weight.element_size() for m in pipeline.unet.modules()
                     if isinstance(m, torch.nn.Linear))
    assert quantize_linear_layers(pipeline.unet) > 0
    quantized = [m for m in pipeline.unet.modules() if type(m).__name__ == "Linear4bit"]
    packed_bytes = sum(m.weight.numel() * m.weight.element_size() for m in quantized)
    assert packed_bytes < 0.2 * full_bytes
    backend = DiffusersBackend(pipeline)
    dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64))
    for algorithm in ("lora", "dora"):
        network = LoRANetwork.create(backend.adapter_targets("attention", False), algorithm, rank=4)
        before = snapshot(network)
        result = train(backend, network, dataset, TrainingConfig(steps=2, gradient_accumulation=1,
                                                                  learning_rate=1e-3))
        assert np.isfinite(result.losses).all() and all(p.dtype == torch.float32 for p in network.parameters())
        assert any(not torch.equal(v, before[k]) for k, v in network.state_dict().items())


def block_inputs_and_gradients(offload: bool) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    """Tiny Flux under gradient checkpointing: the names of its blocks' inputs that carry gradients and are still
    alive after the forward, the prediction, and the LoRA's gradients."""
    import weakref

    from support.tiny_flow_models import build_tiny_flux

    from lora_core.families.flux import FluxBackend
    from lora_core.training.loop import checkpointed

    backend = FluxBackend(build_tiny_flux(seed=0))
    torch.manual_seed(0)
    network = LoRANetwork.create(backend.adapter_targets("full", False), "lora", 4, 4)
    for parameter in network.parameters():  # non-zero up weights: gradients reach every layer and block input
        torch.nn.init.normal_(parameter, std=0.1)
    inputs = []

    def keep_input(block, args, kwargs):
        inputs.extend((name, weakref.ref(value)) for name, value in [*enumerate(args), *kwargs.items()]
                      if isinstance(value, torch.Tensor) and value.requires_grad)

    blocks = backend.checkpoint_blocks()
    hooks = [block.register_forward_pre_hook(keep_input, with_kwargs=True) for block in blocks]
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    conditioning = backend.encode_text(["a photo of sks"])
    with network.applied(1.0), checkpointed(blocks, torch.device("cpu") if offload else None):
        prediction = backend.predict(latents, torch.tensor([0.5]), conditioning)
        alive = [name for name, reference in inputs if reference() is not None]
        prediction.square().mean().backward()
    for hook in hooks:
        hook.remove()
    assert inputs and not any("forward" in block.__dict__ for block in blocks)
    return alive, prediction.detach(), {name: p.grad for name, p in network.named_parameters()}


def test_cpu_offload_checkpointing_lets_go_of_the_block_inputs_and_changes_nothing_else() -> None:
    """The activations the checkpointed blocks take stay alive on their device under plain checkpointing, and nothing
    holds them with cpu_offload_checkpointing (its host copies are what the recompute reads); only the time embedding
    stays, which the model's last layer holds anyway. Prediction and every gradient are bit for bit the same."""
    kept, prediction, gradients = block_inputs_and_gradients(offload=False)
    offloaded, offloaded_prediction, offloaded_gradients = block_inputs_and_gradients(offload=True)
    assert kept.count("hidden_states") == 2 and kept.count("encoder_hidden_states") == 2  # double and single block
    assert offloaded == ["temb", "temb"]
    assert torch.equal(prediction, offloaded_prediction)
    assert gradients.keys() == offloaded_gradients.keys()
    for name, gradient in gradients.items():
        assert gradient is not None and gradient.abs().sum() > 0, name
        assert torch.equal(gradient, offloaded_gradients[name]), name


def test_cpu_offload_checkpointing_is_refused_where_it_cannot_do_what_it_says(pipeline, concept_dir) -> None:
    backend, dataset, network = make(pipeline, concept_dir)
    for config, reason in [
        (TrainingConfig(steps=1, cpu_offload_checkpointing=True), "gradient_checkpointing is off"),
        (TrainingConfig(steps=1, cpu_offload_checkpointing=True, gradient_checkpointing=True),
         "trains on the CPU, where the activations already are in host memory"),
    ]:
        with pytest.raises(TrainingError, match=reason):
            train(backend, network, dataset, config)
    backend.device = torch.device("cuda")  # a UNet on a GPU: refused before anything moves there
    with pytest.raises(TrainingError, match="a UNet keeps its skip connections outside its blocks"):
        train(backend, network, dataset, TrainingConfig(steps=1, cpu_offload_checkpointing=True,
                                                        gradient_checkpointing=True))
