"""`python -m lora_core make-base`: pretrain the demo's tiny SD1.x base from scratch on procedural scenes.

Scenes are one shape (circle, square, triangle) in one colour on a plain background, at a random place and size,
captioned "a red circle on a white background". A few shape × colour × background combinations are held out of
training to measure whether the base composes its prompts. The run trains, in order and all seeded: the VAE
(pixels → 8×8×4 latents), a small CNN detector that reads shape, colour and background back from images (trained on
scenes decoded by the VAE, including the demo's "cross", which the base never sees), then the UNet and CLIP text
encoder together on cached latents (ε-prediction, caption dropout for classifier-free guidance, EMA of the weights).
Every weights file records the settings and the data recipe in its safetensors metadata.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .tiny_model import write_tokenizer_files

BASE_DIR = Path(__file__).resolve().parent / "base"
RESOLUTION = 32
BASE_SHAPES = ("circle", "square", "triangle")
CONCEPT_SHAPE = "cross"
SHAPES = BASE_SHAPES + (CONCEPT_SHAPE,)
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (235, 200, 40)}
BACKGROUNDS = {"white": (240, 240, 235), "black": (25, 25, 30)}
HELD_OUT = (("blue", "triangle", "black"), ("red", "square", "white"), ("green", "circle", "black"),
            ("yellow", "triangle", "white"))
WORDS = ("a", "on", "background", "sks", *SHAPES, *COLOURS, *BACKGROUNDS)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str

    def caption(self, shape_word: str | None = None) -> str:
        return f"a {self.colour} {shape_word or self.shape} on a {self.background} background"


def all_scenes(shapes=BASE_SHAPES) -> list[Scene]:
    return [Scene(shape, colour, background) for shape, colour, background in itertools.product(shapes, COLOURS, BACKGROUNDS)]


def training_scenes() -> list[Scene]:
    return [scene for scene in all_scenes() if (scene.colour, scene.shape, scene.background) not in HELD_OUT]


def held_out_scenes() -> list[Scene]:
    return [Scene(shape, colour, background) for colour, shape, background in HELD_OUT]


def draw_scene(scene: Scene, rng: random.Random, resolution: int = RESOLUTION) -> Image.Image:
    """The scene at a random size (radius 22–34 % of the side) and place (centre within ±12 % of the middle)."""
    scale = 4  # drawn large and downsampled: anti-aliased edges
    side = resolution * scale
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    radius = side * rng.uniform(0.22, 0.34)
    x, y = (side / 2 + rng.uniform(-0.12, 0.12) * side for _ in range(2))
    draw, fill = ImageDraw.Draw(image), COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    elif scene.shape == "square":
        half = radius * 0.85
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(x, y - radius), (x - radius * 0.95, y + radius * 0.75), (x + radius * 0.95, y + radius * 0.75)],
                     fill=fill)
    elif scene.shape == CONCEPT_SHAPE:
        arm = radius * 0.33
        draw.rectangle((x - radius, y - arm, x + radius, y + arm), fill=fill)
        draw.rectangle((x - arm, y - radius, x + arm, y + radius), fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; choose one of {SHAPES}")
    return image.resize((resolution, resolution), Image.LANCZOS)


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL images → a float batch in [-1, 1], as the VAE sees them."""
    array = torch.stack([torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8) for image in images])
    side = images[0].size[0]
    return array.view(len(images), side, side, 3).permute(0, 3, 1, 2).float() / 127.5 - 1


def render(scenes: list[Scene], seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    return to_pixels([draw_scene(scene, rng) for scene in scenes])


class SceneDetector(nn.Module):
    """Reads shape (base shapes + the demo's cross), colour and background from a 32 px image in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
        )
        self.shape = nn.Linear(64 * 16, len(SHAPES))
        self.colour = nn.Linear(64 * 16, len(COLOURS))
        self.background = nn.Linear(64 * 16, len(BACKGROUNDS))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.features(pixels)
        return self.shape(features), self.colour(features), self.background(features)

    @torch.no_grad()
    def read(self, pixels: torch.Tensor) -> list[dict]:
        """Per image: the most likely shape, colour and background, and the probability of each shape."""
        shape, colour, background = (logits.softmax(-1) for logits in self(pixels))
        return [{
            "shape": SHAPES[int(s.argmax())], "colour": list(COLOURS)[int(c.argmax())],
            "background": list(BACKGROUNDS)[int(b.argmax())], "shape_probabilities": dict(zip(SHAPES, s.tolist())),
        } for s, c, b in zip(shape, colour, background)]


def load_detector(directory: Path = BASE_DIR) -> SceneDetector:
    detector = SceneDetector()
    detector.load_state_dict(load_file(Path(directory) / "detector.safetensors"))
    return detector.eval()


def load_base(directory: Path = BASE_DIR):
    """The shipped (or a `make-base`) pipeline, offline."""
    from diffusers import StableDiffusionPipeline

    if not (Path(directory) / "model_index.json").is_file():
        raise FileNotFoundError(f"{directory} holds no base pipeline; build one with `python -m lora_core make-base`")
    pipeline = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def scene_prompts(scenes: list[Scene], seeds: range, shape_word: str | None = None):
    """Every scene from each seed: the scenes asked for, their captions, and each image's generator seed."""
    asked = [scene for _ in seeds for scene in scenes]
    image_seeds = [seed * 1000 + index for seed in seeds for index in range(len(scenes))]
    return asked, [scene.caption(shape_word) for scene in asked], image_seeds


def generate_batch(pipeline, prompts: list[str], seeds: list[int], steps: int = 20,
                   guidance_scale: float = 5.0) -> torch.Tensor:
    """One image per prompt, each from its own seed's noise (as a one-image call would start), in [0, 1]."""
    generator = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                    output_type="pt").images


def read_back(detector: SceneDetector, asked: list[Scene], images: torch.Tensor) -> dict:
    """The fraction of `images` (in [0, 1]) that the detector reads back as `asked`, per attribute and in all."""
    readings = detector.read(images * 2 - 1)
    hits = {key: [getattr(scene, key) == reading[key] for scene, reading in zip(asked, readings)]
            for key in ("shape", "colour", "background")}
    every = [all(values) for values in zip(*hits.values())]
    return {"all": sum(every) / len(every), **{key: sum(value) / len(value) for key, value in hits.items()},
            "images": len(every), "readings": readings}


def prompt_accuracy(pipeline, detector: SceneDetector, scenes: list[Scene], seeds: range, steps: int = 20,
                    guidance_scale: float = 5.0, shape_word=None) -> dict:
    """Generate every scene's caption from each seed; the fraction the detector reads back as asked."""
    asked, prompts, image_seeds = scene_prompts(scenes, seeds, shape_word)
    return read_back(detector, asked, generate_batch(pipeline, prompts, image_seeds, steps, guidance_scale))


@dataclass
class Settings:
    seed: int = 0
    images_per_scene: int = 150
    vae_steps: int = 800
    unet_steps: int = 3000
    detector_steps: int = 600
    batch_size: int = 32
    vae_lr: float = 2e-3
    unet_lr: float = 1.5e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    kl_weight: float = 1e-6
    checkpoint_every: int = 500


def build_models(vocabulary: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer(str(vocabulary / "vocab.json"), str(vocabulary / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=RESOLUTION,
    )
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return tokenizer, text_encoder, vae, unet, scheduler


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_vae(vae, pixels: torch.Tensor, settings: Settings, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(settings.vae_steps):
        batch = pixels[torch.randint(len(pixels), (settings.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + settings.kl_weight * posterior.kl().mean()
        for group in optimizer.param_groups:
            group["lr"] = settings.vae_lr * 0.5 * (1 + math.cos(math.pi * step / settings.vae_steps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == settings.vae_steps - 1:
            log(f"vae {step}/{settings.vae_steps} loss {loss.item():.5f}")
    vae.eval()


def train_denoiser(unet, text_encoder, tokenizer, scheduler, latents, captions, settings, generator, save) -> tuple:
    """ε-prediction on cached latents, UNet and text encoder together; returns the EMA copies."""
    tokens = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_parameters = [*ema_unet.parameters(), *ema_text.parameters()]
    alphas = scheduler.alphas_cumprod
    unet.train(), text_encoder.train()
    warmup = min(200, settings.unet_steps // 10 + 1)
    for step in range(settings.unet_steps):
        index = torch.randint(len(latents), (settings.batch_size,), generator=generator)
        ids = tokens[index].clone()
        ids[torch.rand(len(ids), generator=generator) < settings.caption_dropout] = empty[0]
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, len(alphas), (len(clean),), generator=generator)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / settings.unet_steps))
        for group in optimizer.param_groups:
            group["lr"] = settings.unet_lr * scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_parameters, parameters, 1 - decay)
        if step % 100 == 0 or step == settings.unet_steps - 1:
            log(f"unet {step}/{settings.unet_steps} loss {loss.item():.4f}")
        if (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.unet_steps:
            save(ema_unet, ema_text, step + 1)
    return ema_unet, ema_text


def train_detector(detector: SceneDetector, vae, settings: Settings, generator: torch.Generator) -> None:
    """On fresh scenes of every shape, half of them passed through the VAE (the look of generated images)."""
    scenes = all_scenes(SHAPES)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=2e-3)
    detector.train()
    for step in range(settings.detector_steps):
        picked = [scenes[i] for i in torch.randint(len(scenes), (settings.batch_size,), generator=generator)]
        pixels = render(picked, settings.seed * 7919 + 100_000 + step)
        with torch.no_grad():
            half = len(pixels) // 2
            pixels[:half] = vae.decode(vae.encode(pixels[:half]).latent_dist.mode()).sample.clamp(-1, 1)
            pixels = pixels + 0.05 * torch.randn(pixels.shape, generator=generator)
        targets = [torch.tensor([names.index(getattr(scene, key)) for scene in picked])
                   for key, names in (("shape", SHAPES), ("colour", list(COLOURS)), ("background", list(BACKGROUNDS)))]
        loss = sum(F.cross_entropy(logits, target) for logits, target in zip(detector(pixels), targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == settings.detector_steps - 1:
            log(f"detector {step}/{settings.detector_steps} loss {loss.item():.4f}")
    detector.eval()


def recipe(settings: Settings, **measured) -> dict[str, str]:
    """The safetensors metadata every shipped weights file carries."""
    data = {
        "resolution": RESOLUTION, "shapes": BASE_SHAPES, "detector_extra_shape": CONCEPT_SHAPE, "colours": COLOURS,
        "backgrounds": BACKGROUNDS, "held_out": HELD_OUT, "caption": "a {colour} {shape} on a {background} background",
        "placement": "radius 22-34 % of the side, centre within ±12 % of the middle, drawn 4x and downsampled",
    }
    return {"format": "pt", "lora_lab.make_base.settings": json.dumps(asdict(settings)),
            "lora_lab.make_base.data": json.dumps(data), "lora_lab.make_base.measured": json.dumps(measured)}


def write_metadata(directory: Path, metadata: dict[str, str]) -> None:
    """`metadata` into every weights file. The text encoder's keys get back the `text_model.` prefix that
    transformers 5 leaves out when saving, so that transformers 4 loads the file too (5 reads both)."""
    for path in directory.rglob("*.safetensors"):
        tensors = load_file(path)
        if path.parent.name == "text_encoder":
            tensors = {key if key.startswith("text_model.") else f"text_model.{key}": value
                       for key, value in tensors.items()}
        save_file(tensors, path, metadata=metadata)


def make_base(out: Path, settings: Settings) -> dict:
    """Build, pretrain and save the base pipeline and detector into `out`; returns the measured figures."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    with tempfile.TemporaryDirectory() as vocabulary:
        tokenizer, text_encoder, vae, unet, scheduler = build_models(write_tokenizer_files(Path(vocabulary), WORDS))
    log(f"parameters: unet {sum(p.numel() for p in unet.parameters()):,}, vae {sum(p.numel() for p in vae.parameters()):,}, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()):,}")

    scenes = [scene for scene in training_scenes() for _ in range(settings.images_per_scene)]
    pixels = render(scenes, settings.seed)
    log(f"{len(scenes)} training images of {len(training_scenes())} scenes")
    train_vae(vae, pixels, settings, generator)
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(256)])
    vae.register_to_config(scaling_factor=round(1 / means.std().item(), 5))
    latents = means * vae.config.scaling_factor
    log(f"vae scaling factor {vae.config.scaling_factor}")

    detector = SceneDetector()
    train_detector(detector, vae, settings, generator)
    save_file(detector.state_dict(), out / "detector.safetensors")

    def save(unet_weights, text_weights, step: int) -> None:
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_weights, tokenizer=tokenizer, unet=unet_weights, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipeline.save_pretrained(out)
        write_tokenizer_files(out / "tokenizer", WORDS)  # vocab.json + merges.txt: what transformers 4 reads
        write_metadata(out, recipe(settings, unet_steps_done=step))
        log(f"saved {out} at unet step {step}")

    ema_unet, ema_text = train_denoiser(unet, text_encoder, tokenizer, scheduler, latents,
                                        [scene.caption() for scene in scenes], settings, generator, save)
    save(ema_unet, ema_text, settings.unet_steps)
    pretraining_seconds = time.monotonic() - started

    pipeline = load_base(out)
    measured = {
        "pretraining_seconds": round(pretraining_seconds, 1),
        "detector_on_vae_scenes": detector_accuracy(detector, vae, settings.seed),
        "prompt_accuracy_training_scenes": strip(prompt_accuracy(pipeline, detector, training_scenes(), range(2))),
        "prompt_accuracy_held_out_scenes": strip(prompt_accuracy(pipeline, detector, held_out_scenes(), range(5))),
    }
    write_metadata(out, recipe(settings, unet_steps_done=settings.unet_steps, **measured))
    return measured


def strip(accuracy: dict) -> dict:
    return {key: value for key, value in accuracy.items() if key != "readings"}


@torch.no_grad()
def detector_accuracy(detector: SceneDetector, vae, seed: int) -> float:
    """How often the detector reads all three attributes right on fresh VAE-decoded scenes of every shape."""
    scenes = all_scenes(SHAPES) * 4
    pixels = vae.decode(vae.encode(render(scenes, seed + 555)).latent_dist.mode()).sample.clamp(-1, 1)
    readings = detector.read(pixels)
    right = [all(getattr(scene, key) == reading[key] for key in ("shape", "colour", "background"))
             for scene, reading in zip(scenes, readings)]
    return sum(right) / len(right)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument("--out", default=str(BASE_DIR), help="the folder to write (default: the shipped base)")
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.set_defaults(run=command_make_base)


def command_make_base(args: argparse.Namespace) -> None:
    settings = Settings(**{name: getattr(args, name) for name in asdict(Settings())})
    print(json.dumps(make_base(Path(args.out), settings), indent=2))
