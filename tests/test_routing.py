"""Route and virtual-host selection (eXpServer's rules)."""
import pytest

from expserver.routing import RouteTable, VirtualHosts, match_path


@pytest.fixture
def table():
    return RouteTable([("/", "root"), ("/api", "api"), ("/api/v2", "v2"), ("/static/", "static")])


@pytest.mark.parametrize(("path", "route"), [
    (b"/", "root"), (b"/x", "root"), (b"/api", "api"), (b"/api/", "api"), (b"/api/x", "api"),
    (b"/api2", "root"), (b"/api/v2", "v2"), (b"/api/v2/y", "v2"), (b"/api/v2y", "api"),
    (b"/static", "static"), (b"/static/a.css", "static"), (b"/staticx", "root"),
])
def test_longest_prefix_on_slash_boundaries(table, path, route):
    assert table.match(path) == route


def test_no_route_without_root():
    assert RouteTable([("/api", "api")]).match(b"/other") is None


@pytest.mark.parametrize(("raw", "matched"), [
    (b"/plain", b"/plain"),
    (b"/%70rivate/x", b"/private/x"),
    (b"/a%2Fb", b"/a%2Fb"),            # an encoded slash is no boundary
    (b"/a%2fb%2F", b"/a%2Fb%2F"),
    (b"//a///b", b"/a/b"),
    (b"/caf%C3%A9", "/café".encode()),
    (b"/bad%zz", b"/bad%zz"),          # left for the handler to refuse
])
def test_match_path_decodes_once(raw, matched):
    assert match_path(raw) == matched


def test_virtual_hosts_first_match_then_catch_all():
    hosts = VirtualHosts([(("a.example",), "A"), (("B.example", "c.example"), "BC"), ((), "any")])
    assert hosts.select(b"a.example") == "A"
    assert hosts.select(b"b.example") == "BC"
    assert hosts.select(b"c.example.") == "BC"
    assert hosts.select(b"other") == "any"
    assert hosts.select(b"") == "any"


def test_unknown_host_without_catch_all_is_none():
    assert VirtualHosts([(("a.example",), "A")]).select(b"b.example") is None
