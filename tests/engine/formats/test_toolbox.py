"""Extract, resize and merge (lora_core.formats.toolbox) against the linear algebra they promise: Eckart–Young for SVD
truncation, exact sums for concatenation, recovery of a known ΔW from a fine-tune."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from support.random_loras import random_lora

from lora_core.families.sd1 import DiffusersBackend
from lora_core.formats.files import LoRAFileError, LoRAWeights, load_lora
from lora_core.formats.toolbox import extract, lora_delta, merge, modules_of, resize
from lora_core.network import LoRANetwork


def deltas(weights: LoRAWeights) -> dict[str, torch.Tensor]:
    return {name: lora_delta(name, module, frozenset(module)) for name, module in modules_of(weights).items()}


def test_resize_loses_exactly_the_discarded_singular_values(pipeline) -> None:
    original = random_lora(DiffusersBackend(pipeline), seed=1)
    resized, reports = resize(original, "rank", 3)
    before, after = deltas(original), deltas(resized)
    assert set(before) == set(after) and {r.rank_after for r in reports} <= {1, 2, 3}
    for report in reports:
        flat = before[report.name].reshape(before[report.name].shape[0], -1)
        values = torch.linalg.svdvals(flat.double())
        error = (before[report.name] - after[report.name]).double().norm() ** 2
        discarded = (values[report.rank_after:] ** 2).sum()
        assert abs(error - discarded) <= 1e-4 * (values**2).sum(), report.name  # Eckart–Young: nothing else lost
        assert report.retained == pytest.approx(float(1 - discarded / (values**2).sum()), abs=1e-5)


def test_dynamic_resize_keeps_the_fewest_singular_values_that_hold_the_asked_energy(pipeline) -> None:
    original = random_lora(DiffusersBackend(pipeline), seed=2)
    resized, reports = resize(original, "sv_fro", 0.9)
    for report in reports:
        delta = deltas(original)[report.name]
        values = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        energy = (values**2).cumsum(0) / (values**2).sum()
        assert energy[report.rank_after - 1] >= 0.9 - 1e-6
        assert report.rank_after == 1 or energy[report.rank_after - 2] < 0.9
    assert resized.metadata["ss_network_dim"] in {"Dynamic", str(reports[0].rank_after)}
    with pytest.raises(ValueError, match="sv_fro = 1.5 is out of range"):
        resize(original, "sv_fro", 1.5)


def test_concatenated_merge_is_exactly_the_weighted_sum_and_loads_as_one_network(pipeline) -> None:
    backend = DiffusersBackend(pipeline)
    first, second = random_lora(backend, seed=3, rank=4), random_lora(backend, seed=4, rank=6)
    merged = merge([(first, 0.7), (second, -0.4)])
    for name, delta in deltas(merged).items():
        expected = 0.7 * deltas(first)[name] + -0.4 * deltas(second)[name]
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)
        assert modules_of(merged)[name]["lora_down.weight"].shape[0] == 10

    # applied to the model: the merged network's output is that of both networks at their weights
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    networks = [LoRANetwork.from_tensors(w.tensors, backend.loadable_modules())[0] for w in (first, second, merged)]
    with torch.no_grad(), networks[0].applied(0.7), networks[1].applied(-0.4):
        both = pipeline.unet(latents, 500, encoder_hidden_states=context).sample
    with torch.no_grad(), networks[2].applied(1.0):
        one = pipeline.unet(latents, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(one, both, rtol=1e-4, atol=1e-5)


def test_svd_merge_to_a_rank_is_the_best_approximation_of_the_sum(pipeline) -> None:
    backend = DiffusersBackend(pipeline)
    first, second = random_lora(backend, seed=5, rank=4), random_lora(backend, seed=6, rank=4)
    merged = merge([(first, 1.0), (second, 1.0)], rank=5)
    for name, delta in deltas(merged).items():
        total = deltas(first)[name] + deltas(second)[name]
        values = torch.linalg.svdvals(total.reshape(total.shape[0], -1).double())
        error = (total - delta).double().norm() ** 2
        assert abs(error - (values[5:] ** 2).sum()) <= 1e-4 * (values**2).sum()


def test_merge_refuses_what_is_not_lora(pipeline) -> None:
    backend = DiffusersBackend(pipeline)
    with pytest.raises(LoRAFileError, match="LoRA modules .* only, not LoHa"):
        merge([(random_lora(backend, seed=7, algorithm="loha"), 1.0)])


def test_extract_recovers_a_known_delta_from_a_fine_tune(pipeline, tmp_path) -> None:
    base_backend = DiffusersBackend(pipeline)
    tuned_pipeline = copy.deepcopy(pipeline)
    tuned_backend = DiffusersBackend(tuned_pipeline)
    known = random_lora(tuned_backend, seed=8, rank=4)
    network, _ = LoRANetwork.from_tensors(known.tensors, tuned_backend.loadable_modules())
    network.merge(1.0)  # the fine-tune: base + a rank-4 ΔW in every adapted layer

    targets = {name: module for name, module in base_backend.adapter_targets("full", True).items()}
    tuned_targets = tuned_backend.adapter_targets("full", True)
    extracted, reports = extract(targets, tuned_targets, "rank", 4, clamp_quantile=1.0)
    for name, delta in deltas(known).items():
        torch.testing.assert_close(deltas(extracted)[name], delta, rtol=1e-4, atol=1e-5)
    assert all(r.retained == pytest.approx(1.0, abs=1e-5) for r in reports)

    lower, _ = extract(targets, tuned_targets, "rank", 2, clamp_quantile=1.0)
    for name, delta in deltas(known).items():
        values = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
        error = (delta - deltas(lower)[name]).double().norm() ** 2
        assert abs(error - (values[2:] ** 2).sum()) <= 1e-4 * (values**2).sum()  # the top two directions kept

    path = extracted.save(tmp_path / "extracted.safetensors")
    loaded, _ = load_lora(path, base_backend.loadable_modules())  # strict: every module names a layer of the base
    assert len(loaded.adapters) == len(modules_of(known))
    with pytest.raises(ValueError, match="no layer differs"):
        extract(targets, targets, "rank", 4)


def test_the_command_line_tools_resize_merge_into_a_base_and_extract_it_back(pipeline, tmp_path, capsys) -> None:
    from lora_core.cli import main

    base = tmp_path / "base"
    pipeline.save_pretrained(base)
    backend = DiffusersBackend(pipeline)
    known = random_lora(backend, seed=9, rank=4)
    known.save(tmp_path / "known.safetensors")

    main(["resize", "--lora", str(tmp_path / "known.safetensors"), "--rank", "2", "--save-dtype", "float32",
          "--out", str(tmp_path / "small.safetensors")])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert max(summary["ranks"]) == 2 and 0 < summary["retained_min"] <= summary["retained_mean"] < 1
    for module in modules_of(LoRAWeights.load(tmp_path / "small.safetensors")).values():
        assert module["lora_down.weight"].shape[0] <= 2

    main(["merge", "--lora", f"{tmp_path / 'known.safetensors'}:0.5", "--lora", str(tmp_path / "known.safetensors"),
          "--base", str(base), "--out", str(tmp_path / "tuned")])
    main(["extract", "--base", str(base), "--tuned", str(tmp_path / "tuned"), "--preset", "full", "--text-encoder",
          "--rank", "4", "--clamp-quantile", "1", "--save-dtype", "float32", "--out", str(tmp_path / "x.safetensors")])
    extracted = LoRAWeights.load(tmp_path / "x.safetensors")
    assert extracted.metadata["ss_base_model_version"] == "sd_v1"
    for name, delta in deltas(known).items():  # the pipeline saved with 1.5 × ΔW merged in gives back 1.5 × ΔW
        torch.testing.assert_close(deltas(extracted)[name], 1.5 * delta, rtol=1e-3, atol=1e-5)


def family_pipeline(family: str):
    """The tiny pipeline the family's tests train (random weights, the real architecture)."""
    from lora_core.demo.tiny_model import build_tiny_pipeline
    from support.tiny_flow_models import build_tiny_flux, build_tiny_sd3
    from support.tiny_sdxl import build_tiny_sdxl

    return {"sd1": build_tiny_pipeline, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}[family]()


def family_file(backend, seed: int) -> LoRAWeights:
    """A LoRA as LoRA Lab writes it for the backend's family (kohya names; SD3: diffusers' lora_A/lora_B; Flux:
    BFL's fused layers), with random non-zero ups."""
    network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", rank=4, alpha=2, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_up" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return LoRAWeights.from_network(network, {}, file_tensors=backend.file_tensors)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux"])
def test_every_familys_own_files_resize_merge_and_extract(family: str) -> None:
    """The files LoRA Lab writes for each family: resize keeps the best rank-2 ΔW of every module (SVD truncation),
    merge gives the weighted sum, extract recovers a fine-tune's ΔW; each result keeps the family's naming and loads
    back into the model it is for."""
    from lora_core.families import backend_class, denoiser

    pipeline = family_pipeline(family)
    backend = backend_class(pipeline)(pipeline)
    first, second = family_file(backend, 1), family_file(backend, 2)

    def loads(weights: LoRAWeights) -> None:
        LoRANetwork.from_tensors(backend.network_tensors(weights.tensors), backend.loadable_modules(), strict=True)

    resized, _ = resize(first, "rank", 2)
    assert {key.rsplit(".", 2)[-2] for key in resized.tensors} == {key.rsplit(".", 2)[-2] for key in first.tensors}
    before, after = deltas(first), deltas(resized)
    assert set(before) == set(after)
    for name, delta in before.items():
        u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1).double(), full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(after[name].reshape(best.shape).double(), best, rtol=1e-4, atol=1e-6)
    loads(resized)

    merged = merge([(first, 0.5), (second, 1.0)])
    second_deltas = deltas(second)
    for name, delta in deltas(merged).items():
        torch.testing.assert_close(delta, 0.5 * before[name] + second_deltas[name], rtol=1e-5, atol=1e-6)
    loads(merged)

    tuned = copy.deepcopy(pipeline)
    targets = backend.adapter_targets("attention", False)
    tuned_backend = backend_class(tuned)(tuned)
    tuned_targets = tuned_backend.adapter_targets("attention", False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in tuned_targets.items():  # a rank-1 change of every attention layer
            out_features, in_features = layer.weight.shape[:2]
            layer.weight += torch.outer(torch.randn(out_features, generator=generator),
                                        torch.randn(in_features, generator=generator)).reshape(layer.weight.shape) * 0.01
    extracted, _ = extract(targets, tuned_targets, "rank", 4, clamp_quantile=1.0)
    named = LoRAWeights(backend.file_tensors(extracted.tensors), extracted.metadata)
    loads(named)
    network, _ = LoRANetwork.from_tensors(backend.network_tensors(named.tensors), backend.loadable_modules(),
                                          strict=True)
    for name, adapter in network.items():
        change = tuned_targets[name].weight - targets[name].weight
        torch.testing.assert_close(adapter.delta_weight(), change.float(), rtol=1e-4, atol=1e-6)
    assert denoiser(pipeline) is not denoiser(tuned)
