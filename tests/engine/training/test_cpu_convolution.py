"""Frozen CPU convolutions by size: the same numbers as PyTorch's own choice, on the kernel the rule names."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.profiler import profile

from lora_core import DatasetConfig, ImageFolderDataset, LoRANetwork, TrainingConfig, TrainingError, train
from lora_core.families.sd1 import DiffusersBackend
from lora_core.training import cpu_convolution
from lora_core.training.cpu_convolution import kernels_by_size


def kernels_run(function) -> set[str]:
    """The convolution kernels (aten operators) that `function` ran, forward and backward."""
    with profile() as profiler:
        function()
    return {event.key for event in profiler.key_averages() if "conv" in event.key and "mkldnn" in event.key
            or "slow_conv2d" in event.key}


def forward_and_input_gradient(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().requires_grad_(True)
    output = conv(x)
    output.backward(grad)
    return output.detach(), x.grad


@pytest.mark.parametrize("channels, size, batch, gemm", [
    (1280, 8, 1, True),     # a UNet's deepest level: 64 output pixels, 14.7 M weights
    (640, 16, 1, True),     # 256 output pixels: the rule's limit
    (320, 32, 1, False),    # 1024 output pixels: oneDNN's
    (640, 8, 4, True),      # a batch of 4 at 8×8: 256 output pixels
    (64, 8, 4, False),      # a 37 k-value weight: its reorder costs microseconds, nothing to gain
    (64, 8, 1, False),      # 4,096 input values: PyTorch already takes GEMM, nothing to route
])
def test_frozen_convolutions_run_on_the_kernel_the_rule_names_and_compute_the_same(channels, size, batch, gemm):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1).requires_grad_(False)
    x, grad = torch.randn(batch, channels, size, size), torch.randn(batch, channels, size, size)
    expected = forward_and_input_gradient(conv, x, grad)
    default_kernels = kernels_run(lambda: forward_and_input_gradient(conv, x, grad))
    with kernels_by_size([conv]):
        routed = forward_and_input_gradient(conv, x, grad)
        routed_kernels = kernels_run(lambda: forward_and_input_gradient(conv, x, grad))
    for got, want in zip(routed, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    on_gemm = {"aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"}
    assert on_gemm <= routed_kernels if gemm else not routed_kernels & on_gemm or on_gemm <= default_kernels
    if gemm and batch * channels * size * size > 20480:  # where routing changes PyTorch's choice
        assert not default_kernels & on_gemm and any("mkldnn" in key for key in default_kernels)


def test_trained_weights_and_other_tensors_keep_pytorchs_kernel_and_their_gradients():
    torch.manual_seed(0)
    trained = nn.Conv2d(1280, 1280, 3, padding=1)  # LoCon-style: the base weight itself trains
    x = torch.randn(1, 1280, 8, 8)
    with kernels_by_size([trained]):
        assert "aten::_slow_conv2d_forward" not in kernels_run(lambda: trained(x).sum().backward())
        assert trained.weight.grad is not None and trained.weight.grad.abs().sum() > 0
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: PyTorch's path, in bf16
            trained.requires_grad_(False)
            assert trained(x).dtype == torch.bfloat16


def test_the_modules_and_the_global_flag_are_restored_even_after_an_error():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 5))
    flag = torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError, match="inside"):
        with kernels_by_size([model, model[0]]):
            assert "_conv_forward" in model[0].__dict__
            assert "_conv_forward" not in model[1].__dict__  # grouped: not measured, left alone
            assert "_conv_forward" not in model[2].__dict__  # 5×5: PyTorch always takes oneDNN, left alone
            raise RuntimeError("inside")
    assert all("_conv_forward" not in conv.__dict__ for conv in model)
    assert torch.backends.mkldnn.enabled == flag


def test_pytorch_kernels_inside_the_block_take_pytorchs_path_and_then_route_again():
    conv = nn.Conv2d(1280, 1280, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 1280, 8, 8)
    with torch.no_grad():
        expected = conv(x)
        with kernels_by_size([conv]):
            with cpu_convolution.pytorch_kernels([conv, conv]):
                assert "aten::_slow_conv2d_forward" not in kernels_run(lambda: conv(x))
                assert torch.equal(conv(x), expected)  # bit for bit: what generating after training gives
            assert "aten::_slow_conv2d_forward" in kernels_run(lambda: conv(x))
    assert "_conv_forward" not in conv.__dict__


def test_a_frozen_convolution_keeps_only_its_weight_for_backward():
    """PyTorch's convolution keeps its input for backward even where the weight is frozen; the routed one keeps
    only the weight (which exists anyway), so the activations it would have held are not kept."""
    conv = nn.Conv2d(1280, 1280, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 1280, 8, 8, requires_grad=True)

    def saved_values() -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            conv(x)
        return sum(t.numel() for t in saved if t.data_ptr() != conv.weight.data_ptr())

    assert saved_values() >= x.numel()
    with kernels_by_size([conv]):
        assert saved_values() == 0


def test_training_by_size_matches_pytorchs_kernels_within_fp32_rounding(pipeline, concept_dir, monkeypatch):
    """The same run (batch 2, so PyTorch would take oneDNN everywhere) with both settings: equal losses and LoRA
    weights up to fp32 rounding, and the by-size run did route the UNet's convolutions (every one with a small
    output: the tiny UNet's weights are all below the size limit, which is lifted here). Its sample image is drawn on
    PyTorch's kernels and equals a generation after training bit for bit."""
    monkeypatch.setattr(cpu_convolution, "GEMM_MIN_WEIGHT_VALUES", 0)
    routed = []
    apply = cpu_convolution.FrozenConvolution.apply
    monkeypatch.setattr(cpu_convolution.FrozenConvolution, "apply",
                        lambda *args: routed.append(args[0].shape) or apply(*args))
    results, initial = {}, None
    for kernels in ("pytorch", "by_size"):
        backend = DiffusersBackend(pipeline)
        dataset = ImageFolderDataset(concept_dir, DatasetConfig(resolution=64))
        network = LoRANetwork.create(backend.adapter_targets("attention", False), rank=4, seed=3)
        draw = backend.sample_images
        backend.sample_images = lambda *args: routed.append("sampling") or draw(*args)
        initial = {k: v.clone() for k, v in network.state_dict().items()}
        config = TrainingConfig(steps=4, learning_rate=1e-3, batch_size=2, gradient_accumulation=1, seed=5,
                                validation_every=2, sample_every=4, sample_steps=2, cpu_conv_kernels=kernels)
        result = train(backend, network, dataset, config)
        results[kernels] = (result, {k: v.clone() for k, v in network.state_dict().items()})
        assert bool(set(routed) - {"sampling"}) == (kernels == "by_size")
        assert routed[routed.index("sampling") + 1:] == [], "samples are drawn on PyTorch's kernels"
        with network.applied(1.0):
            again = backend.sample_images(list(config.sample_prompts), config.sample_seed, config.sample_steps)
        assert np.array_equal(np.asarray(result.samples[0][1][0]), np.asarray(again[0]))
        routed.clear()
    (plain, plain_weights), (by_size, by_size_weights) = results["pytorch"], results["by_size"]
    assert len(plain.losses) == 4
    torch.testing.assert_close(by_size.losses, plain.losses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close([v for _, v in by_size.validation], [v for _, v in plain.validation], rtol=1e-4, atol=1e-6)
    # AdamW turns the rounding of near-zero gradients into whole steps of single elements, so the updates compare
    # as vectors: their difference against their size
    update = torch.cat([(plain_weights[k] - initial[k]).flatten() for k in initial])
    difference = torch.cat([(by_size_weights[k] - plain_weights[k]).flatten() for k in initial])
    assert difference.norm() <= 0.01 * update.norm()
    assert "_conv_forward" not in pipeline.unet.conv_in.__dict__


def test_an_unknown_kernel_choice_is_refused_by_name():
    with pytest.raises(TrainingError, match="cpu_conv_kernels = 'onednn' is out of range: use one of"):
        TrainingConfig(cpu_conv_kernels="onednn").validate()
