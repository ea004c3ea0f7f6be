"""`python -m lora_core train | generate | check | demo`: the engine from a shell, on a diffusers pipeline folder."""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import signal
import sys
from pathlib import Path

from .data.config import DATASET_SETTINGS, REGULARIZATION_FOLDER
from .errors import LoRALabError
from .families.qwen_image import EDIT_PROMPT
from .families.wan import WAN_EXPERT
from .formats.files import SAVE_PRECISION
from .network_config import EXTRACT_TARGET, NETWORK_SETTINGS, NetworkConfig
from .settings import add_arguments, parsed_settings
from .training.checkpoints import CHECKPOINT_SETTINGS
from .training.config import TRAINING_SETTINGS, TrainingConfig
from .training.distributed import DEFAULT_TIMEOUT_SECONDS, Distributed, is_peer_failure
from .training.sweep import SWEEP_SETTINGS, check_sweep, parse_sweep


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


SAMPLE_FPS = 16  # clips' frame rate in animated samples where the dataset sets none (Wan's)


def load_pipeline(base: Path, device: str, dtype: str = "fp32", quantize_denoiser: bool = False,
                  to_device: bool = True):
    """The diffusers pipeline in the local folder `base`, of any family lora_core trains (nothing is downloaded)."""
    from .families import base_dtype, fp8_storage
    from .families import load_pipeline as load_family_pipeline

    return load_family_pipeline(base, device, base_dtype(dtype, device), quantize_denoiser, to_device,
                                fp8_storage(dtype))


def make_backend(pipeline, args: argparse.Namespace, **identity):
    """The backend of the pipeline's family; `--flux-guidance` only where the family has a guidance input."""
    from .families import backend_class

    cls = backend_class(pipeline)
    options = {}
    if args.flux_guidance is not None:
        if "guidance" not in inspect.signature(cls).parameters:
            raise SystemExit(f"error: --flux-guidance sets the embedded guidance input of Flux.1-dev and HunyuanVideo; "
                             f"{cls.family} has none")
        options["guidance"] = args.flux_guidance
    for setting, parameter in ((EDIT_PROMPT, "edit_prompt"), (WAN_EXPERT, "expert")):  # the family's own options
        value = getattr(args, setting.name)
        if value is not None:
            if parameter not in inspect.signature(cls).parameters:
                raise SystemExit(f"error: {setting.flag} is not an option of {cls.family}: {setting.help}")
            options[parameter] = value
    return cls(pipeline, **identity, **options)


def unet_hash(base: Path) -> str:
    """sha256 of the denoiser's weights file (the UNet's, or the transformer's for SD3 and Flux)."""
    weights = sorted((base / "unet").glob("*.safetensors")) or sorted((base / "transformer").glob("*.safetensors"))
    return file_sha256(weights[0]) if weights else ""


def command_train(args: argparse.Namespace) -> None:
    """One process, or one rank of a torchrun / accelerate launch (data-parallel, see lora_core.training.distributed)."""
    distributed = Distributed.from_environment(args.device, args.distributed_timeout)
    distributed.stop_on_sigterm()
    try:
        train_and_save(args, distributed)
    except Exception as error:
        if not (distributed.enabled and is_peer_failure(error)):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the message gets out whatever the launcher sends now
        print(peer_failure_message(args, distributed, error), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # not a normal exit: tearing down a broken process group can hang or abort
    distributed.close()


def peer_failure_message(args: argparse.Namespace, distributed: Distributed, error: BaseException) -> str:
    """Why this rank stops, and where the run can continue from."""
    from .training.checkpoints import Checkpointer, state_path

    out = Path(args.out)
    saved = Checkpointer(out.parent, every=1, name=out.stem).saved() if args.checkpoint_every else []
    if saved:
        last = (f"The last checkpoint is {saved[-1]}; continue from it with --resume-state {state_path(saved[-1])} and "
                f"the same settings on the same number of processes ({distributed.world_size}).")
    else:
        last = "No checkpoint was saved (--checkpoint-every N saves some to resume from)."
    cause = " ".join(str(error).split())[:300]
    return (f"error: distributed training stopped on rank {distributed.rank} of {distributed.world_size}: another "
            f"rank probably died or stalled (killed, out of memory, a lost node), and this one stops instead of "
            f"waiting; a rank waits at most {distributed.timeout:g} s for the others (--distributed-timeout). "
            f"{last}\n({type(error).__name__}: {cause})")


def train_and_save(args: argparse.Namespace, distributed: Distributed) -> None:
    from tqdm import tqdm

    from .data.config import DatasetConfig
    from .data.dataset import ImageFolderDataset
    from .formats.files import save_lora
    from .formats.metadata import lora_metadata
    from .training.checkpoints import Checkpointer, load_state
    from .training.loop import TrainingDiverged, train

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists; choose another --out or pass --overwrite")
    config = TrainingConfig(**parsed_settings(args, TRAINING_SETTINGS))
    variants = parse_sweep(**parsed_settings(args, SWEEP_SETTINGS))
    if variants:
        if distributed.enabled or args.resume_state or args.fsdp:
            raise SystemExit("error: a sweep trains its variants one after another in one process, each from its "
                             "start: run it without torchrun/accelerate, --fsdp and --resume-state")
        check_sweep(variants, config, continues_a_lora=bool(args.start_from_lora))
    swap = args.blocks_to_swap  # None: auto, which swaps blocks of a base loaded onto the device whole
    if swap != 0 and args.qlora:
        raise SystemExit("error: --blocks-to-swap moves full-precision blocks between host and device; with --qlora "
                         "the NF4 weights stay on the device: use one or the other")
    if args.fsdp and (swap != 0 or args.qlora or args.base_dtype.startswith("fp8")):
        raise SystemExit("error: --fsdp shards the base's weights over the ranks in their own dtype; it does not "
                         "combine with --blocks-to-swap (each rank then holds a share already), --qlora's NF4 or an "
                         "fp8 base, which FSDP2 would all-gather in one byte untested here: use one or the other")
    pipeline = load_pipeline(Path(args.base), str(distributed.device), args.base_dtype, args.qlora,
                             to_device=not (swap or args.fsdp))
    if swap:  # the swapped blocks never reach the device whole: a denoiser larger than it trains
        from .families import place_except

        place_except(pipeline, make_backend(pipeline, args).checkpoint_blocks()[-swap:], str(distributed.device))
    if distributed.is_main:
        from .families import describe_memory

        print(describe_memory(pipeline), flush=True)
    backend = make_backend(pipeline, args, name=Path(args.base).name, model_hash=unet_hash(Path(args.base)))
    dataset = ImageFolderDataset(args.data, DatasetConfig(**parsed_settings(args, DATASET_SETTINGS)),
                                 regularization_root=args.regularization_folder)
    if variants:
        sweep_and_save(args, backend, dataset, config, variants, out)
        return
    network = new_network(args, backend)
    if args.fsdp:  # after the adapters, which read the base's weights whole when they are made (DoRA's magnitude)
        from .families import denoisers, place_except
        from .training.memory_plan import size

        if len(denoisers(pipeline)) > 1:
            raise SystemExit("error: --fsdp shards the blocks of the expert that trains; Wan 2.2 A14B's other expert "
                             "would be gathered whole by each rank when it samples: not supported yet")
        held = distributed.shard(backend.checkpoint_blocks(), denoisers(pipeline))
        place_except(pipeline, denoisers(pipeline), str(distributed.device))
        backend.device = distributed.device
        if distributed.is_main:
            whole = sum(tensor.numel() * tensor.element_size() for model in denoisers(pipeline)
                        for tensor in model.parameters())
            print(f"fsdp: each of the {distributed.world_size} ranks holds {size(held)} of the denoiser's "
                  f"{size(whole)} of weights", flush=True)
    network.to(backend.device)
    backend.file_tensors(network.kohya_tensors())  # a layout the family's files cannot hold fails now, not at saving

    def metadata(steps: int) -> dict[str, str]:
        return lora_metadata(network, config, backend, dataset, steps, title=out.stem)

    checkpointer = None
    if args.checkpoint_every:
        checkpointer = Checkpointer(out.parent, args.checkpoint_every, args.keep_checkpoints, out.stem, metadata,
                                    args.save_precision)
    resume_state = load_state(args.resume_state) if args.resume_state else None
    is_main = distributed.is_main  # rank 0 alone prints and writes files
    if is_main:
        ranks = (f"; {distributed.world_size} processes, global batch {config.batch_size} × {distributed.world_size} × "
                 f"{config.gradient_accumulation}") if distributed.enabled else ""
        print(f"{len(dataset)} examples from {dataset.num_images} images; {len(network.adapters)} {network.algorithm} "
              f"modules{ranks}")
    validation_loss = "-"
    with tqdm(total=config.steps, initial=resume_state["step"] if resume_state else 0, desc="training", unit="step",
              disable=not is_main) as bar:
        def show(report) -> None:
            nonlocal validation_loss
            if report.validation_loss is not None:
                validation_loss = f"{report.validation_loss:.4f}"
            bar.set_postfix(loss=f"{report.smoothed_loss:.4f}", val=validation_loss, lr=f"{report.learning_rate:.2e}")
            bar.update(1)
            if is_main:
                save_samples(report, out, dataset)

        try:
            result = train(backend, network, dataset, config, callback=show, checkpointer=checkpointer,
                           resume_state=resume_state, distributed=distributed,
                           memory_plan=lambda plan: is_main and bar.write(plan.describe()))
        except TrainingDiverged as error:
            result = error.result
            out = out.with_name(out.stem + "-last-good.safetensors")
            if is_main:
                print(f"error: {error}\nthe weights of the last good step are saved to {out}", file=sys.stderr)
    if is_main:
        with distributed.shielded():
            save_lora(out, network, metadata(result.steps), dtype=args.save_precision, overwrite=args.overwrite,
                      file_tensors=backend.file_tensors)
        hidden = ("losses", "learning_rates", "validation")
        print(json.dumps({"file": str(out), **{k: v for k, v in result.as_dict().items() if k not in hidden}}))
    if result.stop_reason == "diverged":
        raise SystemExit(1)


def new_network(args: argparse.Namespace, backend, variant=None):
    """The adapters to train: those of --start-from-lora, or new ones as the network options (and a sweep's
    `variant`: its rank and alpha) say."""
    from .formats.files import load_lora
    from .network import LoRANetwork

    if args.start_from_lora:
        network, _ = load_lora(args.start_from_lora, backend.loadable_modules(), network_tensors=backend.network_tensors)
        return network
    adapters = NetworkConfig(**parsed_settings(args, NETWORK_SETTINGS))
    if variant is not None:
        adapters = variant.adapters(adapters)
    return LoRANetwork.create(backend.adapter_targets(adapters.target, adapters.train_text_encoder), adapters.algorithm,
                              adapters.rank, adapters.alpha, args.seed)


def save_samples(report, out: Path, dataset) -> None:
    """A step's sample images beside `out`: `<stem>-sample-step00000100-0.png`, a clip as an animated WEBP."""
    for index, image in enumerate(report.samples or []):
        name = f"{out.stem}-sample-step{report.step:08d}-{index}"
        if isinstance(image, list):  # a clip: an animated WEBP at the dataset's frame rate
            image[0].save(out.parent / f"{name}.webp", save_all=True, append_images=image[1:], loop=0,
                          duration=round(1000 / (dataset.config.target_fps or SAMPLE_FPS)), quality=90)
        else:
            image.save(out.parent / f"{name}.png")


def sweep_and_save(args: argparse.Namespace, backend, dataset, config: TrainingConfig, variants: list,
                   out: Path) -> None:
    """Train each variant of the sweep in turn on the dataset encoded once; each is saved as
    `<out stem>-<variant>.safetensors` when it finishes (an interrupted sweep keeps those), the best by validation
    loss as `out`, and the chart of every variant's validation loss as `<out stem>-sweep.png`."""
    from tqdm import tqdm

    from .formats.files import LoRAWeights
    from .formats.metadata import lora_metadata
    from .training.checkpoints import Checkpointer
    from .training.plots import sweep_chart
    from .training.sweep import sweep, validation_warning

    if warning := validation_warning(dataset, config):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    paths = {variant: out.with_name(f"{out.stem}-{variant.slug}.safetensors") for variant in variants}
    chart = out.with_name(f"{out.stem}-sweep.png")
    taken = [path for path in (*paths.values(), chart) if path.exists()]
    if taken and not args.overwrite:
        raise SystemExit(f"error: {taken[0]} exists; choose another --out or pass --overwrite")

    def weights(each) -> LoRAWeights:
        metadata = lora_metadata(each.network, each.variant.config(config), backend, dataset, each.result.steps,
                                 title=paths[each.variant].stem)
        return LoRAWeights.from_network(each.network, metadata, args.save_precision, backend.file_tensors)

    def save_variant(each) -> None:
        weights(each).save(paths[each.variant], overwrite=args.overwrite)
        bar.write(json.dumps({"variant": each.variant.label, "file": str(paths[each.variant]),
                              "validation_loss": each.validation_loss, "steps": each.result.steps}))

    def checkpointer_for(variant, network) -> Checkpointer | None:
        if not args.checkpoint_every:
            return None
        run, stem = variant.config(config), paths[variant].stem
        return Checkpointer(out.parent, args.checkpoint_every, args.keep_checkpoints, stem,
                            lambda steps: lora_metadata(network, run, backend, dataset, steps, title=stem),
                            args.save_precision)

    def show(variant, index: int, report) -> None:
        bar.set_description(f"variant {index + 1}/{len(variants)}")
        bar.set_postfix(loss=f"{report.smoothed_loss:.4f}", lr=f"{report.learning_rate:.2e}")
        bar.update(1)
        save_samples(report, paths[variant], dataset)

    def make_network(variant):
        network = new_network(args, backend, variant).to(backend.device)
        backend.file_tensors(network.kohya_tensors())  # a layout the family's files cannot hold fails now
        return network

    with tqdm(total=sum(variant.config(config).steps for variant in variants), unit="step") as bar:
        result = sweep(backend, make_network, dataset, config, variants, callback=show, finished=save_variant,
                       checkpointer_for=checkpointer_for, memory_plan=lambda plan: bar.write(plan.describe()))
    for variant, reason in result.diverged:
        print(f"warning: sweep variant {variant.label} diverged and is left out: {reason}", file=sys.stderr)
    best = result.best
    weights(best).save(out, overwrite=args.overwrite)
    sweep_chart([(each.variant.label, each.result.validation) for each in result.variants],
                result.variants.index(best)).save(chart)
    print(json.dumps({"file": str(out), "best": best.variant.label, "validation_loss": best.validation_loss,
                      "chart": str(chart), "variants": {each.variant.label: str(paths[each.variant])
                                                        for each in result.variants}}))


def command_generate(args: argparse.Namespace) -> None:
    from .families import backend_class
    from .families.sd1 import generate
    from .formats.files import load_lora
    from .training.plots import image_grid

    pipeline = load_pipeline(Path(args.base), args.device)
    network = None
    if args.lora:
        backend = backend_class(pipeline)(pipeline)
        network, _ = load_lora(args.lora, backend.loadable_modules(), strict=not args.non_strict,
                               network_tensors=backend.network_tensors)
        network.to(backend.device)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists; choose another --out or pass --overwrite")
    images = [
        generate(pipeline, network, args.prompt, strength, args.seed, args.steps, args.guidance, args.size,
                 negative_prompt=args.negative_prompt)
        for strength in args.strength
    ]
    picture = images[0] if len(images) == 1 else image_grid(images, [f"strength {s:g}" for s in args.strength])
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print(out)


def rank_rule(args: argparse.Namespace) -> tuple[str, float]:
    """The one rank rule given: --rank N, or --sv-ratio / --sv-fro / --sv-cumulative."""
    given = [(rule, getattr(args, rule)) for rule in ("sv_ratio", "sv_fro", "sv_cumulative")
             if getattr(args, rule) is not None]
    if len(given) > 1 or (given and args.rank is not None):
        raise SystemExit("error: give one of --rank, --sv-ratio, --sv-fro, --sv-cumulative")
    return given[0] if given else ("rank", args.rank if args.rank is not None else 8)


def write_lora(weights, args: argparse.Namespace, reports=()) -> None:
    """Save a toolbox result and print what it holds (ranks and retained energy per module, summarised)."""
    path = weights.converted(args.save_precision).save(args.out, overwrite=args.overwrite)
    summary = {"file": str(path), "modules": len({key.partition(".")[0] for key in weights.tensors})}
    if reports:
        summary.update(ranks=sorted({r.rank_after for r in reports}),
                       retained_min=round(min(r.retained for r in reports), 6),
                       retained_mean=round(sum(r.retained for r in reports) / len(reports), 6))
    print(json.dumps(summary))


def weighted_files(specs: list[str]) -> list[tuple[str, float]]:
    """FILE or FILE:WEIGHT (default 1.0), as kohya's merge tools take them."""
    parts = []
    for spec in specs:
        path, _, weight = spec.rpartition(":")
        try:
            parts.append((path, float(weight)) if path else (spec, 1.0))
        except ValueError:  # a colon in the path itself
            parts.append((spec, 1.0))
    return parts


def command_resize(args: argparse.Namespace) -> None:
    from .formats.files import LoRAWeights
    from .formats.toolbox import resize

    weights, reports = resize(LoRAWeights.load(args.lora), *rank_rule(args))
    write_lora(weights, args, reports)


def command_merge(args: argparse.Namespace) -> None:
    from .formats.files import LoRAWeights
    from .formats.toolbox import merge

    parts = [(LoRAWeights.load(path), weight) for path, weight in weighted_files(args.lora)]
    if args.base is None:
        write_lora(merge(parts, args.rank), args)
        return
    from .families import backend_class
    from .network import LoRANetwork

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists; choose another --out or pass --overwrite")
    pipeline = load_pipeline(Path(args.base), args.device)
    backend = backend_class(pipeline)(pipeline)
    for weights, weight in parts:
        network, _ = LoRANetwork.from_tensors(backend.network_tensors(weights.tensors), backend.loadable_modules())
        network.to(backend.device)
        network.merge(weight)
    pipeline.save_pretrained(out)
    print(json.dumps({"folder": str(out), "merged": [[path, weight] for path, weight in weighted_files(args.lora)]}))


def command_extract(args: argparse.Namespace) -> None:
    from .families import backend_class
    from .formats.files import LoRAWeights
    from .formats.toolbox import extract

    backends = []
    for folder in (args.base, args.tuned):
        pipeline = load_pipeline(Path(folder), args.device)
        backends.append(backend_class(pipeline)(pipeline))
    base, tuned = (backend.adapter_targets(args.target, args.train_text_encoder) for backend in backends)
    weights, reports = extract(base, tuned, *rank_rule(args), clamp_quantile=args.clamp_quantile,
                               min_diff=args.min_diff)
    weights = LoRAWeights(backends[0].file_tensors(weights.tensors), weights.metadata)  # the family's file names
    weights.metadata.update(ss_sd_model_name=Path(args.base).name,
                            ss_base_model_version=backends[0].model_info()["version"])
    write_lora(weights, args, reports)


def command_check(args: argparse.Namespace) -> None:
    from .families import backend_class, version_family
    from .formats.check import LoRACheck, ModuleCheck, check_modules, describe_file, file_modules
    from .formats.files import read_safetensors

    tensors, metadata = read_safetensors(args.lora)
    layout, families, told_by = describe_file(tensors, metadata)
    if args.base is None:  # the file alone: every module unchecked
        check = LoRACheck(layout, families, told_by, "none given", "", "no loader (pass --base)",
                          tuple(ModuleCheck(name) for name in file_modules(tensors)))
        blocks = check.blocks()
        print(json.dumps(check.as_dict()) if args.json else "\n".join(
            [check.text().splitlines()[1], f"{len(check.modules)} modules in {len(blocks)} blocks: "
             + ", ".join(f"{block.name} ({block.modules})" for block in blocks)]))
        return
    pipeline = load_pipeline(Path(args.base), "cpu", args.base_dtype)
    backend = backend_class(pipeline)(pipeline)
    model_family = version_family(backend.model_info()["version"]).name
    try:
        named = backend.network_tensors(tensors)
    except (LoRALabError, ValueError, KeyError) as error:  # another family's file the family's renaming cannot read
        modules = [ModuleCheck(name, f"the {model_family} loader cannot read the file: {error}")
                   for name in file_modules(tensors)]
    else:
        modules = check_modules(named, backend.loadable_modules())
    check = LoRACheck(layout, families, told_by, model_family, model_family, "lora_core's loader", tuple(modules))
    print(json.dumps(check.as_dict()) if args.json else check.text())


def command_demo(args: argparse.Namespace) -> None:
    from .demo.demo import run_demo

    report = run_demo(Path(args.out), steps=args.steps, seed=args.seed, overwrite=args.overwrite,
                      grid_seed=args.grid_seed)
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}/: base/ (pipeline), lora.safetensors, strength_*.png, grid.png, loss.png, report.json")


RENAMED_OPTIONS = {
    "--resume-from": "--start-from-lora (a new run starting from a LoRA's weights); to continue a checkpointed run "
                     "exactly, use --resume-state with its .state.safetensors",
}


class Renamed(argparse.Action):
    """An option of an earlier version whose name misled: refused with its new name."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} was renamed: use {self.new}")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m lora_core", description=__doc__, allow_abbrev=False)
    commands = root.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a LoRA on an image folder", allow_abbrev=False)
    train.add_argument("--base", required=True, help="diffusers pipeline folder (model_index.json inside)")
    train.add_argument("--data", required=True, help="image folder with same-stem .txt captions; N_name subfolders repeat N times")
    train.add_argument("--out", required=True, help="the .safetensors file to write")
    add_arguments(train, (REGULARIZATION_FOLDER,) + DATASET_SETTINGS + NETWORK_SETTINGS)
    train.add_argument("--start-from-lora", metavar="FILE",
                       help="a LoRA file whose weights a new run starts from (its algorithm and rank are kept)")
    train.add_argument("--resume-state", "--resume", metavar="FILE",
                       help="a checkpoint's .state.safetensors: continue that run exactly where it stopped")
    for old, new in RENAMED_OPTIONS.items():
        train.add_argument(old, action=Renamed, new=new, help=argparse.SUPPRESS)
    add_arguments(train, CHECKPOINT_SETTINGS + TRAINING_SETTINGS + SWEEP_SETTINGS)
    train.add_argument("--qlora", action="store_true", help="hold the UNet's Linear weights in 4-bit NF4 (bitsandbytes), "
                       "quantized on the CPU before the base moves to --device")
    train.add_argument("--base-dtype", default="auto", help="the dtype the denoiser and text encoders are loaded in: "
                       "auto (bf16 on CUDA, fp32 elsewhere), bf16, fp16 or fp32; fp8 (e4m3fn) or fp8_e5m2 store the "
                       "denoiser's Linear and Conv2d weights in one byte, scaled per tensor, and cast each layer to "
                       "auto's dtype as it runs; the VAE stays fp32, the LoRA is fp32")
    train.add_argument("--flux-guidance", type=float, default=None,
                       help="Flux.1-dev and HunyuanVideo: the embedded guidance input during training (default 1.0, "
                            "as kohya's docs recommend for Flux LoRAs and musubi-tuner trains HunyuanVideo; kohya's and "
                            "diffusers' Flux scripts default to 3.5)")
    add_arguments(train, (SAVE_PRECISION, EDIT_PROMPT, WAN_EXPERT))
    train.add_argument("--device", default="cpu", help="under torchrun/accelerate, cuda means cuda:LOCAL_RANK")
    train.add_argument("--fsdp", action="store_true",
                       help="under torchrun/accelerate: shard the frozen base over the ranks with FSDP2 (fully_shard), "
                            "each rank holding 1/N of its weights and gathering one block at a time, for a base that "
                            "does not fit one device; the LoRA stays whole on every rank and is saved as one file")
    train.add_argument("--distributed-timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                       help="seconds a rank waits for the others before failing, when several processes train")
    train.add_argument("--overwrite", action="store_true")
    train.set_defaults(run=command_train)

    generate = commands.add_parser("generate", help="generate an image with a LoRA at one or more strengths")
    generate.add_argument("--base", required=True, help="diffusers pipeline folder")
    generate.add_argument("--lora", help="kohya-format .safetensors LoRA (none: the base model)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt")
    generate.add_argument("--strength", type=float, nargs="+", default=[1.0], help="several give a grid")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--steps", type=int, default=25)
    generate.add_argument("--guidance", type=float, default=7.5)
    generate.add_argument("--size", type=int, default=None, help="default: the model's own")
    generate.add_argument("--non-strict", action="store_true", help="skip LoRA modules that match no layer")
    generate.add_argument("--out", required=True, help="PNG file to write")
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--overwrite", action="store_true")
    generate.set_defaults(run=command_generate)

    def rank_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--rank", type=int, default=None, help="a fixed rank (default 8)")
        command.add_argument("--sv-ratio", type=float, help="dynamic: keep singular values ≥ the largest / this")
        command.add_argument("--sv-fro", type=float, help="dynamic: keep this fraction of ΔW's Frobenius energy")
        command.add_argument("--sv-cumulative", type=float, help="dynamic: keep this fraction of Σ singular values")

    def output_options(command: argparse.ArgumentParser, what: str) -> None:
        command.add_argument("--out", required=True, help=what)
        add_arguments(command, (SAVE_PRECISION,))
        command.add_argument("--overwrite", action="store_true")

    resize = commands.add_parser("resize", help="change a LoRA's rank by SVD (kohya's resize_lora)",
                                 allow_abbrev=False)
    resize.add_argument("--lora", required=True, help="the LoRA or DoRA .safetensors to resize")
    rank_options(resize)
    output_options(resize, "the .safetensors file to write")
    resize.set_defaults(run=command_resize)

    merge = commands.add_parser("merge", help="merge LoRAs into one, or into a base pipeline", allow_abbrev=False)
    merge.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                       help="a LoRA and its weight (default 1); repeat for each")
    merge.add_argument("--rank", type=int, default=None,
                       help="SVD-merge to this rank (default: concatenate the ranks, exact)")
    merge.add_argument("--base", help="merge into this diffusers pipeline and save the merged pipeline as --out")
    merge.add_argument("--device", default="cpu")
    output_options(merge, "the .safetensors file (or, with --base, the pipeline folder) to write")
    merge.set_defaults(run=command_merge)

    extract = commands.add_parser("extract", help="a LoRA of a fine-tune's difference from its base",
                                  allow_abbrev=False)
    extract.add_argument("--base", required=True, help="the base diffusers pipeline folder")
    extract.add_argument("--tuned", required=True, help="the fine-tuned pipeline folder (same architecture)")
    add_arguments(extract, (EXTRACT_TARGET, *(each for each in NETWORK_SETTINGS if each.name == "train_text_encoder")))
    extract.add_argument("--clamp-quantile", type=float, default=0.99, help="kohya's outlier clamp (1: none)")
    extract.add_argument("--min-diff", type=float, default=0.0, help="skip layers whose largest |ΔW| is at most this")
    extract.add_argument("--device", default="cpu")
    rank_options(extract)
    output_options(extract, "the .safetensors file to write")
    extract.set_defaults(run=command_extract)

    check = commands.add_parser("check", help="which family a LoRA file is for, which of its modules a base applies "
                                "or ignores (by block) and how much they change it", allow_abbrev=False)
    check.add_argument("--lora", required=True, help="any .safetensors LoRA file, LoRA Lab's or downloaded")
    check.add_argument("--base", help="a diffusers pipeline folder to check the file against (none: the file alone)")
    check.add_argument("--base-dtype", default="bf16", help="the dtype the base is loaded in on the CPU (bf16, fp16, "
                       "fp32; fp8 or fp8_e5m2 for the denoiser): norms are taken per layer in fp32")
    check.add_argument("--json", action="store_true", help="print the report as one JSON object")
    check.set_defaults(run=command_check)

    demo = commands.add_parser("demo", help="the offline demo: the shipped tiny SD1.x base learns a new shape")
    demo.add_argument("--out", required=True)
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0, help="the seed of the dataset, the LoRA's initialization and training")
    demo.add_argument("--grid-seed", type=int, default=None, help="the noise seed of grid.png's images (default: the demo's GRID_SEED, 2)")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(run=command_demo)

    from .demo.pretrain import add_arguments as make_base_arguments
    make_base_arguments(commands.add_parser("make-base", help="pretrain the demo's tiny SD1.x base on procedural "
                                                              "scenes (writes lora_core/demo/base/ by default)"))
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (LoRALabError, ValueError, FileExistsError) as error:  # a library's ValueError too: a bad file, a bad value
        raise SystemExit(f"error: {error}") from error
