"""Stub of the compiled HTTP/1.1 request parser (ext/expserver/_http.pyx)."""

class HttpError(Exception):
    status: int
    reason: str
    def __init__(self, status: int, reason: str) -> None: ...

class Request:
    """A parsed request head. Made by the parser, never by Python code."""

    method: bytes
    target: bytes
    path: bytes
    query: bytes
    version: int
    headers: list[tuple[bytes, bytes]]
    host: bytes
    content_length: int
    chunked: bool
    keep_alive: bool
    expect_continue: bool
    body: bytes | None
    peer: str | None
    def get(self, name: bytes) -> bytes | None: ...

class Parser:
    max_line: int
    max_field: int
    max_head: int
    max_fields: int
    error_status: int
    error_reason: str | None
    def __init__(
        self, max_line: int = ..., max_field: int = ..., max_head: int = ..., max_fields: int = ...
    ) -> None: ...

class RequestParser:
    def __init__(
        self, max_line: int = ..., max_field: int = ..., max_head: int = ..., max_fields: int = ...
    ) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> list[Request]: ...
    @property
    def pending(self) -> int: ...
