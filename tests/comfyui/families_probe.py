"""Train LoRA on tiny SDXL / Flux.1 / SD3 models built from ComfyUI's own classes, run inside a ComfyUI checkout.

`python families_probe.py COMFY_DIR FAMILY WORK_DIR` builds FAMILY ("sdxl", "flux", "flux_fp8", "flux_scaled_fp8",
"sd3") small:
`comfy.supported_models` config with a tiny unet_config → `model_base` model in a `ModelPatcher`, real `comfy.sd.CLIP`
objects with small transformer configs, a small `comfy.sd.VAE`; all under `torch.inference_mode()` as ComfyUI's loaders
run. It then runs the pack's node classes (Load Dataset, Inject LoRA, Training Options, Train LoRA, Apply LoRA) and
ComfyUI's core LoRA loader, and prints one JSON object `{check: result}`; a check that raises reports
`{"error": ...}`. Hand computations use only ComfyUI's `model_sampling` and `BaseModel.apply_model`.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_machinery_probe import PACK_NAME, import_backend  # noqa: E402

RESOLUTION = 64
SMALL_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
              "projection_dim": 32}
SMALL_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 1}
SIGMAS = [0.05, 0.5, 0.95]  # flow families: noise levels of the hand check
TIMESTEPS = [10, 500, 999]  # discrete families
# Load Dataset's inputs for the concept folder, by name as ComfyUI passes them
CONCEPT_DATASET = {"folder": "concept", "resolution": RESOLUTION, "caption_extension": ".txt",
                   "default_caption": "a photo of {token}", "token": "sks", "repeats": 1, "flip": False}


def reset_to_torch_default_init(module: torch.nn.Module) -> None:
    """torch's own `reset_parameters` on every submodule (ComfyUI's layers skip init), with a fixed seed; tensors
    no `reset_parameters` sets (SD3's positional table, a buffer) are zero."""
    torch.manual_seed(0)
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            tensor.zero_()
    for submodule in module.modules():
        for cls in type(submodule).__mro__:
            if cls.__module__.startswith("torch.nn") and "reset_parameters" in vars(cls):
                cls.reset_parameters(submodule)
                break
        for name, parameter in submodule.named_parameters(recurse=False):  # RMSNorm scales, T5's layer norms…
            if name in ("scale",) or (type(submodule).__name__ == "T5LayerNorm" and name == "weight"):
                parameter.fill_(1.0)


def build_clip(target, options: dict, tokenizer_data: dict | None = None):
    import comfy.sd

    clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data or {}, model_options=options)
    reset_to_torch_default_init(clip.cond_stage_model)
    return clip


def build_vae(channels: int):
    """A small KL VAE (8× down, `channels` latent channels) through `comfy.sd.VAE`, as VAELoader makes one."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": channels, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    source = AutoencoderKL(ddconfig=ddconfig, embed_dim=channels)
    reset_to_torch_default_init(source)
    vae = comfy.sd.VAE(sd=source.state_dict(), config={"params": {"ddconfig": ddconfig, "embed_dim": channels}})
    vae.latent_channels = channels
    return vae


def patcher(config, weight_dtype: torch.dtype | None = None):
    """The model of `config` in a ModelPatcher; with `weight_dtype` stored in it and cast per layer, as
    UNETLoader's weight_dtype does (`load_diffusion_model_state_dict`)."""
    import comfy.model_management
    import comfy.model_patcher

    device = torch.device("cpu")
    state = None
    if weight_dtype is not None:
        state = patcher(type(config)(config.unet_config)).model.diffusion_model.state_dict()
        manual_cast = comfy.model_management.unet_manual_cast(weight_dtype, device, config.supported_inference_dtypes)
        config.set_inference_dtype(weight_dtype, manual_cast)
    model = config.get_model({})
    if state is None:
        reset_to_torch_default_init(model.diffusion_model)
    else:
        model.diffusion_model.load_state_dict({key: value.to(weight_dtype) for key, value in state.items()})
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def build_sdxl():
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base

    unet_config = {**comfy.supported_models.SDXL.unet_config, "image_size": 32, "in_channels": 4, "out_channels": 4,
                   "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
                   "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1, "model_channels": 32,
                   "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
                   "context_dim": 64, "adm_in_channels": 32 + 6 * 256, "use_checkpoint": False}
    config = comfy.supported_models.SDXL(unet_config)
    config.unet_config.update(num_head_channels=16)
    if "model_options" in inspect.signature(comfy.sd.CLIP).parameters:
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        clip = build_clip(target, {"clip_l_model_config": SMALL_CLIP, "clip_g_model_config": SMALL_CLIP})
    else:  # the 2024 ComfyUI reads CLIP configs from files only
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, small_sdxl_clip_2024)
        clip = comfy.sd.CLIP(target)
        reset_to_torch_default_init(clip.cond_stage_model)
    return patcher(config), clip, build_vae(4)


def small_sdxl_clip_2024(device="cpu", dtype=None):
    """The 2024 ComfyUI's SDXLClipModel, its CLIP-L and CLIP-G built as it builds them from small config files."""
    import tempfile

    import comfy.sd1_clip
    import comfy.sdxl_clip

    folder = Path(tempfile.mkdtemp())
    configs = {}
    for name, source in (("l", "sd1_clip_config.json"), ("g", "clip_config_bigg.json")):
        config = json.loads((Path(comfy.sd1_clip.__file__).parent / source).read_text())
        configs[name] = folder / f"clip_{name}.json"
        configs[name].write_text(json.dumps({**config, **SMALL_CLIP}))
    model = comfy.sdxl_clip.SDXLClipModel.__new__(comfy.sdxl_clip.SDXLClipModel)
    torch.nn.Module.__init__(model)
    model.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                              layer_norm_hidden_state=False, textmodel_json_config=str(configs["l"]))
    model.clip_g = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                              textmodel_json_config=str(configs["g"]), layer_norm_hidden_state=False,
                                              special_tokens={"start": 49406, "end": 49407, "pad": 0})
    return model


FLUX_CONFIG = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
               "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
               "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True}


def flux_clip():
    import comfy.supported_models_base
    import comfy.text_encoders.flux

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                    comfy.text_encoders.flux.flux_clip())
    return build_clip(target, {"clip_l_model_config": SMALL_CLIP, "t5xxl_model_config": SMALL_T5})


def build_flux(weight_dtype: torch.dtype | None = None):
    import comfy.supported_models

    return patcher(comfy.supported_models.Flux(dict(FLUX_CONFIG)), weight_dtype), flux_clip(), build_vae(16)


def build_flux_scaled_fp8():
    """Flux as ComfyUI loads an "fp8_scaled" file on a GPU with fp8 compute (`--supports-fp8-compute`): the file's
    empty `scaled_fp8` marker makes `model_detection` set the scaled-fp8 ops with fp8 optimizations, so every Linear
    stores e4m3 weights over a per-layer `scale_weight` and multiplies through `torch._scaled_mm`."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    comfy.model_management.SUPPORT_FP8_OPS = True
    source = patcher(comfy.supported_models.Flux(dict(FLUX_CONFIG))).model.diffusion_model
    config = comfy.supported_models.Flux(dict(FLUX_CONFIG))
    config.scaled_fp8, config.optimizations["fp8"] = torch.float8_e4m3fn, True  # as model_detection sets them
    config.set_inference_dtype(torch.float32, None)  # as load_diffusion_model_state_dict does on a CPU
    model = config.get_model({})
    state = {}
    for name, layer in source.named_modules():
        if isinstance(layer, torch.nn.Linear):  # scaled as the fp8_scaled files are: absmax to e4m3's 448
            scale = layer.weight.abs().max() / 448
            state |= {f"{name}.weight": (layer.weight / scale).to(torch.float8_e4m3fn), f"{name}.scale_weight": scale}
    model.load_model_weights({**source.state_dict(), **state}, "")  # as load_diffusion_model_state_dict does
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device), flux_clip(), build_vae(16)


def build_sd3():
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip

    unet_config = {"in_channels": 16, "out_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2,
                   "depth": 2, "pos_embed_max_size": 16, "num_patches": 256, "adm_in_channels": 64,
                   "context_embedder_config": {"target": "torch.nn.Linear",
                                               "params": {"in_features": 4096, "out_features": 128}},
                   "qk_norm": None, "x_block_self_attn_layers": []}
    config = comfy.supported_models.SD3(unet_config)
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                                                    comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True,
                                                                                          t5=False))
    clip = build_clip(target, {"clip_l_model_config": SMALL_CLIP, "clip_g_model_config": SMALL_CLIP})
    return patcher(config), clip, build_vae(16)


QWEN_IMAGE_CONFIG = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
                     "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                     "axes_dims_rope": [4, 6, 6]}
SMALL_QWEN = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1}


def qwen_clip():
    """ComfyUI's Qwen-Image text encoder (its tokenizer and templates, Qwen2.5-VL's language model and vision tower)
    small: ComfyUI fixes the vision tower's size (658 M parameters even over a small language model), so the test's
    has 2 blocks of width 32; the edit prompt nodes run it on their images."""
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_image as qwen_image
    import comfy.text_encoders.qwen_vl as qwen_vl

    class LanguageModel(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers, self.dtype = config.num_hidden_layers, dtype
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.visual = qwen_vl.Qwen2VLVisionTransformer(
                hidden_size=32, output_hidden_size=config.hidden_size, intermediate_size=64, num_heads=2, num_layers=2,
                device=device, dtype=dtype, ops=operations)

    class TextModel(qwen_image.Qwen25_7BVLIModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True,
                     model_options={}):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=LanguageModel,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(qwen_image.QwenImageTokenizer, qwen_image.te())
    clip = build_clip(target, {"qwen25_7b_model_config": SMALL_QWEN, "qwen25_7b_class": TextModel})
    for module in clip.cond_stage_model.modules():  # RMSNorm scales, zeroed with the rest
        if "RMSNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
    return clip


def wan_vae():
    """Qwen-Image's VAE as VAELoader makes it (Wan 2.1's, whose layout ComfyUI fixes: full size), random."""
    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE

    source = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True], dropout=0.0)
    reset_to_torch_default_init(source)
    for name, parameter in source.named_parameters():
        if name.endswith("gamma"):  # its RMS norms' scales
            parameter.fill_(1.0)
    return comfy.sd.VAE(sd=source.state_dict())


CHROMA_CONFIG = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2, "context_in_dim": 32,
                 "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                 "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "in_dim": 64, "out_dim": 64,
                 "hidden_dim": 32, "n_layers": 1}


def build_chroma():
    """Chroma with ComfyUI's PixArt T5 text encoder (small), as CLIPLoader's chroma type loads it."""
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5 as pixart_t5

    target = comfy.supported_models_base.ClipTarget(pixart_t5.PixArtTokenizer, pixart_t5.pixart_te())
    clip = build_clip(target, {"t5xxl_model_config": SMALL_T5})
    return patcher(comfy.supported_models.Chroma(dict(CHROMA_CONFIG))), clip, build_vae(16)


LUMINA2_CONFIG = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32,
                  "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16,
                  "qk_norm": True, "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512]}


def gemma_sentencepiece_model() -> torch.Tensor:
    """A small SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3), trained here on the system
    prompt and captions, as a Lumina 2 text-encoder file carries its tokenizer: a `spiece_model` byte tensor."""
    import io

    import sentencepiece

    from comfyui_lora_lab.lora_core.families.lumina2 import LUMINA2

    text = [LUMINA2.caption_template.format("a photo of sks, a red circle on a white background")] * 8
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=96,
                                             model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                             character_coverage=1.0, minloglevel=2)
    return torch.frombuffer(bytearray(model.getvalue()), dtype=torch.uint8)


def build_lumina2():
    """Lumina 2 with ComfyUI's Gemma-2 text encoder (its class, small; head_dim stays Gemma-2's 256), as CLIPLoader's
    lumina2 type loads it, with the tokenizer the file would carry."""
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.lumina2 as lumina2

    target = comfy.supported_models_base.ClipTarget(lumina2.LuminaTokenizer, lumina2.te())
    small_gemma = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                   "num_attention_heads": 2, "num_key_value_heads": 1}
    clip = build_clip(target, {"gemma2_2b_model_config": small_gemma}, {"spiece_model": gemma_sentencepiece_model()})
    return patcher(comfy.supported_models.Lumina2(dict(LUMINA2_CONFIG))), clip, build_vae(16)


HIDREAM_CONFIG = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
                  "num_single_layers": 1, "attention_head_dim": 8, "num_attention_heads": 4, "caption_channels": [32, 32],
                  "text_emb_dim": 64, "num_routed_experts": 4, "num_activated_experts": 2,
                  "axes_dims_rope": [4, 2, 2], "max_resolution": [16, 16], "llama_layers": [0, 1]}
SMALL_LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1}


def llama_tokenizer_folder(folder: Path) -> Path:
    """A Llama-3-style tokenizer (one token per character; <|begin_of_text|> 128000 first, <|eot_id|> 128009) in the
    files LlamaTokenizerFast reads: this ComfyUI copy's llama_tokenizer folder lacks its tokenizer.json."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {character: index for index, character in enumerate(["<unk>", *string.ascii_letters, *string.digits,
                                                                   *string.punctuation])}
    vocab |= {"<|begin_of_text|>": 128000, "<|eot_id|>": 128009}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                             special_tokens=[("<|begin_of_text|>", 128000)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def build_hidream(work_dir: Path):
    """HiDream with ComfyUI's four-encoder text encoder (CLIP-L, CLIP-G, T5, Llama; each small) as
    QuadrupleCLIPLoader makes it, its Llama tokenizer written here (see `llama_tokenizer_folder`)."""
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.hidream as hidream
    import comfy.text_encoders.sd3_clip
    import comfy.sdxl_clip
    from transformers import LlamaTokenizerFast

    folder = llama_tokenizer_folder(work_dir / "llama_tokenizer")

    class Tokenizer(hidream.HiDreamTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 — ComfyUI's signature
            self.clip_l = comfy.sd1_clip.SDTokenizer(embedding_directory=embedding_directory,
                                                     tokenizer_data=tokenizer_data)
            self.clip_g = comfy.sdxl_clip.SDXLClipGTokenizer(embedding_directory=embedding_directory,
                                                             tokenizer_data=tokenizer_data)
            self.t5xxl = comfy.text_encoders.sd3_clip.T5XXLTokenizer(
                embedding_directory=embedding_directory, min_length=128, max_length=128, tokenizer_data=tokenizer_data)
            self.llama = comfy.sd1_clip.SDTokenizer(
                str(folder), embedding_directory=embedding_directory, pad_with_end=False, embedding_size=4096,
                embedding_key="llama", tokenizer_class=LlamaTokenizerFast, has_start_token=True, has_end_token=False,
                pad_to_max_length=False, max_length=99999999, pad_token=128009, min_length=128,
                tokenizer_data=tokenizer_data)

    target = comfy.supported_models_base.ClipTarget(Tokenizer, hidream.hidream_clip())
    clip = build_clip(target, {"clip_l_model_config": SMALL_CLIP, "clip_g_model_config": SMALL_CLIP,
                               "t5xxl_model_config": SMALL_T5, "llama_model_config": SMALL_LLAMA})
    for module in clip.cond_stage_model.modules():  # Llama's RMSNorm scales, zeroed with the rest
        if "RMSNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
    return patcher(comfy.supported_models.HiDream(dict(HIDREAM_CONFIG))), clip, build_vae(16)


WAN_CONFIG = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "num_heads": 2, "num_layers": 2, "ffn_dim": 128,
              "in_dim": 16, "out_dim": 16, "text_dim": 32, "freq_dim": 32, "patch_size": (1, 2, 2)}


def umt5_clip():
    """ComfyUI's Wan text encoder (umT5 through its own tokenizer class, padded to 512 tokens and zeroed past the
    caption) with a 1-layer umT5 of width 32; the SentencePiece model is the T5 one ComfyUI ships (Wan's own comes
    inside the encoder file)."""
    import comfy.supported_models_base
    import comfy.text_encoders.wan as wan

    spiece = Path(wan.__file__).with_name("t5_pile_tokenizer") / "tokenizer.model"
    target = comfy.supported_models_base.ClipTarget(wan.WanT5Tokenizer, wan.te())
    return build_clip(target, {"umt5xxl_model_config": {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2,
                                                         "num_layers": 1, "vocab_size": 32128}},
                      tokenizer_data={"spiece_model": str(spiece)})


def build_wan():
    import comfy.supported_models

    return patcher(comfy.supported_models.WAN21_T2V(dict(WAN_CONFIG))), umt5_clip(), wan_vae()


def build_wan22_5b():
    """Wan 2.2 TI2V 5B's layout (48 latent channels in and out, ComfyUI's WAN22_T2V and its Wan22 latent format),
    small; the VAE is a small KL VAE of 48 channels standing in for the 2.2 VAE, whose full size ComfyUI fixes (its
    latents have the channels the model takes; the model's own tests encode with the real layout in lora_core)."""
    import comfy.supported_models

    config = {**WAN_CONFIG, "in_dim": 48, "out_dim": 48}
    return patcher(comfy.supported_models.WAN22_T2V(config)), umt5_clip(), build_vae(48)


HUNYUAN_VIDEO_CONFIG = {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
                        "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                        "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 256, "patch_size": [1, 2, 2],
                        "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False}


def build_hunyuan_video(work_dir: Path):
    """HunyuanVideo with ComfyUI's text encoder (CLIP-L and a 4-layer Llama: it takes the third-last layer, small) as
    DualCLIPLoader's hunyuan_video type makes it, its Llama tokenizer the tiny pipeline's (tests/support: the
    template's 95 tokens and Llama 3's header ids, so ComfyUI crops the template as it does with the real one; this
    ComfyUI copy lacks its llama tokenizer.json); the VAE is Wan 2.1's (16 channels, 4× temporal and 8× spatial, as
    HunyuanVideo's), whose full size ComfyUI fixes as it fixes HunyuanVideo's."""
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.hunyuan_video as hunyuan_video
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from support.tiny_hunyuan_video import llama3_tokenizer_folder

    folder = llama3_tokenizer_folder(work_dir / "llama3_tokenizer")

    class Tokenizer(hunyuan_video.HunyuanVideoTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 — ComfyUI's signature
            self.clip_l = comfy.sd1_clip.SDTokenizer(embedding_directory=embedding_directory,
                                                     tokenizer_data=tokenizer_data)
            self.llama_template = DEFAULT_PROMPT_TEMPLATE["template"]  # ComfyUI's own, word for word
            self.llama = comfy.sd1_clip.SDTokenizer(  # LLAMA3Tokenizer's settings over the tiny tokenizer, read as
                # its file says (transformers 5's LlamaTokenizer would rebuild it with SentencePiece's pre-tokenizer)
                str(folder), embedding_directory=embedding_directory, pad_with_end=False, embedding_size=4096,
                embedding_key="llama", tokenizer_class=PreTrainedTokenizerFast, has_start_token=True,
                has_end_token=False,
                pad_to_max_length=False, max_length=99999999, pad_token=128258, min_length=1,
                tokenizer_data=tokenizer_data)

    target = comfy.supported_models_base.ClipTarget(Tokenizer, hunyuan_video.hunyuan_video_clip())
    clip = build_clip(target, {"clip_l_model_config": SMALL_CLIP,
                               "llama_model_config": {**SMALL_LLAMA, "num_hidden_layers": 4}})
    for module in clip.cond_stage_model.modules():  # Llama's RMSNorm scales, zeroed with the rest
        if "RMSNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
    return patcher(comfy.supported_models.HunyuanVideo(dict(HUNYUAN_VIDEO_CONFIG))), clip, wan_vae()


def build_qwen_image():
    import comfy.supported_models

    return patcher(comfy.supported_models.QwenImage(dict(QWEN_IMAGE_CONFIG))), qwen_clip(), wan_vae()


BUILDERS = {"sdxl": build_sdxl, "flux": build_flux, "sd3": build_sd3, "qwen_image": build_qwen_image, "wan": build_wan,
            "wan22_5b": build_wan22_5b,
            "chroma": build_chroma, "lumina2": build_lumina2,
            "flux_fp8": lambda: build_flux(torch.float8_e4m3fn), "flux_scaled_fp8": build_flux_scaled_fp8}
FP8_FAMILIES = ("flux_fp8", "flux_scaled_fp8")


def text_conditioning(clip, count: int, extras: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The context (and pooled output, where the family has one, and the encoder's `extras` outputs: HiDream's Llama
    states) of "a photo of sks", `count` times."""
    tokens = clip.tokenize("a photo of sks")
    if extras:
        output = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        context, pooled = output["cond"], output["pooled_output"]
    else:
        context, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return {"context": context.repeat(count, 1, 1), **({} if pooled is None else {"pooled": pooled.repeat(count, 1)}),
            **{name: output[name].repeat(count, *[1] * (output[name].dim() - 1)) for name in extras}}


def fixed_tensors(model, count: int, frames: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and noise of `count` 8×8 images, or with `frames` of clips of that many latent frames."""
    channels = getattr(model.model.latent_format, "latent_channels", 4)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(count, channels, *[frames] * bool(frames), 8, 8, generator=generator)
    return latents, torch.randn(latents.shape, generator=generator)


def sizes(count: int) -> torch.Tensor:
    """SDXL's size/crop conditioning of `count` images: distinct values, so a mixed-up order shows."""
    return torch.tensor([[64 + 8 * i, 72 + 8 * i, 4 * i, 2 * i, 64, 64] for i in range(count)])


def objective_against_comfy(backend_module, model, clip, family: str) -> dict:
    """Loss per sample as Train LoRA computes it (the backend's objective on fixed tensors) and by hand from
    ComfyUI's patched `model_sampling`: x = `noise_scaling(σ, ε, x0)`, x̂0 = `apply_model(x, σ)` with the conditions
    the samplers build; the ε error is (x0 − x̂0)/σ, the v error (x0 − x̂0)/√(1−ᾱ), the flow-velocity
    error (x0 − x̂0)/σ (CONST: x̂0 = x − σ·v̂ and v − v̂ = (x0 − x̂0)/σ). Also: the σ the objective draws are
    the patched schedule's."""
    import comfy_extras.nodes_model_advanced as advanced  # ModelSamplingFlux/SD3: not in the 2024 ComfyUI

    from comfyui_lora_lab.lora_core.training.config import TrainingConfig
    from comfyui_lora_lab.lora_core.training.objectives import sample_sigmas

    import comfy.model_management

    patches = {"sdxl": lambda: advanced.ModelSamplingDiscrete().patch(model, "v_prediction", False),
               "sdxl_eps": lambda: (model,),
               "flux": lambda: advanced.ModelSamplingFlux().patch(model, 1.15, 0.5, RESOLUTION, RESOLUTION),
               "sd3": lambda: advanced.ModelSamplingSD3().patch(model, 3.0),
               "qwen_image": lambda: advanced.ModelSamplingAuraFlow().patch_aura(model, 3.1),
               "chroma": lambda: (model,),  # its own ModelSamplingFlux (μ 1.15)  # as ComfyUI's
               "lumina2": lambda: (model,),  # its own shift 6
               "hidream": lambda: advanced.ModelSamplingSD3().patch(model, 3.0),  # as ComfyUI's HiDream workflows
               "wan": lambda: advanced.ModelSamplingSD3().patch(model, 8.0),  # as ComfyUI's Wan 14B workflows
               "wan22_5b": lambda: advanced.ModelSamplingSD3().patch(model, 8.0),  # as ComfyUI's 5B workflow
               "hunyuan_video": lambda: (model,)}  # its own shift 7
    # Qwen-Image workflows shift it
    with torch.inference_mode():
        (patched,) = patches[family]()
        backend = backend_module.ComfyBackend(patched, clip)
        comfy.model_management.load_models_gpu([patched])
        sampling = backend_module.model_sampling(patched)
        count = len(SIGMAS)
        latents, noise = fixed_tensors(patched, count, 2 * backend.video)
        context, pooled = clip.encode_from_tokens(clip.tokenize("a photo of sks"), return_pooled=True)
        conditioning = {**text_conditioning(clip, count, backend.spec.text_extras), "size_and_crop": sizes(count)}
        objective = backend.objective(TrainingConfig())
        if backend.prediction_type == "flow":
            times = torch.tensor(SIGMAS)
            sigma = times
        else:
            times = torch.tensor(TIMESTEPS)
            sigma = sampling.sigmas[times]
        x = sampling.noise_scaling(sigma.reshape(-1, *[1] * (latents.dim() - 1)), noise, latents)
        one_frame = backend.frames and not backend.video
        if one_frame:  # Qwen-Image's latents are one-frame videos [B, C, 1, H, W]
            x = x[:, :, None]
        denoised = torch.cat([
            patched.model.apply_model(x[i:i + 1], sigma[i:i + 1], **{
                name: cond.process_cond(batch_size=1, device=x.device).cond
                for name, cond in patched.model.extra_conds(
                    cross_attn=context, pooled_output=pooled, noise=x[i:i + 1], device=x.device,
                    **({} if backend.guidance is None else {"guidance": backend.guidance}),
                    **({"attention_mask": torch.ones(1, context.shape[1], dtype=torch.long)}
                       if backend.spec.text_mask_condition else {}),
                    **{name: conditioning[name][i:i + 1] for name in backend.spec.text_extras},
                    **dict(zip(("height", "width", "crop_h", "crop_w", "target_height", "target_width"),
                               sizes(count)[i].tolist()))).items()})
            for i in range(count)])
        denoised = denoised[:, :, 0] if one_frame else denoised
        if backend.prediction_type == "v_prediction":
            scale = sigma / (1 + sigma**2).sqrt()
        elif getattr(objective, "precondition_outputs", False):  # SD3: the loss on x̂0 itself
            scale = torch.ones_like(sigma)
        else:
            scale = sigma
        by_hand = ((latents - denoised) / scale.reshape(-1, *[1] * (latents.dim() - 1))).square().flatten(1).mean(1)
        with backend.training(False), torch.inference_mode(False), torch.no_grad():
            trained = objective.loss(lambda noisy, t: backend.predict(noisy, t, conditioning), latents, noise, times)
        drawn = objective.draw((4, *latents.shape[1:]), torch.Generator().manual_seed(7))[1]
        expected = None
        if backend.prediction_type == "flow":
            generator = torch.Generator().manual_seed(7)
            torch.randn((4, *latents.shape[1:]), generator=generator)  # the noise is drawn first
            uniform = sample_sigmas(objective.sampling, 4, generator, objective.logit_mean, objective.logit_std)
            expected = sampling.sigma(uniform * getattr(sampling, "multiplier", 1.0)).tolist()
    return {"prediction_type": backend.prediction_type, "trainer_loss": trained.tolist(), "hand_loss": by_hand.tolist(),
            "precondition_outputs": getattr(objective, "precondition_outputs", None),
            "drawn_sigmas": drawn.tolist() if expected is not None else None, "schedule_sigmas": expected,
            "sampling": type(sampling).__name__}


def inject(model, clip, algorithm: str, target: str, train_text_encoder: bool) -> tuple:
    """Inject LoRA at rank 4, alpha 4, called by input name as ComfyUI calls nodes."""
    from comfyui_lora_lab.nodes.train_nodes import InjectLoRA

    return InjectLoRA().inject(model=model, clip=clip, algorithm=algorithm, rank=4, alpha=4.0, target=target,
                               train_text_encoder=train_text_encoder)


def tensors_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def fixed_loss(backend_module, model, clip, vae, dataset) -> float:
    """The objective's loss on the dataset's first image with fixed noise and fixed times, through MODEL as it is
    (its LoRA patches applied by ComfyUI)."""
    from comfyui_lora_lab.lora_core.training.config import TrainingConfig

    with torch.inference_mode():
        backend = backend_module.ComfyBackend(model, clip, vae)
        pixels = dataset.image_pixels(0).unsqueeze(0)
        latents = backend.encode_images(pixels, torch.Generator().manual_seed(0))
        latents = latents.repeat(4, *[1] * (latents.dim() - 1))
        conditioning = backend.encode_text(["a photo of sks"] * 4)  # the concept's default caption
        conditioning["size_and_crop"] = sizes(4)
        objective = backend.objective(TrainingConfig())
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
        times = objective.stratified(4)
        with backend.training(False), torch.inference_mode(False), torch.no_grad():
            return float(objective.loss(lambda noisy, t: backend.predict(noisy, t, conditioning), latents, noise,
                                        times).mean())


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def sample(model, clip, seed: int = 3):
    """A 4-step KSampler image at 64 px, as the core nodes sample, with the family's cfg and scheduler."""
    import nodes as comfy_nodes

    from comfyui_lora_lab.nodes.comfy_backend import ComfyBackend

    with torch.inference_mode():
        backend = ComfyBackend(model, clip)
        channels = getattr(model.model.latent_format, "latent_channels", 4)
        latent = {"samples": torch.zeros(1, channels, *[1] * backend.video, RESOLUTION // 8, RESOLUTION // 8)}
        (sampled,) = comfy_nodes.common_ksampler(model, seed, 4, backend.spec.sample_cfg, "euler",
                                                 backend.spec.sample_scheduler, backend.conditioning("a photo of sks"),
                                                 backend.conditioning(""), latent)
        return sampled["samples"]


def core_against_lora_core(backend_module, model, clip, tensors: dict[str, torch.Tensor], loader=None) -> dict:
    """ComfyUI's core loader (or `loader`) on a file's `tensors` (its "lora key not loaded" lines), and the
    prediction of the MODEL and CLIP it patches against lora_core's adapters (from the backend's `network_tensors`)
    on the base."""
    import comfy.sd
    from comfyui_lora_lab.lora_core.network import LoRANetwork

    lines = LogLines()
    logging.getLogger().addHandler(lines)
    try:
        core_model, core_clip = (loader or comfy.sd.load_lora_for_models)(model, clip, tensors, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(lines)
    backend = backend_module.ComfyBackend(model, clip)
    latents, noise = fixed_tensors(model, 2, 2 * backend.video)
    times = torch.tensor([0.3, 0.8]) if backend.prediction_type == "flow" else torch.tensor([200, 700])
    conditioning = {**text_conditioning(core_clip, 2, backend.spec.text_extras), "size_and_crop": sizes(2)}
    core_backend = backend_module.ComfyBackend(core_model, core_clip)
    with core_backend.training(False), torch.inference_mode(False), torch.no_grad():
        core_prediction = core_backend.predict(latents + noise, times, conditioning)
    with backend.training(True), torch.inference_mode(False), torch.no_grad():
        trained, _ = LoRANetwork.from_tensors(backend.network_tensors(tensors), backend.loadable_modules(),
                                              strict=True)
        base_prediction = backend.predict(latents + noise, times, conditioning)
        with trained.applied(1.0):
            own = {**conditioning, **text_conditioning(clip, 2, backend.spec.text_extras)}
            lora_prediction = backend.predict(latents + noise, times, own)
    return {"not_loaded": [line for line in lines.lines if "lora key not loaded" in line.lower()],
            "core_vs_lora_core": float((core_prediction - lora_prediction).abs().max()),
            "prediction_scale": float(lora_prediction.abs().max()),
            "lora_effect": float((lora_prediction - base_prediction).abs().max()),
            "text_context_difference": float((own["context"] - conditioning["context"]).abs().max())}


def shared_layout(backend, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya file in the layout ai-toolkit, diffusion-pipe and ComfyUI share: `diffusion_model.<ComfyUI path>`
    with lora_A/lora_B, alpha/rank folded into lora_B, no alpha."""
    paths = {name: path for path, name in backend._unet_names.items()}
    shared = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix == "alpha":
            continue
        rank = tensors[f"{name}.lora_down.weight"].shape[0]
        scale = float(tensors.get(f"{name}.alpha", rank)) / rank
        part = {"lora_down.weight": ("lora_A.weight", 1.0), "lora_up.weight": ("lora_B.weight", scale)}[suffix]
        shared[f"diffusion_model.{paths[name]}.{part[0]}"] = value * part[1]
    return shared


def musubi_layout(backend_module, model, clip, tensors: dict[str, torch.Tensor]) -> dict:
    """A HunyuanVideo file (`diffusion_model.<HunyuanVideo's path>.lora_A/B`) renamed as musubi-tuner writes it
    (`lora_unet_double_blocks_0_img_mlp_fc1.lora_down/lora_up`): the adapters Load LoRA makes of it against those of
    the file itself, and the keys ComfyUI's core loader leaves unmapped."""
    import comfy.sd
    from comfyui_lora_lab.lora_core.network import LoRANetwork

    suffixes = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
    musubi = {}
    for key, value in tensors.items():
        module, _, suffix = key.rpartition(".")
        module, _, leaf = module.rpartition(".")
        name = "lora_unet_" + module.removeprefix("diffusion_model.").replace(".", "_")
        musubi[f"{name}.{suffixes[f'{leaf}.{suffix}']}"] = value
    backend = backend_module.ComfyBackend(model, clip)
    with torch.inference_mode(False), torch.no_grad():
        networks = [LoRANetwork.from_tensors(backend.network_tensors(file), backend.loadable_modules(), strict=True)[0]
                    for file in (tensors, musubi)]
        difference = max(float((networks[1].adapters[name].delta_weight() - adapter.delta_weight()).abs().max())
                         for name, adapter in networks[0].items())
    lines = LogLines()
    logging.getLogger().addHandler(lines)
    try:
        comfy.sd.load_lora_for_models(model, clip, musubi, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(lines)
    return {"modules": [len(network.adapters) for network in networks], "delta_w_difference": difference,
            "core_not_loaded": sorted(line.split()[-1] for line in lines.lines if "lora key not loaded" in line.lower())}


def train_and_load(backend_module, model, clip, vae, family: str, work_dir: Path) -> dict:
    """Train LoRA through the pack's nodes on a fixed concept, then: the fixed-noise loss before and after, MODEL
    and CLIP unchanged, ComfyUI's core loader on the file (unmatched keys, its prediction against the trained network
    attached by lora_core), Apply LoRA's image against core's, strength 0 against the base image."""
    import folder_paths

    import comfy.sd
    from comfyui_lora_lab.lora_core.demo.demo import make_concept_images
    from comfyui_lora_lab.nodes.lora_nodes import ApplyLoRA
    from comfyui_lora_lab.nodes.train_nodes import InjectLoRA, LoadDataset, TrainingOptions, TrainLoRA

    folder_paths.set_input_directory(str(work_dir / "input"))
    make_concept_images(work_dir / "input" / "concept", count=2)  # Load Dataset scales them to RESOLUTION
    fp8 = family in FP8_FAMILIES
    text_encoder = not fp8 and bool(backend_module.ComfyBackend(model, clip).spec.text_encoders)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        unet_before, clip_before = tensors_digest(model.model.diffusion_model), tensors_digest(clip.cond_stage_model)
        (dataset, _), = [LoadDataset().load(**CONCEPT_DATASET)["result"]]
        (network,) = inject(model, clip, "lora", "transformer", text_encoder)
        (options,) = TrainingOptions().options(**{
            **{name: spec[1]["default"] for section in TrainingOptions.INPUT_TYPES().values()
               for name, spec in section.items() if "default" in spec[1]},  # the widgets, not the links
            "gradient_checkpointing": fp8})
        loss_before = fixed_loss(backend_module, model, clip, vae, dataset)
        started = time.perf_counter()
        steps = 20
        output = TrainLoRA().train(network, dataset, vae, steps, 1e-2, 1, "AdamW", 0, 0,
                                   "a photo of sks", options)
        seconds = time.perf_counter() - started
        weights, trained_model, trained_clip = output["result"][:3]
        summary = output["ui"]["lora_lab_training"][0]
        # before any clone with the LoRA loads (ComfyUI patches the shared weights in place while one is loaded)
        unchanged = (tensors_digest(model.model.diffusion_model) == unet_before
                     and tensors_digest(clip.cond_stage_model) == clip_before and not model.patches)
        loss_after = fixed_loss(backend_module, trained_model, trained_clip, vae, dataset)
        result = {"loss_before": loss_before, "loss_after": loss_after, "steps": summary["steps"],
                  "train_seconds": summary["seconds"], "node_seconds": seconds,
                  "model_unchanged": unchanged, "file_keys": sorted(weights.tensors),
                  "compute_dtype": str(backend_module.ComfyBackend(model, clip).compute_dtype()),
                  "weight_dtype": str(model.model.diffusion_model.final_layer.linear.weight.dtype) if fp8 else None,
                  "text_encoder_tooltip": InjectLoRA.INPUT_TYPES()["required"]["train_text_encoder"][1]["tooltip"]}
        if fp8:
            return result

        result |= core_against_lora_core(backend_module, model, clip, weights.tensors)
        if family == "sd3":  # a file whose q, k and v have their own lora_A, as diffusers trains them
            foreign = {key: value + 0.05 * torch.randn(value.shape, generator=torch.Generator().manual_seed(5))
                       if key.endswith(("to_k.lora_A.weight", "add_v_proj.lora_A.weight")) else value
                       for key, value in weights.tensors.items()}
            result["foreign"] = core_against_lora_core(backend_module, model, clip, foreign)
        spec = backend_module.ComfyBackend(model, clip).spec
        if family == "hunyuan_video":  # musubi-tuner's names, which Load LoRA reads (core maps only some of them)
            result["musubi_layout"] = musubi_layout(backend_module, model, clip, weights.tensors)
        if spec.file_prefixes and not spec.file_module_prefix:  # HiDream's own files are in that layout
            result["shared_layout"] = core_against_lora_core(
                backend_module, model, clip, shared_layout(backend_module.ComfyBackend(model, clip), weights.tensors))
        core_model, core_clip = comfy.sd.load_lora_for_models(model, clip, weights.tensors, 1.0, 1.0)

        applied_model, applied_clip = ApplyLoRA().apply(model, clip, weights, 1.0, 1.0)
        result["applied_equals_core"] = bool(torch.equal(sample(applied_model, applied_clip),
                                                         sample(core_model, core_clip)))
        zero_model, zero_clip = ApplyLoRA().apply(model, clip, weights, 0.0, 0.0)
        base_image = sample(model, clip)
        result["strength_zero_equals_base"] = bool(torch.equal(sample(zero_model, zero_clip), base_image))
        result["lora_changes_image"] = not torch.equal(sample(applied_model, applied_clip), base_image)
    return result


def algorithms(backend_module, model, clip, vae, work_dir: Path) -> dict:
    """DoRA, LoHa and LoKr trained a few steps through the nodes: core Load LoRA (LoHa, LoKr) and Apply LoRA (DoRA,
    applied with the trained math) against lora_core's adapters on the base."""
    from comfyui_lora_lab.lora_core.formats.files import LoRAWeights
    from comfyui_lora_lab.nodes.lora_nodes import ApplyLoRA
    from comfyui_lora_lab.nodes.train_nodes import LoadDataset, TrainLoRA

    def apply_lora(model, clip, tensors, strength_model, strength_clip):
        return ApplyLoRA().apply(model, clip, LoRAWeights(tensors), strength_model, strength_clip)

    results = {}
    with torch.inference_mode():
        (dataset, _), = [LoadDataset().load(**CONCEPT_DATASET)["result"]]
        for algorithm in ("dora", "loha", "lokr"):
            (network,) = inject(model, clip, algorithm, "attention", False)
            output = TrainLoRA().train(network, dataset, vae, 3, 1e-2, 1, "AdamW", 0, 0, "a photo of sks")
            tensors = output["result"][0].tensors
            results[algorithm] = core_against_lora_core(backend_module, model, clip, tensors,
                                                        apply_lora if algorithm == "dora" else None)
    return results


def algorithms_in_weights(backend_module, model, clip, vae, work_dir: Path) -> dict:
    """fp8 models: DoRA (Apply LoRA) and LoHa/LoKr (core Load LoRA) trained a few steps; each weight patch ComfyUI
    holds, applied as ComfyUI's `patch_weight_to_device` applies it (`calculate_weight` on the float32 true weight,
    before it is rounded back to fp8), against lora_core's merged weight on the same base. Also DoRA's magnitude as
    a new adapter sets it on ComfyUI's layer, against the row norms of the true weight (`convert_weight`)."""
    import comfy.lora
    import comfy.sd
    import comfy.utils
    from comfyui_lora_lab.lora_core.adapters import DoRAAdapter
    from comfyui_lora_lab.lora_core.formats.files import LoRAWeights
    from comfyui_lora_lab.lora_core.network import LoRANetwork
    from comfyui_lora_lab.nodes.lora_nodes import ApplyLoRA
    from comfyui_lora_lab.nodes.train_nodes import LoadDataset, TrainLoRA

    def true_weight(layer) -> torch.Tensor:
        weight = layer.weight.float()
        return layer.convert_weight(weight) if hasattr(layer, "convert_weight") else weight

    results = {}
    with torch.inference_mode():
        backend = backend_module.ComfyBackend(model, clip)
        with backend.training(False), torch.inference_mode(False), torch.no_grad():
            layer = backend.loadable_modules()["lora_unet_double_blocks_0_img_attn_qkv"]
            magnitude = DoRAAdapter(layer, 4).dora_scale.reshape(-1)
            norms = true_weight(layer).norm(dim=1)
            results["dora_scale_error"] = float(((magnitude - norms).abs() / norms).max())
        (dataset, _), = [LoadDataset().load(**CONCEPT_DATASET)["result"]]
        for algorithm in ("dora", "loha", "lokr"):
            (network,) = inject(model, clip, algorithm, "attention", False)
            tensors = TrainLoRA().train(network, dataset, vae, 3, 1e-2, 1, "AdamW", 0, 0, "a photo of sks")[
                "result"][0].tensors
            if algorithm == "dora":
                patched, _ = ApplyLoRA().apply(model, clip, LoRAWeights(tensors), 1.0, 1.0)
            else:
                patched, _ = comfy.sd.load_lora_for_models(model, clip, tensors, 1.0, 1.0)
            with backend.training(False), torch.inference_mode(False), torch.no_grad():
                trained, _ = LoRANetwork.from_tensors(backend.network_tensors(tensors), backend.loadable_modules(),
                                                      strict=True)
                errors, diff_dtypes = [], set()
                for name, adapter in trained.items():
                    key, _ = backend.weight_key(name)
                    base = true_weight(comfy.utils.get_attr(model.model, key.rpartition(".")[0]))
                    comfy_weight = comfy.lora.calculate_weight(patched.patches[key], base.clone(), key)
                    update = adapter.merged_weight(1.0) - base
                    errors.append(float((comfy_weight - base - update).norm() / update.norm()))
                    diff_dtypes |= {str(patch[1][1][0].dtype) for patch in patched.patches[key]
                                    if isinstance(patch[1], tuple) and patch[1][0] == "diff"}
            results[algorithm] = {"layers": len(errors), "update_error": max(errors), "diff_dtypes": sorted(diff_dtypes)}
    return results


def vae_posterior(backend_module, model, clip, vae) -> dict:
    """Train LoRA's latents of one image against a hand sample of the posterior ComfyUI's own encoder computes (the
    moments that enter its `regularization`): mean + std·ε with ε from the seed the backend draws; the same
    generator seed gives the same latents, another seed others."""
    backend = backend_module.ComfyBackend(model, clip, vae)
    pixels = torch.rand(1, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(3)) * 2 - 1
    moments = []
    hook = vae.first_stage_model.regularization.register_forward_pre_hook(lambda _, args: moments.append(args[0]))
    with torch.inference_mode():
        latents = [backend.encode_images(pixels, torch.Generator().manual_seed(seed)) for seed in (11, 11, 12)]
    hook.remove()
    mean, logvar = moments[0].float().chunk(2, dim=1)
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(11))))
    by_hand = mean + (0.5 * logvar.clamp(-30.0, 20.0)).exp() * torch.randn(mean.shape)
    with torch.inference_mode():
        by_hand, mean = (model.model.process_latent_in(tensor) for tensor in (by_hand, mean))
    return {"sampled_vs_hand": float((latents[0] - by_hand).abs().max()),
            "sampled_vs_mean": float((latents[0] - mean).abs().max()),
            "same_seed_equal": bool(torch.equal(latents[0], latents[1])),
            "other_seed_differs": not torch.equal(latents[0], latents[2])}


def kontext(backend_module, model, clip, vae, work_dir: Path) -> dict:
    """Edit pairs on Flux (Kontext): the velocity Train LoRA computes with a reference image equals ComfyUI's own
    conditioned call (`extra_conds` with the VAE's `reference_latents`, as ReferenceLatent sets them, through
    `apply_model`), the reference changes it, and Train LoRA trains on Load Dataset's pairs."""
    import folder_paths
    from comfyui_lora_lab.lora_core.backend import REFERENCE_LATENTS
    from comfyui_lora_lab.lora_core.demo.demo import make_concept_images
    from comfyui_lora_lab.nodes.train_nodes import LoadDataset, TrainLoRA

    folder_paths.set_input_directory(str(work_dir / "input"))
    make_concept_images(work_dir / "input" / "pairs", count=2)
    make_concept_images(work_dir / "input" / "pairs" / "control", count=2, seed=5)  # the same stems
    with torch.inference_mode():
        (dataset, _), = [LoadDataset().load(**{**CONCEPT_DATASET, "folder": "pairs", "control_images": True})["result"]]
        backend = backend_module.ComfyBackend(model, clip, vae)
        sampling = backend_module.model_sampling(model)
        latents = backend.encode_images(dataset.image_pixels(0)[None], torch.Generator().manual_seed(0))
        pixels = dataset.reference_pixels(0)[0][None]
        reference = backend.encode_reference_images(pixels)
        raw_reference = vae.encode((pixels.movedim(1, -1) + 1) / 2)  # VAEEncode → ReferenceLatent
        sigma = torch.tensor([0.6])
        x = sampling.noise_scaling(sigma.reshape(-1, 1, 1, 1), torch.randn(latents.shape), latents)
        context, pooled = clip.encode_from_tokens(clip.tokenize("a photo of sks"), return_pooled=True)
        conds = model.model.extra_conds(cross_attn=context, pooled_output=pooled, noise=x, device=x.device,
                                        guidance=backend.guidance, reference_latents=[raw_reference])
        denoised = model.model.apply_model(x, sigma, **{name: cond.process_cond(batch_size=1, device=x.device).cond
                                                        for name, cond in conds.items()})
        conditioning = {"context": context, "pooled": pooled, REFERENCE_LATENTS: reference[:, None]}
        with backend.training(False), torch.inference_mode(False), torch.no_grad():
            ours = backend.predict(x, sigma, conditioning)
            alone = backend.predict(x, sigma, {"context": context, "pooled": pooled})
        (network,) = inject(model, clip, "lora", "attention", False)
        output = TrainLoRA().train(network, dataset, vae, 3, 1e-2, 1, "AdamW", 0, 0, "a photo of sks")
    return {"difference": float((denoised - (x - sigma * ours)).abs().max()), "scale": float(denoised.abs().max()),
            "reference_effect": float((ours - alone).abs().max()),
            "steps": output["ui"]["lora_lab_training"][0]["steps"]}


def qwen_edit(backend_module, model, clip, vae, work_dir: Path) -> dict:
    """Edit pairs on Qwen-Image (Qwen-Image-Edit): the caption Train LoRA encodes with a pair's reference is ComfyUI's
    TextEncodeQwenImageEditPlus (or TextEncodeQwenImageEdit) on the reference as LoadImage gives it, and the vision
    tower saw it (another reference, another context); the velocity with the reference latents equals ComfyUI's own
    conditioned call (`extra_conds` with the VAE's `reference_latents`, as the prompt node or ReferenceLatent set
    them, through `apply_model`), and Train LoRA trains on Load Dataset's pairs with either edit prompt."""
    import folder_paths
    import numpy as np
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEdit, TextEncodeQwenImageEditPlus
    from comfyui_lora_lab.lora_core.backend import REFERENCE_LATENTS
    from comfyui_lora_lab.lora_core.demo.demo import make_concept_images
    from comfyui_lora_lab.nodes.train_nodes import LoadDataset, TrainLoRA
    from PIL import Image

    folder_paths.set_input_directory(str(work_dir / "input"))
    make_concept_images(work_dir / "input" / "pairs", count=2)
    make_concept_images(work_dir / "input" / "pairs" / "control", count=2, seed=5)  # the same stems
    caption = "a photo of sks"
    with torch.inference_mode():
        (dataset, _), = [LoadDataset().load(**{**CONCEPT_DATASET, "folder": "pairs", "control_images": True})["result"]]
        backend = backend_module.ComfyBackend(model, clip, vae)
        edit_backend = backend_module.ComfyBackend(model, clip, vae, edit_prompt="edit")
        loaded = [torch.from_numpy(np.array(Image.open(example.path.parent / "control" / example.path.name)
                                            .convert("RGB")).astype(np.float32) / 255.0)[None]
                  for example in dataset.examples]  # each image's reference as LoadImage gives it
        references = [dataset.reference_pixels(image) for image in range(2)]
        ours = [backend.encode_text_with_references([caption], [pixels])["context"] for pixels in references]
        ((plus_node, _),) = TextEncodeQwenImageEditPlus.execute(clip, caption, None, loaded[0]).args[0]
        ((edit_node, _),) = TextEncodeQwenImageEdit.execute(clip, caption, None, loaded[0]).args[0]
        edit_ours = edit_backend.encode_text_with_references([caption], references[:1])["context"]
        alone = backend.encode_text([caption])["context"]

        sampling = backend_module.model_sampling(model)
        latents = backend.encode_images(dataset.image_pixels(0)[None], torch.Generator().manual_seed(0))
        reference = backend.encode_reference_images(references[0][0][None])
        raw_reference = vae.encode(loaded[0])  # VAEEncode → ReferenceLatent (or the prompt node with its VAE)
        sigma = torch.tensor([0.6])
        x = sampling.noise_scaling(sigma.reshape(-1, 1, 1, 1), torch.randn(latents.shape), latents)[:, :, None]
        conds = model.model.extra_conds(cross_attn=ours[0], noise=x, device=x.device, reference_latents=[raw_reference])
        denoised = model.model.apply_model(x, sigma, **{name: cond.process_cond(batch_size=1, device=x.device).cond
                                                        for name, cond in conds.items()})[:, :, 0]
        conditioning = {"context": ours[0], REFERENCE_LATENTS: reference[:, None]}
        with backend.training(False), torch.inference_mode(False), torch.no_grad():
            velocity = backend.predict(x[:, :, 0], sigma, conditioning)
            without = backend.predict(x[:, :, 0], sigma, {"context": ours[0]})
        steps = {}
        for name in ("edit_plus", "edit"):
            (network,) = inject(model, clip, "lora", "attention", False)
            output = TrainLoRA().train(network, dataset, vae, 2, 1e-2, 1, "AdamW", 0, 0, caption,
                                       options={"edit_prompt": name})  # as Flow Matching Options passes it
            steps[name] = output["ui"]["lora_lab_training"][0]["steps"]
    return {"plus_equals_node": bool(torch.equal(ours[0], plus_node)), "edit_equals_node": bool(torch.equal(edit_ours, edit_node)),
            "tokens": [int(ours[0].shape[1]), int(edit_ours.shape[1]), int(alone.shape[1])],
            "references_differ": bool(not torch.equal(ours[0], ours[1])),
            "difference": float((denoised - (x[:, :, 0] - sigma * velocity)).abs().max()),
            "scale": float(denoised.abs().max()), "reference_effect": float((velocity - without).abs().max()),
            "steps": steps}


def wan_clips(backend_module, model, clip, vae, work_dir: Path) -> dict:
    """Load Dataset with frames 5 on a folder of clips (mp4, webm, gif), a too-short one and a broken file: the valid
    clips train as 5-frame videos (2 latent frames) through Train LoRA; the others are named. And min_sigma /
    max_sigma (an A14B expert's side of the boundary) restrict the σ drawn from the MODEL's own schedule."""
    import folder_paths
    from comfyui_lora_lab.lora_core.training.config import TrainingConfig
    from comfyui_lora_lab.nodes.train_nodes import LoadDataset, TrainLoRA

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from support.clips import write_clip

    folder_paths.set_input_directory(str(work_dir / "input"))
    clips = work_dir / "input" / "clips"
    for name in ("a.mp4", "b.webm", "c.gif"):
        write_clip(clips / name, 9, size=RESOLUTION)
    write_clip(clips / "short.mp4", 3, size=RESOLUTION)
    (clips / "broken.mp4").write_bytes(b"not a video" * 50)
    with torch.inference_mode():
        output = LoadDataset().load(**{**CONCEPT_DATASET, "folder": "clips", "frames": 5})
        dataset, _ = output["result"]
        backend = backend_module.ComfyBackend(model, clip, vae)
        latents = backend.encode_images(dataset.image_pixels(0)[None], torch.Generator().manual_seed(0))
        (network,) = inject(model, clip, "lora", "attention", False)
        trained = TrainLoRA().train(network, dataset, vae, 3, 1e-2, 1, "AdamW", 0, 3, "a video of sks",
                                    options={"sample_steps": 2})  # one sample clip, at the last step
        high = backend.objective(TrainingConfig(min_sigma=0.875)).draw((2000, 1), torch.Generator().manual_seed(0))[1]
        low = backend.objective(TrainingConfig(max_sigma=0.875)).draw((2000, 1), torch.Generator().manual_seed(0))[1]
    summary = trained["ui"]["lora_lab_training"][0]
    return {"examples": sorted(example.path.name for example in dataset.examples),
            "skipped": sorted(path.name for path, _ in dataset.skipped), "text": output["ui"]["text"][0],
            "latent_shape": list(latents.shape), "steps": summary["steps"],
            "losses_finite": all(loss == loss for loss in summary["losses"]),
            "expert_sigmas": [float(high.min()), float(high.max()), float(low.min()), float(low.max())],
            "samples_shape": list(trained["result"][4].shape)}


def prompt_node(backend_module, model, clip) -> dict:
    """Lumina 2: the CONDITIONING Train LoRA samples with (its captions are encoded in the same template) is ComfyUI's
    own CLIPTextEncodeLumina2 with the "superior" system prompt, the attention mask its sampler counts tokens from
    included."""
    from comfy_extras.nodes_lumina2 import CLIPTextEncodeLumina2

    backend = backend_module.ComfyBackend(model, clip)
    with torch.inference_mode():
        ((ours, our_extras),) = backend.conditioning("a photo of sks")
        ((node, node_extras),) = CLIPTextEncodeLumina2.execute(clip, "a photo of sks", "superior").args[0]
        caption = backend.encode_text(["a photo of sks"])
    return {"context_equal": bool(torch.equal(ours, node)), "extras": sorted(our_extras),
            "masks_equal": bool(torch.equal(our_extras["attention_mask"], node_extras["attention_mask"])),
            "caption_equals_node": bool(torch.equal(caption["context"], node))}


def caption_tokens(backend_module, model, clip) -> dict:
    """HunyuanVideo: the context Train LoRA trains with is CLIPTextEncode's, ComfyUI's template crop leaving the
    caption's Llama tokens and <|eot_id|>; the pooled output is CLIP-L's."""
    import nodes as comfy_nodes

    backend = backend_module.ComfyBackend(model, clip)
    with torch.inference_mode():
        caption = backend.encode_text(["a video of sks"])
        ((node, extras),) = comfy_nodes.CLIPTextEncode().encode(clip, "a video of sks")[0]
        tokens = clip.tokenize("a video of sks")["llama"][0]
    return {"context_equals_node": bool(torch.equal(caption["context"], node)),
            "pooled_equals_node": bool(torch.equal(caption["pooled"], extras["pooled_output"])),
            "context_tokens": caption["context"].shape[1], "tokenized": len(tokens)}


def refusals(backend_module, model, clip) -> dict:
    """What Train LoRA refuses for this family, each message as the user sees it."""
    from comfyui_lora_lab.lora_core.training.config import TrainingConfig

    backend = backend_module.ComfyBackend(model, clip)
    settings = ({"timestep_sampling": "uniform"} if backend.prediction_type != "flow" else {"min_snr_gamma": 5.0})
    messages = {}
    for name, attempt in {
        "settings": lambda: backend.objective(TrainingConfig(**settings)),
        "guidance": lambda: backend_module.ComfyBackend(model, clip, guidance=3.5),
        "loha": lambda: inject(model, clip, "loha", "attention", False),
        "text_encoder": lambda: inject(model, clip, "lora", "attention", True),
    }.items():
        try:
            attempt()
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


def main() -> None:
    comfy_dir, family, work_dir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    backend_module = import_backend(comfy_dir)
    with torch.inference_mode():  # as ComfyUI's loaders run
        builders = {"hidream": build_hidream, "hunyuan_video": build_hunyuan_video}
        model, clip, vae = builders[family](work_dir) if family in builders else BUILDERS[family]()
    checks = {"train_and_load": (train_and_load, backend_module, model, clip, vae, family, work_dir)}
    if family not in FP8_FAMILIES:
        checks["objective"] = (objective_against_comfy, backend_module, model, clip, family)
    if family == "sdxl":
        checks["objective_eps"] = (objective_against_comfy, backend_module, model, clip, "sdxl_eps")
    checks["refusals"] = (refusals, backend_module, model, clip)
    if family == "sdxl":
        checks["vae_posterior"] = (vae_posterior, backend_module, model, clip, vae)
    if family == "lumina2":
        checks["prompt_node"] = (prompt_node, backend_module, model, clip)
    if family == "hunyuan_video":
        checks["caption_tokens"] = (caption_tokens, backend_module, model, clip)
    if family in ("sdxl", "flux"):
        checks["algorithms"] = (algorithms, backend_module, model, clip, vae, work_dir)
    if family == "flux":
        checks["kontext"] = (kontext, backend_module, model, clip, vae, work_dir)
    if family == "wan":
        checks["clips"] = (wan_clips, backend_module, model, clip, vae, work_dir)
    if family == "qwen_image":
        checks["qwen_edit"] = (qwen_edit, backend_module, model, clip, vae, work_dir)
    if family in FP8_FAMILIES:
        checks["algorithms_in_weights"] = (algorithms_in_weights, backend_module, model, clip, vae, work_dir)
    results = {"parameters": sum(p.numel() for p in model.model.diffusion_model.parameters())}
    for name, (check, *arguments) in checks.items():
        try:
            results[name] = check(*arguments)
        except Exception as error:  # reported to the test, which names the check that failed
            results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
