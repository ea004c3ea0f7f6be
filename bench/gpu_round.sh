#!/usr/bin/env bash
# The GPU round of bench/train_step.py whose results are in bench/results/h200_*: full-size SDXL, Flux.1-dev and
# Qwen-Image denoisers (random weights) in bf16 at 1024 px, LoRA Lab against the diffusers + PEFT loop.
#   bash bench/gpu_round.sh OUTPUT_FOLDER [all|second]
set -u
out=${1:?output folder}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
run() {  # name, then train_step.py's arguments; each run alone in its process, bounded in time
    local name=$1; shift
    echo "== $name"
    timeout 240 python3 bench/train_step.py --device cuda --dtype bf16 "$@" >"$out/$name.json" 2>"$out/$name.log"
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
esac
