"""Load and validate eXpServer configs (JSON, or TOML) into frozen dataclasses.

Theory of operation: every key is declared once, as a field of a dataclass in
:mod:`.model` (default, type and bounds, cascading, documentation). The loader
(:mod:`.keys`) walks a JSON object against the table derived from its dataclass; the
published schema.json and the README's key tables are generated from the same declarations
(:mod:`.docs`) and tests check that the committed copies agree.

Errors: the first problem found raises :class:`ConfigError` with the JSON path of the value
(``servers[0].routes[2].upstreams[1]``, or ``$`` for the document itself) and a reason. Bad
input never escapes as any other exception: ``expserver check`` prints the error and exits 1,
and a config that ``check`` accepts is one that ``serve`` starts with.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from .checks import split_host_port
from .keys import Field, Nested, Table
from .loader import default, load, parse
from .model import (
    HEADERS,
    HEALTH_CHECK,
    LB_METHODS,
    LISTENER,
    PROXY_KEYS,
    REDIRECT_CODES,
    REQUIRED_BY_TYPE,
    ROOT,
    ROUTE,
    ROUTE_TYPES,
    SERVER,
    TABLES,
    TLS,
    UPSTREAM,
    UPSTREAM_TLS,
    AccessLogConfig,
    Config,
    ErrorLogConfig,
    HeadersConfig,
    HealthCheckConfig,
    ListenerConfig,
    RouteConfig,
    ServerConfig,
    TLSConfig,
    UpstreamConfig,
    UpstreamTLSConfig,
)
from .specs import ConfigError
from .summary import summary

__all__ = [
    "HEADERS", "AccessLogConfig", "ErrorLogConfig", "TLS", "UPSTREAM_TLS", "TLSConfig", "UpstreamTLSConfig", "HEALTH_CHECK", "LB_METHODS", "LISTENER", "PROXY_KEYS", "REDIRECT_CODES", "REQUIRED_BY_TYPE",
    "ROOT", "ROUTE", "ROUTE_TYPES", "SERVER", "TABLES", "UPSTREAM", "Config", "ConfigError",
    "Field", "HeadersConfig", "HealthCheckConfig", "ListenerConfig", "Nested", "RouteConfig", "ServerConfig",
    "Table", "UpstreamConfig", "default", "load", "parse", "schema", "split_host_port", "summary",
]


def schema() -> dict[str, Any]:
    """The published JSON Schema (draft 2020-12) of the config file."""
    text = resources.files("expserver").joinpath("schema.json").read_text(encoding="utf-8")
    result: dict[str, Any] = json.loads(text)
    return result
