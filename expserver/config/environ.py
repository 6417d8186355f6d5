"""``${VAR}`` and ``${VAR:-default}`` in config strings, resolved when the file is loaded.

Every string value (object keys are names, not values, and are left alone) may refer to
environment variables; ``$$`` writes a literal ``$``. A string that is nothing but one
reference stays a :class:`FromEnv` string, which the integer, number and boolean specs accept
when its text is one (``"port": "${PORT}"``), so a value can come from the environment whatever
its type. A variable that is not set and has no default is an error naming the JSON path.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from .specs import ConfigError, _join, _show

_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{[^}]*\}?")


class FromEnv(str):
    """A whole string value taken from the environment (see the module docstring)."""


def substitute(node: Any, path: str = "$", env: Mapping[str, str] | None = None) -> Any:
    """``node`` (decoded JSON or TOML) with every reference replaced."""
    env = os.environ if env is None else env
    if isinstance(node, str):
        return _string(node, path, env)
    if isinstance(node, list):
        return [substitute(v, f"{path}[{i}]", env) for i, v in enumerate(node)]
    if isinstance(node, dict):
        out = type(node)((k, substitute(v, _join(path, str(k)), env)) for k, v in node.items())
        if hasattr(node, "duplicate"):
            out.duplicate = node.duplicate
        return out
    return node


def _string(text: str, path: str, env: Mapping[str, str]) -> str:
    if "$" not in text:
        return text

    def value(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        if name is None:
            raise ConfigError(path, f"{_show(m.group(0))} is not ${{NAME}} or ${{NAME:-default}}")
        if name in env:
            return env[name]
        if m.group(2) is not None:
            return m.group(2)
        raise ConfigError(path, f"environment variable {name} is not set "
                                f"(write ${{{name}:-default}} for a default)")

    whole = _REF.fullmatch(text)
    result = _REF.sub(value, text)
    return FromEnv(result) if whole is not None and whole.group(1) else result
