"""expserver.acl: eXpServer's ip_whitelist / ip_blacklist semantics."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from expserver.acl import Acl, parse_network


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.168.1.7", "192.168.1.7/32"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.0.0.1/8", "10.0.0.0/8"),  # host bits ignored, as nginx does
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("::1", "::1/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:db8::1/32", "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", "::ffff:a00:0/104"),
    ],
)
def test_parse_network(text: str, expected: str) -> None:
    assert str(parse_network(text)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x", '"x" is not an IP address or CIDR block'),
        ("", '"" is not an IP address or CIDR block'),
        ("1.2.3", '"1.2.3" is not an IP address or CIDR block'),
        ("010.0.0.1", '"010.0.0.1" is not an IP address or CIDR block'),  # octal or decimal?
        (" 10.0.0.1", '" 10.0.0.1" is not an IP address or CIDR block'),
        ("10.0.0.0/8/8", '"10.0.0.0/8/8" has an invalid prefix length (must be 0..32)'),
        ("10.0.0.0/33", '"10.0.0.0/33" has an invalid prefix length (must be 0..32)'),
        ("10.0.0.0/-1", '"10.0.0.0/-1" has an invalid prefix length (must be 0..32)'),
        ("::1/129", '"::1/129" has an invalid prefix length (must be 0..128)'),
        ("host.example/24", '"host.example/24" is not an IP address or CIDR block'),
    ],
)
def test_parse_network_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_network(text)
    assert str(info.value) == message


def test_parse_network_rejects_non_strings() -> None:
    # ipaddress.ip_network(5) would be 0.0.0.5/32; a config's 5 is a mistake.
    with pytest.raises(ValueError, match="is not an IP address or CIDR block"):
        parse_network(5)  # type: ignore[arg-type]


def test_no_rules_allows_everyone() -> None:
    acl = Acl()
    assert acl.empty
    assert acl.allows("203.0.113.9") and acl.allows("::1") and acl.allows("not an address")


def test_whitelist_admits_only_listed_clients() -> None:
    acl = Acl(whitelist=["192.168.1.7", "10.0.0.0/8"])
    assert not acl.empty
    assert acl.allows("192.168.1.7") and acl.allows("10.200.3.4")
    assert not acl.allows("192.168.1.8") and not acl.allows("11.0.0.1")
    assert not acl.allows("::1")  # not listed, whatever the family


def test_blacklist_alone_removes_clients() -> None:
    acl = Acl(blacklist=["203.0.113.0/24", "2001:db8::/32"])
    assert not acl.allows("203.0.113.200") and not acl.allows("2001:db8:1::5")
    assert acl.allows("203.0.114.1") and acl.allows("2001:db9::1") and acl.allows("::1")


def test_blacklist_applies_after_whitelist() -> None:
    acl = Acl(whitelist=["10.0.0.0/8"], blacklist=["10.1.0.0/16", "10.2.3.4"])
    assert acl.allows("10.0.0.1") and acl.allows("10.2.3.5")
    assert not acl.allows("10.1.255.255") and not acl.allows("10.2.3.4")
    assert not acl.allows("172.16.0.1")  # outside the whitelist, not blacklisted


def test_ipv6_entries() -> None:
    acl = Acl(whitelist=["2001:db8::/48", "::1"])
    assert acl.allows("2001:db8:0:ffff::1") and acl.allows("::1")
    assert acl.allows("2001:DB8::1")  # any spelling of the address
    assert not acl.allows("2001:db8:1::1") and not acl.allows("127.0.0.1")


def test_scoped_ipv6_client() -> None:
    # Link-local peers come back from accept() with their interface: "fe80::1%eth0".
    assert Acl(whitelist=["fe80::/10"]).allows("fe80::1%eth0")
    assert not Acl(blacklist=["fe80::/10"]).allows("fe80::1%eth0")


def test_mapped_client_matches_ipv4_entries() -> None:
    acl = Acl(whitelist=["10.0.0.0/8"], blacklist=["10.9.9.9"])
    assert acl.allows("::ffff:10.1.2.3")
    assert not acl.allows("::ffff:10.9.9.9")
    assert not acl.allows("::ffff:11.1.2.3")


def test_ipv4_client_matches_mapped_entries() -> None:
    acl = Acl(whitelist=["::ffff:10.0.0.0/104"], blacklist=["::ffff:10.9.9.9"])
    assert acl.allows("10.1.2.3") and acl.allows("::ffff:10.1.2.3")
    assert not acl.allows("10.9.9.9") and not acl.allows("::ffff:10.9.9.9")
    assert not acl.allows("11.1.2.3")
    assert Acl(whitelist=["::ffff:0:0/96"]).allows("198.51.100.1")  # every IPv4 address


def test_other_ipv6_entries_do_not_match_ipv4_clients() -> None:
    # nginx checks IPv4 clients against IPv4 rules only: ::/0 means "every IPv6 client".
    acl = Acl(blacklist=["::/0"])
    assert acl.allows("192.0.2.1") and acl.allows("::ffff:192.0.2.1")
    assert not acl.allows("2001:db8::1")


def test_unreadable_client_address_is_refused_when_rules_exist() -> None:
    assert not Acl(blacklist=["10.0.0.0/8"]).allows("unix:/run/x.sock")
    assert not Acl(whitelist=["10.0.0.0/8"]).allows("")


@pytest.mark.parametrize(
    ("whitelist", "blacklist"), [(["10.0.0.0/8", "nope"], []), ([], ["::1/200"])]
)
def test_invalid_entries_are_rejected(whitelist: list[str], blacklist: list[str]) -> None:
    with pytest.raises(ValueError):
        Acl(whitelist, blacklist)


def test_decision_cache_is_bounded_and_stays_correct() -> None:
    acl = Acl(whitelist=["10.0.0.0/9"])
    for n in range(10_000):  # 10.0.0.0 .. 10.0.39.15, then the same in 10.128/9
        assert acl.allows(str(ipaddress.IPv4Address(0x0A000000 + n)))
        assert not acl.allows(str(ipaddress.IPv4Address(0x0A800000 + n)))
    assert len(acl._cache) <= 4096  # memory stays bounded under a scan of many clients
    assert acl.allows("10.0.0.1") and not acl.allows("10.128.0.1")


_ACL = Acl(whitelist=["10.0.0.0/8", "::ffff:192.168.0.0/112"], blacklist=["10.66.0.0/16"])


def _within(network: str) -> st.SearchStrategy[int]:
    net = ipaddress.IPv4Network(network)
    return st.integers(int(net.network_address), int(net.broadcast_address))


@given(
    _within("0.0.0.0/0")
    | _within("10.0.0.0/8")
    | _within("10.66.0.0/16")
    | _within("192.168.0.0/16")
)
def test_mapped_and_plain_ipv4_always_agree(n: int) -> None:
    v4 = ipaddress.IPv4Address(n)
    listed = v4 in ipaddress.IPv4Network("10.0.0.0/8") or v4 in ipaddress.IPv4Network(
        "192.168.0.0/16"
    )
    expected = listed and v4 not in ipaddress.IPv4Network("10.66.0.0/16")
    assert _ACL.allows(str(v4)) == _ACL.allows(f"::ffff:{v4}") == expected
