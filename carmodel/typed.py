"""Typed settings, one way: frozen dataclasses (sections may nest) read from YAML or a mapping, and
overridden by one `--<field>` flag per setting.

Every configuration of the project goes through here: the model's (carmodel.config.ModelConfig, the
export's model.yaml), training's (training.config.Config: YAML with sections) and the server's
(handler.settings: build-mar's flags, the archive's model-config.yaml).

    cfg = from_dict(Config, yaml.safe_load(text))              # unknown keys and bad values say where
    add_arguments(parser, Config)                              # --lr, --epochs, ... (default: as configured)
    cfg = from_dict(Config, nest(Config, flags_given(args, Config)), cfg)    # the flags given, applied

A setting's name is its flag, so names are unique across sections (checked when flags are made). A
field may carry help and choices: `setting(default, "what it is", choices=(...))`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml


class SettingsError(ValueError):
    pass


def setting(default, help: str = "", choices: tuple | None = None, factory=None) -> dataclasses.Field:
    """A dataclass field with its help and allowed values (checked wherever a value comes from)."""
    metadata = {"help": help, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def is_section(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def coerce(name: str, value, hint):
    """A YAML or command-line value as the field's type, with a message that names the field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(name, value, next(a for a in typing.get_args(hint) if a is not type(None)))
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any number of them ("" on the CLI: none)
            return tuple(coerce(name, item, args[0]) for item in items if item != "")
        if len(items) != len(args):
            raise SettingsError(f"{name}: expected {len(args)} values, got {value!r}")
        return tuple(coerce(name, item, arg) for item, arg in zip(items, args, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}: expected true or false, got {value!r}")
    if hint is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(value, bool) and hint in (int, float):
        raise SettingsError(f"{name}: expected {hint.__name__}, got {value!r}")
    try:
        return hint(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None


def _checked(name: str, field: dataclasses.Field, value):
    choices = field.metadata.get("choices")
    if choices and value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def from_dict(cls, values: dict | None, base=None, where: str = ""):
    """`base` (default: `cls()`) with `values` set: a mapping of fields, sections as nested mappings."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise SettingsError(f"{where or cls.__name__}: expected a mapping of settings, got {values!r}")
    base = base if base is not None else cls()
    fields, hints = {f.name: f for f in dataclasses.fields(cls)}, _hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingsError(
            f"unknown {where + ' ' if where else ''}settings: {', '.join(unknown)} (known: {', '.join(fields)})"
        )
    changes = {}
    for name, value in values.items():
        path = f"{where}.{name}" if where else name
        if is_section(hints[name]):
            changes[name] = from_dict(hints[name], value, getattr(base, name), path)
        else:
            changes[name] = _checked(path, fields[name], coerce(path, value, hints[name]))
    return dataclasses.replace(base, **changes)


def to_dict(obj) -> dict:
    """Plain values for YAML and JSON: sections as mappings, tuples as lists."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(obj))


def load_yaml(cls, path: str | Path, base=None):
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"settings file not found: {path}")
    try:
        return from_dict(cls, yaml.safe_load(path.read_text()), base)
    except SettingsError as err:
        raise SettingsError(f"{path}: {err}") from None


def save_yaml(obj, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


# ----------------------------------------------------------------------------- flags


def leaves(cls, prefix: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], dataclasses.Field, object]]:
    """{flag name: (path of section names, field, type)} of every setting; names unique across sections."""
    found, hints = {}, _hints(cls)
    for field in dataclasses.fields(cls):
        if is_section(hints[field.name]):
            for name, leaf in leaves(hints[field.name], (*prefix, field.name)).items():
                if name in found:
                    raise TypeError(f"setting {name!r} is in two sections: flags need unique names")
                found[name] = leaf
        elif field.name in found:
            raise TypeError(f"setting {field.name!r} is in two sections: flags need unique names")
        else:
            found[field.name] = (prefix, field, hints[field.name])
    return found


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One `--<setting>` flag per setting, grouped by section; unset flags leave the setting as configured."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (path, field, _) in leaves(cls).items():
        if name in skip:
            continue
        title = f"{cls.__name__}" + (f" {'.'.join(path)}" if path else "")
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        default = field.default if field.default is not dataclasses.MISSING else None
        hint = field.metadata.get("help", "")
        group.add_argument(
            f"--{name}",
            dest=f"setting_{name}",
            default=None,
            metavar="VALUE",
            help=f"{hint} (default {default})" if hint else f"default {default}",
        )


def flags_given(args: argparse.Namespace, cls) -> dict:
    """{setting: value} of the flags given on the command line."""
    return {name: value for name in leaves(cls) if (value := getattr(args, f"setting_{name}", None)) is not None}


def nest(cls, settings: dict) -> dict:
    """{setting: value} -> the sectioned mapping `from_dict` reads; an unknown name is an error."""
    known, nested = leaves(cls), {}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(unknown)}")
    for name, value in settings.items():
        node = nested
        for section in known[name][0]:
            node = node.setdefault(section, {})
        node[name] = value
    return nested
