"""Small helpers to validate YAML mappings at the edge, naming the file and the key.

YAML 1.1 reads `1e-5` (no dot) as a string; `as_float` accepts it as the number the user meant.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, overload

import yaml

from tuner.errors import ConfigError


class Checker:
    """Reads values out of one mapping, raising `ConfigError` that names `file` and `prefix.key`."""

    def __init__(self, data: Any, *, file: str | None, prefix: str, allowed: Iterable[str]) -> None:
        self.file = file
        self.prefix = prefix
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"must be a mapping, got {type(data).__name__}", file=file, key=prefix or None)
        self.data = dict(data)
        allowed = list(allowed)
        for key in self.data:
            if key not in allowed:
                raise ConfigError(
                    f"unknown key (valid keys: {', '.join(allowed)})", file=file, key=self.key(str(key))
                )

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, key=self.key(name))

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)

    # The readers are named after the types they return; inside the class those names are the
    # methods, so annotations spell the built-in types `builtins.x`. `optional=True` may return None.

    @overload
    def float(self, name: builtins.str, default: Any, *, gt: builtins.float | None = None,
              ge: builtins.float | None = None, lt: builtins.float | None = None, le: builtins.float | None = None,
              optional: Literal[False] = False) -> builtins.float: ...

    @overload
    def float(self, name: builtins.str, default: Any, *, gt: builtins.float | None = None,
              ge: builtins.float | None = None, lt: builtins.float | None = None, le: builtins.float | None = None,
              optional: builtins.bool) -> builtins.float | None: ...

    def float(self, name: builtins.str, default: Any, *, gt: builtins.float | None = None,
              ge: builtins.float | None = None, lt: builtins.float | None = None, le: builtins.float | None = None,
              optional: builtins.bool = False) -> builtins.float | None:
        value = self.data.get(name, default)
        if value is None and optional:
            return None
        number = as_float(value)
        if number is None:
            raise self.error(name, f"must be a number, got {value!r}")
        _check_range(self, name, number, gt=gt, ge=ge, lt=lt, le=le)
        return number

    @overload
    def int(self, name: builtins.str, default: Any, *, ge: builtins.int | None = None,
            optional: Literal[False] = False) -> builtins.int: ...

    @overload
    def int(self, name: builtins.str, default: Any, *, ge: builtins.int | None = None,
            optional: builtins.bool) -> builtins.int | None: ...

    def int(self, name: builtins.str, default: Any, *, ge: builtins.int | None = None,
            optional: builtins.bool = False) -> builtins.int | None:
        value = self.data.get(name, default)
        if value is None and optional:
            return None
        number = as_int(value)
        if number is None:
            raise self.error(name, f"must be a whole number, got {value!r}")
        if ge is not None and number < ge:
            raise self.error(name, f"must be >= {ge}, got {number}")
        return number

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self.data.get(name, default)
        if not isinstance(value, builtins.bool):
            raise self.error(name, f"must be true or false, got {value!r}")
        return value

    @overload
    def str(self, name: builtins.str, default: Any, *, choices: Iterable[builtins.str] | None = None,
            optional: Literal[False] = False) -> builtins.str: ...

    @overload
    def str(self, name: builtins.str, default: Any, *, choices: Iterable[builtins.str] | None = None,
            optional: builtins.bool) -> builtins.str | None: ...

    def str(self, name: builtins.str, default: Any, *, choices: Iterable[builtins.str] | None = None,
            optional: builtins.bool = False) -> builtins.str | None:
        value = self.data.get(name, default)
        if value is None and optional:
            return None
        if not isinstance(value, builtins.str) or not value:
            raise self.error(name, f"must be a non-empty string, got {value!r}")
        if choices is not None:
            choices = list(choices)
            if value not in choices:
                raise self.error(name, f"unknown value {value!r} (valid: {', '.join(choices)})")
        return value


def _check_range(c: Checker, name: str, x: float, *, gt: float | None, ge: float | None,
                 lt: float | None, le: float | None) -> None:
    if not math.isfinite(x):
        raise c.error(name, f"must be finite, got {x}")
    if gt is not None and not x > gt:
        raise c.error(name, f"must be > {gt}, got {x}")
    if ge is not None and not x >= ge:
        raise c.error(name, f"must be >= {ge}, got {x}")
    if lt is not None and not x < lt:
        raise c.error(name, f"must be < {lt}, got {x}")
    if le is not None and not x <= le:
        raise c.error(name, f"must be <= {le}, got {x}")


def as_float(value: Any) -> float | None:
    """A YAML scalar as a float, or None. Accepts ints and strings like '1e-5'; rejects bools."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def as_int(value: Any) -> int | None:
    """A YAML scalar as an int, or None. Accepts 10, 10.0 and '10'; rejects 1.5 and bools."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    number = as_float(value)
    if number is not None and math.isfinite(number) and number == int(number):
        return int(number)
    return None


def read_yaml(path: str | Path) -> tuple[Any, str]:
    """Load a YAML file with `yaml.safe_load`. Returns (data, display name). Errors exit 2."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise ConfigError("file not found", file=name)
    if path.is_dir():
        raise ConfigError("is a directory, expected a YAML file", file=name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=name) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"YAML syntax error{where}: {problem}", file=name) from None
    if data is None:
        raise ConfigError("file is empty", file=name)
    if not isinstance(data, Mapping):
        raise ConfigError(f"top level must be a mapping, got {type(data).__name__}", file=name)
    return data, name
