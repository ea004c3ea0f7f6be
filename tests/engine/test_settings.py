"""Each setting declared once: the CLI's options, the nodes' widgets and the configs' range checks that are made from
the declarations carry the config's defaults, the declared ranges and the help; earlier flags still set them."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_core import DatasetConfig, DatasetError, TrainingConfig, TrainingError
from lora_core.cli import parser
from lora_core.data.config import DATASET_SETTINGS, REGULARIZATION_FOLDER
from lora_core.formats.files import SAVE_PRECISION
from lora_core.network_config import EXTRACT_TARGET, NETWORK_SETTINGS, NetworkConfig
from lora_core.settings import Setting, parsed_settings
from lora_core.training.checkpoints import CHECKPOINT_SETTINGS
from lora_core.training.config import TRAINING_SETTINGS
from lora_core.training.sweep import SWEEP_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = ROOT / ".cache" / "comfyui-0.3.64"
DEFAULTS = TrainingConfig()
REQUIRED = ["train", "--base", "base", "--data", "data", "--out", "out.safetensors"]


def train_options() -> dict[str, object]:
    """The `train` command's argparse actions by destination."""
    commands = next(action for action in parser()._actions if action.dest == "command")
    return {action.dest: action for action in commands.choices["train"]._actions}


def test_checkpoint_options_carry_their_declared_defaults_and_help() -> None:
    args, actions = parser().parse_args(REQUIRED), train_options()
    for setting in CHECKPOINT_SETTINGS:
        assert getattr(args, setting.name) == setting.default and actions[setting.name].help == setting.help


def test_cli_options_carry_the_config_defaults_flags_choices_and_help() -> None:
    args = parser().parse_args(REQUIRED)
    assert TrainingConfig(**parsed_settings(args, TRAINING_SETTINGS)) == DEFAULTS
    actions = train_options()
    for setting in TRAINING_SETTINGS:
        if not setting.cli:
            assert setting.name not in actions
            continue
        action = actions[setting.name]
        assert parsed_settings(args, (setting,)) == {setting.name: getattr(DEFAULTS, setting.name)}
        assert action.option_strings[:1 + len(setting.aliases)] == [setting.flag, *setting.aliases]
        assert action.help == setting.help
        if setting.choices and setting.type is not bool:
            assert list(action.choices) == [choice for choice in setting.choices if choice is not None]


def test_cli_aliases_and_unified_flags_set_the_same_setting() -> None:
    for flags in (["--lr", "0.5"], ["--learning-rate", "0.5"]):
        assert parser().parse_args(REQUIRED + flags).learning_rate == 0.5
    for flags in (["--save-every", "5"], ["--checkpoint-every", "5"]):
        assert parser().parse_args(REQUIRED + flags).checkpoint_every == 5
    args = parser().parse_args(REQUIRED + ["--sample-prompt", "a", "--sample-prompts", "b", "--no-precondition-outputs"])
    assert parsed_settings(args, TRAINING_SETTINGS)["sample_prompts"] == ("a", "b")
    assert parsed_settings(args, TRAINING_SETTINGS)["precondition_outputs"] is False


def test_every_declared_setting_is_a_config_field_with_its_default() -> None:
    fields = {field.name: field for field in dataclasses.fields(TrainingConfig)}
    for setting in TRAINING_SETTINGS:
        assert setting.default == getattr(DEFAULTS, setting.name) and setting.help, setting.name
        assert setting.in_range(setting.default), setting.name
        assert fields[setting.name].type.startswith(setting.type.__name__), setting.name


def test_dataset_network_and_save_options_carry_their_declared_defaults_and_help() -> None:
    args, actions = parser().parse_args(REQUIRED), train_options()
    assert DatasetConfig(**parsed_settings(args, DATASET_SETTINGS)) == DatasetConfig()
    assert NetworkConfig(**parsed_settings(args, NETWORK_SETTINGS)) == NetworkConfig()
    for setting in DATASET_SETTINGS + NETWORK_SETTINGS + SWEEP_SETTINGS + (SAVE_PRECISION, REGULARIZATION_FOLDER):
        if not setting.cli:
            assert setting.name not in actions
            continue
        assert getattr(args, setting.name) == setting.default, setting.name
        assert actions[setting.name].option_strings == [setting.flag, *setting.aliases], setting.name
        assert actions[setting.name].help == setting.help, setting.name


@pytest.mark.parametrize(("old", "new", "value"), [
    ("--reg-data", "--regularization-folder", "class_images"), ("--reg-caption", "--regularization-caption", "dog"),
    ("--preset", "--target", "full"), ("--text-encoder", "--train-text-encoder", None),
    ("--save-dtype", "--save-precision", "float32"),
])
def test_earlier_flags_set_the_setting_of_the_node_s_name(old, new, value) -> None:
    """One name per setting (the node's: saved workflows fix it), the flags users already have kept as aliases."""
    given = [value] if value is not None else []
    parsed = [vars(parser().parse_args(REQUIRED + [flag, *given])) for flag in (old, new)]
    assert parsed[0] == parsed[1] != vars(parser().parse_args(REQUIRED))
    toolbox = ["resize", "--lora", "a.safetensors", "--out", "b.safetensors"]
    assert parser().parse_args(toolbox + ["--save-dtype", "float32"]).save_precision == "float32"
    extract = ["extract", "--base", "a", "--tuned", "b", "--out", "c.safetensors"]
    assert parser().parse_args(extract).target == EXTRACT_TARGET.default == "transformer"
    assert parser().parse_args(extract + ["--preset", "full"]).target == "full"


DATASET_CHECKED = [setting for setting in DATASET_SETTINGS if setting.allowed]


@pytest.mark.parametrize("setting", DATASET_CHECKED, ids=[setting.name for setting in DATASET_CHECKED])
def test_a_dataset_value_outside_the_declared_range_is_refused_naming_the_setting(setting) -> None:
    values = outside(setting) + ([setting.default + setting.multiple_of // 2] if setting.multiple_of else [])
    assert values, f"{setting.name} says what it allows but declares no range"
    for value in values:
        with pytest.raises(DatasetError, match=rf"^{setting.name} = .* is out of range: use "):
            DatasetConfig(**{setting.name: value})


def outside(setting) -> list:
    """Values just outside the setting's declared range."""
    values = [bound - 1 for bound in (setting.minimum,) if bound is not None]
    values += [bound + 1 for bound in (setting.maximum,) if bound is not None]
    values += [bound for bound in (setting.above, setting.below) if bound is not None]
    return values + (["not one of them"] if setting.choices else [])


CHECKED = [setting for setting in TRAINING_SETTINGS if setting.allowed]


@pytest.mark.parametrize("setting", CHECKED, ids=[setting.name for setting in CHECKED])
def test_a_value_outside_the_declared_range_is_refused_naming_the_setting(setting) -> None:
    values = outside(setting)
    assert values, f"{setting.name} says what it allows but declares no range"
    for value in values:
        with pytest.raises(TrainingError, match=rf"^{setting.name} = .* is out of range: use "):
            dataclasses.replace(DEFAULTS, **{setting.name: value}).validate()


@pytest.fixture(scope="module")
def node_inputs() -> dict:
    """Every node's inputs as ComfyUI gets them (the pack imported in ComfyUI 0.3.64), by node class."""
    if not (COMFY_DIR / "main.py").exists():
        pytest.skip(f"no ComfyUI at {COMFY_DIR}")
    probe = ROOT / "tests" / "comfyui" / "node_inputs_probe.py"
    output = subprocess.run([sys.executable, str(probe), str(COMFY_DIR)], capture_output=True, text=True, check=True)
    nodes = json.loads(output.stdout.splitlines()[-1])
    return {node: {name: spec for section in ("required", "optional") for name, spec in inputs.get(section, {}).items()}
            for node, inputs in nodes.items()}


def declared_widgets() -> list[tuple[str, str, Setting]]:
    """(node, input, setting) of every input a node makes from a declared setting."""
    shown = [("TrainLoRA", "TrainingOptions", "FlowMatchingOptions"), TRAINING_SETTINGS + CHECKPOINT_SETTINGS,
             ("LoadDataset",), DATASET_SETTINGS + (REGULARIZATION_FOLDER,), ("InjectLoRA",), NETWORK_SETTINGS,
             ("Sweep",), SWEEP_SETTINGS]
    widgets = [(node, setting.name, setting) for nodes, settings in zip(shown[::2], shown[1::2]) for node in nodes
               for setting in settings if setting.widget is not None]
    return widgets + [("SaveLoRA", "precision", SAVE_PRECISION), ("ExtractLoRA", "target", EXTRACT_TARGET)]


def test_widgets_carry_the_config_defaults_the_declared_ranges_and_the_help(node_inputs) -> None:
    shown = [(node, name, setting) for node, name, setting in declared_widgets() if name in node_inputs[node]]
    assert {setting.name for _, _, setting in shown} == {setting.name for _, _, setting in declared_widgets()}
    for node, name, setting in shown:
        kind, options = node_inputs[node][name]
        assert options["tooltip"] == setting.tooltip() and options["tooltip"].startswith(setting.help)
        assert setting.config_value(options["default"]) == (
            setting.default if setting.widget.default is None else setting.widget.default), setting.name
        if isinstance(kind, list):  # a combo: each entry is an allowed value (or, for folders, the node's own list)
            assert options["default"] in kind
            if setting is not REGULARIZATION_FOLDER:
                assert all(setting.config_value(entry) in (setting.choices or setting.widget.choices) for entry in kind)
            continue
        assert kind == {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING", tuple: "STRING"}[setting.type]
        low, high = options.get("min"), options.get("max")
        assert low == (setting.minimum if setting.widget.minimum is None else setting.widget.minimum), setting.name
        assert high == (setting.maximum if setting.widget.maximum is None else setting.widget.maximum), setting.name
        assert options.get("step") == setting.widget.step, setting.name
        unset = low is not None and low == setting.widget.unset  # flow_shift's 0: the family's own
        assert setting.minimum is None or low >= setting.minimum or unset, setting.name  # blocks_to_swap: -1 auto
        assert setting.above is None or low > setting.above or unset, setting.name
        assert setting.maximum is None or high <= setting.maximum, setting.name
        assert setting.below is None or high < setting.below, setting.name
        assert setting.multiple_of is None or (options.get("step", 1) % setting.multiple_of == 0
                                               and low % setting.multiple_of == 0), setting.name
