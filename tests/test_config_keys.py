"""Config keys are declared once: schema.json and the README tables are generated from the
declarations, and every value `check` accepts is one the server can hold."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from expserver import config
from expserver.config import docs
from expserver.config.specs import INT32_MAX, INT64_MAX, MAX_SECONDS

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_schema_json_is_generated_from_the_declarations() -> None:
    committed = (ROOT / "expserver" / "schema.json").read_text(encoding="utf-8")
    assert committed == docs.schema_text(), "run: python -m expserver.config.docs"


def test_readme_key_tables_are_generated_from_the_declarations() -> None:
    blocks = docs.readme_blocks(README)
    assert set(blocks) == {t.name or "top" for t in config.TABLES}
    assert docs.render_readme(README) == README, "run: python -m expserver.config.docs"


def test_every_key_has_a_sentence() -> None:
    for table in config.TABLES:
        for field in table.fields:
            assert field.doc.endswith("."), (table.name, field.name)


BASE: dict[str, Any] = {"servers": [{"listeners": [{"host": "127.0.0.1", "port": 8080}],
                                     "routes": [{"req_path": "/", "type": "reverse_proxy",
                                                 "upstreams": ["127.0.0.1:9"]}]}]}


def with_value(path: tuple[object, ...], value: object) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    node: Any = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return doc


ROUTE = ("servers", 0, "routes", 0)
OUT_OF_RANGE = [
    ("max_body_size", ("max_body_size",), INT64_MAX + 1, "max_body_size: must be at most"),
    ("route max_body_size", ROUTE + ("max_body_size",), 2**64,
     "servers[0].routes[0].max_body_size: must be at most"),
    ("max_connections", ("max_connections",), INT32_MAX + 1, "max_connections: must be at most"),
    ("retries", ROUTE + ("retries",), 2**63, "servers[0].routes[0].retries: must be at most"),
    ("upstream_keepalive", ROUTE + ("upstream_keepalive",), 2**63,
     "servers[0].routes[0].upstream_keepalive: must be at most"),
    ("compress_min_length", ROUTE + ("compress_min_length",), 2**70,
     "servers[0].routes[0].compress_min_length: must be at most"),
    ("header_timeout", ("header_timeout",), MAX_SECONDS * 10, "header_timeout: must be at most"),
    ("health timeout", ROUTE + ("health_check",), {"timeout": 1e300},
     "servers[0].routes[0].health_check.timeout: must be at most"),
    ("workers", ("workers",), 100000, "workers: must be at most 1024"),
    ("hostname empty label", ("servers", 0, "hostnames"), ["a..example"],
     "servers[0].hostnames[0]: is not a valid host name"),
    ("hostname long label", ("servers", 0, "hostnames"), ["x" * 64 + ".example"],
     "servers[0].hostnames[0]: is not a valid host name"),
    ("listener host", ("servers", 0, "listeners", 0, "host"), "a..b",
     "servers[0].listeners[0].host: is not a valid host name"),
    ("lone surrogate", ("server_name",), "\ud800", "server_name: is not valid Unicode"),
    ("surrogate in a path", ROUTE + ("req_path",), "/\udcff",
     "servers[0].routes[0].req_path: is not valid Unicode"),
]


@pytest.mark.parametrize("path,value,message", [c[1:] for c in OUT_OF_RANGE],
                         ids=[c[0] for c in OUT_OF_RANGE])
def test_check_refuses_what_the_core_cannot_hold(path, value, message) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(with_value(path, value), "/")
    assert str(err.value).startswith(message), str(err.value)
    str(err.value).encode("utf-8")          # the message itself prints


def test_a_key_with_a_lone_surrogate_is_reported_printably() -> None:
    doc = copy.deepcopy(BASE)
    doc["\udc80x"] = 1
    with pytest.raises(config.ConfigError) as err:
        config.parse(doc, "/")
    str(err.value).encode("utf-8")


def test_the_largest_values_are_accepted() -> None:
    doc = with_value(("max_body_size",), INT64_MAX)
    doc["max_connections"] = INT32_MAX
    doc["header_timeout"] = MAX_SECONDS
    doc["servers"][0]["hostnames"] = ["x" * 63 + ".example", "*.example.test"]
    cfg = config.parse(doc, "/")
    assert cfg.max_body_size == INT64_MAX
    assert cfg.servers[0].hostnames == ("x" * 63 + ".example", "*.example.test")
