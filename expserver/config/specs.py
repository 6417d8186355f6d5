"""The kinds of values a config holds: each Spec checks a JSON value, converts it, and
describes itself as JSON Schema (for schema.json) and in words (for the README tables).

Errors: the first problem found raises :class:`ConfigError` with the JSON path of the value
(``servers[0].routes[2].upstreams[1]``, or ``$`` for the document itself) and a reason.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# What the compiled core can hold: byte counts are C long long, counts of things C int, and
# seconds must stay within what epoll's millisecond timeout (a C int) can wait.
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_SECONDS = 2_000_000.0   # about 23 days


class ConfigError(Exception):
    """An invalid config: ``path`` is the JSON path of the offending value, ``reason`` why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)  # both in args, so it pickles across worker processes
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# --- messages ---------------------------------------------------------------------------------


def _show(value: object) -> str:
    """A value as the user wrote it in JSON, cut short so one line stays one line."""
    try:
        text = json.dumps(value, ensure_ascii=False)
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: shown escaped, so the message prints
        text = json.dumps(value)
    except (TypeError, ValueError):  # TOML dates, or an int too long to print
        text = type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {_show(value)}"
    if isinstance(value, int | float):
        return f"number {_show(value)}"
    if isinstance(value, str):
        return f"string {_show(value)}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _expected(path: str, what: str, value: object) -> ConfigError:
    return ConfigError(path, f"expected {what}, got {_describe(value)}")


def _list(choices: tuple[object, ...]) -> str:
    return ", ".join(_show(c) for c in choices)


def _did_you_mean(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f', did you mean "{close[0]}"?' if close else ""


def _join(path: str, key: str) -> str:
    if not key.isidentifier():
        return f"{path}[{json.dumps(key)}]"
    return key if path == "$" else f"{path}.{key}"


# --- specs: one per kind of value ---------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    base_dir: str  # absolute; relative paths in the config resolve against it
    # Effective values of the cascading keys of the enclosing objects, and which of them
    # were set explicitly (not defaults).
    inherited: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    explicit: frozenset[str] = frozenset()


class Spec:
    """Checks one JSON value, returns the dataclass value, and describes itself as JSON Schema
    and in words (the type column of the README's key tables)."""

    def check(self, value: object, path: str, ctx: _Context) -> object:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def words(self) -> str:
        raise NotImplementedError


def _from_env(value: object) -> object:
    """A ``"${VAR}"`` string as the JSON value its text spells (see .environ), else as is."""
    if type(value).__name__ != "FromEnv" or not isinstance(value, str):
        return value
    text = value.strip()
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    if re.fullmatch(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?", text):
        return float(text)
    return value


class Boolean(Spec):
    def check(self, value: object, path: str, ctx: _Context) -> object:
        value = _from_env(value)
        if not isinstance(value, bool):
            raise _expected(path, "a boolean", value)
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}

    def words(self) -> str:
        return "boolean"


@dataclass(frozen=True)
class Integer(Spec):
    """An integer; never more than the core can hold (INT64_MAX unless a bound says less)."""

    minimum: int | None = None
    maximum: int = INT64_MAX
    choices: tuple[int, ...] = ()

    def check(self, value: object, path: str, ctx: _Context) -> object:
        value = _from_env(value)
        # bool is an int in Python, but `"port": true` is a mistake, not port 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected(path, "an integer", value)
        if self.choices and value not in self.choices:
            raise ConfigError(path, f"must be one of {_list(self.choices)}, got {_show(value)}")
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or value > high:
            # the core's own limits are only worth naming to a value that crosses them
            if low is not None and high not in (INT32_MAX, INT64_MAX):
                reason = f"must be between {low} and {high}"
            elif value > high:
                reason = f"must be at most {high}"
            else:
                reason = f"must be at least {low}"
            raise ConfigError(path, f"{reason}, got {_show(value)}")
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer"}
        if self.choices:
            out["enum"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if not self.choices:
            out["maximum"] = self.maximum
        return out

    def words(self) -> str:
        return " \\| ".join(str(c) for c in self.choices) if self.choices else "integer"


class Seconds(Spec):
    """A duration: a JSON number greater than zero, at most MAX_SECONDS."""

    def check(self, value: object, path: str, ctx: _Context) -> object:
        value = _from_env(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _expected(path, "a number of seconds", value)
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds) or seconds <= 0:  # TOML can spell inf and nan
            raise ConfigError(path, f"must be a finite number greater than 0, got {_show(value)}")
        if seconds > MAX_SECONDS:
            raise ConfigError(path, f"must be at most {MAX_SECONDS:.0f} seconds, got {_show(value)}")
        return seconds

    def schema(self) -> dict[str, Any]:
        return {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS}

    def words(self) -> str:
        return "number"


# A String's extra check: takes the string, its path and the context; returns the value to
# store or raises ConfigError.
StringCheck = Callable[[str, str, _Context], str]


@dataclass(frozen=True)
class String(Spec):
    choices: tuple[str, ...] = ()
    extra: StringCheck | None = None
    keywords: tuple[tuple[str, Any], ...] = ()  # schema keywords that describe `extra`

    def check(self, value: object, path: str, ctx: _Context) -> object:
        if not isinstance(value, str):
            raise _expected(path, "a string", value)
        value = str(value)          # a FromEnv string is a plain one from here on
        _unicode(value, path)
        if self.choices and value not in self.choices:
            hint = _did_you_mean(value, self.choices)
            reason = f"must be one of {_list(self.choices)}, got {_show(value)}{hint}"
            raise ConfigError(path, reason)
        return self.extra(value, path, ctx) if self.extra else value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string"}
        if self.choices:
            out["enum"] = list(self.choices)
        out.update(self.keywords)
        return out

    def words(self) -> str:
        return " \\| ".join(_show(c) for c in self.choices) if self.choices else "string"


def _unicode(text: str, path: str) -> None:
    """JSON can spell a lone surrogate (``"\\ud800"``); no file name, URL or header can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(path, f"is not valid Unicode (a lone surrogate), got {_show(text)}") from None


@dataclass(frozen=True)
class Array(Spec):
    item: Spec
    min_items: int = 0

    def check(self, value: object, path: str, ctx: _Context) -> object:
        if not isinstance(value, list):
            raise _expected(path, "an array", value)
        if len(value) < self.min_items:
            raise ConfigError(path, "must not be empty")
        return tuple(self.item.check(v, f"{path}[{i}]", ctx) for i, v in enumerate(value))

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "array", "items": self.item.schema()}
        if self.min_items:
            out["minItems"] = self.min_items
        return out

    def words(self) -> str:
        return f"array of {self.item.words()}"


@dataclass(frozen=True)
class Nullable(Spec):
    """A value that may also be null, meaning "off" (the dataclass default None)."""

    inner: Spec

    def check(self, value: object, path: str, ctx: _Context) -> object:
        return None if value is None else self.inner.check(value, path, ctx)

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "null"}, self.inner.schema()]}

    def words(self) -> str:
        return f"null or {self.inner.words()}"


class Workers(Spec):
    """eXpServer's worker count, or "auto" for one per CPU (as nginx's worker_processes)."""

    def check(self, value: object, path: str, ctx: _Context) -> object:
        value = _from_env(value)
        if isinstance(value, str) and value == "auto":
            return os.cpu_count() or 1
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected(path, 'an integer or "auto"', value)
        if value < 1:
            raise ConfigError(path, f"must be at least 1, got {_show(value)}")
        if value > MAX_WORKERS:
            raise ConfigError(path, f"must be at most {MAX_WORKERS}, got {_show(value)}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "integer", "minimum": 1, "maximum": MAX_WORKERS},
                          {"const": "auto"}]}

    def words(self) -> str:
        return 'integer or "auto"'


MAX_WORKERS = 1024


@dataclass(frozen=True)
class MapOf(Spec):
    """A JSON object whose names are data (header names, status codes): kept as a tuple of
    (name, value) pairs in the order written."""

    name: String
    value: Spec

    def check(self, value: object, path: str, ctx: _Context) -> object:
        if not isinstance(value, dict):
            raise _expected(path, "an object", value)
        duplicate = getattr(value, "duplicate", None)
        if duplicate is not None:
            raise ConfigError(_join(path, duplicate), "duplicate key")
        return tuple((self.name.check(k, _join(path, k), ctx),
                      self.value.check(v, _join(path, k), ctx)) for k, v in value.items())

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "propertyNames": self.name.schema(),
                "additionalProperties": self.value.schema()}

    def words(self) -> str:
        return f"object of {self.value.words()}"


@dataclass(frozen=True)
class OneOrMany(Spec):
    """A value, or an array of such values (kept as a tuple either way)."""

    item: Spec

    def check(self, value: object, path: str, ctx: _Context) -> object:
        if isinstance(value, list):
            return tuple(self.item.check(v, f"{path}[{i}]", ctx) for i, v in enumerate(value))
        return (self.item.check(value, path, ctx),)

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [self.item.schema(), {"type": "array", "items": self.item.schema()}]}

    def words(self) -> str:
        return f"{self.item.words()} or array of {self.item.words()}"
