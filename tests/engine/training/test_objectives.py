"""The flow-matching objective (SD3, Flux) against diffusers' scheduler and training utilities and ComfyUI 0.3.64's own
`model_sampling` code, on fixed tensors."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lora_core.training.objectives import (
    SIGMA_SQRT_FLOOR,
    FlowMatchingObjective,
    flow_noised_and_target,
    flux_mu,
    flux_shifted_sigmas,
    sample_sigmas,
    sd3_loss_weight,
    shifted_sigmas,
    stratified_sigmas,
)

COMFYUI = Path(__file__).resolve().parents[3] / ".cache" / "comfyui-0.3.64"  # scripts/setup_comfyui.sh unpacks it


def comfyui_source(relative_path: str) -> ast.Module:
    path = COMFYUI / relative_path
    if not path.is_file():
        pytest.skip(f"{path} is missing: run scripts/setup_comfyui.sh")
    return ast.parse(path.read_text(), str(path))


def run_alone(statements: list[ast.stmt], **names) -> dict:
    """Run ComfyUI statements by themselves (importing `comfy` would start its device and argument setup)."""
    namespace = {"math": math, "torch": torch, **names}
    exec(compile(ast.Module(statements, type_ignores=[]), "comfyui", "exec"), namespace)
    return namespace


def comfyui_function(name: str):
    """A top-level function of ComfyUI 0.3.64's comfy/model_sampling.py."""
    tree = comfyui_source("comfy/model_sampling.py")
    return run_alone([node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name])[name]


def comfyui_flux_node_mu(width: int, height: int, base_shift: float, max_shift: float) -> float:
    """The `shift` (Flux's μ) that ComfyUI's ModelSamplingFlux node computes from the image size, by its statements."""
    tree = comfyui_source("comfy_extras/nodes_model_advanced.py")
    node = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "ModelSamplingFlux")
    patch = next(method for method in node.body if isinstance(method, ast.FunctionDef) and method.name == "patch")
    arithmetic = [statement for statement in patch.body if isinstance(statement, ast.Assign)
                  and getattr(statement.targets[0], "id", None) in ("x1", "x2", "mm", "b", "shift")]
    assert len(arithmetic) == 5, "ComfyUI's ModelSamplingFlux node computes μ differently now"
    return run_alone(arithmetic, width=width, height=height, base_shift=base_shift, max_shift=max_shift)["shift"]


def recording_denoiser(output: torch.Tensor, seen: dict):
    def predict(noisy: torch.Tensor, time_input: torch.Tensor) -> torch.Tensor:
        seen["noisy"], seen["time_input"] = noisy, time_input
        return output
    return predict


def test_noising_and_target_equal_the_hand_formula_and_diffusers_scale_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3.5's scheduler config
    index = torch.tensor([0, 400, 999])
    sigma = scheduler.sigmas[index]
    noisy, target = flow_noised_and_target(latents, noise, sigma.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(noisy, scheduler.scale_noise(latents, scheduler.timesteps[index], noise))
    for sample in range(3):
        s = sigma[sample].item()
        torch.testing.assert_close(noisy[sample], (1 - s) * latents[sample] + s * noise[sample])
    assert torch.equal(noisy[0], noise[0])  # σ = 1: pure noise
    assert torch.equal(target, noise - latents)

    seen: dict = {}
    velocity = torch.randn(3, 4, 8, 8, generator=generator)
    objective = FlowMatchingObjective(timestep_multiplier=1000)
    loss = objective.loss(recording_denoiser(velocity, seen), latents, noise, sigma)
    torch.testing.assert_close(seen["noisy"], noisy)
    torch.testing.assert_close(seen["time_input"], scheduler.timesteps[index])  # SD3's transformer takes σ·1000
    torch.testing.assert_close(loss, ((velocity - (noise - latents)) ** 2).mean(dim=(1, 2, 3)))
    assert objective.loss(lambda noisy, time_input: noise - latents, latents, noise, sigma).abs().max() == 0


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_weighted_loss_equals_diffusers_training_scripts(weighting: str) -> None:
    generator = torch.Generator().manual_seed(1)
    latents, noise, velocity = (torch.randn(4, 16, 4, 6, generator=generator) for _ in range(3))
    sigmas = torch.tensor([0.05, 0.3, 0.7, 1.0])
    seen: dict = {}
    objective = FlowMatchingObjective(timestep_multiplier=1, weighting=weighting)  # Flux takes σ, scales it itself
    loss = objective.loss(recording_denoiser(velocity, seen), latents, noise, sigmas)
    assert torch.equal(seen["time_input"], sigmas)
    # train_dreambooth_lora_flux.py / _sd3.py (without preconditioning), per sample
    weighting_diffusers = compute_loss_weighting_for_sd3(weighting, sigmas.reshape(-1, 1, 1, 1))
    expected = torch.mean((weighting_diffusers * (velocity - (noise - latents)) ** 2).reshape(4, -1), 1)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("weighting", ["none", "cosmap"])
def test_preconditioned_loss_equals_diffusers_sd3_script(weighting: str) -> None:
    """train_dreambooth_lora_sd3.py with `--precondition_outputs 1` (its default; kohya's sd3_train_network.py too):
    model_pred · (−σ) + noisy_model_input against the latents, weighted, per sample."""
    generator = torch.Generator().manual_seed(2)
    latents, noise, velocity = (torch.randn(4, 16, 4, 6, generator=generator) for _ in range(3))
    sigmas = torch.tensor([0.05, 0.3, 0.7, 1.0])
    objective = FlowMatchingObjective(timestep_multiplier=1000, weighting=weighting, precondition_outputs=True)
    loss = objective.loss(lambda noisy, time_input: velocity, latents, noise, sigmas)
    per_sample = sigmas.reshape(-1, 1, 1, 1)
    noisy_model_input = (1.0 - per_sample) * latents + per_sample * noise
    model_pred = velocity * (-per_sample) + noisy_model_input
    weighting_diffusers = compute_loss_weighting_for_sd3(weighting, per_sample)
    expected = torch.mean((weighting_diffusers * (model_pred - latents) ** 2).reshape(4, -1), 1)
    torch.testing.assert_close(loss, expected)
    plain = FlowMatchingObjective(timestep_multiplier=1000, weighting=weighting).loss(
        lambda noisy, time_input: velocity, latents, noise, sigmas)
    torch.testing.assert_close(loss, plain * sigmas**2)  # σ² times the velocity loss


def test_preconditioning_is_sd3s_default_and_refused_on_discrete_families() -> None:
    from lora_core.families.flow import flow_objective
    from lora_core.families.flux import FLUX
    from lora_core.families.sd3 import SD3
    from lora_core.training.config import TrainingConfig, TrainingError

    assert flow_objective(TrainingConfig(), SD3, 1000, 3.0).precondition_outputs
    assert not flow_objective(TrainingConfig(precondition_outputs=False), SD3, 1000, 3.0).precondition_outputs
    assert not flow_objective(TrainingConfig(), FLUX, 1, None).precondition_outputs
    with pytest.raises(TrainingError, match="precondition_outputs set the flow-matching objective"):
        TrainingConfig(precondition_outputs=True).check_discrete("SDXL")


def test_sd3_weightings_equal_diffusers_and_sigma_sqrt_stays_finite_at_zero() -> None:
    sigmas = torch.linspace(SIGMA_SQRT_FLOOR, 1, 101)
    for weighting in ("none", "sigma_sqrt", "cosmap"):
        expected = compute_loss_weighting_for_sd3(weighting, sigmas)
        torch.testing.assert_close(sd3_loss_weight(sigmas, weighting), expected)
    assert sd3_loss_weight(torch.tensor([0.0]), "sigma_sqrt").item() == pytest.approx(SIGMA_SQRT_FLOOR ** -2)


@pytest.mark.parametrize("settings", [{"sampling": "uniform"}, {"sampling": "logit_normal", "logit_mean": 0.5,
                                      "logit_std": 1.3}, {"sampling": "mode", "mode_scale": 1.29}])
def test_draw_equals_diffusers_density_with_the_same_seed(settings: dict) -> None:
    objective = FlowMatchingObjective(timestep_multiplier=1000, **settings)
    noise, sigmas = objective.draw((6, 4, 8, 8), torch.Generator().manual_seed(7))
    oracle = torch.Generator().manual_seed(7)
    assert torch.equal(noise, torch.randn(6, 4, 8, 8, generator=oracle))
    expected = compute_density_for_timestep_sampling(settings["sampling"], 6, settings.get("logit_mean"),
                                                     settings.get("logit_std"), settings.get("mode_scale"),
                                                     generator=oracle)
    assert torch.equal(sigmas, expected)
    share_noise, share_sigmas = objective.draw((6, 4, 8, 8), torch.Generator().manual_seed(7), slice(2, 4))
    assert torch.equal(share_noise, noise[2:4]) and torch.equal(share_sigmas, sigmas[2:4])


def test_sigma_is_the_drawn_value_in_distribution() -> None:
    """σ's quantiles are the paper's: logit-normal(m, s) puts the median at sigmoid(m) (m > 0: more noise), and
    f_mode is decreasing, so σ's q-quantile is f_mode(1 − q)."""
    generator, count, quantiles = torch.Generator().manual_seed(3), 40_000, torch.tensor([0.1, 0.5, 0.9])
    uniform = sample_sigmas("uniform", count, generator)
    torch.testing.assert_close(uniform.quantile(quantiles), quantiles, atol=0.01, rtol=0)
    logit_normal = sample_sigmas("logit_normal", count, generator, logit_mean=1.0, logit_std=0.5)
    normal_quantiles = torch.distributions.Normal(1.0, 0.5).icdf(quantiles)
    torch.testing.assert_close(logit_normal.quantile(quantiles), normal_quantiles.sigmoid(), atol=0.01, rtol=0)
    mode = sample_sigmas("mode", count, generator, mode_scale=1.29)
    u = 1 - quantiles
    torch.testing.assert_close(mode.quantile(quantiles), 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u),
                               atol=0.01, rtol=0)
    assert 0 <= mode.min() and mode.max() <= 1


def test_fixed_shift_equals_comfyui_and_the_sd3_scheduler() -> None:
    time_snr_shift = comfyui_function("time_snr_shift")
    plain = torch.linspace(1, 1000, 1000).flip(0) / 1000
    shifted = shifted_sigmas(plain, 3.0)
    torch.testing.assert_close(shifted, FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas)
    torch.testing.assert_close(shifted, time_snr_shift(3.0, plain))
    noise_sigmas = FlowMatchingObjective(timestep_multiplier=1000, shift=3.0).draw((5, 4, 8, 8),
                                                                                   torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    torch.randn(5, 4, 8, 8, generator=generator)
    torch.testing.assert_close(noise_sigmas[1], time_snr_shift(3.0, torch.rand(5, generator=generator)))


@pytest.mark.parametrize("latent_size", [(64, 64), (128, 128), (96, 160)])  # 512², 1024², 768×1280 images
def test_flux_resolution_shift_equals_comfyui_kohya_and_diffusers(latent_size: tuple[int, int]) -> None:
    height, width = latent_size
    tokens = (height // 2) * (width // 2)  # kohya: (h // 2) * (w // 2) of the unpacked latents
    mu = flux_mu(tokens)
    assert mu == pytest.approx(calculate_shift(tokens))
    assert mu == pytest.approx(comfyui_flux_node_mu(width * 8, height * 8, base_shift=0.5, max_shift=1.15))
    assert flux_mu(4096, 0.4, 1.2) == pytest.approx(comfyui_flux_node_mu(1024, 1024, base_shift=0.4, max_shift=1.2))

    objective = FlowMatchingObjective(timestep_multiplier=1, resolution_shift=True)
    _, sigmas = objective.draw((5, 16, height, width), torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    torch.randn(5, 16, height, width, generator=generator)
    plain = torch.rand(5, generator=generator)
    flux_time_shift = comfyui_function("flux_time_shift")
    torch.testing.assert_close(sigmas, flux_time_shift(mu, 1.0, plain))  # ModelSamplingFlux.sigma with shift = μ
    torch.testing.assert_close(sigmas, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).time_shift(mu, 1.0,
                                                                                                               plain))
    torch.testing.assert_close(flux_shifted_sigmas(torch.tensor([0.0, 0.5, 1.0]), mu),
                               torch.tensor([0.0, math.exp(mu) / (math.exp(mu) + 1), 1.0]))


def test_stratified_sigmas_cover_zero_to_one_evenly() -> None:
    assert stratified_sigmas(4).tolist() == [0.125, 0.375, 0.625, 0.875]
    assert stratified_sigmas(1).tolist() == [0.5]


@pytest.mark.parametrize("settings, message", [
    ({"sampling": "sigmoid"}, "sigma sampling 'sigmoid' is not supported"),
    ({"weighting": "min_snr"}, "loss weighting 'min_snr' is not supported"),
    ({"mode_scale": 2.0}, r"mode_scale 2.0 leaves σ outside \[0, 1\]"),
    ({"logit_std": 0.0}, "logit_std must be > 0"),
    ({"shift": 3.0, "resolution_shift": True}, "set shift 1 for Flux's resolution-dependent shift"),
])
def test_bad_settings_are_refused_naming_the_fix(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlowMatchingObjective(timestep_multiplier=1000, **settings)
    with pytest.raises(ValueError, match=r"timestep_multiplier must be > 0 \(1000 for SD3, 1 for Flux\)"):
        FlowMatchingObjective(timestep_multiplier=0)
    with pytest.raises(ValueError, match=r"unpacked latents \(B, C, H, W\)"):
        FlowMatchingObjective(timestep_multiplier=1, resolution_shift=True).draw((2, 1024, 64), torch.Generator())
