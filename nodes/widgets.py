"""ComfyUI inputs made from `lora_core`'s declared settings (`lora_core.settings.Setting`)."""
from __future__ import annotations

from ..lora_core.settings import Setting

WIDGET_TYPES = {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING", tuple: "STRING"}


def setting_input(setting: Setting, choices: list | None = None) -> tuple:
    """ComfyUI's input of a declared setting: its widget type or combo (`choices`, where the node lists them itself:
    folders), default, bounds and tooltip."""
    options = {"default": setting.widget_default()}
    choices = choices if choices is not None else setting.widget_choices()
    if choices is None:
        bounds = {"min": setting.minimum if setting.widget.minimum is None else setting.widget.minimum,
                  "max": setting.maximum if setting.widget.maximum is None else setting.widget.maximum,
                  "step": setting.widget.step, "multiline": setting.type is tuple or None}
        options.update({key: value for key, value in bounds.items() if value is not None})
    return (WIDGET_TYPES[setting.type] if choices is None else choices), {**options, "tooltip": setting.tooltip()}
