"""From YAML and ``section.key=value`` overrides to a checked :class:`Config`, and back to YAML.

Unknown sections and keys are refused with the known ones, values are checked against the
dataclasses' annotations, and a key given twice in a row on the command line is refused: that is
an unquoted brace pattern the shell expanded into one argument per shard.
"""
from __future__ import annotations

import dataclasses
import os
import keyword
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .sections import Config

SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise a ConfigError naming ``key``."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError:
                continue  # try the next option; the message below names them all
        raise ConfigError(f"{key} has the wrong type: got {value!r}, expected {_type_name(annotation)}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} has the wrong type: got {value!r}, expected {_type_name(annotation)}")
        return [_check_type(key, v, item_type) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} has the wrong type: got {value!r}, expected {_type_name(annotation)}")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _field_name(key: str) -> str:
    """A key that is a Python keyword (checkpoint.async) is the field with a trailing underscore."""
    return key + "_" if keyword.iskeyword(key) else key


def _key_name(field_name: str) -> str:
    return field_name[:-1] if keyword.iskeyword(field_name[:-1]) else field_name


def _build_section(name: str, cls: type, raw: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {_key_name(f.name) for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key '{name}.{key}'; known keys of '{name}': {', '.join(sorted(known))}")
    return cls(**{_field_name(key): _check_type(f"{name}.{key}", value, hints[_field_name(key)])
                  for key, value in raw.items()})


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dictionaries (unknown keys are errors)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section '{name}'; known sections: {', '.join(SECTIONS)}")
    sections: dict[str, Any] = {}
    for name, spec in SECTIONS.items():
        section_raw = raw.get(name) or {}
        if not isinstance(section_raw, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {section_raw!r}")
        if name == "deepspeed":
            sections[name] = dict(section_raw)
        else:
            sections[name] = _build_section(name, spec.default_factory, dict(section_raw))
    return Config(**sections)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.max_steps=10`` -> (["train", "max_steps"], 10); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. train.max_steps=10")
    dotted, _, value_text = text.partition("=")
    path = dotted.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override '{text}' must name section.key, e.g. train.max_steps=10")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    return path, value


def _refuse_expanded_braces(overrides: list[str]) -> None:
    # bash turns an unquoted data.train_shards=train-{000000..000003}.tar into four adjacent
    # arguments with the same key, and the last would silently win: one shard instead of four.
    # A key repeated further apart is layering (a launcher's defaults, then the user's), where
    # the later one wins as documented.
    keys = [".".join(parse_override(text)[0]) for text in overrides]
    for i in range(1, len(keys)):
        if keys[i] == keys[i - 1]:
            end = i
            while end + 1 < len(keys) and keys[end + 1] == keys[i]:
                end += 1
            values = [text.partition("=")[2] for text in overrides[i - 1:end + 1]]
            given = f"override key '{keys[i]}' is given {len(values)} times in a row ({', '.join(values)})"
            if _looks_expanded(values):
                raise ConfigError(
                    f"{given}, as the shell's brace expansion leaves an unquoted pattern such as "
                    f"{{000000..000003}}: quote the whole override, e.g. "
                    f"'{keys[i]}={_pattern_of(values)}', or give the key once")
            raise ConfigError(f"{given}: give it once, with the value you mean")


def _split_common(values: list[str]) -> tuple[str, list[str], str]:
    """(common prefix, the parts that differ, common suffix), a number kept whole in the middle."""
    prefix = os.path.commonprefix(values)
    suffix = os.path.commonprefix([v[len(prefix):][::-1] for v in values])[::-1]
    prefix, suffix = prefix.rstrip("0123456789"), suffix.lstrip("0123456789")
    return prefix, [v[len(prefix):len(v) - len(suffix)] for v in values], suffix


def _looks_expanded(values: list[str]) -> bool:
    """What a shell's {a..b} or {x,y} leaves: distinct values, the same text around what differs
    (a run of numbers, or a few characters at least: true/false do not qualify)."""
    if len(set(values)) < 2:
        return False
    prefix, middles, suffix = _split_common(values)
    numbered = all(m.isdigit() for m in middles) and (prefix or suffix)
    return bool(numbered or len(prefix) + len(suffix) >= 3)


def _pattern_of(values: list[str]) -> str:
    """The brace pattern that expands to ``values``: ``train-{000000..000003}.tar`` for a run of numbers."""
    prefix, middles, suffix = _split_common(values)
    if all(m.isdigit() for m in middles) and [int(m) for m in middles] == list(range(int(middles[0]),
                                                                                      int(middles[0]) + len(middles))):
        return f"{prefix}{{{middles[0]}..{middles[-1]}}}{suffix}"
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    _refuse_expanded_braces(overrides)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None), then apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix the syntax") from None
    return config_from_dict(apply_overrides(raw, list(overrides or [])))


def output_dir_of(path: str | Path | None, overrides: list[str] | None = None) -> str:
    """``train.output_dir`` as the run will see it, read without checking anything else: the
    launcher writes ``exit_status`` there before the config is loaded, so that a config refused
    later still leaves its code (and a rerun's refusal does not leave the old run's 0)."""
    from .sections import TrainConfig

    value: Any = None
    for text in reversed(list(overrides or [])):
        dotted, _, raw = text.partition("=")
        if dotted.strip() == "train.output_dir":
            value = raw.strip()
            break
    if value is None and path is not None:
        try:
            value = ((yaml.safe_load(Path(path).read_text()) or {}).get("train") or {}).get("output_dir")
        except (OSError, yaml.YAMLError, AttributeError):
            value = None
    return str(value) if value else TrainConfig.output_dir


def dump_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    raw = {section: {_key_name(k): v for k, v in values.items()} if section != "deepspeed" else values
           for section, values in config.to_dict().items()}
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))
