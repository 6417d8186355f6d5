"""``reverse_proxy`` routes: the policy around the compiled data path (expserver._proxy).

The balancer picks peers (expserver.balancer); ``expserver._proxy`` moves the bytes. Peer
addresses are resolved when the worker starts, and peers named by a host name are resolved
again every ``RESOLVE_EVERY`` seconds by a background thread, so the loop never waits for DNS
(a name that stops resolving keeps its last address).

Active health checks run in one daemon thread per route with blocking sockets and short
timeouts: a probe is a few hundred bytes every ``interval`` seconds, and the only thing the
thread shares with the loop is ``peer.healthy``, a flag the loop reads when picking.
"""
from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from typing import Any

from . import log
from ._loop import Loop
from ._proxy import ProxyRoute
from .balancer import Balancer, HealthChecker, Peer
from .config import HealthCheckConfig, RouteConfig
from .tls import upstream_context

Address = tuple[int, Any]
RESOLVE_EVERY = 30.0
MAX_PAUSE = 3600.0      # the longest sleep between two rounds of health checks


def resolve(host: str, port: int) -> Address | None:
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as e:
        log.warn(f"upstream {host}:{port} does not resolve ({e}); requests to it will fail")
        return None
    return family, sockaddr


def _host_header(route: RouteConfig) -> bytes | None:
    mode = route.proxy_host_header
    if mode is None:    # an https:// upstream's certificate names it, not the client's Host
        mode = "upstream" if any(u.tls for u in route.upstreams) else "client"
    if mode == "client":
        return None
    if mode == "upstream":
        return b""
    return mode.encode("ascii")


def tls_names(route: RouteConfig, peers: list[Peer]) -> dict[Peer, str | None]:
    """The https:// peers, with the name each is asked for (SNI) and checked against."""
    return {peer: route.upstream_tls.server_name or peer.host
            for peer, upstream in zip(peers, route.upstreams) if upstream.tls}


def make_route(route: RouteConfig, loop: Loop) -> ProxyRoute:
    balancer = Balancer.from_route(route)
    addrs = {peer: resolve(peer.host, peer.port) for peer in balancer.peers}
    handler = ProxyRoute(
        loop, balancer, addrs,
        connect_timeout=route.connect_timeout,
        read_timeout=route.upstream_read_timeout,
        send_timeout=route.upstream_send_timeout,
        keepalive=route.upstream_keepalive,
        retries=balancer.tries - 1,
        host_header=_host_header(route),
        max_body=route.max_body_size,
        body_timeout=route.body_timeout,
    )
    names = tls_names(route, balancer.peers)
    context = upstream_context(route.upstream_tls) if names else None
    handler.tls_names = names
    handler.tls_context = context
    if route.health_check is not None:
        HealthProbe(route.health_check, balancer.peers, addrs, context, names).start()
    named = [peer for peer in balancer.peers if not _is_ip(peer.host)]
    if named:
        Resolver(handler, named).start()
    return handler


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Resolver(threading.Thread):
    """Re-resolves the peers named by host name, off the loop."""

    def __init__(self, route: ProxyRoute, peers: list[Peer]) -> None:
        super().__init__(name="expserver-resolver", daemon=True)
        self.route = route
        self.peers = peers

    def run(self) -> None:
        while True:
            time.sleep(RESOLVE_EVERY)
            self.resolve_all()

    def resolve_all(self) -> None:
        """One round: every peer's name again; a fault with one is logged, the rest go on."""
        for peer in self.peers:
            try:
                info = socket.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
                family, _, _, _, sockaddr = info[0]
                self.route.set_address(peer, (family, sockaddr))
            except OSError:
                continue        # keep the last address that worked
            except Exception as exc:    # never stop resolving for good
                log.exception(f"re-resolving upstream {peer.address}", exc)


class HealthProbe(threading.Thread):
    """Sends each peer a GET of the check path every interval; flips ``peer.healthy``."""

    def __init__(self, check: HealthCheckConfig, peers: list[Peer],
                 addrs: dict[Peer, Address | None], context: ssl.SSLContext | None = None,
                 names: dict[Peer, str | None] | None = None) -> None:
        super().__init__(name="expserver-health", daemon=True)
        self.check = check
        self.checker = HealthChecker(check, peers)
        self.addrs = addrs
        self.context = context
        self.names = names or {}

    def run(self) -> None:
        while True:
            started = time.monotonic()
            for peer in self.checker.peers:
                self.check_peer(peer)
            pause = self.check.interval - (time.monotonic() - started)
            time.sleep(min(max(0.0, pause), MAX_PAUSE))

    def check_peer(self, peer: Peer) -> None:
        """One probe and its verdict. A fault of our own is logged and changes nothing: the
        thread goes on checking, and the peer keeps the health it had."""
        try:
            ok = self.checker.passed(self.probe(peer))
            if self.checker.record(peer, ok):
                if peer.healthy:
                    log.warn(f"upstream {peer.address} is healthy again")
                else:
                    log.warn(f"upstream {peer.address} is unhealthy: its health check "
                             f"{self.check.path} failed")
        except Exception as exc:
            log.exception(f"health check of upstream {peer.address}", exc)

    def probe(self, peer: Peer) -> int | None:
        """The status of one probe, or None when it got no valid response."""
        addr = self.addrs.get(peer)
        if addr is None:
            return None
        family, sockaddr = addr
        try:
            with socket.socket(family, socket.SOCK_STREAM) as raw:
                raw.settimeout(self.check.timeout)
                raw.connect(sockaddr)
                sock = raw
                if peer in self.names and self.context is not None:
                    sock = self.context.wrap_socket(raw, server_hostname=self.names[peer])
                sock.sendall(self.checker.request(peer))
                line = sock.makefile("rb").readline(256)
        except OSError:
            return None
        parts = line.split()
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return None
        return int(parts[1])
