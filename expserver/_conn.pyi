"""Stub of the compiled listeners and connections (ext/expserver/_conn.pyx)."""
import socket
from collections.abc import Callable

from ._loop import Handle, Loop

class Stats:
    conn_accepted: int
    conn_current: int
    conn_error: int
    conn_timeout: int
    conn_accepted_error: int
    req_total: int
    req_current: int
    res_1xx: int
    res_2xx: int
    res_3xx: int
    res_4xx: int
    res_5xx: int
    recv_bytes: int
    send_bytes: int
    res_time_total: float
    res_time_peak: float

class Settings:
    keepalive_timeout: float
    header_timeout: float
    body_timeout: float
    send_timeout: float
    max_body_size: int
    max_line: int
    max_field: int
    max_head: int
    max_fields: int
    pipe_threshold: int
    max_connections: int
    def __init__(
        self,
        keepalive_timeout: float = ...,
        header_timeout: float = ...,
        body_timeout: float = ...,
        send_timeout: float = ...,
        max_body_size: int = ...,
        max_line: int = ...,
        max_field: int = ...,
        max_head: int = ...,
        max_fields: int = ...,
        pipe_threshold: int = ...,
        max_connections: int = ...,
    ) -> None: ...

class Core:
    loop: Loop
    stats: Stats
    connections: set[object]
    draining: bool
    def __init__(self, loop: Loop) -> None: ...
    def drain(self) -> None: ...
    def close_all(self) -> None: ...

class Listener(Handle):
    sock: socket.socket
    handler: Callable[..., tuple[int, bytes, object]]
    settings: Settings
    def __init__(
        self,
        core: Core,
        sock: socket.socket,
        handler: Callable[..., tuple[int, bytes, object]],
        settings: Settings,
    ) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def adopt(self, fd: int, peer: str = ...) -> Connection: ...

class Connection(Handle):
    settings: Settings
    peer: str
    state: int
    body_timeout: float
    @property
    def state_name(self) -> str: ...
    @property
    def buffered(self) -> int: ...
    @property
    def holds_buffer(self) -> bool: ...
    def resume(self) -> None: ...
