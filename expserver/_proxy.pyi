"""Stub of the compiled reverse-proxy data path (ext/expserver/_proxy.pyx)."""
from typing import Any

from ._http import Request
from ._loop import Loop
from .balancer import Balancer, Peer

Address = tuple[int, Any]   # (socket family, sockaddr)

class ProxyRoute:
    """The handler of one reverse_proxy route; built by expserver.proxy.make_route."""
    balancer: Balancer
    loop: Loop
    connect_timeout: float
    read_timeout: float
    send_timeout: float
    idle_timeout: float
    keepalive: int
    retries: int
    host_header: bytes | None
    threshold: int
    max_body: int
    body_timeout: float
    def __init__(
        self,
        loop: Loop,
        balancer: Balancer,
        addrs: dict[Peer, Address | None],
        *,
        connect_timeout: float = ...,
        read_timeout: float = ...,
        send_timeout: float = ...,
        idle_timeout: float = ...,
        keepalive: int = ...,
        retries: int = ...,
        host_header: bytes | None = ...,
        threshold: int = ...,
        max_body: int = ...,
        body_timeout: float = ...,
    ) -> None: ...
    def __call__(self, req: Request) -> tuple[int, bytes, object]: ...
    def set_address(self, peer: Peer, addr: Address) -> None: ...
    def idle_count(self) -> int: ...
