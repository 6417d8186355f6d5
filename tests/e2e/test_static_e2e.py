"""Static files through the real process: types, validators, ranges, paths, big files.

Every assertion is about what a client sees: the status, exact header values and exact body
bytes. Documents are written into ``served.root`` before they are requested; the "secret"
files used by the traversal tests live beside the root, never under it.
"""
from __future__ import annotations

import http.client
import os
import random
import socket
import subprocess
import time
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from urllib.parse import quote

import pytest

from .conftest import Reader, request

SECRET = b"TOP-SECRET-BYTES-never-served\n"


def get(served, path: str | bytes, *headers: str, method: str = "GET"):
    """One request on a fresh connection: (status, headers, body)."""
    if isinstance(path, str):
        path = path.encode("utf-8")
    extra = "".join(f"{h}\r\n" for h in headers).encode("latin-1")
    raw = method.encode() + b" " + path + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"
    return request(served, raw, head_only=method == "HEAD")


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-s", "--max-time", "20", *args],
                          capture_output=True, timeout=30, check=True)


# -- media types --------------------------------------------------------------------------------

CONTENT_TYPES = {
    "photo.jpg": "image/jpeg",
    "photo.JPEG": "image/jpeg",
    "paper.pdf": "application/pdf",
    "notes.txt": "text/plain",
    "data.json": "application/json",
    "page.html": "text/html",
    "site.css": "text/css",
    "blob.qqqunknown": "application/octet-stream",
    "README": "application/octet-stream",
    "archive.tar.gz": "application/gzip",
}


def test_content_type_is_exact(start):
    served = start()
    for name in CONTENT_TYPES:
        (served.root / name).write_bytes(f"content of {name}\n".encode())
    got = {}
    for name in CONTENT_TYPES:
        status, headers, body = get(served, "/" + name)
        assert (status, body) == (200, f"content of {name}\n".encode()), name
        assert headers["content-length"] == str(len(body))
        got[name] = headers["content-type"]
    # exact: no "; charset=..." appended to text types (eXpServer's and nginx's default)
    assert got == CONTENT_TYPES


# -- validators and conditional requests --------------------------------------------------------

def test_etag_and_last_modified(start):
    served = start()
    f = served.root / "a.txt"
    f.write_bytes(b"hello\n")
    mtime = 1_600_000_000
    os.utime(f, (mtime, mtime))
    status, headers, _ = get(served, "/a.txt")
    assert status == 200
    assert headers["last-modified"] == formatdate(mtime, usegmt=True)
    etag = headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 2
    assert headers["accept-ranges"] == "bytes"
    # the same version gives the same validator on a second request
    assert get(served, "/a.txt")[1]["etag"] == etag


def test_if_none_match_304_then_200_after_change(start):
    served = start()
    f = served.root / "a.txt"
    f.write_bytes(b"version one\n")
    _, headers, _ = get(served, "/a.txt")
    etag = headers["etag"]
    status, h304, body = get(served, "/a.txt", f"If-None-Match: {etag}")
    assert (status, body) == (304, b"")
    assert h304["etag"] == etag
    # a list holding our tag, and "*", match too
    assert get(served, "/a.txt", f'If-None-Match: "nope", {etag}')[0] == 304
    assert get(served, "/a.txt", "If-None-Match: *")[0] == 304
    assert get(served, "/a.txt", 'If-None-Match: "nope"')[0] == 200

    f.write_bytes(b"version two, longer\n")
    later = time.time() + 5
    os.utime(f, (later, later))
    status, headers, body = get(served, "/a.txt", f"If-None-Match: {etag}")
    assert (status, body) == (200, b"version two, longer\n")
    assert headers["etag"] != etag


def test_if_modified_since_304_then_200_after_change(start):
    served = start()
    f = served.root / "a.txt"
    f.write_bytes(b"version one\n")
    os.utime(f, (1_600_000_000, 1_600_000_000))
    _, headers, _ = get(served, "/a.txt")
    lm = headers["last-modified"]
    status, _, body = get(served, "/a.txt", f"If-Modified-Since: {lm}")
    assert (status, body) == (304, b"")
    # a later date than the file's is "not modified" as well
    assert get(served, "/a.txt", "If-Modified-Since: " + formatdate(1_700_000_000, usegmt=True)
               )[0] == 304
    # an earlier one is not
    assert get(served, "/a.txt", "If-Modified-Since: " + formatdate(1_500_000_000, usegmt=True)
               )[0] == 200

    f.write_bytes(b"version 2!!!\n")
    os.utime(f, (1_600_000_100, 1_600_000_100))
    status, headers, body = get(served, "/a.txt", f"If-Modified-Since: {lm}")
    assert (status, body) == (200, b"version 2!!!\n")
    assert headers["last-modified"] == formatdate(1_600_000_100, usegmt=True)


def test_etag_changes_on_same_size_edit_within_a_second(start):
    """A strong ETag must change whenever the bytes change (RFC 9110 8.8.3).

    Editors and live-reload tools save and re-request within milliseconds; an ETag built
    from the whole-second mtime and the size answers 304 for the old bytes.
    """
    served = start()
    f = served.root / "app.css"
    f.write_bytes(b"a{color:red}\n")
    etag = get(served, "/app.css")[1]["etag"]
    time.sleep(0.05)  # beyond the file system's timestamp granularity, inside one second
    f.write_bytes(b"a{color:tan}\n")
    status, headers, body = get(served, "/app.css", f"If-None-Match: {etag}")
    assert (status, body) == (200, b"a{color:tan}\n")
    assert headers["etag"] != etag


def test_same_size_edit_is_seen_without_conditionals(start):
    """An edit that keeps the size is served at once (the in-memory copy is revalidated)."""
    served = start()
    f = served.root / "a.txt"
    f.write_bytes(b"AAAA\n")
    assert get(served, "/a.txt")[2] == b"AAAA\n"
    time.sleep(0.05)  # beyond the file system's timestamp granularity
    f.write_bytes(b"BBBB\n")
    assert get(served, "/a.txt")[2] == b"BBBB\n"


# -- ranges ------------------------------------------------------------------------------------

# 100 bytes (memory path) and 100 KiB (sendfile path) take different code paths in the server.
@pytest.mark.parametrize("size", [100, 100 * 1024], ids=["small", "large"])
def test_ranges(start, size):
    served = start()
    data = random.Random(size).randbytes(size)
    (served.root / "r.bin").write_bytes(data)

    status, headers, body = get(served, "/r.bin")
    assert (status, body) == (200, data)
    assert headers["accept-ranges"] == "bytes"

    cases = {
        "bytes=0-9": (0, 9),
        "bytes=-5": (size - 5, size - 1),
        "bytes=10-": (10, size - 1),
        f"bytes=5-{size + 1000}": (5, size - 1),  # end clamped to the file
    }
    for spec, (first, last) in cases.items():
        status, headers, body = get(served, "/r.bin", f"Range: {spec}")
        assert status == 206, spec
        assert headers["content-range"] == f"bytes {first}-{last}/{size}", spec
        assert headers["content-length"] == str(last - first + 1), spec
        assert body == data[first:last + 1], spec
        assert headers["content-type"] == "application/octet-stream"

    for spec in (f"bytes={size}-", f"bytes={size + 50}-{size + 60}", "bytes=-0"):
        status, headers, body = get(served, "/r.bin", f"Range: {spec}")
        assert status == 416, spec
        assert headers["content-range"] == f"bytes */{size}", spec
        assert SECRET not in body

    # HEAD + Range mirrors GET + Range
    status, headers, _ = get(served, "/r.bin", "Range: bytes=0-9", method="HEAD")
    assert (status, headers["content-range"], headers["content-length"]) == (
        206, f"bytes 0-9/{size}", "10")


def test_range_with_stale_if_range_sends_whole_file(start):
    served = start()
    data = bytes(range(256))
    (served.root / "r.bin").write_bytes(data)
    etag = get(served, "/r.bin")[1]["etag"]
    lm = get(served, "/r.bin")[1]["last-modified"]
    status, headers, body = get(served, "/r.bin", "Range: bytes=0-9", f"If-Range: {etag}")
    assert (status, body, headers["content-range"]) == (206, data[:10], "bytes 0-9/256")
    status, headers, body = get(served, "/r.bin", "Range: bytes=0-9", f"If-Range: {lm}")
    assert (status, body) == (206, data[:10])
    for stale in ('"old"', "W/" + etag, "Mon, 01 Jan 2001 00:00:00 GMT"):
        status, headers, body = get(served, "/r.bin", "Range: bytes=0-9", f"If-Range: {stale}")
        assert (status, body) == (200, data), stale
        assert "content-range" not in headers
    # Range headers the server does not honour give the whole file, never an error
    for spec in ("bytes=5-2", "items=0-1", "bytes=0-1,5-6", "bytes=abc"):
        status, _, body = get(served, "/r.bin", f"Range: {spec}")
        assert (status, body) == (200, data), spec


# -- paths -------------------------------------------------------------------------------------

def test_double_slashes_collapse(start):
    served = start()
    (served.root / "a").mkdir()
    (served.root / "a" / "b.txt").write_bytes(b"in a\n")
    for path in ("//a//b.txt", "/a//b.txt", "///a///b.txt"):
        status, headers, body = get(served, path)
        assert (status, body) == (200, b"in a\n"), path
        assert headers["content-type"] == "text/plain"


def test_directory_without_slash_redirects(start):
    served = start()
    (served.root / "dir").mkdir()
    (served.root / "dir" / "index.html").write_bytes(b"<p>index</p>\n")
    status, headers, _ = get(served, "/dir")
    assert status == 301
    assert headers["location"] == "/dir/"
    status, headers, _ = get(served, "/dir?a=1&b=2")
    assert (status, headers["location"]) == (301, "/dir/?a=1&b=2")
    # "//dir" must not become the protocol-relative Location "//dir/" (another host)
    status, headers, _ = get(served, "//dir")
    assert (status, headers["location"]) == (301, "/dir/")


def test_directory_redirect_keeps_the_name_encoded(start):
    served = start()
    for name in ("my dir", "what?", "hash#", "caf\u00e9", "100%"):
        (served.root / name).mkdir()
        (served.root / name / "f.txt").write_bytes(name.encode() + b"\n")
    os.mkdir(os.fsencode(served.root) + b"/bad\xffdir")
    cases = {"/my%20dir": "/my%20dir/", "/what%3F": "/what%3F/", "/hash%23": "/hash%23/",
             "/caf%C3%A9": "/caf%C3%A9/", "/100%25": "/100%25/", "/bad%FFdir": "/bad%FFdir/"}
    for path, location in cases.items():
        status, headers, _ = get(served, path)
        assert (status, headers.get("location")) == (301, location), path
        # and the Location leads to the directory
        assert get(served, location)[0] == 200, location


def test_index_symlink_leading_out_is_not_served(start):
    served = start()
    (served.root.parent / "secret").write_bytes(SECRET)
    (served.root / "d").mkdir()
    (served.root / "d" / "index.html").symlink_to(served.root.parent / "secret")
    (served.root / "d" / "other.txt").write_bytes(b"other\n")
    status, _, body = get(served, "/d/")
    assert SECRET not in body
    assert status in (200, 403, 404)
    assert b"index.html" not in body  # a listing must not show what cannot be fetched


def test_index_file_is_served(start):
    served = start()
    (served.root / "index.html").write_bytes(b"<h1>root index</h1>\n")
    (served.root / "sub").mkdir()
    (served.root / "sub" / "index.html").write_bytes(b"<h1>sub index</h1>\n")
    status, headers, body = get(served, "/")
    assert (status, body) == (200, b"<h1>root index</h1>\n")
    assert headers["content-type"] == "text/html"
    status, headers, body = get(served, "/sub/")
    assert (status, body) == (200, b"<h1>sub index</h1>\n")
    assert headers["content-type"] == "text/html"
    # a file is not a directory
    assert get(served, "/sub/index.html/")[0] == 404


def test_configured_index_names_in_order(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=[{"req_path": "/", "type": "file_serve", "dir_path": str(root),
                            "index": ["home.htm", "index.txt"]}])
    (root / "index.html").write_bytes(b"not an index here\n")
    (root / "index.txt").write_bytes(b"second choice\n")
    status, headers, body = get(served, "/")
    assert (status, body, headers["content-type"]) == (200, b"second choice\n", "text/plain")
    (root / "home.htm").write_bytes(b"<b>first</b>\n")
    status, headers, body = get(served, "/")
    assert (status, body, headers["content-type"]) == (200, b"<b>first</b>\n", "text/html")


@pytest.fixture
def jailed(start):
    """A server whose root has a secret file (and directory) right beside it."""
    served = start()
    outside = served.root.parent
    (outside / "secret").write_bytes(SECRET)
    (outside / "secretdir").mkdir()
    (outside / "secretdir" / "secret").write_bytes(SECRET)
    (served.root / "sub").mkdir()
    (served.root / "ok.txt").write_bytes(b"ok\n")
    (served.root / "link").symlink_to(outside / "secret")
    (served.root / "linkdir").symlink_to(outside / "secretdir")
    (served.root / "sub" / "uplink").symlink_to("../../secret")
    return served


TRAVERSALS = [
    "/../secret",
    "/sub/../../secret",
    "/%2e%2e/secret",
    "/%2E%2E/secret",
    "/.%2e/secret",
    "/%2E%2E%2Fsecret",
    "/..%2fsecret",
    "/..%2Fsecret",
    "/sub%2f..%2f..%2fsecret",
    "/..%5csecret",
    "/..\\secret",
    "/sub/%2e%2e/%2e%2e/secret",
    "/%252e%252e/secret",
    "/secret%00",
    "/ok.txt%00",
    "/ok.txt%00.jpg",
    "/link",
    "/linkdir/secret",
    "/linkdir/",
    "/sub/uplink",
    "/./../secret",
]


def test_traversal_never_leaks(jailed):
    for path in TRAVERSALS:
        status, headers, body = get(jailed, path)
        assert status in (400, 403, 404), (path, status, body[:200])
        assert SECRET not in body, path
        assert "secret" not in headers.get("location", ""), path


def test_traversal_on_one_keep_alive_connection(jailed):
    """The refusals are answers, not dropped connections: the next request still works."""
    with jailed.connect() as sock:
        r = Reader(sock)
        for path in TRAVERSALS:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, _, body = r.response()
            assert status in (400, 403, 404), path
            assert SECRET not in body
            sock.sendall(b"GET /ok.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            assert r.response()[::2] == (200, b"ok\n"), path


def test_traversal_via_curl_path_as_is(jailed):
    out = curl("--path-as-is", "-o", "-", "-w", "\n%{http_code}", jailed.url("/../secret"))
    assert SECRET not in out.stdout
    assert out.stdout.rsplit(b"\n", 1)[1] in (b"400", b"403", b"404")


def test_symlink_inside_root_is_followed(start):
    served = start()
    (served.root / "real.txt").write_bytes(b"real\n")
    (served.root / "alias.txt").symlink_to("real.txt")
    assert get(served, "/alias.txt")[::2] == (200, b"real\n")


def test_dotfiles_hidden_by_default(start):
    served = start()
    (served.root / ".env").write_bytes(b"PASSWORD=x\n")
    (served.root / ".git").mkdir()
    (served.root / ".git" / "config").write_bytes(b"[core]\n")
    for path in ("/.env", "/.git/config", "/.git/", "/.git", "/%2eenv"):
        status, _, body = get(served, path)
        assert status == 404, path
        assert b"PASSWORD" not in body and b"[core]" not in body


def test_dotfiles_allowed(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=[{"req_path": "/", "type": "file_serve", "dir_path": str(root),
                            "dotfiles": "allow"}])
    (root / ".env").write_bytes(b"PASSWORD=x\n")
    (root / ".well-known").mkdir()
    (root / ".well-known" / "security.txt").write_bytes(b"Contact: x\n")
    assert get(served, "/.env")[::2] == (200, b"PASSWORD=x\n")
    assert get(served, "/.well-known/security.txt")[::2] == (200, b"Contact: x\n")


def test_unicode_and_space_names(start):
    served = start()
    names = ["my file.txt", "ünïcödé €.txt", "日本語.txt", "a+b=c&d.txt", "100%.txt"]
    for name in names:
        (served.root / name).write_bytes(name.encode() + b"\n")
    for name in names:
        status, headers, body = get(served, "/" + quote(name))
        assert (status, body) == (200, name.encode() + b"\n"), name
        assert headers["content-type"] == "text/plain"
    # a client that does not encode the safe sub-delims ("+", "=", "&") reaches it as well
    assert get(served, "/a+b=c&d.txt")[0] == 200


def test_bad_percent_encoding_is_400(start):
    served = start()
    for path in ("/%zz", "/a%2", "/%"):
        assert get(served, path)[0] == 400, path


# -- big files ---------------------------------------------------------------------------------

BIG = 5 * 1024 * 1024


@pytest.fixture
def big(start):
    served = start()
    data = random.Random(5).randbytes(BIG)
    (served.root / "big.bin").write_bytes(data)
    return served, data


def test_big_file_via_curl(big, tmp_path):
    served, data = big
    out = tmp_path / "download.bin"
    result = curl("-o", str(out), "-w", "%{http_code} %{size_download}", served.url("/big.bin"))
    assert result.stdout == f"200 {BIG}".encode()
    assert out.read_bytes() == data


def test_big_file_via_http_client(big):
    served, data = big
    conn = http.client.HTTPConnection(*served.addr, timeout=10)
    try:
        for _ in range(2):  # twice on one keep-alive connection
            conn.request("GET", "/big.bin")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.getheader("Content-Length") == str(BIG)
            assert resp.read() == data
        conn.request("GET", "/big.bin", headers={"Range": "bytes=1000000-1999999"})
        resp = conn.getresponse()
        assert resp.status == 206
        assert resp.read() == data[1_000_000:2_000_000]
    finally:
        conn.close()


def test_a_big_file_replaced_or_deleted_while_kept_open(start):
    """Large files stay open between requests (nginx's open_file_cache): a file replaced
    under its name is served new at once, one deleted gets 404 and is no longer held open
    (its disk space is freed), and concurrent downloads of one file share one descriptor."""
    served = start()
    data = random.Random(5).randbytes(32 << 20)    # more than the socket buffers hold
    (served.root / "big.bin").write_bytes(data)
    pid = served.server.worker_pid

    def open_files() -> list[str]:
        fds = Path(f"/proc/{pid}/fd")
        return [os.readlink(fds / n) for n in os.listdir(fds) if (fds / n).exists()]

    readers = []
    for _ in range(4):                  # four downloads in flight on one file
        sock = served.connect()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        readers.append((sock, bytearray(sock.recv(4096))))     # each one is being answered
    big_path = str((served.root / "big.bin").resolve())
    assert open_files().count(big_path) == 1
    new = random.Random(6).randbytes(BIG)
    (served.root / "big.new").write_bytes(new)
    (served.root / "big.new").rename(served.root / "big.bin")
    assert get(served, "/big.bin")[2] == new
    for sock, got in readers:           # the old version, whole, to those who asked for it
        while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + len(data):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        head, _, body = bytes(got).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and body == data
        sock.close()
    (served.root / "big.bin").unlink()
    assert get(served, "/big.bin")[0] == 404
    deadline = time.monotonic() + 5
    while any(big_path in link for link in open_files()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [link for link in open_files() if big_path in link]


# -- HEAD --------------------------------------------------------------------------------------

def test_head_matches_get(start):
    served = start()
    sizes = {"empty": 0, "small": 10, "medium": 40_000, "big": BIG}
    for name, size in sizes.items():
        (served.root / f"{name}.txt").write_bytes(b"x" * size)
    for name, size in sizes.items():
        with served.connect() as sock:
            r = Reader(sock)
            # HEAD then GET on one connection: a HEAD that leaked a body would desync the GET
            sock.sendall(f"HEAD /{name}.txt HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            hs, hh, _ = r.response(head_only=True)
            sock.sendall(f"GET /{name}.txt HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            gs, gh, body = r.response()
        assert hs == gs == 200, name
        assert len(body) == size, name
        assert hh["content-length"] == gh["content-length"] == str(size), name
        hh.pop("date"), gh.pop("date")
        assert hh == gh, name


def test_head_of_listing_and_index_match_get(start):
    served = start()
    (served.root / "d").mkdir()
    (served.root / "d" / "x.txt").write_bytes(b"x")
    (served.root / "i").mkdir()
    (served.root / "i" / "index.html").write_bytes(b"<p>i</p>")
    for path in ("/d/", "/i/"):
        gs, gh, body = get(served, path)
        hs, hh, hbody = get(served, path, method="HEAD")
        assert (hs, hbody) == (gs, b"")
        assert hh["content-length"] == gh["content-length"] == str(len(body)), path


def test_curl_head_matches_raw_head(start):
    served = start()
    f = served.root / "page.html"
    f.write_bytes(b"<!doctype html><title>t</title>\n")
    os.utime(f, (1_600_000_000, 1_600_000_000))
    out = curl("-sI", served.url("/page.html")).stdout.decode("latin-1")
    lines = out.split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    curl_headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            curl_headers[name.strip().lower()] = value.strip()
    _, raw_headers, _ = get(served, "/page.html", method="HEAD")
    for h in (curl_headers, raw_headers):
        assert h.pop("date")
    assert curl_headers == raw_headers
    assert curl_headers["content-type"] == "text/html"
    assert curl_headers["content-length"] == "32"
    assert curl_headers["server"] == "eXpServer"
    assert curl_headers["last-modified"] == "Sun, 13 Sep 2020 12:26:40 GMT"
    parsedate_to_datetime(curl_headers["last-modified"])


def test_methods_other_than_get_head(start):
    served = start()
    (served.root / "a.txt").write_bytes(b"a")
    status, headers, _ = request(
        served, b"POST /a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert Path(served.root / "a.txt").read_bytes() == b"a"
