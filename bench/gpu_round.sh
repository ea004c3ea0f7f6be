#!/usr/bin/env bash
# The GPU round of bench/train_step.py whose results are in bench/results/h200_*: full-size SDXL, Flux.1-dev and
# Qwen-Image denoisers (random weights) in bf16 at 1024 px, LoRA Lab against the diffusers + PEFT loop; `video`: Wan 2.1
# transformers at 480×832 (1.3B against the reference at 33 frames; 14B alone at 81 frames, --skip-reference) and
# HunyuanVideo's at 544×960×33 (alone).
#   bash bench/gpu_round.sh OUTPUT_FOLDER [all|second|video|plan|swap]      # RUN_TIMEOUT=seconds per run (default 240)
set -u
out=${1:?output folder}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
run() {  # name, then train_step.py's arguments; each run alone in its process, bounded in time
    local name=$1; shift
    echo "== $name"
    timeout "${RUN_TIMEOUT:-240}" python3 bench/train_step.py --device cuda --dtype bf16 "$@" >"$out/$name.json" 2>"$out/$name.log"
    echo "exit $?"; tail -3 "$out/$name.log"
}
case ${2:-all} in
  all)
    run h200_sdxl_bf16 --size sdxl
    run h200_flux_bf16_checkpointing --size flux --gradient-checkpointing
    run h200_qwen_image_bf16_checkpointing --size qwen-image --gradient-checkpointing
    run h200_flux_bf16 --size flux ;;
  second)  # after the first round: Flux with LoRA Lab first, Qwen-Image profiled
    run h200_flux_bf16_checkpointing --size flux --gradient-checkpointing
    run h200_flux_bf16 --size flux
    run h200_qwen_image_bf16_checkpointing_profile --size qwen-image --gradient-checkpointing --profile --steps 6 ;;
  video)  # video transformers at 480×832: latents [16, (frames − 1)/4 + 1, 60, 104], 30×52 tokens per latent frame
    run h200_wan_1.3b_480x832x33 --size wan-1.3b --gradient-checkpointing --frames 33 --steps 3 --blocks 1
    run h200_wan_14b_480x832x81 --size wan-14b --gradient-checkpointing --frames 81 --steps 1 --blocks 1 --skip-reference
    run h200_hunyuan_video_544x960x33 --size hunyuan-video --gradient-checkpointing --frames 33 --steps 1 --blocks 1 \
        --skip-reference
    ;;
  plan)  # lora_core's memory plan against the measured peak, runs the plan's constants were not fitted on; the last
    # one does not fit 139 GiB and must be refused before its first step
    run h200_plan_wan_1.3b_480x832x33_no_checkpointing --size wan-1.3b --frames 33 --steps 1 --blocks 1 --skip-reference
    run h200_plan_flux_1024_checkpointing --size flux --gradient-checkpointing --steps 1 --blocks 1 --skip-reference
    run h200_plan_flux_512_no_checkpointing --size flux --resolution 512 --steps 1 --blocks 1 --skip-reference
    run h200_plan_wan_14b_480x832x81_refused --size wan-14b --frames 81 --steps 1 --blocks 1 --skip-reference ;;
  swap)  # block swap: Flux.1-dev at 1024 px, checkpointing, 30 of its 57 blocks swapped against none, one process;
    # then fp8 weights (lora_core's --base-dtype fp8) with 0 and 28 swapped: the 12 GB goal of #26
    run h200_flux_1024_block_swap_30 --size flux --gradient-checkpointing --steps 3 --blocks 1 --skip-reference \
        --blocks-to-swap 0 30
    run h200_flux_1024_fp8_block_swap_28 --size flux --gradient-checkpointing --fp8 --steps 3 --blocks 1 \
        --skip-reference --blocks-to-swap 0 28
    # and with the checkpointed blocks' inputs in host memory (--cpu-offload-checkpointing)
    run h200_flux_1024_fp8_block_swap_28_offload --size flux --gradient-checkpointing --fp8 --cpu-offload-checkpointing \
        --steps 3 --blocks 1 --skip-reference --blocks-to-swap 28 ;;
esac
