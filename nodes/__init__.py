"""LoRA Lab's ComfyUI nodes (V1 API): thin adapters over `lora_core`."""
from .lora_nodes import ApplyLoRA, CheckLoRA, LoadLoRA, SaveLoRA
from .toolbox_nodes import ExtractLoRA, MergeLoRAs, ResizeLoRA
from .train_nodes import (
    FlowMatchingOptions, InjectLoRA, LoadDataset, Sweep, TrainingOptions, TrainingOptionsWithFlowMatching, TrainLoRA,
    TrainLoRAAllSettings,
)

NODE_CLASS_MAPPINGS = {
    "LoraLab_LoadDataset": LoadDataset,
    "LoraLab_InjectLoRA": InjectLoRA,
    "LoraLab_Train": TrainLoRA,
    "LoraLab_TrainingOptions2": TrainingOptions,
    "LoraLab_FlowMatchingOptions": FlowMatchingOptions,
    "LoraLab_Sweep": Sweep,
    "LoraLab_TrainingOptions": TrainingOptionsWithFlowMatching,
    "LoraLab_TrainLoRA": TrainLoRAAllSettings,
    "LoraLab_SaveLoRA": SaveLoRA,
    "LoraLab_LoadLoRA": LoadLoRA,
    "LoraLab_ApplyLoRA": ApplyLoRA,
    "LoraLab_CheckLoRA": CheckLoRA,
    "LoraLab_ResizeLoRA": ResizeLoRA,
    "LoraLab_MergeLoRAs": MergeLoRAs,
    "LoraLab_ExtractLoRA": ExtractLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraLab_LoadDataset": "Load Dataset (LoRA Lab)",
    "LoraLab_InjectLoRA": "Inject LoRA (LoRA Lab)",
    "LoraLab_Train": "Train LoRA (LoRA Lab)",
    "LoraLab_TrainingOptions2": "Training Options (LoRA Lab)",
    "LoraLab_FlowMatchingOptions": "Flow Matching Options (LoRA Lab)",
    "LoraLab_Sweep": "Sweep (LoRA Lab)",
    "LoraLab_TrainingOptions": "Training Options, SD3/Flux settings on the node (LoRA Lab, old layout)",
    "LoraLab_TrainLoRA": "Train LoRA, all settings (LoRA Lab, old layout)",
    "LoraLab_SaveLoRA": "Save LoRA (LoRA Lab)",
    "LoraLab_LoadLoRA": "Load LoRA (LoRA Lab)",
    "LoraLab_ApplyLoRA": "Apply LoRA (LoRA Lab)",
    "LoraLab_CheckLoRA": "Check LoRA (LoRA Lab)",
    "LoraLab_ResizeLoRA": "Resize LoRA (LoRA Lab)",
    "LoraLab_MergeLoRAs": "Merge LoRAs (LoRA Lab)",
    "LoraLab_ExtractLoRA": "Extract LoRA (LoRA Lab)",
}
