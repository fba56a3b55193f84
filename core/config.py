"""The one typed configuration of a training run.

``TrainConfig`` is the single source of truth for the command line, the app
and saved runs. Every field carries its help text, range and choices in
``metadata`` so the app can build its widgets from it. Configs are stored as
TOML; ``config_version`` plus ``MIGRATIONS`` keep old files loading.

Validation happens here, before any model loads, and every error names the
key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from core.config_checks import ConfigError, check_rules
from core.config_checks import check_paths as check_folders
from core.config_fields import (  # noqa: F401 - the config's types, re-exported for everyone
    CONFIG_VERSION,
    DatasetConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    SampleConfig,
    TrainConfig,
    TrainStepsConfig,
    opt,
)

SECTIONS = ("model", "dataset", "lora", "train", "sample", "output")

# {old_version: function(dict) -> dict} upgrading a raw config one version.
MIGRATIONS: dict[int, typing.Callable[[dict], dict]] = {}


# ---------------------------------------------------------------- reading


def from_dict(raw: dict[str, Any], *, check_paths: bool = True) -> TrainConfig:
    """Build and validate a config from a plain dict (parsed TOML)."""
    raw = _migrate(dict(raw))
    unknown_sections = set(raw) - set(SECTIONS) - {"config_version"}
    for key in sorted(unknown_sections):
        raise ConfigError(f"unknown section [{key}]{_did_you_mean(key, SECTIONS)}; "
                          f"allowed sections: {', '.join(SECTIONS)}")
    config = TrainConfig()
    for section in SECTIONS:
        values = raw.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of key = value lines, got {values!r}")
        setattr(config, section, _build_section(section, getattr(config, section), values))
    validate(config, check_paths=check_paths)
    return config


def load(path: str | os.PathLike, overrides: list[str] | None = None, *, check_paths: bool = True) -> TrainConfig:
    """Read a TOML config file, apply ``--set section.key=value`` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw, check_paths=check_paths)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` to a raw dict; value is parsed as TOML, else taken as a string."""
    key, sep, value = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.learning_rate=5e-5")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word such as a path or a name
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ConfigError(f"--set {item!r}: [{section}] is not a table")
    raw[section][name] = parsed


def _migrate(raw: dict[str, Any]) -> dict[str, Any]:
    version = raw.get("config_version", CONFIG_VERSION)
    if not isinstance(version, int) or version < 1:
        raise ConfigError(f"config_version = {version!r} is not a valid version (expected 1..{CONFIG_VERSION})")
    if version > CONFIG_VERSION:
        raise ConfigError(f"config_version = {version} was written by a newer version of this app "
                          f"(this one reads up to {CONFIG_VERSION}); update the app")
    while version < CONFIG_VERSION:
        raw = MIGRATIONS[version](raw)
        version += 1
    raw["config_version"] = CONFIG_VERSION
    return raw


def _build_section(section: str, default_obj, values: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(default_obj)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown key {section}.{key}{_did_you_mean(key, fields)}; allowed keys in "
                              f"[{section}]: {', '.join(fields)}")
    hints = typing.get_type_hints(type(default_obj))
    kwargs = {key: _coerce(f"{section}.{key}", value, hints[key]) for key, value in values.items()}
    return dataclasses.replace(default_obj, **kwargs)


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a raw TOML value against a field's type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{name} = {value!r} is not allowed; choose one of: "
                              f"{', '.join(repr(c) for c in choices)}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list) or not all(isinstance(v, item_type) for v in value):
            raise ConfigError(f"{name} = {value!r} must be a list of {item_type.__name__}, "
                              f'e.g. ["a", "b"]')
        return list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} = {value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} = {value!r} must be a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} = {value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{name} = {value!r} must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} = {value!r} must be a string (in quotes)")
        return value
    raise TypeError(f"unsupported config type {hint} for {name}")


# ------------------------------------------------------------- validation

def validate(config: TrainConfig, *, check_paths: bool = True) -> None:
    """Check ranges, choices and cross-field rules; with ``check_paths`` also that folders exist."""
    for section in SECTIONS:
        obj = getattr(config, section)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            name, value = f"{section}.{f.name}", getattr(obj, f.name)
            _coerce(name, value, hints[f.name])  # dataclasses built in code are checked too
            _check_range(name, value, f.metadata)
    check_rules(config)
    if check_paths:
        check_folders(config)


def _check_range(name: str, value: Any, meta: typing.Mapping) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi, multiple = meta.get("min"), meta.get("max"), meta.get("multiple_of")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ConfigError(f"{name} = {value!r} is out of range; allowed: {lo} to {hi}")
    if multiple and value % multiple:
        raise ConfigError(f"{name} = {value!r} must be a multiple of {multiple} "
                          f"(e.g. {max(multiple, value // multiple * multiple)})")


def resolve_paths(config: TrainConfig) -> TrainConfig:
    """Return a copy with local paths made absolute (hub ids are kept as they are); nothing is re-validated."""
    config = copy.deepcopy(config)
    if Path(config.model.path).expanduser().exists():
        config.model.path = str(Path(config.model.path).expanduser().resolve())
    config.dataset.path = str(Path(config.dataset.path).expanduser().resolve())
    config.output.dir = str(Path(config.output.dir).expanduser().resolve())
    if config.dataset.validation_path:
        config.dataset.validation_path = str(Path(config.dataset.validation_path).expanduser().resolve())
    if config.dataset.cache_dir:
        config.dataset.cache_dir = str(Path(config.dataset.cache_dir).expanduser().resolve())
    return config


def with_values(config: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A copy with ``{"section.key": value}`` set (typed values, as the planner chooses them; not validated)."""
    config = copy.deepcopy(config)
    for key, value in values.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    return config


def to_raw(config: TrainConfig) -> dict[str, Any]:
    raw = {"config_version": config.config_version}
    raw.update({section: dataclasses.asdict(getattr(config, section)) for section in SECTIONS})
    return raw


def to_toml(config: TrainConfig) -> str:
    import tomli_w

    return tomli_w.dumps(to_raw(config))


def save(config: TrainConfig, path: str | os.PathLike) -> None:
    from core.fsutil import write_text

    write_text(path, to_toml(config))


def field_info(section: str, key: str) -> dict[str, Any]:
    """Metadata of one field for the app: help, min, max, choices, group, type, default."""
    obj = getattr(TrainConfig(), section)
    f = {f.name: f for f in dataclasses.fields(obj)}[key]
    hint = typing.get_type_hints(type(obj))[key]
    info = dict(f.metadata)
    info["choices"] = list(typing.get_args(hint)) if typing.get_origin(hint) is Literal else None
    info["type"] = hint
    info["default"] = getattr(obj, key)
    return info
