"""Each setting declared once: default, allowed values, help, the families it applies to, CLI flag, widget.

The fields of `TrainingConfig`, `DatasetConfig` and `NetworkConfig` carry their declaration (`setting(...)`); their
range checks, the options of `python -m lora_core train` and the nodes' widgets are generated from it. Plain data:
nodes/ turns a `Widget` into ComfyUI's input tuple.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

ALL_FAMILIES = "all"
FLOW_MATCHING = "flow matching"  # SD3, Flux
DISCRETE = "discrete"  # SD1.x/2.x, SDXL: ε/v-prediction on a discrete schedule
VALUE_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "tuple[str, ...]": tuple}


@dataclass(frozen=True)
class Widget:
    """How a node shows a setting, where that differs from its allowed values."""

    minimum: float | None = None  # the widget's bounds, where the allowed range has none or excludes its end
    maximum: float | None = None
    step: float | None = None
    choices: tuple = ()  # a combo's values, where they are fewer than the allowed ones (optimizer)
    default: Any = None  # the widget's default, where it differs from the setting's (alpha: 8.0, not None)
    labels: dict | None = None  # a combo's label of a value that is not a string (None: "default")
    unset: Any = None  # the widget value that means None (flow_shift's 0)
    note: str = ""  # what the widget's own values mean, added to the help in the tooltip


@dataclass(frozen=True)
class Setting:
    """One setting; its config checks its range where `allowed` says it in words, else the module using it does."""

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None  # inclusive bounds
    maximum: float | None = None
    above: float | None = None  # exclusive bounds
    below: float | None = None
    multiple_of: int | None = None
    choices: tuple = ()
    allowed: str = ""  # the allowed values in words, for TrainingConfig's message; "" where another module checks
    families: str = ALL_FAMILIES
    cli: bool = True  # an option of `python -m lora_core train`, --name-with-dashes
    aliases: tuple[str, ...] = ()  # earlier flags, still accepted
    widget: Widget | None = None  # None: on no node (or a node shows it its own way)
    words: tuple[tuple[str, Any], ...] = ()  # values the CLI takes as words ("auto" → None) beside the type's

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def in_range(self, value: Any) -> bool:
        if self.choices and value not in self.choices:
            return False
        if value is None or self.type not in (int, float):
            return True
        if self.multiple_of is not None and value % self.multiple_of:
            return False
        return ((self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))

    def widget_default(self) -> Any:
        shown = self.widget.default if self.widget is not None else None
        return self.widget_value(self.default if shown is None else shown)

    def widget_value(self, value: Any) -> Any:
        """A config value as the node's widget shows it."""
        labels = (self.widget.labels if self.widget else None) or {}
        if value in labels:
            return labels[value]
        if value is None and self.widget is not None and self.widget.unset is not None:
            return self.widget.unset
        return "\n".join(value) if self.type is tuple else value

    def config_value(self, value: Any) -> Any:
        """The node's widget value as the config value: labels and the unset value mapped back, one prompt a line."""
        labels = {label: config for config, label in ((self.widget.labels if self.widget else None) or {}).items()}
        if value in labels:
            return labels[value]
        if self.widget is not None and self.widget.unset is not None and value == self.widget.unset:
            return None
        if self.type is tuple:
            return tuple(line.strip() for line in value.splitlines() if line.strip())
        return value

    def widget_choices(self) -> list | None:
        """A combo's labels, or None for a number, boolean or text widget."""
        values = (self.widget.choices if self.widget else ()) or self.choices
        return [self.widget_value(value) for value in values] if values else None

    def tooltip(self) -> str:
        return f"{self.help} {self.widget.note}" if self.widget and self.widget.note else self.help


def setting(default: Any, help: str, **declaration: Any):
    """A config dataclass's field declared with its setting (see `Setting`; the name and type are the field's)."""
    return dataclasses.field(default=default, metadata={"setting": {"default": default, "help": help, **declaration}})


def declared_settings(config_class: type) -> tuple[Setting, ...]:
    """The settings a config dataclass's fields declare, in field order."""
    return tuple(Setting(name=field.name, type=VALUE_TYPES[field.type.removesuffix(" | None")],
                         **field.metadata["setting"])
                 for field in dataclasses.fields(config_class) if "setting" in field.metadata)


def out_of_range(config: Any, settings: tuple[Setting, ...]) -> str | None:
    """What is wrong with the first of `config`'s values outside its declared range, or None."""
    for each in settings:
        value = getattr(config, each.name)
        if each.allowed and not each.in_range(value):
            return f"{each.name} = {value!r} is out of range: use {each.allowed}"
    return None


def add_arguments(parser: argparse.ArgumentParser, settings: tuple[Setting, ...]) -> None:
    """An option per setting with a CLI flag, into `dest` = the setting's name, defaulting to the setting's default."""
    for each in settings:
        if not each.cli:
            continue
        options: dict[str, Any] = {"dest": each.name, "help": each.help, "default": each.default}
        if each.type is bool:
            options["action"] = "store_true" if each.default is False else argparse.BooleanOptionalAction
        elif each.type is tuple:  # repeated; the given values replace the default
            options.update(action="append", default=None)
        else:
            options["type"] = cli_type(each)
            if each.choices:
                options["choices"] = [choice for choice in each.choices if choice is not None]
        parser.add_argument(each.flag, *each.aliases, **options)


def cli_type(each: Setting) -> Any:
    """The setting's type for argparse, taking its words too (`--blocks-to-swap auto`)."""
    if not each.words:
        return each.type
    words = dict(each.words)

    def parse(text: str) -> Any:
        return words[text] if text in words else each.type(text)

    parse.__name__ = each.type.__name__  # argparse names the type in its error message
    return parse


def parsed_settings(args: argparse.Namespace, settings: tuple[Setting, ...]) -> dict[str, Any]:
    """The values of the settings' CLI options; a repeated option as a tuple, its default when not given."""
    values = {}
    for each in settings:
        if each.cli:
            value = getattr(args, each.name)
            values[each.name] = (tuple(value) if value else each.default) if each.type is tuple else value
    return values
