"""The device memory a run will take, planned before its first step: the denoiser's weights as they are stored, the
other models left on the device, the LoRA with its gradients and optimizer state (fp32), and the activations of one
step, which a transformer denoiser's width, blocks and tokens decide.

Activations count values of tokens × width in the compute dtype: what autograd keeps of one block for its backward
(the family's `saved_activations` values per token and channel: Flux's 16 unless measured otherwise) for every
block, or with gradient checkpointing the input of every block and those of the one block recomputed; and the
transient values of one block's backward (BACKWARD_BLOCK). A UNet's (SD1.x/2.x, SDXL) are its family's values per
latent position and channel of its first level (`Family.unet_activations`), with and without checkpointing: its
levels' widths and resolutions make them a fixed multiple of the latent's area and the UNet's base width. The constants are measured (bench/train_step.py on an H200 and on
this CPU: docs/benchmarks.md says which runs set them and which check them). The plan is an estimate: its total is
what `torch.cuda.max_memory_allocated` would read, without the CUDA context (CUDA_CONTEXT); on a CPU, the peak of
the bytes malloc has in use (the RSS also holds freed memory glibc keeps)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch import nn

GIB = 2**30
BACKWARD_BLOCK = 24.0  # the transient values of one block's backward, in tokens × width values
CUDA_CONTEXT = GIB // 2  # the CUDA context and kernels, outside PyTorch's allocator (its peak does not count them)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "lion": 4, "sgd": 4, "rmsprop": 4, "adafactor": 0,
                         "prodigy": 16}  # per fp32 LoRA value; an optimizer not listed is planned as AdamW
OFFLOADED_INPUTS = 3  # block inputs on the device at once with cpu_offload_checkpointing: the block's, its output
# (the next one's) and the copy its recompute reads
MIN_TOKENS = 256  # fewer tokens than a 256² image's are no way to fit a run
PATCH_TOKENS = 4  # latent values per token of every transformer family: 2×2 patches (Flux packs them alike)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on the training device, by what holds them."""

    weights: int  # the denoiser's, as stored (fp8 at one byte, NF4 at half)
    weight_values: int  # how many values they hold
    other_models: int  # text encoders and VAE left on the device
    adapters: int  # LoRA values, their gradients and the optimizer's state, fp32
    tokens: int  # the largest batch's tokens (latent and text) the activations are planned for; a UNet's: its latent
    # positions (batch × frames × height × width of the latent)
    width: int  # a transformer block's residual width; a UNet's first level's channels
    blocks: int
    activation_bytes: int  # of one value in the compute (or autocast) dtype
    checkpointing: bool
    saved_per_block: float  # the values per token and channel autograd keeps of one block (Family.saved_activations)
    block_bytes: tuple[int, ...] = ()  # each block's frozen weights, in order (what block swap moves)
    swapped: int = 0  # blocks_to_swap: their weights are on the host, two of them on the device at a time
    auto_swap: bool = False  # blocks_to_swap auto: `swapped` is what the plan chose
    offloaded: bool = False  # cpu_offload_checkpointing: the checkpointed blocks' inputs are in host memory
    host_weights: int | None = None  # frozen weights in host memory besides the swapped blocks' (the text encoders
    # and VAE parked there, a base left there); None: the device is the host (a CPU run)
    unet_values: tuple[float, float] = (0.0, 0.0)  # a UNet's values per latent position and channel of its first
    # level, without and with checkpointing (Family.unet_activations); zeros: a transformer

    @property
    def unet(self) -> bool:
        return bool(self.unet_values[0])

    def activations_for(self, tokens: int, checkpointing: bool) -> int:
        if self.unet:
            return int(self.unet_values[checkpointing] * tokens * self.width * self.activation_bytes)
        if not self.width:
            return 0
        inputs = min(OFFLOADED_INPUTS, self.blocks) if self.offloaded else self.blocks  # the blocks' inputs kept
        kept = inputs + self.saved_per_block if checkpointing else self.blocks * self.saved_per_block
        return int((kept + BACKWARD_BLOCK) * tokens * self.width * self.activation_bytes)

    @property
    def activations(self) -> int:
        return self.activations_for(self.tokens, self.checkpointing)

    @property
    def swapped_in(self) -> int:
        """The device copies of the swapped blocks in use at once: the one computing and the next."""
        return 2 * max(self.block_bytes[len(self.block_bytes) - self.swapped:], default=0) if self.swapped else 0

    @property
    def host(self) -> int:
        """Host memory the run adds beside the device's: the weights kept there, the swapped blocks' and the inputs
        cpu_offload_checkpointing keeps there (the Python process and the dataset not counted)."""
        swapped_out = sum(self.block_bytes[len(self.block_bytes) - self.swapped:]) if self.swapped else 0
        inputs = (self.blocks * self.tokens * self.width * self.activation_bytes
                  if self.offloaded and self.checkpointing and not self.unet else 0)
        return (self.host_weights or 0) + swapped_out + inputs

    @property
    def total(self) -> int:
        return self.weights + self.swapped_in + self.other_models + self.adapters + self.activations

    def with_swap(self, count: int) -> MemoryPlan:
        """This plan with `count` of the last blocks swapped (their weights leave the device)."""
        moved = sum(self.block_bytes[len(self.block_bytes) - count:]) - sum(
            self.block_bytes[len(self.block_bytes) - self.swapped:]) if self.swapped else sum(
            self.block_bytes[len(self.block_bytes) - count:])
        return replace(self, weights=self.weights - moved, swapped=count)

    def fewest_swapped(self, available: int) -> int | None:
        """The fewest of the last blocks to swap for this plan (swapping none) to fit `available` bytes: 0 where it
        fits as it is, None where no count does."""
        return next((count for count in range(len(self.block_bytes) or 1)
                     if self.with_swap(count).total <= available), None)

    def breakdown(self) -> str:
        swap = f" + {size(self.swapped_in)} of {self.swapped} swapped blocks" if self.swapped else ""
        parts = [f"weights {size(self.weights)}{swap}", f"other models {size(self.other_models)}",
                 f"LoRA + gradients + optimizer {size(self.adapters)}"]
        checkpointing = f"{'with' if self.checkpointing else 'without'} gradient checkpointing" + (
            ", its inputs in host memory" if self.offloaded else "")
        if self.unet:
            parts.append(f"activations {size(self.activations)} ({self.tokens:,} latent positions × {self.width}, {checkpointing})")
        elif self.width:
            parts.append(f"activations {size(self.activations)} ({self.tokens:,} tokens × {self.width} × "
                         f"{self.blocks} blocks, {checkpointing})")
        else:
            parts.append("activations not planned for this denoiser")
        return ", ".join(parts)

    def describe(self) -> str:
        auto = f"; blocks_to_swap auto: {self.swapped or 'none'}" if self.auto_swap else ""
        host = "" if self.host_weights is None else (
            f"; ≈ {size(self.host)} in host memory (the models off the device"
            f"{', the swapped blocks' if self.swapped else ''}"
            f"{', the inputs of the checkpointed blocks' if self.offloaded else ''})")
        return (f"memory plan: ≈ {size(self.total)} on the device ({self.breakdown()}{auto}; planned, not "
                f"measured){host}")

    def refusal(self, available: int) -> str | None:
        """Why the run will not fit in `available` bytes and the fewest of these that make it fit, in this order:
        gradient checkpointing, the text encoders and VAE off the device, the fewest swapped blocks that fit, fp8
        weights, fewer tokens; None where it fits."""
        if self.total <= available:
            return None
        changes, plan = [], self
        if (self.width or self.unet) and not self.checkpointing:
            plan = replace(plan, checkpointing=True)
            changes.append(("gradient_checkpointing on", plan))
        if self.other_models:
            plan = replace(plan, other_models=0)
            changes.append(("the text encoders and VAE off this device (latents and captions cached)", plan))
        swap = next((count for count in range(max(self.swapped, 1), len(self.block_bytes))
                     if plan.with_swap(count).total <= available), None) if self.block_bytes else None
        if swap is not None:
            plan = plan.with_swap(swap)
            changes.append((f"blocks_to_swap {swap}", plan))
        if self.weights > self.weight_values:  # stored in more than a byte a value
            plan = replace(plan, weights=self.weight_values)
            changes.append((("the denoiser's weights in fp8 (lora_core's --base-dtype fp8, ComfyUI's Load Diffusion "
                              "Model weight_dtype fp8_e4m3fn; --qlora stores NF4, half that)"), plan))
        if self.width and not self.unet and not self.offloaded:
            plan = replace(plan, offloaded=True)
            changes.append(("cpu_offload_checkpointing on", plan))
        needed = f"this run needs ≈ {size(self.total)} on the device and {size(available)} are free for it"
        planned = f"(planned: {self.breakdown()})"
        for count, (_, candidate) in enumerate(changes, 1):
            if candidate.total <= available:
                ways = " and ".join(change for change, _ in changes[:count])
                return f"{needed}: it would fit with {ways} (≈ {size(candidate.total)}) {planned}"
        fixed, per_token = plan.total - plan.activations, plan.activations_for(1, plan.checkpointing)
        if per_token and (available - fixed) // per_token >= MIN_TOKENS:
            unit = "latent positions" if self.unet else "tokens"
            ways = " and ".join([change for change, _ in changes] + [
                (f"at most {(available - fixed) // per_token:,} {unit} a batch (now {self.tokens:,}: a lower "
                 "resolution, fewer frames or a smaller batch)")])
            return f"{needed}: it would fit with {ways} {planned}"
        return f"{needed}, whatever these settings: train on a device with more memory {planned}"


def size(count: int) -> str:
    return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / 2**20:.0f} MiB"


def module_bytes(module: nn.Module, device: torch.device, seen: set[int]) -> int:
    """Bytes of `module`'s parameters and buffers on `device`'s type, each storage once across calls sharing `seen`."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # FSDP2: this rank's shard
        if tensor.device.type != device.type or tensor.untyped_storage().data_ptr() in seen:
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        total += tensor.untyped_storage().nbytes()
    return total


def block_width(block: nn.Module) -> int:
    """The residual width of a transformer block: the input width most of its Linear layers share."""
    widths = Counter(module.in_features for module in block.modules() if isinstance(module, nn.Linear))
    return widths.most_common(1)[0][0] if widths else 0


def first_convolution_width(unet: nn.Module) -> int:
    """The channels of a UNet's first level: its input convolution's (diffusers' conv_in, ComfyUI's
    input_blocks.0.0), the first Conv2d it registers."""
    return next(module.out_channels for module in unet.modules() if isinstance(module, nn.Conv2d))


def plan_memory(frozen: list[nn.Module], blocks: list[nn.Module], network: nn.Module, device: torch.device,
                latent_values: int, text_tokens: int, batch_size: int, activation_bytes: int, checkpointing: bool,
                optimizer: str, saved_per_block: float | None, swapped: int = 0,
                unet_values: tuple[float, float] | None = None, offloaded: bool = False,
                averaged: bool = False) -> MemoryPlan:
    """The plan for a run whose largest latent holds `latent_values` values per channel (frames × height × width)
    and longest caption `text_tokens` tokens; `frozen` lists the denoiser first, then the other models;
    `saved_per_block` is a transformer family's, `unet_values` a UNet family's (both None: activations not planned);
    the last `swapped` blocks are to be swapped (planned before they are, with every block where it is now);
    `averaged`: an EMA of the LoRA's weights is kept."""
    seen: set[int] = set()
    weights = module_bytes(frozen[0], device, seen)
    weights += sum(tensor.numel() * tensor.element_size() for block in blocks[len(blocks) - swapped:] if swapped
                   for tensor in [*block.parameters(), *block.buffers()]
                   if not tensor.requires_grad and tensor.device.type != device.type)  # loaded on the host for swap
    weight_values = sum(tensor.numel() for tensor in [*frozen[0].parameters(), *frozen[0].buffers()])
    other = sum(module_bytes(module, device, seen) for module in frozen[1:])
    lora_values = sum(parameter.numel() for parameter in network.parameters() if parameter.requires_grad)
    adapters = lora_values * (8 + OPTIMIZER_STATE_BYTES.get(optimizer.lower(), 8) + 4 * averaged)  # EMA: fp32
    width = (first_convolution_width(frozen[0]) if unet_values else
             block_width(blocks[0]) if saved_per_block is not None and blocks else 0)
    tokens = batch_size * (latent_values if unet_values else latent_values // PATCH_TOKENS + text_tokens)
    block_bytes = tuple(sum(tensor.numel() * tensor.element_size() for tensor in [*block.parameters(), *block.buffers()]
                            if not tensor.requires_grad) for block in blocks)
    host_weights = None
    if device.type != "cpu":  # the swapped blocks' weights are the plan's `host` already
        counted = {tensor.untyped_storage().data_ptr() for block in blocks[len(blocks) - swapped:] if swapped
                   for tensor in [*block.parameters(), *block.buffers()]}
        host_weights = sum(module_bytes(module, torch.device("cpu"), counted) for module in frozen)
    plan = MemoryPlan(weights, weight_values, other, adapters, tokens, width, len(blocks), activation_bytes,
                      checkpointing, saved_per_block or 0.0, block_bytes, offloaded=offloaded, host_weights=host_weights,
                      unet_values=unet_values or (0.0, 0.0))
    return plan.with_swap(swapped) if swapped else plan
