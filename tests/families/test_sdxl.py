"""SDXL in lora_core on a tiny real-architecture SDXL pipeline: conditioning as diffusers' pipeline computes it, the
objective from its own scheduler, learning, strength 0, and files that diffusers and ComfyUI load whole."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_core import (
    DatasetConfig,
    ImageFolderDataset,
    LoRANetwork,
    TrainingConfig,
    kohya_metadata,
    load_file,
    save_lora,
    train,
)
from lora_core.backend import SIZE_CONDITIONING
from lora_core.demo.demo import make_concept_images
from lora_core.families.sd1 import generate
from lora_core.families.sdxl import SDXLBackend, SDXLNamingError, sgm_names
from lora_core.targets import all_adaptable
from lora_core.training.encoded import EncodedDataset
from lora_core.training.loop import parameter_groups
from support.tiny_sdxl import COMFY_CLIP_OPTIONS, COMFY_UNET_CONFIG, build_tiny_sdxl

ROOT = Path(__file__).resolve().parents[2]
COMFYUI = ROOT / ".cache" / "comfyui-0.3.64"  # scripts/setup_comfyui.sh unpacks it
PROMPTS = ["a photo of sks", "red circle on white background"]


@pytest.fixture(scope="module")
def pipeline():
    return build_tiny_sdxl(seed=0)


def trained_looking(network: LoRANetwork, seed: int = 3) -> LoRANetwork:
    """Random non-zero adapter weights, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return network


def fixed_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 8, 8, generator=generator), torch.randn(batch, 4, 8, 8, generator=generator)


def diffusers_unet_call(pipeline, latents, timesteps, prompts, size_and_crop) -> torch.Tensor:
    """The UNet as StableDiffusionXLPipeline calls it: its encode_prompt and its `_get_add_time_ids`."""
    context, _, pooled, _ = pipeline.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    time_ids = torch.cat([pipeline._get_add_time_ids(tuple(row[0:2]), tuple(row[2:4]), tuple(row[4:6]), torch.float32,
                                                     pipeline.text_encoder_2.config.projection_dim)
                          for row in size_and_crop])
    return pipeline.unet(latents, timesteps, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def test_conditioning_is_the_pipelines_and_time_ids_are_size_crop_target(pipeline, tmp_path) -> None:
    """A 131×40 image in buckets of 32 px at resolution 64: nearest bucket 96×32, scaled to cover it 105×32 (×0.8),
    centre crop left (105 − 96) // 2 = 4, mirrored 9 − 4 = 5; diffusers orders (orig h, w, crop top, left, target
    h, w)."""
    backend = SDXLBackend(pipeline)
    with torch.no_grad():
        ours = backend.encode_text(PROMPTS)
        context, _, pooled, _ = pipeline.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert ours["context"].shape == (2, 77, 64)
    torch.testing.assert_close(ours["context"], context, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled"], pooled, rtol=0, atol=0)

    folder = tmp_path / "wide"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 131, 3), dtype=np.uint8)).save(folder / "a.png")
    dataset = ImageFolderDataset(folder, DatasetConfig(resolution=64, bucketing=True, flip=True, bucket_step=32,
                                                       min_bucket_size=32, max_bucket_size=128))
    encoded = EncodedDataset(backend, dataset, seed=0, cache_text=False)
    conditioning = encoded.conditioning([(0, False), (0, True)], PROMPTS)
    assert conditioning[SIZE_CONDITIONING].tolist() == [[40, 131, 0, 4, 32, 96], [40, 131, 0, 5, 32, 96]]

    latents, _ = fixed_inputs(2)
    timesteps = torch.tensor([100, 700])
    with torch.no_grad():
        expected = diffusers_unet_call(pipeline, latents, timesteps, PROMPTS, conditioning[SIZE_CONDITIONING].tolist())
        torch.testing.assert_close(backend.predict(latents, timesteps, conditioning), expected, rtol=1e-6, atol=1e-6)
        swapped = {**conditioning, SIZE_CONDITIONING: conditioning[SIZE_CONDITIONING][:, [1, 0, 3, 2, 5, 4]]}
        assert not torch.allclose(backend.predict(latents, timesteps, swapped), expected, atol=1e-4), \
            "the size/crop conditioning must reach the UNet"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_objective_is_diffusers_training_step_on_the_pipelines_own_schedule(prediction_type: str) -> None:
    """By hand as diffusers' train_dreambooth_lora_sdxl.py: DDPM noising with the pipeline scheduler's betas, target
    ε or its `get_velocity`, MSE of the UNet called as the pipeline calls it."""
    from diffusers import DDPMScheduler

    pipeline = build_tiny_sdxl(seed=0, prediction_type=prediction_type)
    backend = SDXLBackend(pipeline)
    assert backend.prediction_type == prediction_type
    objective = backend.objective(TrainingConfig())
    latents, noise = fixed_inputs(2)
    timesteps = torch.tensor([50, 850])
    size_and_crop = [[64, 64, 0, 0, 64, 64], [80, 48, 8, 0, 64, 64]]
    conditioning = {**backend.encode_text(PROMPTS), SIZE_CONDITIONING: torch.tensor(size_and_crop)}

    ddpm = DDPMScheduler.from_config(pipeline.scheduler.config)
    noisy = ddpm.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else ddpm.get_velocity(latents, noise, timesteps)
    with torch.no_grad():
        by_hand = ((diffusers_unet_call(pipeline, noisy, timesteps, PROMPTS, size_and_crop) - target) ** 2
                   ).mean(dim=(1, 2, 3))
        ours = objective.loss(lambda x, t: backend.predict(x, t, conditioning), latents, noise, timesteps)
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-7)


def test_fp16_vae_that_asks_for_upcasting_encodes_in_fp32_and_latents_are_scaled() -> None:
    """SDXL's VAE overflows in fp16 (its config says `force_upcast`): latents are those of its weights in fp32, times
    the scaling factor, and the VAE stays fp16 afterwards."""
    pipeline = build_tiny_sdxl(seed=0)
    pipeline.vae.half()
    reference = copy.deepcopy(pipeline.vae).float()
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    latents = SDXLBackend(pipeline).encode_images(pixels, torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(7)) * 0.13025
    assert latents.dtype == torch.float32 and pipeline.vae.dtype == torch.float16
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)


def test_text_encoders_train_at_their_own_learning_rate(pipeline) -> None:
    network = LoRANetwork.create(SDXLBackend(pipeline).adapter_targets("attention", True), rank=4)
    unet, text = parameter_groups(network, TrainingConfig(learning_rate=1e-3, text_encoder_lr=1e-5))
    text_parameters = [p for name, adapter in network.items() if name.startswith(("lora_te1_", "lora_te2_"))
                       for p in adapter.parameters()]
    assert (unet["lr"], text["lr"]) == (1e-3, 1e-5) and set(map(id, text["params"])) == set(map(id, text_parameters))


def test_training_lowers_the_validation_loss(pipeline, tmp_path) -> None:
    backend = SDXLBackend(pipeline)
    dataset = ImageFolderDataset(make_concept_images(tmp_path / "concept", count=4, resolution=64),
                                 DatasetConfig(resolution=64))
    network = LoRANetwork.create(backend.adapter_targets("full", False), rank=4)
    result = train(backend, network, dataset, TrainingConfig(
        steps=20, learning_rate=1e-2, batch_size=2, lr_scheduler="constant", seed=0, validation_every=10))
    losses = [loss for _, loss in result.validation]
    print(f"SDXL tiny: {result.seconds_per_step:.3f} s/step, validation loss {losses}")
    assert min(losses[1:]) < 0.8 * losses[0], f"the validation loss must fall: {losses}"


def test_cli_detects_sdxl_and_trains(pipeline, tmp_path) -> None:
    base = tmp_path / "base"
    pipeline.save_pretrained(base)
    data = make_concept_images(tmp_path / "concept", count=4, resolution=64)
    out = tmp_path / "sdxl.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "lora_core", "train", "--base", str(base), "--data", str(data), "--out", str(out),
         "--steps", "3", "--resolution", "64", "--text-encoder", "--rank", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 3
    tensors, metadata = load_file(out)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    modules = {key.split(".")[0] for key in tensors}
    assert {name.split("_")[1] for name in modules} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules


def test_strength_zero_is_the_base_image(pipeline) -> None:
    backend = SDXLBackend(pipeline)
    network = trained_looking(LoRANetwork.create(backend.adapter_targets("full", True), rank=4))

    def image(network: LoRANetwork | None, strength: float = 1.0) -> np.ndarray:
        return np.asarray(generate(pipeline, network, PROMPTS[0], strength=strength, seed=5, steps=3, size=64))

    base = image(None)
    assert np.array_equal(image(network, 0.0), base)
    assert not np.array_equal(image(network, 1.0), base)


def saved_network(pipeline, path: Path) -> tuple[LoRANetwork, Path]:
    """A trained-looking LoRA on every layer a file may name: all of the UNet (conv_in to conv_out, the time and
    size embeddings, every block; each preset's layers among them) and both text encoders."""
    modules = SDXLBackend(pipeline).loadable_modules()
    layers = [module for component in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2)
              for module in all_adaptable(component).values()]
    assert len(modules) == len(layers) and set(map(id, modules.values())) == set(map(id, layers)), \
        "every layer needs a name of its own"
    network = trained_looking(LoRANetwork.create(modules, rank=4, alpha=2))
    return network, save_lora(path, network, kohya_metadata(network, model={"version": "sdxl_base_v1-0"}),
                              dtype="float32")


def test_a_layer_outside_sdxls_layout_is_a_clear_error(pipeline) -> None:
    unet = copy.deepcopy(pipeline.unet)
    unet.encoder_hid_proj = torch.nn.Linear(64, 64)  # what an IP-Adapter adds
    with pytest.raises(SDXLNamingError, match="encoder_hid_proj has no name in SDXL's SGM layout"):
        sgm_names(unet, all_adaptable(unet))


def component_outputs(pipeline) -> tuple[torch.Tensor, ...]:
    """Both text encoders' outputs and the UNet's, on fixed inputs."""
    latents, _ = fixed_inputs(2)
    with torch.no_grad():
        context, _, pooled, _ = pipeline.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        unet = diffusers_unet_call(pipeline, latents, torch.tensor([300, 600]), PROMPTS,
                                   [[64, 64, 0, 0, 64, 64], [96, 64, 16, 0, 64, 64]])
    return context, pooled, unet


def test_diffusers_load_lora_weights_consumes_every_module_with_the_same_outputs(pipeline, tmp_path) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    network, path = saved_network(pipeline, tmp_path / "lora.safetensors")
    theirs = build_tiny_sdxl(seed=0)
    theirs.load_lora_weights(str(path), adapter_name="lab")
    layers = {component: sum(isinstance(module, BaseTunerLayer) and "lab" in module.lora_A
                             for module in getattr(theirs, component).modules())
              for component in ("unet", "text_encoder", "text_encoder_2")}
    ours = {component: sum(name.startswith(prefix) for name, _ in network.items())
            for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"),
                                      ("text_encoder_2", "lora_te2_"))}
    assert layers == ours and all(ours.values())

    base = component_outputs(pipeline)
    with network.applied(1.0):
        expected = component_outputs(pipeline)
    for got, want, before in zip(component_outputs(theirs), expected, base):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(want, before, atol=1e-4), "the LoRA must change every output"


COMFY_KEY_MAPS = """
import json, logging, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch, comfy.lora, comfy.sdxl_clip, comfy.supported_models, comfy.utils
unet_config, clip_options, lora_path = json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
model = comfy.supported_models.SDXL(unet_config).get_model({})
clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32, model_options=clip_options)
key_map = comfy.lora.model_lora_keys_clip(clip, comfy.lora.model_lora_keys_unet(model, {}))
not_loaded = []
logging.getLogger().addFilter(lambda r: not_loaded.append(r.getMessage()) if "not loaded" in r.getMessage() else True)
lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
patches = comfy.lora.load_lora(lora, key_map)
modules = {key.split(".")[0] for key in lora}
shapes = {key: list(value.shape) for key, value in [*model.state_dict().items(), *clip.state_dict().items()]}
print(json.dumps({"not_loaded": not_loaded, "patched": len(patches),
                  "targets": {name: key_map.get(name) for name in modules},
                  "diffusers_to_sgm": comfy.utils.unet_to_diffusers(model.model_config.unet_config),
                  "shapes": {key_map[name]: shapes[key_map[name]] for name in modules if name in key_map}}))
"""


def test_comfyui_load_lora_maps_every_module_to_the_same_layer(pipeline, tmp_path) -> None:
    """ComfyUI 0.3.64's own key maps on its SDXL model (`comfy.model_base.SDXL` from a tiny unet_config) and its SDXL
    CLIP (`SDXLClipModel`, CLIP-L and CLIP-G at tiny widths): core Load LoRA loads every key, and each module lands
    on the layer that ComfyUI's diffusers→SGM map (`unet_to_diffusers`) pairs with the diffusers layer it trained."""
    if not (COMFYUI / "comfy" / "lora.py").is_file():
        pytest.skip(f"{COMFYUI} is missing: run scripts/setup_comfyui.sh")
    network, path = saved_network(pipeline, tmp_path / "lora.safetensors")
    result = subprocess.run([sys.executable, "-c", COMFY_KEY_MAPS, str(COMFYUI), json.dumps(COMFY_UNET_CONFIG),
                             json.dumps(COMFY_CLIP_OPTIONS), str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    comfy = json.loads(result.stdout.strip().splitlines()[-1])
    assert comfy["not_loaded"] == [] and comfy["patched"] == len(network.adapters)

    layers = SDXLBackend(pipeline).loadable_modules()
    unet_paths = {module: path for path, module in pipeline.unet.named_modules()}
    for name in network.adapters:
        target = comfy["targets"][name]
        if name.startswith("lora_unet_"):
            expected = "diffusion_model." + comfy["diffusers_to_sgm"][f"{unet_paths[layers[name]]}.weight"]
        else:
            clip, encoder = ("clip_l", pipeline.text_encoder) if name.startswith("lora_te1_") else \
                ("clip_g", pipeline.text_encoder_2)
            path = {module: path for path, module in encoder.named_modules()}[layers[name]]
            if not hasattr(encoder, "text_model"):  # transformers 5's CLIPTextModel: no text_model wrapper
                path = f"text_model.{path}"
            expected = f"{clip}.transformer.{path}.weight"
        assert target == expected, name
        assert comfy["shapes"][target] == list(layers[name].weight.shape), name
