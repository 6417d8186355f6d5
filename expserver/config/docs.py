"""schema.json and the README's key tables, generated from the key declarations (.model).

Both are committed (the schema ships in the package; the README is read on GitHub), and tests
check that they equal what this module generates, so a key is never documented in a second
place by hand. After changing a declaration: ``python -m expserver.config.docs`` rewrites
both.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from .keys import Field, Table
from .model import PROXY_KEYS, REQUIRED_BY_TYPE, ROOT, ROUTE, SERVER, TABLES

_LEVELS = {"": "the top level", "server": "a server", "route": "a route"}


def description(field: Field, table: Table[Any]) -> str:
    """The field's documentation at this level: its sentence, where else it may be set or
    where its default comes from, and whether eXpServer has it."""
    text = field.doc
    if field.cascade:
        if not table.name:
            below = ["server"] + (["route"] if field.name in ROUTE.names else [])
            text += " May be set per " + " and per ".join(below) + "."
        elif table.name == "server":
            text += " Default: the top-level value."
        else:
            text += " Default: the server's value."
    if field.ours:
        text += " Not an eXpServer key."
    return text


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items() if v is not None}
    return list(value) if isinstance(value, tuple) else value


def _has_default(field: Field, table: Table[Any]) -> bool:
    value = table.defaults.get(field.name)
    # Below the top level a cascading key defaults to its parent's value, not a constant.
    return value is not None and not (field.cascade and table.name)


def _object(table: Table[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "description": table.description,
                           "additionalProperties": False}
    if table.required:
        out["required"] = list(table.required)
    props = {}
    for field in table.fields:
        prop: dict[str, Any] = {"description": description(field, table), **field.spec.schema()}
        if _has_default(field, table):
            prop["default"] = _jsonable(table.defaults[field.name])
        props[field.name] = prop
    out["properties"] = props
    if table is ROUTE:
        out["allOf"] = _route_conditions()
    return out


def _route_conditions() -> list[dict[str, Any]]:
    def when(kind: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
        return {"if": {"properties": {"type": kind}, "required": ["type"]}, "then": then}

    out = []
    for kind, keys in REQUIRED_BY_TYPE.items():
        then: dict[str, Any] = {"required": list(keys)}
        if kind == "reverse_proxy":
            primary = {"anyOf": [{"type": "string"}, {
                "type": "object",
                "not": {"required": ["backup"], "properties": {"backup": {"const": True}}}}]}
            then["properties"] = {"upstreams": {"minItems": 1, "contains": primary}}
        out.append(when({"const": kind}, then))
    out.append(when({"not": {"const": "reverse_proxy"}},
                    {"properties": {name: False for name in PROXY_KEYS}}))
    return out


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the config file."""
    root = _object(ROOT)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "expserver configuration",
        **{k: v for k, v in root.items()},
        "$defs": {t.name: _object(t) for t in TABLES if t.name},
    }


def schema_text() -> str:
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"


# --- README tables ------------------------------------------------------------------------------


def _default_words(field: Field, table: Table[Any]) -> str:
    if field.name in table.required:
        return "required"
    if field.cascade and table.name:
        return "top level's" if table is SERVER else "server's"
    if field.default_doc is not None:
        return field.default_doc
    value = table.defaults.get(field.name)
    if value is None:
        return ""
    return f"`{json.dumps(_jsonable(value))}`"


def key_table(table: Table[Any]) -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for field in table.fields:
        rows.append(f"| `{field.name}` | {field.spec.words()} | {_default_words(field, table)} "
                    f"| {description(field, table)} |")
    return "\n".join(rows)


_BLOCK = re.compile(r"(<!-- keys: (\w+) -->\n)(.*?)(<!-- /keys -->)", re.S)


def readme_blocks(text: str) -> dict[str, str]:
    """The key tables a README holds, by table name ("top" for the root)."""
    return {m.group(2): m.group(3) for m in _BLOCK.finditer(text)}


def render_readme(text: str) -> str:
    """The README with every key table regenerated."""
    by_name = {t.name or "top": t for t in TABLES}

    def table(m: re.Match[str]) -> str:
        return m.group(1) + key_table(by_name[m.group(2)]) + "\n" + m.group(4)

    return _BLOCK.sub(table, text)


def main() -> int:
    package = Path(__file__).resolve().parent.parent
    (package / "schema.json").write_text(schema_text(), encoding="utf-8")
    readme = package.parent / "README.md"
    if readme.exists():
        readme.write_text(render_readme(readme.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {package / 'schema.json'} and the key tables of {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
