"""Qwen-Image-Edit (QwenImageEditPipeline) and -2509 and later (QwenImageEditPlusPipeline) in lora_core, on tiny
pipelines with Qwen2.5-VL's vision tower and processor: the prompt with its reference images, the reference latents
and the transformer call equal the pipelines' first step; training on edit pairs (a text encoding per image, since
the text encoder sees each pair's reference) lowers the loss; the CLI trains a saved edit base. Files and objective
are Qwen-Image's (tests/families/test_qwen_image.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.tiny_flow_models import edit_pairs
from support.tiny_qwen_image import QWEN_TOKENIZER, build_tiny_qwen_image, build_tiny_qwen_image_edit

from lora_core.backend import REFERENCE_LATENTS
from lora_core.data.config import DatasetConfig
from lora_core.data.dataset import ImageFolderDataset
from lora_core.families.qwen_image import EDIT_PROMPTS, QwenImageBackend
from lora_core.network import LoRANetwork
from lora_core.training.config import TrainingConfig
from lora_core.training.encoded import EncodedDataset
from lora_core.training.loop import train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not QWEN_TOKENIZER.is_dir(),
                                reason="Qwen2.5's tokenizer comes with ComfyUI 0.3.64 (scripts/setup_comfyui.sh)")
PROMPT = "make the circle blue"


@pytest.fixture(scope="module")
def plus():
    return build_tiny_qwen_image_edit("QwenImageEditPlusPipeline")


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def as_pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).movedim(-1, 0).float() / 127.5 - 1


@pytest.mark.parametrize(("pipeline", "sizes"), [("QwenImageEditPlusPipeline", ((64, 48), (48, 80))),
                                                 ("QwenImageEditPipeline", ((64, 48),))])
def test_prompt_references_and_velocity_are_the_edit_pipelines_first_step(plus, pipeline: str, sizes) -> None:
    """The pipeline's first step on a 64×64 target and its reference image(s): `encode_text_with_references` on the
    references as given is the prompt it encodes (template, "Picture N:" for Plus, each reference resized for the
    vision tower: 384² px Plus, 1 MP Edit); `encode_reference_images` of each reference as the pipeline sizes it
    for the VAE is the tokens after the image's; `predict` is the transformer's output on the image's tokens."""
    from diffusers import QwenImagePipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    edit = plus if pipeline == "QwenImageEditPlusPipeline" else build_tiny_qwen_image_edit(pipeline)
    backend = QwenImageBackend(edit)
    assert backend.edit_prompt == EDIT_PROMPTS["edit_plus" if "Plus" in pipeline else "edit"]
    references = [noise_image(width, height, seed) for seed, (width, height) in enumerate(sizes)]
    calls = []
    hook = edit.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((kwargs, out[0])),
                                                  with_kwargs=True)
    try:
        edit(image=references if len(references) > 1 else references[0], prompt=PROMPT, height=64, width=64,
             num_inference_steps=2, true_cfg_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    inputs, output = calls[0]
    image_tokens, scale = 16, edit.vae_scale_factor
    (target_shape, *reference_shapes), = inputs["img_shapes"]
    assert target_shape == (1, 4, 4) and len(reference_shapes) == len(references)
    with torch.no_grad():
        text = backend.encode_text_with_references([PROMPT], [[as_pixels(image) for image in references]])
        torch.testing.assert_close(text["context"], inputs["encoder_hidden_states"], rtol=0, atol=0)
        encoded, start = [], image_tokens
        for image, (_, height, width) in zip(references, reference_shapes):
            vae_width, vae_height, *_ = calculate_dimensions(1024 * 1024, image.width / image.height)
            pixels = edit.image_processor.preprocess(edit.image_processor.resize(image, vae_height, vae_width),
                                                     vae_height, vae_width)
            encoded.append(backend.encode_reference_images(pixels))
            theirs = inputs["hidden_states"][:, start:start + height * width]
            start += height * width
            torch.testing.assert_close(
                encoded[-1], QwenImagePipeline._unpack_latents(theirs, height * 2 * scale, width * 2 * scale, scale
                                                               )[:, :, 0], rtol=0, atol=1e-6)
        assert start == inputs["hidden_states"].shape[1]
        if len(encoded) > 1:  # of different sizes; the next test predicts with two of one size, as a dataset's
            return
        latents = QwenImagePipeline._unpack_latents(inputs["hidden_states"][:, :image_tokens], 64, 64, scale)[:, :, 0]
        ours = backend.predict(latents, inputs["timestep"], {**text, REFERENCE_LATENTS: encoded[0][:, None]})
    theirs = QwenImagePipeline._unpack_latents(output[:, :image_tokens], 64, 64, scale)[:, :, 0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_two_references_predict_as_the_plus_pipeline(plus) -> None:
    """`predict` with two references of one size (as a dataset's, cropped to their image's bucket) equals the Plus
    pipeline's step on them: frame indices 1 and 2, the output sliced to the image's tokens."""
    from diffusers import QwenImagePipeline

    backend = QwenImageBackend(plus)
    references = [noise_image(64, 64, seed) for seed in (3, 4)]
    calls = []
    hook = plus.transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((kwargs, out[0])),
                                                  with_kwargs=True)
    try:
        plus(image=references, prompt=PROMPT, height=64, width=64, num_inference_steps=2, true_cfg_scale=1.0,
             output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    inputs, output = calls[0]
    scale, tokens = plus.vae_scale_factor, inputs["hidden_states"].shape[1]
    side = int(((tokens - 16) // 2) ** 0.5)  # each reference: 1024×1024 px, 64×64 tokens
    with torch.no_grad():
        text = backend.encode_text_with_references([PROMPT], [[as_pixels(image) for image in references]])
        packed = inputs["hidden_states"]
        latents = QwenImagePipeline._unpack_latents(packed[:, :16], 64, 64, scale)[:, :, 0]
        parts = [QwenImagePipeline._unpack_latents(packed[:, 16 + i * side**2:16 + (i + 1) * side**2],
                                                   side * 2 * scale, side * 2 * scale, scale)[:, :, 0] for i in (0, 1)]
        ours = backend.predict(latents, inputs["timestep"], {**text, REFERENCE_LATENTS: torch.stack(parts, 1)})
        alone = backend.predict(latents, inputs["timestep"], {**text, REFERENCE_LATENTS: parts[0][:, None]})
    theirs = QwenImagePipeline._unpack_latents(output[:, :16], 64, 64, scale)[:, :, 0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (alone - ours).abs().max() > 1e-4  # the second reference counts


def test_training_on_edit_pairs_lowers_the_loss_with_a_prompt_per_reference(plus, tmp_path) -> None:
    """Every pair has the same caption, and each image's cached prompt differs (it holds its reference); 30 steps
    lower the validation loss; the reference changes the velocity."""
    backend = QwenImageBackend(plus)
    dataset = ImageFolderDataset(edit_pairs(tmp_path / "pairs"), DatasetConfig(resolution=64, control_images=True))
    assert len({example.caption for example in dataset.examples}) == 1
    encoded = EncodedDataset(backend, dataset, 0, cache_text=True)
    contexts = [encoded.text_cache[image, False]["context"] for image in range(dataset.num_images)]
    assert all(not torch.equal(contexts[0], other) for other in contexts[1:])
    network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4)
    result = train(backend, network, dataset, TrainingConfig(
        steps=30, learning_rate=1e-2, gradient_accumulation=1, validation_every=30, validation_timesteps=4))
    (_, before), (_, after) = result.validation
    print(f"qwen-image-edit validation loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before
    conditioning = encoded.conditioning([(0, False)], [dataset.examples[0].caption])
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        paired = backend.predict(latents, torch.tensor([0.5]), conditioning)
        conditioning.pop(REFERENCE_LATENTS)
        alone = backend.predict(latents, torch.tensor([0.5]), conditioning)
    assert (paired - alone).abs().max() > 1e-3


def test_edit_prompt_is_refused_where_no_reference_is_seen(tmp_path) -> None:
    """A Qwen-Image (text-to-image) pipeline takes no reference: edit pairs and edit_prompt are refused by name."""
    backend = QwenImageBackend(build_tiny_qwen_image())
    dataset = ImageFolderDataset(edit_pairs(tmp_path / "pairs", 2), DatasetConfig(resolution=64, control_images=True))
    network = LoRANetwork.create(backend.adapter_targets("attention", False), "lora", 4, 4)
    with pytest.raises(ValueError, match="takes none: train an edit model on edit pairs"):
        train(backend, network, dataset, TrainingConfig(steps=1, validation_every=0))
    with pytest.raises(ValueError, match="has no image input: load Qwen-Image-Edit"):
        QwenImageBackend(backend.pipeline, edit_prompt="edit")
    with pytest.raises(ValueError, match="'edit_pro' is not one of edit_plus, edit"):
        QwenImageBackend(build_tiny_qwen_image_edit(), edit_prompt="edit_pro")


def test_cli_trains_a_saved_edit_base_with_either_prompt(plus, tmp_path) -> None:
    """A saved QwenImageEditPlusPipeline trains from the CLI on edit pairs with --edit-prompt edit (the vision tower
    sees each reference at 1 MP, as TextEncodeQwenImageEdit); a target without its reference is refused by name."""
    plus.save_pretrained(tmp_path / "base")
    pairs = edit_pairs(tmp_path / "pairs", 2)
    command = [sys.executable, "-m", "lora_core", "train", "--base", str(tmp_path / "base"), "--data", str(pairs),
               "--control-images", "--edit-prompt", "edit", "--steps", "12", "--resolution", "64", "--rank", "4",
               "--lr", "1e-2", "--gradient-accumulation", "1", "--validation-every", "12"]
    done = subprocess.run([*command, "--out", str(tmp_path / "edit.safetensors")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["best_step"] == 12, "the validation loss must fall"
    (pairs / "control" / "circle_01.png").unlink()
    refused = subprocess.run([*command, "--out", str(tmp_path / "other.safetensors")], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert refused.returncode != 0 and "circle_01.png has no reference image" in refused.stderr
