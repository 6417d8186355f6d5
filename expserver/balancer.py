"""Load balancing for reverse_proxy routes: which upstream peer takes the next attempt.

Theory of operation: a :class:`Balancer` owns one :class:`Peer` per configured upstream and
picks one per attempt. The proxy does all the I/O and reports back::

    peer = balancer.pick(client_ip, now, exclude=tried)   # None: answer 502
    peer.active += 1        # while a connection to it is in use; -= 1 when it is released
    peer.failed(now)        # refused, reset, timed out, invalid reply
    peer.succeeded()        # a valid response head arrived

Whether a peer may be picked has two independent parts:

- passive (nginx's max_fails/fail_timeout): ``max_fails`` failures, each within
  ``fail_timeout`` of the one before, take the peer out for ``fail_timeout``. After that one
  request tries it (the others still skip it): a success brings it back, a failure takes it
  out again. A route's only upstream is never taken out (nginx ignores max_fails for a single
  server): refusing every request for fail_timeout would only turn one failure into many.
- active: a :class:`HealthChecker`, fed by the proxy's periodic probes, flips ``healthy``.

Primary peers serve while any of them is available to the attempt (neither down nor unhealthy
nor excluded, i.e. already tried by this request); backups only otherwise. With nothing
available pick() returns None and the caller answers **502** (nginx's "no live upstreams").
Unless that was only because the request had tried every peer, the passive failure counts are
then forgotten, as nginx does, so the next request tries the peers again rather than getting
502s for fail_timeout after all the upstreams restarted at once.

Every call takes ``now`` (time.monotonic()) from the caller: one clock read per request, and
tests drive time by hand. ip_hash uses a stable hash (not ``hash()``, which differs per
process), so every worker sends a client to the same peer.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Collection, Iterable, Sequence

from .config import LB_METHODS, HealthCheckConfig, RouteConfig, UpstreamConfig

# ip_hash ring points per unit of weight (ketama's figure, as nginx's "hash ... consistent").
POINTS_PER_WEIGHT = 160
# Ring points per group at most: big weights are scaled down so that building the ring stays
# in milliseconds (weights 1..1000 would otherwise make 160,000 points per peer).
MAX_POINTS = 40_000


class Peer:
    """One upstream server of a route, and what the proxy has learnt about it."""

    __slots__ = (
        "_trial",
        "active",
        "backup",
        "current_weight",
        "down_until",
        "effective_weight",
        "fail_timeout",
        "fails",
        "healthy",
        "host",
        "last_failure",
        "max_fails",
        "port",
        "weight",
    )

    def __init__(
        self,
        host: str,
        port: int,
        weight: int = 1,
        max_fails: int = 1,
        fail_timeout: float = 10.0,
        backup: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.weight = weight
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.backup = backup
        self.active = 0  # connections in use now, counted by the proxy
        self.fails = 0  # failures of the current run (see failed)
        self.last_failure = float("-inf")
        self.down_until = 0.0  # monotonic; passive health keeps the peer out until then
        self.healthy = True  # active health; stays True when the route has no checks
        # Smooth weighted round-robin state (nginx's ngx_http_upstream_rr_peer_t).
        self.current_weight = 0
        self.effective_weight = weight  # lowered by failures, earned back one pick at a time
        self._trial = False  # the one request after a down period is in flight

    @classmethod
    def from_config(cls, upstream: UpstreamConfig) -> Peer:
        u = upstream
        return cls(u.host, u.port, u.weight, u.max_fails, u.fail_timeout, u.backup)

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 in brackets), for logs and for ``proxy_host_header: upstream``."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<Peer {self.address}{' backup' if self.backup else ''}>"

    def available(self, now: float) -> bool:
        """Neither down after failures nor failing its health checks."""
        return self.healthy and now >= self.down_until

    def failed(self, now: float) -> None:
        """An attempt failed: connect error or timeout, reset, empty or invalid reply."""
        if self.fails < self.max_fails and now - self.last_failure > self.fail_timeout:
            self.fails = 0  # the earlier failures are too old to count with this one
        self.fails += 1
        self.last_failure = now
        self._trial = False
        if not self.max_fails:
            return  # 0: failures are counted but never take the peer out
        # nginx: a failing peer's share shrinks at once and grows back with each pick.
        self.effective_weight = max(0, self.effective_weight - self.weight // self.max_fails)
        if self.fails >= self.max_fails:
            self.down_until = now + self.fail_timeout

    def succeeded(self) -> None:
        """An attempt got a valid response head from the peer."""
        # Only the trial after a down period clears the count: successes between failures do
        # not (nginx), or a peer failing every other request would never be taken out.
        if self._trial:
            self._trial = False
            self.fails = 0
            self.down_until = 0.0

    def _picked(self, now: float) -> None:
        if self.max_fails and self.fails >= self.max_fails:
            # Back from a down period: this request is the trial; the others keep skipping the
            # peer until it answers (or for another fail_timeout, if it never does).
            self._trial = True
            self.down_until = now + self.fail_timeout

    def _forgive(self) -> None:
        self.fails = 0
        self.down_until = 0.0
        self._trial = False


class Balancer:
    """Picks the peer for each attempt of a route's requests, by the route's lb_method."""

    def __init__(
        self,
        upstreams: Sequence[UpstreamConfig],
        lb_method: str = "round_robin",
        *,
        retries: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not upstreams:
            raise ValueError("a balancer needs at least one upstream")
        if lb_method not in LB_METHODS:
            raise ValueError(f"unknown lb_method {lb_method!r}")
        self.peers = [Peer.from_config(u) for u in upstreams]
        if len(self.peers) == 1:
            self.peers[0].max_fails = 0  # see "never taken out" above
        primary = [p for p in self.peers if not p.backup]
        backup = [p for p in self.peers if p.backup]
        self.groups = [group for group in (primary, backup) if group]
        self.lb_method = lb_method
        # Attempts per request, the first included: by default each peer once.
        self.tries = len(self.peers) if retries is None else retries + 1
        self._rng = rng or random.Random()
        self._rings = [_Ring(group) for group in self.groups] if lb_method == "ip_hash" else []
        choose: dict[str, Callable[[int, list[Peer], str], Peer]] = {
            "round_robin": lambda group, peers, ip: _smooth_weighted(peers),
            "least_conn": lambda group, peers, ip: _least_conn(peers),
            "ip_hash": lambda group, peers, ip: self._rings[group].lookup(ip, peers),
            "random_two": lambda group, peers, ip: _random_two(peers, self._rng),
        }
        self._choose = choose[lb_method]
        # nginx's "single" fast path: one peer is never taken out (above), so only its
        # health check and the request's own failures decide.
        self._single = self.peers[0] if len(self.peers) == 1 else None

    @classmethod
    def from_route(cls, route: RouteConfig, rng: random.Random | None = None) -> Balancer:
        return cls(route.upstreams, route.lb_method, retries=route.retries, rng=rng)

    def pick(
        self, client_ip: str, now: float, exclude: Collection[Peer] = frozenset()
    ) -> Peer | None:
        """The peer for the next attempt, or None: answer 502 (nothing left to try)."""
        single = self._single
        if single is not None:
            return single if single.healthy and single not in exclude else None
        for index, group in enumerate(self.groups):
            candidates = [p for p in group if p.available(now) and p not in exclude]
            if candidates:
                peer = self._choose(index, candidates, client_ip)
                peer._picked(now)
                return peer
        if not all(peer in exclude for peer in self.peers):
            # Peers are down, not merely all tried by this request: nginx's "all peers
            # failed, mark them as live for quick recovery".
            for peer in self.peers:
                peer._forgive()
        return None


def _smooth_weighted(peers: list[Peer]) -> Peer:
    """nginx's smooth weighted round-robin (ngx_http_upstream_get_peer): for weights 5, 1, 1
    the order is a a b a c a a, spreading a's turns instead of sending it five in a row."""
    best = peers[0]
    total = 0
    for peer in peers:
        peer.current_weight += peer.effective_weight
        total += peer.effective_weight
        if peer.effective_weight < peer.weight:
            peer.effective_weight += 1
        if peer.current_weight > best.current_weight:
            best = peer
    best.current_weight -= total
    return best


def _least_conn(peers: list[Peer]) -> Peer:
    """Fewest active connections per unit of weight (nginx's least_conn); ties share by
    smooth weighted round-robin among themselves, so idle peers still take turns."""
    best = peers[0]
    tied = [best]
    for peer in peers[1:]:
        # active/weight compared without division, as nginx does.
        mine, theirs = peer.active * best.weight, best.active * peer.weight
        if mine < theirs:
            best = peer
            tied = [peer]
        elif mine == theirs:
            tied.append(peer)
    return best if len(tied) == 1 else _smooth_weighted(tied)


def _random_two(peers: list[Peer], rng: random.Random) -> Peer:
    """Power of two choices: two distinct weighted random peers, the less busy one wins
    (nginx's random two least_conn). With no load at all the shares follow the weights."""
    if len(peers) == 1:
        return peers[0]
    first = rng.choices(peers, [p.weight for p in peers])[0]
    rest = [p for p in peers if p is not first]
    second = rng.choices(rest, [p.weight for p in rest])[0]
    return second if second.active * first.weight < first.active * second.weight else first


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _Ring:
    """Consistent hashing of client addresses onto a group of peers (ketama).

    Each peer owns POINTS_PER_WEIGHT points per unit of weight on a 64-bit circle, placed by
    hashing its address; a client goes to the owner of the first point at or after the hash of
    its address. A peer's points depend on nothing but its address, so adding a peer moves only
    the clients that land on its new points (about 1/n of them) and taking one out moves only
    its own clients, to the next points along the circle.
    """

    def __init__(self, peers: list[Peer]) -> None:
        total = sum(p.weight for p in peers) * POINTS_PER_WEIGHT
        scale = min(1.0, MAX_POINTS / total)
        points: list[tuple[int, int]] = []
        seen: dict[str, int] = {}
        for index, peer in enumerate(peers):
            # The same address listed twice needs points of its own, or one copy shadows the other.
            copy = seen[peer.address] = seen.get(peer.address, -1) + 1
            name = peer.address if not copy else f"{peer.address}#{copy}"
            count = max(1, round(POINTS_PER_WEIGHT * peer.weight * scale))
            points += ((_hash(f"{name}-{i}"), index) for i in range(count))
        points.sort()
        self.hashes = [h for h, _ in points]
        self.owners = [peers[i] for _, i in points]

    def lookup(self, key: str, allowed: Collection[Peer]) -> Peer:
        """The owner of the first point from ``key`` on whose peer is in ``allowed``."""
        allowed = set(allowed)
        start = bisect.bisect_left(self.hashes, _hash(key))
        size = len(self.owners)
        for step in range(size):
            peer = self.owners[(start + step) % size]
            if peer in allowed:
                return peer
        raise ValueError("no allowed peer on the ring")  # pick() passes a non-empty subset


class HealthChecker:
    """Turns active health check results into ``peer.healthy``. No I/O: the proxy sends the
    probes (see request()) every ``interval``, with ``timeout``, and reports each result."""

    def __init__(self, config: HealthCheckConfig, peers: Iterable[Peer]) -> None:
        self.config = config
        self.peers = list(peers)
        self._passes = {peer: 0 for peer in self.peers}  # consecutive, since the last failure
        self._fails = {peer: 0 for peer in self.peers}  # consecutive, since the last pass

    def passed(self, status: int | None) -> bool:
        """Whether a probe answered as expected (None: it got no valid response at all)."""
        return status == self.config.expect_status

    def request(self, peer: Peer, host: str | None = None) -> bytes:
        """The probe to send to ``peer``: a GET of the check path that closes after it."""
        head = (
            f"GET {self.config.path} HTTP/1.1\r\nHost: {host or peer.address}\r\n"
            "User-Agent: expserver-health-check\r\nConnection: close\r\n\r\n"
        )
        return head.encode("ascii")

    def record(self, peer: Peer, ok: bool) -> bool:
        """Count one probe of ``peer``; True when this flipped ``peer.healthy``."""
        if ok:
            self._fails[peer] = 0
            self._passes[peer] += 1
            if not peer.healthy and self._passes[peer] >= self.config.passes:
                peer.healthy = True
                return True
        else:
            self._passes[peer] = 0
            self._fails[peer] += 1
            if peer.healthy and self._fails[peer] >= self.config.fails:
                peer.healthy = False
                return True
        return False
