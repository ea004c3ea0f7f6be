"""LoRA Lab's engine: adapters (LoRA, DoRA, LoHa, LoKr), injection, kohya-format files, datasets and training.

Imports nothing from ComfyUI; the diffusers backend and the demo import diffusers only when used.
"""
from .adapters import ALGORITHMS, Adapter, AdapterError
from .backend import TrainingBackend
from .data.config import DatasetConfig, DatasetError
from .data.dataset import ImageFolderDataset
from .errors import LoRALabError
from .formats.files import LoRAFileError, LoRAWeights, load_file, load_lora, save_file, save_lora
from .formats.metadata import kohya_metadata, lora_metadata
from .network import LoRANetwork, NetworkError
from .quantize import hide_kernels_community_warning
from .targets import TEXT_ENCODER_PREFIX, UNET_PREFIX, UNET_PRESETS, find_targets, kohya_name
from .training.config import TrainingConfig, TrainingError
from .training.loop import StepReport, TrainingDiverged, train
from .training.state import TrainingResult

hide_kernels_community_warning()

__all__ = [
    "ALGORITHMS", "Adapter", "AdapterError", "DatasetConfig", "DatasetError", "ImageFolderDataset", "LoRAFileError",
    "LoRALabError", "LoRANetwork", "LoRAWeights", "NetworkError", "StepReport", "TEXT_ENCODER_PREFIX", "TrainingBackend",
    "TrainingConfig", "TrainingDiverged", "TrainingError", "TrainingResult", "UNET_PREFIX", "UNET_PRESETS", "find_targets",
    "kohya_metadata", "kohya_name", "lora_metadata", "load_file", "load_lora", "save_file", "save_lora", "train",
]
