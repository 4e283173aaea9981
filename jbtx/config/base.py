"""Typed, validated configuration: the generic ConfigDict -> dataclass machinery.

Experiment files in `configs/` return an `ml_collections.ConfigDict`; `from_mapping`
turns it into frozen dataclasses once, at the edge of the program. Every later piece
of jbtx takes those dataclasses, never raw dicts. Unknown keys, values of the wrong
type and impossible combinations are rejected with a `ConfigError` that names the full
key, e.g. ``config key 'model.n_kv_heads': must divide model.n_heads (32), got 5``.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import ml_collections
from ml_collections.config_dict import placeholder

T = TypeVar("T")


class ConfigError(ValueError):
  """A configuration value is unknown, mistyped or impossible; the message names the key."""

  def __init__(self, key: str, message: str):
    self.key = key
    self.message = message
    super().__init__(f"config key '{key}': {message}")

  def under(self, prefix: str) -> ConfigError:
    """The same error with `prefix` prepended to the key path."""
    return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.message)


def require(condition: bool, key: str, message: str) -> None:
  if not condition:
    raise ConfigError(key, message)


def require_positive(config: Any, *keys: str) -> None:
  for key in keys:
    value = getattr(config, key)
    require(value > 0, key, f"must be positive, got {value}")


def from_mapping(cls: type[T], data: Mapping[str, Any] | Any, key: str = "") -> T:
  """Builds the frozen dataclass `cls` from a (Config)dict, checking every key and type.

  Args:
    cls: a dataclass type whose fields carry type annotations.
    data: a mapping (dict or `ml_collections.ConfigDict`) with the field values.
    key: the dotted path of `data` in the full config, used in error messages.

  A dataclass may list keys it no longer has in a class attribute `MOVED` (old name ->
  the new key from the root); using one is an error that names the new key.

  Raises:
    ConfigError: for unknown, moved or missing keys, wrong types or invalid values.
  """
  if hasattr(data, "to_dict"):
    data = data.to_dict()
  if not isinstance(data, Mapping):
    raise ConfigError(key or "<root>", f"expected a group of settings, got {data!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(data) - set(fields))
  moved = getattr(cls, "MOVED", {})  # old key -> its new place, from the root
  for name in unknown:
    if name in moved:
      raise ConfigError(_join(key, name), f"this key moved to '{moved[name]}'; set that instead")
  if unknown:
    raise ConfigError(_join(key, unknown[0]),
                      f"unknown key; valid keys are {', '.join(sorted(fields))}")
  values = {}
  for name, field in fields.items():
    path = _join(key, name)
    if name in data:
      values[name] = _coerce(hints[name], data[name], path)
    elif (field.default is dataclasses.MISSING
          and field.default_factory is dataclasses.MISSING):
      raise ConfigError(path, "missing required key")
  try:
    return cls(**values)
  except ConfigError as e:
    raise e.under(key) from None


def moved_key(cls: type, key: str) -> str | None:
  """Where the dotted `key` of `cls` moved (a `MOVED` entry on its way), else None."""
  parts = key.split(".")
  for i, name in enumerate(parts):
    moved = getattr(cls, "MOVED", {})
    if name in moved:
      return ".".join([moved[name], *parts[i + 1:]])
    hint = typing.get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None
    if hint is None or not dataclasses.is_dataclass(hint):
      return None
    cls = hint
  return None


def check_overrides(cls: type, argv: Sequence[str]) -> None:
  """Raises ConfigError for a command-line override `--config.KEY=…` of a key that
  moved, naming where it went (before the flags parser fails on the unknown key)."""
  for arg in argv:
    if arg.startswith("--config."):
      key = arg.removeprefix("--config.").split("=", 1)[0]
      new = moved_key(cls, key)
      if new:
        raise ConfigError(key, f"this key moved to '{new}'; set that instead")


def exit_on_moved_overrides(cls: type, argv: Sequence[str]) -> None:
  """`check_overrides` for a command line: a moved key is printed as an error naming
  its new place, and the process exits with status 2 (a bad config)."""
  try:
    check_overrides(cls, argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _join(prefix: str, name: str) -> str:
  return f"{prefix}.{name}" if prefix else name


def _coerce(hint: Any, value: Any, key: str) -> Any:
  """Checks `value` against the type `hint`; returns it converted where lossless."""
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if dataclasses.is_dataclass(hint):  # an instance was validated when it was made
    return value if isinstance(value, hint) else from_mapping(hint, value, key)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # `X | None`: X's own error, with its own key (`model.moe.top_k`)
      return _coerce(options[0], value, key)
    errors = []
    for option in options:
      try:
        return _coerce(option, value, key)
      except ConfigError as e:
        errors.append(e.message)
    raise ConfigError(key, " or ".join(errors))
  if origin in (dict, Mapping):
    return _coerce_dict(args, value, key)
  if origin is tuple:
    return _coerce_tuple(args, value, key)
  if origin is Literal:
    if value not in args:
      raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
    return value
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(key, f"expected a number, got {value!r}")
    return float(value)
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(key, f"expected an integer, got {value!r}")
    return value
  if hint in (str, bool):
    if not isinstance(value, hint):
      raise ConfigError(key, f"expected {hint.__name__}, got {value!r}")
    return value
  raise TypeError(f"unsupported config annotation {hint!r} for {key}")


def _coerce_dict(args: tuple[Any, ...], value: Any, key: str) -> dict[str, Any]:
  """A `dict[str, X]`: every entry coerced to X under the key `key.<name>`."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ConfigError(key, f"expected a group of named settings, got {value!r}")
  key_type, value_type = args
  for name in value:
    if not isinstance(name, key_type):
      raise ConfigError(key, f"expected {key_type.__name__} names, got {name!r}")
  return {name: _coerce(value_type, item, _join(key, name)) for name, item in value.items()}


def _coerce_tuple(args: tuple[Any, ...], value: Any, key: str) -> tuple[Any, ...]:
  """A `tuple[X, ...]` (any length) or `tuple[X, Y]` (fixed length) from a list or tuple."""
  if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
    raise ConfigError(key, f"expected a list, got {value!r}")
  if len(args) == 2 and args[1] is Ellipsis:
    args = (args[0],) * len(value)
  elif len(args) != len(value):
    raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
  return tuple(_coerce(hint, item, f"{key}[{i}]")
               for i, (hint, item) in enumerate(zip(args, value, strict=True)))


def to_dict(config: Any) -> dict[str, Any]:
  """The plain-dict form of a config dataclass (inverse of `from_mapping`)."""
  return dataclasses.asdict(config)


def to_config_dict(config: Any) -> ml_collections.ConfigDict:
  """A config dataclass as an `ml_collections.ConfigDict` listing every key, for
  experiment files: each key can then be overridden with `--config.KEY=VALUE`.

  A field that is None but typed `X | None` for a plain X (str, int, float, bool)
  becomes a placeholder of X, still None but typed, so that the command line can set
  it; one typed as a nested config (e.g. `model.moe`) stays None.
  """
  hints = typing.get_type_hints(type(config))
  entries = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      value = to_config_dict(value)
    elif isinstance(value, dict):
      value = ml_collections.ConfigDict(
          {k: to_config_dict(v) if dataclasses.is_dataclass(v) else v
           for k, v in value.items()})
    elif value is None:
      plain = [a for a in typing.get_args(hints[field.name]) if a in (str, int, float, bool)]
      value = placeholder(plain[0]) if plain else None
    entries[field.name] = value
  return ml_collections.ConfigDict(entries)
