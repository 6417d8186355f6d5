"""Config keys, declared once, and the loader that checks a JSON object against them.

A key is a field of one of the frozen dataclasses in :mod:`.model`, declared with
:func:`key`: its name (the JSON key and the dataclass field), its default (none: required),
its :class:`~.specs.Spec` (type and bounds), whether it cascades, which route types it is
for, and its documentation sentence. Everything else is derived from that one declaration:
the :class:`Table` the loader walks, schema.json and the README's key tables
(:mod:`.docs`, checked by tests), and the values handed to the compiled core.

Cascading keys (timeouts, max_body_size) may be set at the top level, per server and per
route: an object that does not set one takes its parent's value, resolved here at load time,
so every ServerConfig and RouteConfig carries the effective values and nothing downstream
walks up. A cascading key may have a different built-in default per route type
(``type_defaults``); a value set explicitly higher up still wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .specs import ConfigError, Spec, _Context, _did_you_mean, _expected, _join

T = TypeVar("T")


@dataclass(frozen=True)
class Field:
    name: str  # the JSON key and the dataclass field
    spec: Spec
    doc: str = ""
    # Cascading: when absent, the value of the enclosing object (route < server < top level);
    # checked before the object's other keys, as the objects nested in it inherit it.
    cascade: bool = False
    ours: bool = True  # not an eXpServer key (the docs say so)
    only: tuple[str, ...] = ()  # the route types it applies to (empty: all)
    default_doc: str | None = None  # the default in words, where the value says too little
    type_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def key(
    default: Any = dataclasses.MISSING,
    *,
    spec: Spec,
    doc: str,
    cascade: bool = False,
    ours: bool = True,
    only: tuple[str, ...] = (),
    default_doc: str | None = None,
    type_defaults: Mapping[str, Any] | None = None,
) -> Any:
    """Declare a config key as a dataclass field (no ``default``: a required key)."""
    meta = {"key": (spec, doc, cascade, ours, only, default_doc, dict(type_defaults or {}))}
    return dataclasses.field(default=default, metadata=meta)


def declared(cls: type) -> tuple[Field, ...]:
    """The keys declared on a dataclass: its own in order, then those of its bases (the
    cascading groups) in theirs."""
    own = cls.__dict__.get("__annotations__", {})
    fields = dataclasses.fields(cls)
    out = []
    for f in [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]:
        meta = f.metadata.get("key")
        if meta is not None:
            spec, doc, cascade, ours, only, default_doc, type_defaults = meta
            out.append(Field(f.name, spec, doc, cascade, ours, only, default_doc, type_defaults))
    return tuple(out)


@dataclass(frozen=True)
class Table(Generic[T]):
    name: str  # the object's name under "$defs" in schema.json ("" for the root)
    cls: type[T]
    fields: tuple[Field, ...]
    description: str = ""
    # Checks across fields, run once all fields are valid: (values, path of the object).
    finish: Callable[[dict[str, Any], str], None] | None = None
    # Builds the dataclass from the checked values, where keys and fields differ (an upstream's
    # "address" becomes host and port); default: cls(**values).
    make: Callable[[dict[str, Any]], T] | None = None

    @classmethod
    def of(cls, name: str, model: type[T], description: str, *, extra: tuple[Field, ...] = (),
           finish: Callable[[dict[str, Any], str], None] | None = None,
           make: Callable[[dict[str, Any]], T] | None = None) -> Table[T]:
        return cls(name, model, extra + declared(model), description, finish, make)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def defaults(self) -> dict[str, Any]:
        """Defaults from the dataclass; a key with none is required."""
        return {
            f.name: f.default
            for f in dataclasses.fields(self.cls)  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING
        }

    @property
    def required(self) -> tuple[str, ...]:
        defaults = self.defaults
        return tuple(n for n in self.names if n not in defaults)

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)


class Nested(Spec, Generic[T]):
    """A JSON object described by another table."""

    def __init__(self, table: Table[T]) -> None:
        self.table = table

    def check(self, value: object, path: str, ctx: _Context) -> object:
        return build(self.table, value, path, ctx)

    def schema(self) -> dict[str, Any]:
        return {"$ref": f"#/$defs/{self.table.name}"}

    def words(self) -> str:
        return f"{self.table.name} object"


# Set by model.py once every table exists: where a misplaced key belongs.
ALL_TABLES: list[Table[Any]] = []
_WHERE = {"": "the top level", "health_check": "a health_check"}


def build(table: Table[T], value: object, path: str, ctx: _Context) -> T:
    if not isinstance(value, dict):
        raise _expected(path, "an object", value)
    duplicate = getattr(value, "duplicate", None)
    if duplicate is not None:
        raise ConfigError(_join(path, duplicate), "duplicate key")
    names = table.names
    for name in value:
        if name not in names:  # a typo must not silently fall back to a default
            raise ConfigError(_join(path, str(name)), _unknown(str(name), table))
    values: dict[str, Any] = {}
    # Cascading keys first (they have defaults, so are never required): the objects nested in
    # this one take this one's effective values as theirs.
    cascading = [f for f in table.fields if f.cascade]
    for field in cascading:
        if field.name in value:
            values[field.name] = field.spec.check(value[field.name], _join(path, field.name), ctx)
    effective = {f.name: _inherit(f.name, values, ctx, table) for f in cascading}
    inner = ctx
    if cascading:
        inner = dataclasses.replace(ctx, inherited={**ctx.inherited, **effective},
                                    explicit=ctx.explicit | set(values))
    required = table.required
    for field in table.fields:
        if field.cascade:
            continue
        if field.name in value:
            values[field.name] = field.spec.check(value[field.name], _join(path, field.name), inner)
        elif field.name in required:
            raise ConfigError(path, f"{field.name} is required")
    if table.finish is not None:
        table.finish(values, path)  # before inheriting, so it sees only the keys given
    for field in cascading:
        kind = values.get("type")
        if field.name not in inner.explicit and kind in field.type_defaults:
            effective[field.name] = field.type_defaults[kind]
    values.update(effective)
    return table.make(values) if table.make else table.cls(**values)


def _unknown(name: str, table: Table[Any]) -> str:
    # A key of another level (header_timeout in a route) is better told where it goes than
    # offered a look-alike of this level.
    homes = [_WHERE.get(t.name, f"a {t.name}") for t in ALL_TABLES if name in t.names]
    if homes:
        return f"unknown key here (allowed in {' and '.join(homes)})"
    return "unknown key" + _did_you_mean(name, table.names)


def _inherit(name: str, values: dict[str, Any], ctx: _Context, table: Table[Any]) -> Any:
    if name in values:
        return values[name]
    return ctx.inherited.get(name, table.defaults[name])
