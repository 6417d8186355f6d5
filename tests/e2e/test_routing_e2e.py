"""Server and route selection, redirects and IP access lists through the real process."""
from __future__ import annotations

import pytest

from .conftest import Reader, request


def get(served, path: str = "/", host: str = "x", method: str = "GET", version: str = "1.1"):
    host_line = f"Host: {host}\r\n" if host is not None else ""
    raw = f"{method} {path} HTTP/{version}\r\n{host_line}\r\n".encode()
    return request(served, raw, head_only=method == "HEAD")


def fs(req_path: str, root, **keys) -> dict:
    return {"req_path": req_path, "type": "file_serve", "dir_path": str(root), **keys}


def redirect(req_path: str, url: str, code: int | None = None, **keys) -> dict:
    r = {"req_path": req_path, "type": "redirect", "redirect_url": url, **keys}
    if code is not None:
        r["http_status_code"] = code
    return r


def make_root(tmp_path, name: str, files: dict[str, bytes]):
    root = tmp_path / name
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    root.mkdir(exist_ok=True)
    return root


# -- longest prefix ----------------------------------------------------------------------------

@pytest.fixture
def prefixes(start, tmp_path):
    top = make_root(tmp_path, "top", {"api2": b"top:/api2\n", "x": b"top:/x\n",
                                      "apix/y": b"top:/apix/y\n", "index.html": b"top index\n"})
    api = make_root(tmp_path, "api", {"x": b"api:/x\n", "v2y": b"api:/v2y\n",
                                      "index.html": b"api index\n", "v3/y": b"api:/v3/y\n"})
    v2 = make_root(tmp_path, "v2", {"y": b"v2:/y\n", "index.html": b"v2 index\n"})
    # listed in an order that is not the matching order
    return start(routes=[fs("/api", api), fs("/", top), fs("/api/v2", v2)])


PREFIX_CASES = [
    ("/x", b"top:/x\n"),
    ("/api2", b"top:/api2\n"),            # not on a "/" boundary: not /api
    ("/apix/y", b"top:/apix/y\n"),
    ("/api/x", b"api:/x\n"),
    ("/api/v2y", b"api:/v2y\n"),          # not /api/v2
    ("/api/v3/y", b"api:/v3/y\n"),
    ("/api/v2/y", b"v2:/y\n"),
    ("/", b"top index\n"),
    ("/api/", b"api index\n"),
    ("/api/v2/", b"v2 index\n"),
    ("//api//v2//y", b"v2:/y\n"),         # collapsed before matching
    ("/api/x?q=/api/v2/y", b"api:/x\n"),  # the query plays no part
]


def test_longest_prefix_on_slash_boundaries(prefixes):
    got = {path: get(prefixes, path)[::2] for path, _ in PREFIX_CASES}
    assert got == {path: (200, body) for path, body in PREFIX_CASES}


def test_percent_encoded_path_selects_the_route_it_names(prefixes):
    """Routes are chosen by the path the request names, as the file server reads it.

    ``/%61pi/x`` *is* ``/api/x`` (RFC 3986 6.2.2.2: unreserved characters percent-encoded are
    equivalent); nginx decodes before matching locations. Choosing the route on the raw bytes
    while the ``/`` route decodes them serves the name from the wrong route.
    """
    cases = {"/%61pi/x": b"api:/x\n", "/ap%69/v%32/y": b"v2:/y\n", "/%61pi%2Fv2/y": None}
    for path, body in cases.items():
        status, _, got = get(prefixes, path)
        if body is None:
            assert status == 404, path  # encoded "/" names no resource of ours
        else:
            assert (status, got) == (200, body), path


def test_non_ascii_route_reached_by_percent_encoded_request(start, tmp_path):
    root = make_root(tmp_path, "cafe", {"menu.txt": b"menu\n"})
    served = start(routes=[fs("/caf\u00e9", root)])
    # what every browser and curl sends for http://host/café/menu.txt
    assert get(served, "/caf%C3%A9/menu.txt")[::2] == (200, b"menu\n")


def test_route_root_without_slash_redirects(prefixes):
    for path, location in (("/api", "/api/"), ("/api/v2", "/api/v2/")):
        status, headers, _ = get(prefixes, path)
        assert (status, headers["location"]) == (301, location)


def test_prefix_with_trailing_slash_in_config(start, tmp_path):
    root = make_root(tmp_path, "docs", {"a.txt": b"doc a\n"})
    served = start(routes=[fs("/docs/", root)])
    assert get(served, "/docs/a.txt")[::2] == (200, b"doc a\n")
    assert get(served, "/docsa.txt")[0] == 404
    assert get(served, "/")[0] == 404


def test_no_matching_route_is_404(start, tmp_path):
    root = make_root(tmp_path, "api", {"x": b"x"})
    served = start(routes=[fs("/api", root)])
    for path in ("/", "/x", "/api2", "/ap", "/API/x"):
        assert get(served, path)[0] == 404, path
    assert get(served, "/api/x")[0] == 200


# -- redirects ---------------------------------------------------------------------------------

def test_redirect_codes_and_location(start):
    codes = (301, 302, 303, 307, 308)
    url = "https://example.com/new/place?a=1&b=2"
    served = start(routes=[redirect(f"/r{code}", f"{url}&c={code}", code) for code in codes])
    for code in codes:
        for path in (f"/r{code}", f"/r{code}/deeper/path", f"/r{code}?x=1"):
            for method in ("GET", "HEAD"):
                status, headers, _body = get(served, path, method=method)
                assert status == code, (path, method)
                assert headers["location"] == f"{url}&c={code}"
    assert get(served, "/r3010")[0] == 404


def test_redirect_default_code_is_302(start):
    served = start(routes=[redirect("/", "http://example.org/")])
    status, headers, body = get(served, "/anything")
    assert (status, headers["location"]) == (302, "http://example.org/")
    assert b"http://example.org/" in body


def test_redirect_location_with_non_ascii_is_encoded(start):
    served = start(routes=[redirect("/", "https://example.com/caf\u00e9/menu", 301)])
    status, headers, _ = get(served, "/")
    assert status == 301
    assert headers["location"] == "https://example.com/caf%C3%A9/menu"


def test_redirect_and_files_side_by_side(start, tmp_path):
    root = make_root(tmp_path, "www", {"a.txt": b"A\n"})
    served = start(routes=[fs("/", root), redirect("/go", "https://example.com/", 308)])
    assert get(served, "/a.txt")[::2] == (200, b"A\n")
    status, headers, _ = get(served, "/go/x")
    assert (status, headers["location"]) == (308, "https://example.com/")
    assert get(served, "/gone")[0] == 404  # a file route: no such file, not the redirect


# -- virtual hosts -----------------------------------------------------------------------------

@pytest.fixture
def vhosts(start, tmp_path):
    a = make_root(tmp_path, "a", {"who": b"site a\n"})
    b = make_root(tmp_path, "b", {"who": b"site b\n"})
    return start(servers=[
        {"hostnames": ["a.example", "www.a.example"], "routes": [fs("/", a)]},
        {"hostnames": ["b.example"], "routes": [fs("/", b)]},
    ])


def test_virtual_host_by_host_header(vhosts):
    cases = {
        "a.example": b"site a\n",
        "www.a.example": b"site a\n",
        "b.example": b"site b\n",
        "a.example:8080": b"site a\n",   # port ignored
        "B.Example": b"site b\n",        # case-insensitive
        "WWW.A.EXAMPLE:1": b"site a\n",
    }
    got = {host: get(vhosts, "/who", host=host)[::2] for host in cases}
    assert got == {host: (200, body) for host, body in cases.items()}


def test_unknown_host_is_404_without_catch_all(vhosts):
    for host in ("c.example", "example", "a.example.evil", "127.0.0.1", "xa.example"):
        status, _, body = get(vhosts, "/who", host=host)
        assert status == 404, host
        assert b"site" not in body


def test_host_with_trailing_dot(vhosts):
    # "a.example." is the fully qualified spelling of "a.example" (curl sends it as typed);
    # nginx drops the trailing dot before choosing a server
    assert get(vhosts, "/who", host="a.example.")[::2] == (200, b"site a\n")
    assert get(vhosts, "/who", host="b.example.:8080")[::2] == (200, b"site b\n")


def test_host_from_absolute_form_target_wins(vhosts):
    # RFC 9112 3.2.2: with an absolute-form target the Host header is ignored
    status, _, body = get(vhosts, "http://b.example/who", host="a.example")
    assert (status, body) == (200, b"site b\n")


def test_host_switch_on_one_connection(vhosts):
    with vhosts.connect() as sock:
        r = Reader(sock)
        for host, body in [("a.example", b"site a\n"), ("b.example", b"site b\n"),
                           ("nope.example", None), ("a.example", b"site a\n")]:
            sock.sendall(f"GET /who HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            status, _, got = r.response()
            if body is None:
                assert status == 404
            else:
                assert (status, got) == (200, body)


def test_first_matching_server_wins_and_catch_all(start, tmp_path):
    a = make_root(tmp_path, "a", {"who": b"site a\n"})
    c = make_root(tmp_path, "c", {"who": b"catch-all\n"})
    b = make_root(tmp_path, "b", {"who": b"site b\n"})
    served = start(servers=[
        {"hostnames": ["a.example"], "routes": [fs("/", a)]},
        {"routes": [fs("/", c)]},                           # no hostnames: any host
        {"hostnames": ["b.example"], "routes": [fs("/", b)]},  # shadowed by the catch-all
    ])
    assert get(served, "/who", host="a.example")[2] == b"site a\n"
    assert get(served, "/who", host="unknown.example")[2] == b"catch-all\n"
    assert get(served, "/who", host="b.example")[2] == b"catch-all\n"


def test_http10_without_host(start, tmp_path):
    a = make_root(tmp_path, "a", {"who": b"site a\n"})
    c = make_root(tmp_path, "c", {"who": b"catch-all\n"})
    served = start(servers=[
        {"hostnames": ["a.example"], "routes": [fs("/", a)]},
        {"routes": [fs("/", c)]},
    ])
    assert get(served, "/who", host=None, version="1.0")[::2] == (200, b"catch-all\n")


# -- IP access lists ---------------------------------------------------------------------------

ACL_CASES = [
    ({"ip_whitelist": ["127.0.0.1"]}, 200),
    ({"ip_whitelist": ["127.0.0.0/8"]}, 200),
    ({"ip_whitelist": ["::ffff:127.0.0.1"]}, 200),
    ({"ip_whitelist": ["10.0.0.0/8"]}, 403),
    ({"ip_whitelist": ["10.0.0.1", "192.168.0.0/16"]}, 403),
    ({"ip_whitelist": ["::1"]}, 403),        # IPv6 rules never match an IPv4 client
    ({"ip_blacklist": ["127.0.0.0/8"]}, 403),
    ({"ip_blacklist": ["127.0.0.1"]}, 403),
    ({"ip_blacklist": ["10.0.0.0/8"]}, 200),
    ({"ip_whitelist": ["127.0.0.0/8"], "ip_blacklist": ["127.0.0.1"]}, 403),
    ({"ip_whitelist": ["127.0.0.0/8"], "ip_blacklist": ["127.0.0.2"]}, 200),
]


def test_route_acl(start, tmp_path):
    """One route per case, each with its own lists, all on one server."""
    root = make_root(tmp_path, "www", {"a.txt": b"A\n"})
    served = start(routes=[fs(f"/c{i}", root, **keys) for i, (keys, _) in enumerate(ACL_CASES)])
    for i, (keys, want) in enumerate(ACL_CASES):
        status, _, body = get(served, f"/c{i}/a.txt")
        assert status == want, keys
        assert (body == b"A\n") == (want == 200), keys


def test_route_acl_only_guards_its_route(start, tmp_path):
    root = make_root(tmp_path, "www", {"a.txt": b"A\n", "private/p.txt": b"P\n"})
    served = start(routes=[fs("/", root),
                           fs("/private", root / "private", ip_blacklist=["127.0.0.1"])])
    assert get(served, "/a.txt")[::2] == (200, b"A\n")
    status, _, body = get(served, "/private/p.txt")
    assert status == 403 and body != b"P\n"
    assert get(served, "/private/nothing")[0] == 403  # denied before looking for the file


def test_route_acl_not_bypassed_by_percent_encoding(start, tmp_path):
    """A route's ACL must guard every spelling of its paths, not only the literal one."""
    root = make_root(tmp_path, "www", {"a.txt": b"A\n", "private/p.txt": b"PRIVATE\n"})
    served = start(routes=[fs("/", root),
                           fs("/private", root / "private", ip_blacklist=["127.0.0.1"])])
    for path in ("/private/p.txt", "/%70rivate/p.txt", "/priv%61te/p.txt",
                 "/%70%72%69%76%61%74%65/p.txt", "//%70rivate//p.txt"):
        status, _, body = get(served, path)
        assert status == 403, path
        assert b"PRIVATE" not in body, path


def test_server_blacklist_applies_to_all_routes(start, tmp_path):
    root = make_root(tmp_path, "www", {"a.txt": b"A\n", "sub/b.txt": b"B\n"})
    served = start(servers=[{
        "ip_blacklist": ["127.0.0.0/8"],
        "routes": [fs("/", root), fs("/sub", root / "sub", ip_whitelist=["127.0.0.1"]),
                   redirect("/go", "https://example.com/", 301)],
    }])
    for path in ("/a.txt", "/sub/b.txt", "/go", "/", "/missing"):
        status, headers, body = get(served, path)
        assert status in (403, 404), path
        assert status == 403 or path == "/missing", path
        assert "location" not in headers
        assert body not in (b"A\n", b"B\n")


def test_server_whitelist_with_route_blacklist(start, tmp_path):
    root = make_root(tmp_path, "www", {"a.txt": b"A\n", "sub/b.txt": b"B\n"})
    served = start(servers=[{
        "ip_whitelist": ["127.0.0.1"],
        "routes": [fs("/", root), fs("/sub", root / "sub", ip_blacklist=["127.0.0.1"])],
    }])
    assert get(served, "/a.txt")[::2] == (200, b"A\n")
    assert get(served, "/sub/b.txt")[0] == 403


def test_acl_denies_on_keep_alive_and_keeps_connection(start, tmp_path):
    root = make_root(tmp_path, "www", {"a.txt": b"A\n", "deny/d.txt": b"D\n"})
    served = start(routes=[fs("/", root), fs("/deny", root / "deny", ip_whitelist=["10.0.0.0/8"])])
    with served.connect() as sock:
        r = Reader(sock)
        for path, want in [("/deny/d.txt", 403), ("/a.txt", 200), ("/deny/d.txt", 403)]:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert r.response()[0] == want


# -- a server with no routes -------------------------------------------------------------------

@pytest.mark.parametrize("server", [{"routes": []}, {}], ids=["empty-routes", "no-routes-key"])
def test_server_without_routes_is_404(start, server):
    """Everything is 404 but /api, where eXpServer's dashboard reads the metrics."""
    served = start(servers=[server])
    for method in ("GET", "HEAD"):
        status, headers, _ = get(served, "/api", method=method)
        assert (status, headers["content-type"]) == (200, "application/json")
    for path in ("/", "/index.html", "/api2", "/a/b/c?d=e"):
        for method in ("GET", "HEAD"):
            status, headers, _ = get(served, path, method=method)
            assert status == 404, (path, method)
            assert headers["server"] == "eXpServer"
