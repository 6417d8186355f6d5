"""Client IP access lists: eXpServer's ``ip_whitelist`` / ``ip_blacklist``.

Semantics (eXpServer's, with nginx's handling of address families):

* A non-empty whitelist admits only the clients it lists; the blacklist then removes clients.
  No rules at all admits everyone, and callers skip the check (:attr:`Acl.empty`).
* An entry is a single address or a CIDR block, IPv4 or IPv6. Host bits after the prefix are
  ignored (``10.0.0.1/8`` is ``10.0.0.0/8``), as nginx's ``allow``/``deny`` do.
* IPv4 and IPv4-mapped IPv6 are one address space: a dual-stack listener reports an IPv4
  client as ``::ffff:a.b.c.d``, and a rule must not change meaning with the listener's family.
  So a mapped client is checked as its IPv4 address, and an entry inside ``::ffff:0:0/96`` is
  stored as its IPv4 equivalent. Other IPv6 entries (even ``::/0``) never match an IPv4
  client, as in nginx, where IPv4 clients are checked against IPv4 rules only.

:meth:`Acl.allows` runs once per request, so decisions are cached per address string.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Clients mostly come back (keep-alive, reloads of a page), so a small cache removes nearly all
# parsing. It is cleared wholesale when full: simpler than LRU, and a scan of many distinct
# addresses then costs what it would cost with no cache at all.
_CACHE_SIZE = 4096

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_network(text: str) -> IPNetwork:
    """Parse one ACL entry: an IPv4/IPv6 address or CIDR block. Raises ValueError."""
    if not isinstance(text, str):  # ip_network() would also take an int or a tuple
        raise ValueError(f"{text!r} is not an IP address or CIDR block")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    # Tell a bad prefix apart from a bad address: "10.0.0.0/33" is a near miss worth naming.
    address, slash, _prefix = text.partition("/")
    if slash:
        try:
            bits = ipaddress.ip_address(address).max_prefixlen
        except ValueError:
            pass
        else:
            raise ValueError(f'"{text}" has an invalid prefix length (must be 0..{bits})')
    raise ValueError(f'"{text}" is not an IP address or CIDR block')


def _as_ipv4(network: IPNetwork) -> IPNetwork:
    """The IPv4 network an IPv4-mapped IPv6 network stands for; other networks unchanged."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        ipv4 = network.network_address.ipv4_mapped
        assert ipv4 is not None  # guaranteed by subnet_of(_MAPPED)
        return ipaddress.IPv4Network((ipv4, network.prefixlen - 96))
    return network


def _compile(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(_as_ipv4(parse_network(entry)) for entry in entries)


def _matches(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    # `in` across families is simply False, so one list serves both.
    return any(address in network for network in networks)


class Acl:
    """A whitelist and a blacklist, checked as eXpServer does. Entries are validated here."""

    __slots__ = ("_blacklist", "_cache", "_whitelist")

    def __init__(self, whitelist: Sequence[str] = (), blacklist: Sequence[str] = ()) -> None:
        self._whitelist = _compile(whitelist)
        self._blacklist = _compile(blacklist)
        self._cache: dict[str, bool] = {}

    @property
    def empty(self) -> bool:
        """True when there are no rules: every client is allowed and callers may skip us."""
        return not self._whitelist and not self._blacklist

    def allows(self, ip: str) -> bool:
        """Whether client address ``ip`` (as the socket reports it) may be served."""
        decision = self._cache.get(ip)
        if decision is None:
            decision = self._decide(ip)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[ip] = decision
        return decision

    def _decide(self, ip: str) -> bool:
        if self.empty:
            return True
        try:
            address: IPAddress = ipaddress.ip_address(ip)
        except ValueError:
            # An address we cannot read cannot be shown to be allowed: with rules in force,
            # fail closed rather than let it slip past a blacklist.
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if self._whitelist and not _matches(address, self._whitelist):
            return False
        return not _matches(address, self._blacklist)

    def __repr__(self) -> str:
        white = [str(n) for n in self._whitelist]
        black = [str(n) for n in self._blacklist]
        return f"Acl(whitelist={white}, blacklist={black})"
