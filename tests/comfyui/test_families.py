"""Train LoRA on SDXL (ε and v), Flux.1 (also over fp8 and scaled-fp8 weights), SD3, Qwen-Image, Chroma, Lumina 2,
HiDream, Wan (2.1 and the 2.2 TI2V 5B) and HunyuanVideo, each a tiny model built from ComfyUI's own classes in `families_probe.py`, run in a ComfyUI checkout's Python (its own
process, no server): 0.3.64 for all, the 2024 ComfyUI for SDXL (it predates SD3 and Flux).

Per family: the loss equals the one computed by hand from ComfyUI's patched `model_sampling`; training lowers the
loss on a fixed concept and leaves MODEL and CLIP as they were; ComfyUI's core LoRA loader reads every key of the
file and predicts what lora_core's adapters predict; Apply LoRA samples what core samples; strength 0 samples the base.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .harness import COMFY_DIR, CURRENT_COMFY_DIR, VENV_PYTHON

PROBE = Path(__file__).with_name("families_probe.py")
FP8_FAMILIES = ("flux_fp8", "flux_scaled_fp8")
RUNS = [("0.3.64", CURRENT_COMFY_DIR, "sdxl"), ("0.3.64", CURRENT_COMFY_DIR, "flux"),
        ("0.3.64", CURRENT_COMFY_DIR, "flux_fp8"), ("0.3.64", CURRENT_COMFY_DIR, "flux_scaled_fp8"),
        ("0.3.64", CURRENT_COMFY_DIR, "sd3"), ("0.3.64", CURRENT_COMFY_DIR, "qwen_image"),
        ("0.3.64", CURRENT_COMFY_DIR, "chroma"), ("0.3.64", CURRENT_COMFY_DIR, "lumina2"),
        ("0.3.64", CURRENT_COMFY_DIR, "hidream"), ("0.3.64", CURRENT_COMFY_DIR, "wan"),
        ("0.3.64", CURRENT_COMFY_DIR, "wan22_5b"), ("0.3.64", CURRENT_COMFY_DIR, "hunyuan_video"),
        ("2024", COMFY_DIR, "sdxl")]
KEY_PREFIXES = {"sdxl": ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_te1_",
                         "lora_te2_"),
                "flux": ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te1_"),
                # diffusers' naming, as lora_core's SD3 files: q, k and v apart, CLIP-L only
                "sd3": ("transformer.transformer_blocks.", "text_encoder.text_model."),
                # kohya's names over ComfyUI's (= diffusers') paths, as musubi-tuner writes them
                "qwen_image": ("lora_unet_transformer_blocks_",),
                "chroma": ("lora_unet_double_blocks_", "lora_unet_single_blocks_"),
                # kohya's names over NextDiT's layers (qkv fused), as sd-scripts writes them
                "lumina2": ("lora_unet_noise_refiner_", "lora_unet_context_refiner_", "lora_unet_layers_"),
                # diffusion-pipe's layout, which diffusers reads (it refuses kohya's names and alpha keys)
                "hidream": ("diffusion_model.double_stream_blocks.", "diffusion_model.single_stream_blocks."),
                # diffusion-pipe's layout over Wan's own names, which ComfyUI and diffusers both read
                "wan": ("diffusion_model.blocks.",), "wan22_5b": ("diffusion_model.blocks.",),
                # the same layout over HunyuanVideo's own names (img_attn_qkv, img_mlp.fc1, …), q/k/v fused
                "hunyuan_video": ("diffusion_model.double_blocks.", "diffusion_model.single_blocks.")}
_results: dict[tuple[str, str], dict] = {}


def probe(server: str, comfy_dir: Path, family: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The probe's results for `family` in `comfy_dir`, run once per session."""
    if (server, family) not in _results:
        if not (comfy_dir / "main.py").exists():
            message = f"{comfy_dir} is missing: run scripts/setup_comfyui.sh"
            pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
        work = tmp_path_factory.mktemp(f"{family}-{server}")
        completed = subprocess.run([str(VENV_PYTHON), str(PROBE), str(comfy_dir), family, str(work)],
                                   capture_output=True, text=True, timeout=600,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert completed.returncode == 0, completed.stderr[-4000:]
        _results[server, family] = json.loads(completed.stdout.strip().splitlines()[-1])
    return _results[server, family]


def check(results: dict, name: str) -> dict:
    outcome = results[name]
    assert "error" not in outcome, f"{name}: {outcome['error']}\n{outcome['traceback']}"
    return outcome


@pytest.mark.parametrize(("server", "comfy_dir", "family", "objective", "prediction_type"), [
    ("0.3.64", CURRENT_COMFY_DIR, "sdxl", "objective", "v_prediction"),
    ("0.3.64", CURRENT_COMFY_DIR, "sdxl", "objective_eps", "epsilon"),
    ("0.3.64", CURRENT_COMFY_DIR, "flux", "objective", "flow"),
    ("0.3.64", CURRENT_COMFY_DIR, "sd3", "objective", "flow"),
    ("0.3.64", CURRENT_COMFY_DIR, "qwen_image", "objective", "flow"),
    ("0.3.64", CURRENT_COMFY_DIR, "chroma", "objective", "flow"),
    ("0.3.64", CURRENT_COMFY_DIR, "lumina2", "objective", "flow"),
    ("0.3.64", CURRENT_COMFY_DIR, "hidream", "objective", "flow"),
    ("0.3.64", CURRENT_COMFY_DIR, "wan", "objective", "flow"),
    ("0.3.64", CURRENT_COMFY_DIR, "wan22_5b", "objective", "flow"),
    ("0.3.64", CURRENT_COMFY_DIR, "hunyuan_video", "objective", "flow"),
    ("2024", COMFY_DIR, "sdxl", "objective", "v_prediction"),
    ("2024", COMFY_DIR, "sdxl", "objective_eps", "epsilon"),
], ids=["sdxl-v-0.3.64", "sdxl-eps-0.3.64", "flux-0.3.64", "sd3-0.3.64", "qwen_image-0.3.64", "chroma-0.3.64",
        "lumina2-0.3.64", "hidream-0.3.64", "wan-0.3.64", "wan22_5b-0.3.64", "hunyuan_video-0.3.64", "sdxl-v-2024",
        "sdxl-eps-2024"])
def test_loss_is_the_one_comfys_patched_model_sampling_defines(server, comfy_dir, family, objective, prediction_type,
                                                               tmp_path_factory) -> None:
    """ModelSamplingDiscrete v_prediction (SDXL), ModelSamplingFlux (Flux, its resolution shift) and ModelSamplingSD3
    (shift 3) applied before training set the target and the noise levels: the loss per sample on fixed tensors,
    with SDXL's size/crop ADM and Flux's guidance, equals the hand computation from `apply_model`; the σ drawn
    are the patched schedule's."""
    outcome = check(probe(server, comfy_dir, family, tmp_path_factory), objective)
    assert outcome["prediction_type"] == prediction_type
    if prediction_type == "flow":  # SD3 on the preconditioned x̂0 by default, as diffusers' and kohya's SD3 trainers
        assert outcome["precondition_outputs"] == (family == "sd3")
    np.testing.assert_allclose(outcome["trainer_loss"], outcome["hand_loss"], rtol=2e-5)
    if prediction_type == "flow":
        np.testing.assert_allclose(outcome["drawn_sigmas"], outcome["schedule_sigmas"], rtol=1e-6)


@pytest.mark.parametrize(("server", "comfy_dir", "family"), RUNS, ids=[f"{f}-{s}" for s, _, f in RUNS])
def test_training_lowers_the_loss_and_leaves_the_model_as_it_was(server, comfy_dir, family, tmp_path_factory) -> None:
    outcome = check(probe(server, comfy_dir, family, tmp_path_factory), "train_and_load")
    assert outcome["steps"] == 20
    assert outcome["loss_after"] < 0.98 * outcome["loss_before"], outcome  # fixed noise and times: no chance
    assert outcome["model_unchanged"]
    if family in FP8_FAMILIES:  # UNETLoader's fp8_e4m3fn, or an fp8_scaled file whose layers multiply in fp8 on
        # a GPU with fp8 compute (torch._scaled_mm, no backward): stored in fp8, trained in fp32 per layer
        assert outcome["weight_dtype"] == "torch.float8_e4m3fn" and outcome["compute_dtype"] == "torch.float32"


@pytest.mark.parametrize("family", FP8_FAMILIES)
def test_fp8_models_get_the_trained_weights_in_true_units(family, tmp_path_factory) -> None:
    """DoRA through Apply LoRA, LoHa and LoKr through core Load LoRA on fp8 Flux, plain and scaled: the weight
    ComfyUI computes from the patches before rounding to fp8 is lora_core's merged weight (the DoRA diff is not
    rounded to fp8 first, and a scaled layer's patches are in true units); DoRA's magnitude starts at the true
    weight's row norms."""
    outcome = check(probe("0.3.64", CURRENT_COMFY_DIR, family, tmp_path_factory), "algorithms_in_weights")
    assert outcome["dora_scale_error"] <= 1e-5, outcome
    for algorithm in ("dora", "loha", "lokr"):
        assert outcome[algorithm]["layers"] == 6 and outcome[algorithm]["update_error"] <= 1e-4, outcome
    assert outcome["dora"]["diff_dtypes"] == ["torch.float32"]  # the compute dtype on this CPU


@pytest.mark.parametrize(("server", "comfy_dir", "family"), [run for run in RUNS if run[2] not in FP8_FAMILIES],
                         ids=[f"{f}-{s}" for s, _, f in RUNS if f not in FP8_FAMILIES])
def test_core_load_lora_reads_every_key_and_applies_the_trained_lora(server, comfy_dir, family,
                                                                     tmp_path_factory) -> None:
    """kohya's names from ComfyUI's own key maps: `comfy.sd.load_lora_for_models` logs no "lora key not loaded",
    and the MODEL/CLIP it patches predict what lora_core's adapters on the base predict; Apply LoRA samples the same
    image as core, strength 0 the base image. Qwen-Image's, Chroma's and Lumina 2's files in the layout other
    trainers share (`diffusion_model.<path>.lora_A/B`) are read the same way by core and by Load LoRA."""
    outcome = check(probe(server, comfy_dir, family, tmp_path_factory), "train_and_load")
    keys = outcome["file_keys"]
    for prefix in KEY_PREFIXES[family]:
        assert any(key.startswith(prefix) for key in keys), prefix
    assert all(key.startswith(KEY_PREFIXES[family]) for key in keys), keys
    if family == "sd3":  # ComfyUI's fused qkv split exactly; alpha folded into lora_B
        assert not any(".qkv." in key or key.endswith(".alpha") for key in keys)
        assert {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj"} <= {
            ".".join(key.split(".")[-4:-2]) for key in keys}
    for loaded in [outcome] + ([outcome["foreign"]] if family == "sd3" else []):
        assert loaded["not_loaded"] == []
        assert loaded["core_vs_lora_core"] <= 1e-4 * loaded["prediction_scale"], loaded
        assert loaded["lora_effect"] > 1000 * loaded["core_vs_lora_core"], loaded  # the LoRA moves the prediction
    assert outcome["applied_equals_core"] and outcome["strength_zero_equals_base"] and outcome["lora_changes_image"]
    if family in ("qwen_image", "chroma", "lumina2"):  # the layout other trainers share, as Load LoRA reads it
        shared = outcome["shared_layout"]
        assert shared["not_loaded"] == [] and shared["core_vs_lora_core"] <= 1e-4 * shared["prediction_scale"], shared
        assert shared["lora_effect"] > 1000 * shared["core_vs_lora_core"], shared


TEXT_ENCODER_FILE_PREFIXES = {"lora_te1_": "CLIP-L", "lora_te2_": "CLIP-G", "text_encoder.": "CLIP-L",
                              "text_encoder_2.": "CLIP-G"}


@pytest.mark.parametrize(("family", "family_name"), [("sdxl", "SDXL"), ("flux", "Flux.1"), ("sd3", "SD3"),
                                                   ("qwen_image", "Qwen-Image"), ("chroma", "Chroma"),
                                                   ("lumina2", "Lumina 2"), ("hidream", "HiDream-I1"),
                                                   ("wan", "Wan"), ("hunyuan_video", "HunyuanVideo")])
def test_text_encoder_tooltip_names_the_encoders_that_train(family, family_name, tmp_path_factory) -> None:
    """Inject LoRA's train_text_encoder tooltip names, for each family, exactly the CLIP encoders whose layers the
    trained file holds."""
    outcome = check(probe("0.3.64", CURRENT_COMFY_DIR, family, tmp_path_factory), "train_and_load")
    trained = {encoder for prefix, encoder in TEXT_ENCODER_FILE_PREFIXES.items()
               if any(key.startswith(prefix) for key in outcome["file_keys"])}
    named = re.search(rf"\b{re.escape(family_name)} ([^;(]+)", outcome["text_encoder_tooltip"]).group(1).strip()
    assert (set(named.split(" and ")) if named != "none" else set()) == trained, outcome["text_encoder_tooltip"]


@pytest.mark.parametrize(("family", "family_name", "setting"), [
    ("sdxl", "SDXL", "timestep_sampling"), ("flux", "Flux.1", "min_snr_gamma"), ("sd3", "SD3", "min_snr_gamma"),
    ("qwen_image", "Qwen-Image", "min_snr_gamma"), ("chroma", "Chroma", "min_snr_gamma"),
    ("lumina2", "Lumina 2", "min_snr_gamma"), ("hidream", "HiDream-I1", "min_snr_gamma"),
    ("wan", "Wan", "min_snr_gamma"), ("wan22_5b", "Wan 2.2 TI2V 5B", "min_snr_gamma"),
    ("hunyuan_video", "HunyuanVideo", "min_snr_gamma")])
def test_what_a_family_cannot_train_is_refused_naming_the_family(
        family, family_name, setting, tmp_path_factory) -> None:
    outcome = check(probe("0.3.64", CURRENT_COMFY_DIR, family, tmp_path_factory), "refusals")
    assert setting in outcome["settings"] and family_name in outcome["settings"]
    if family in ("flux", "hunyuan_video"):
        assert outcome["guidance"] is None  # Flux.1-dev and HunyuanVideo have a guidance input
    else:
        assert "flux_guidance" in outcome["guidance"] and family_name in outcome["guidance"]
    if family == "sd3":  # Inject LoRA refuses, before any training, what SD3's files cannot hold
        assert "loha" in outcome["loha"] and "use algorithm lora" in outcome["loha"]
    else:
        assert outcome["loha"] is None
    if family in ("qwen_image", "chroma", "lumina2", "hidream", "wan", "wan22_5b", "hunyuan_video"):  # no text encoder
        # of theirs trains: refused
        assert "train_text_encoder off" in outcome["text_encoder"] and family_name in outcome["text_encoder"]
    else:
        assert outcome["text_encoder"] is None


def test_lumina2_captions_and_samples_are_encoded_as_its_prompt_node_encodes(tmp_path_factory) -> None:
    """Lumina 2's captions (training) and prompts (sample images) go through Gemma-2 inside the system prompt
    CLIPTextEncodeLumina2 adds, with the attention mask from which its NextDiT counts the prompt's tokens."""
    outcome = check(probe("0.3.64", CURRENT_COMFY_DIR, "lumina2", tmp_path_factory), "prompt_node")
    assert outcome == {"context_equal": True, "extras": ["attention_mask", "pooled_output"], "masks_equal": True,
                       "caption_equals_node": True}


ALGORITHM_RUNS = [("0.3.64", CURRENT_COMFY_DIR, "sdxl"), ("0.3.64", CURRENT_COMFY_DIR, "flux"),
                  ("2024", COMFY_DIR, "sdxl")]


@pytest.mark.parametrize(("server", "comfy_dir", "family"), ALGORITHM_RUNS,
                         ids=[f"{f}-{s}" for s, _, f in ALGORITHM_RUNS])
@pytest.mark.parametrize("algorithm", ["dora", "loha", "lokr"])
def test_dora_loha_and_lokr_files_apply_as_trained(server, comfy_dir, family, algorithm, tmp_path_factory) -> None:
    """LoHa and LoKr through core Load LoRA, DoRA through Apply LoRA (the trained math), each predicting what
    lora_core's adapters predict; SD3 refuses them for its fused qkv (test above)."""
    outcome = check(probe(server, comfy_dir, family, tmp_path_factory), "algorithms")[algorithm]
    assert outcome["not_loaded"] == []
    assert outcome["core_vs_lora_core"] <= 1e-4 * outcome["prediction_scale"], outcome
    assert outcome["lora_effect"] > 1000 * outcome["core_vs_lora_core"], outcome


@pytest.mark.parametrize(("server", "comfy_dir"), [("0.3.64", CURRENT_COMFY_DIR), ("2024", COMFY_DIR)],
                         ids=["0.3.64", "2024"])
def test_training_latents_sample_the_vae_posterior(server, comfy_dir, tmp_path_factory) -> None:
    """As lora_core, kohya and diffusers encode: a seeded sample of the posterior, not its mean (ComfyUI 0.3.64's
    VAE returns the mean unless told to sample)."""
    outcome = check(probe(server, comfy_dir, "sdxl", tmp_path_factory), "vae_posterior")
    assert outcome["sampled_vs_hand"] <= 1e-5, outcome
    assert outcome["sampled_vs_mean"] > 1e-3, outcome
    assert outcome["same_seed_equal"] and outcome["other_seed_differs"], outcome


def test_flux_kontext_trains_on_edit_pairs_as_comfyui_runs_them(tmp_path_factory) -> None:
    """Load Dataset's control_images on Flux (Kontext): Train LoRA's velocity with the reference image equals
    ComfyUI's own call with `reference_latents` (ReferenceLatent's), the reference changes it, and training runs."""
    outcome = check(probe("0.3.64", CURRENT_COMFY_DIR, "flux", tmp_path_factory), "kontext")
    assert outcome["difference"] <= 1e-5 * outcome["scale"], outcome
    assert outcome["reference_effect"] > 1000 * outcome["difference"], outcome
    assert outcome["steps"] == 3


def test_qwen_image_edit_trains_on_edit_pairs_as_comfyui_runs_them(tmp_path_factory) -> None:
    """Load Dataset's control_images on Qwen-Image (Qwen-Image-Edit): each caption is encoded with its pair's
    reference exactly as TextEncodeQwenImageEditPlus (edit_prompt edit_plus, the default) or TextEncodeQwenImageEdit
    (edit) encode it from LoadImage's image, through a vision tower that sees it (another reference, another
    context; 384² px and 1 MP give different token counts, both more than the caption alone); the velocity with the
    reference latents equals ComfyUI's own call with `reference_latents`, which the reference changes; both train."""
    outcome = check(probe("0.3.64", CURRENT_COMFY_DIR, "qwen_image", tmp_path_factory), "qwen_edit")
    assert outcome["plus_equals_node"] and outcome["edit_equals_node"], outcome
    plus_tokens, edit_tokens, caption_tokens = outcome["tokens"]
    assert caption_tokens < plus_tokens < edit_tokens and outcome["references_differ"], outcome
    assert outcome["difference"] <= 1e-5 * outcome["scale"], outcome
    assert outcome["reference_effect"] > 1e-3 * outcome["scale"], outcome
    assert outcome["steps"] == {"edit_plus": 2, "edit": 2}


def test_wan_trains_on_clips_of_the_dataset_and_names_those_it_cannot(tmp_path_factory) -> None:
    """Load Dataset with frames 5 on mp4, webm and gif clips, a 3-frame clip and a broken file: the three valid
    clips become 5-frame items (2 latent frames of ComfyUI's Wan VAE) that Train LoRA trains; the others are
    skipped by name, and the node's text says so; the sample is a 5-frame clip. min_sigma / max_sigma keep σ on
    one expert's side."""
    outcome = check(probe("0.3.64", CURRENT_COMFY_DIR, "wan", tmp_path_factory), "clips")
    assert outcome["examples"] == ["a.mp4", "b.webm", "c.gif"] and outcome["skipped"] == ["broken.mp4", "short.mp4"]
    assert "3 of them clips of 5 frames" in outcome["text"] and "2 skipped" in outcome["text"], outcome["text"]
    assert outcome["latent_shape"] == [1, 16, 2, 8, 8]
    assert outcome["steps"] == 3 and outcome["losses_finite"]
    high_min, high_max, low_min, low_max = outcome["expert_sigmas"]  # Wan 2.2 A14B's experts, split at 0.875
    assert 0.875 <= high_min < high_max <= 1 and 0 <= low_min < low_max <= 0.875, outcome
    assert outcome["samples_shape"] == [5, 64, 64, 3]  # the sample clip's 5 frames, as the samples IMAGE


def test_hunyuan_video_captions_and_files_are_what_comfyui_and_musubi_tuner_make(tmp_path_factory) -> None:
    """HunyuanVideo: each caption's context is CLIPTextEncode's (ComfyUI crops the Llama template to the caption's
    tokens and <|eot_id|>; the tiny tokenizer spells "sks" out), its pooled output CLIP-L's; the trained file renamed
    as musubi-tuner names it loads through Load LoRA to the same ΔW, where ComfyUI's core loader maps only the layers
    whose names ComfyUI's own Flux layers share (img_mlp.fc1 is ComfyUI's img_mlp.0)."""
    results = probe("0.3.64", CURRENT_COMFY_DIR, "hunyuan_video", tmp_path_factory)
    tokens = check(results, "caption_tokens")
    assert tokens["context_equals_node"] and tokens["pooled_equals_node"], tokens
    assert tokens["context_tokens"] == len("a video of".split()) + len("sks") + 1, tokens
    assert tokens["tokenized"] == 95 + tokens["context_tokens"], tokens  # the template's 95 tokens, cropped
    musubi = check(results, "train_and_load")["musubi_layout"]
    assert musubi["modules"][0] == musubi["modules"][1] > 0 and musubi["delta_w_difference"] == 0.0, musubi
    assert musubi["core_not_loaded"] and all("_mlp_fc" in key or "_mod_linear" in key or "_modulation_linear" in key
                                             for key in musubi["core_not_loaded"]), musubi
