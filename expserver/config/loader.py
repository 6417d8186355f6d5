"""Reading config files (JSON, or TOML) and turning them into a validated Config."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .environ import substitute
from .keys import build
from .model import ROOT, Config
from .specs import ConfigError, _Context


class _JsonObject(dict[str, Any]):
    """A JSON object that remembers a repeated key, which json.loads would silently overwrite."""

    duplicate: str | None = None


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                obj.duplicate = key
                break
            seen.add(key)
    return obj


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")  # Python's json takes NaN/Infinity; JSON does not


def _parse_json(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ConfigError("$", f"invalid JSON at {where}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # NaN, 5000-digit integers, absurd nesting
        raise ConfigError("$", f"invalid JSON: {exc}") from None


def _parse_toml(text: str) -> object:
    try:
        import tomllib  # here, not at the top: Python 3.10 can still load JSON configs
    except ImportError:
        raise ConfigError("$", "TOML configs need Python 3.11 or later") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("$", f"invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError("$", "invalid TOML: nested too deeply") from None


def load(path: str) -> Config:
    """Read and validate the config file at ``path`` (TOML if it ends in .toml, else JSON)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError("$", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM from a Windows editor is harmless
    except UnicodeDecodeError as exc:
        raise ConfigError("$", f"not UTF-8 text (bad byte at offset {exc.start})") from None
    obj = _parse_toml(text) if path.endswith(".toml") else _parse_json(text)
    obj = substitute(obj)
    source = os.path.abspath(path)
    return parse(obj, os.path.dirname(source), source=source)


def parse(obj: object, base_dir: str, source: str | None = None) -> Config:
    """Validate an already-decoded config; relative paths resolve against ``base_dir``."""
    config = build(ROOT, obj, "$", _Context(os.path.abspath(base_dir)))
    return dataclasses.replace(config, source=source)


def default(dir_path: str, host: str = "127.0.0.1", port: int = 8080) -> Config:
    """The no-config mode: serve ``dir_path`` with directory listings on one listener."""
    raw = {
        # as python -m http.server and uvicorn do: one line per request on stdout
        "access_log": {"path": "stdout", "format": "combined"},
        "charset": "utf-8",         # UTF-8 names and files read right in a browser
        "servers": [
            {
                "listeners": [{"host": host, "port": port}],
                "routes": [{"req_path": "/", "type": "file_serve", "dir_path": dir_path}],
            }
        ]
    }
    return parse(raw, os.getcwd())
