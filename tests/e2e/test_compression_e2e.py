"""Content-coding (gzip, brotli) through the real process.

A compressed answer is right only if it decodes to the file's exact bytes, says so in its
headers (Content-Encoding, Vary) and is a separate representation (its own ETag).
"""
from __future__ import annotations

import functools
import gzip
import os
import socket
import subprocess
import time

import brotli
import pytest

from .conftest import Reader, request


@functools.cache
def text(size: int, seed: int = 1) -> bytes:
    """Compressible but never-repeating HTML-ish text of exactly ``size`` bytes.

    Every line is distinct, so a chunk lost or sent twice by the server cannot decode right.
    """
    words = ["server", "request", "header", "body", "chunk", "gzip", "brotli", "alpha"]
    lines = [f'<p class="{words[i % 8]}">{seed}:{i} {words[(i * 7 + seed) % 8]} '
             f"{(i * 7919 + seed) % 10007}</p>\n" for i in range(size // 30 + 1)]
    return "".join(lines).encode()[:size]


def route(root, **keys) -> list[dict]:
    return [{"req_path": "/", "type": "file_serve", "dir_path": str(root), **keys}]


def get(served, path: str, *headers: str, method: str = "GET"):
    extra = "".join(f"{h}\r\n" for h in headers)
    raw = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()
    return request(served, raw, head_only=method == "HEAD")


@pytest.fixture
def gz(start, tmp_path):
    """gzip and brotli enabled; a 64 KiB HTML page, a tiny page and an image in the root."""
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True, brotli_enable=True))
    data = text(64 * 1024)
    (root / "page.html").write_bytes(data)
    (root / "tiny.html").write_bytes(b"<p>tiny</p>\n")
    (root / "photo.jpg").write_bytes(text(64 * 1024, seed=2))  # compressible bytes, but a jpeg
    return served, data


def test_gzip(gz):
    served, data = gz
    status, headers, body = get(served, "/page.html", "Accept-Encoding: gzip")
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert headers["vary"] == "Accept-Encoding"
    assert headers["content-type"] == "text/html"
    assert len(body) < len(data) // 2
    assert body[:2] == b"\x1f\x8b"  # the gzip container, not a bare zlib stream
    assert gzip.decompress(body) == data
    assert "accept-ranges" not in headers


def test_gzip_accept_encoding_forms(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True))  # brotli off
    data = text(64 * 1024)
    (root / "page.html").write_bytes(data)
    for ae in ("gzip, deflate", "deflate, gzip;q=0.5", "GZIP", "x-gzip", "gzip;q=1.0", "*",
               "br, gzip", " gzip ; q=0.8 "):
        status, headers, body = get(served, "/page.html", f"Accept-Encoding: {ae}")
        assert headers.get("content-encoding") == "gzip", ae
        assert gzip.decompress(body) == data
    for ae in ("gzip;q=0", "gzip;q=0.000", "identity", "deflate", "br",
               "gzip;q=0.5, identity;q=1", "*;q=0, identity", "gzip;q=0, *"):
        status, headers, body = get(served, "/page.html", f"Accept-Encoding: {ae}")
        assert (status, body) == (200, data), ae
        assert "content-encoding" not in headers, ae
        assert headers["vary"] == "Accept-Encoding", ae


def test_no_accept_encoding_is_identity_with_vary(gz):
    served, data = gz
    status, headers, body = get(served, "/page.html")
    assert (status, body) == (200, data)
    assert "content-encoding" not in headers
    assert headers["vary"] == "Accept-Encoding"
    assert headers["content-length"] == str(len(data))
    assert headers["accept-ranges"] == "bytes"


def test_tiny_file_and_image_never_compressed(gz):
    served, _ = gz
    for path, want_type in (("/tiny.html", "text/html"), ("/photo.jpg", "image/jpeg")):
        expected = (served.root / path[1:]).read_bytes()
        for ae in ("gzip", "br", "gzip, br"):
            status, headers, body = get(served, path, f"Accept-Encoding: {ae}")
            assert (status, body) == (200, expected), (path, ae)
            assert "content-encoding" not in headers, (path, ae)
            assert headers["content-type"] == want_type


def test_compress_min_length_is_configurable(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True, compress_min_length=2000))
    (root / "under.html").write_bytes(text(1999))
    (root / "at.html").write_bytes(text(2000))
    assert "content-encoding" not in get(served, "/under.html", "Accept-Encoding: gzip")[1]
    _status, headers, body = get(served, "/at.html", "Accept-Encoding: gzip")
    assert headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == text(2000)


def test_brotli(gz):
    served, data = gz
    for ae in ("br", "gzip, deflate, br", "br;q=0.9, gzip;q=0.9"):
        status, headers, body = get(served, "/page.html", f"Accept-Encoding: {ae}")
        assert status == 200
        assert headers["content-encoding"] == "br", ae
        assert headers["vary"] == "Accept-Encoding"
        assert brotli.decompress(body) == data
    # gzip preferred by q-value wins over br
    status, headers, body = get(served, "/page.html", "Accept-Encoding: br;q=0.5, gzip")
    assert headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == data


def test_brotli_disabled_falls_back_to_gzip(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True))
    (root / "page.html").write_bytes(text(10_000))
    headers = get(served, "/page.html", "Accept-Encoding: br, gzip")[1]
    assert headers["content-encoding"] == "gzip"


def test_no_compression_unless_enabled(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root))
    data = text(64 * 1024)
    (root / "page.html").write_bytes(data)
    status, headers, body = get(served, "/page.html", "Accept-Encoding: gzip, br")
    assert (status, body) == (200, data)
    assert "content-encoding" not in headers
    assert "vary" not in headers


def test_etags_differ_per_representation(gz):
    served, _ = gz
    ident = get(served, "/page.html")[1]["etag"]
    gzipped = get(served, "/page.html", "Accept-Encoding: gzip")[1]["etag"]
    brotlied = get(served, "/page.html", "Accept-Encoding: br")[1]["etag"]
    assert len({ident, gzipped, brotlied}) == 3
    # each tag validates only its own representation
    assert get(served, "/page.html", "Accept-Encoding: gzip", f"If-None-Match: {gzipped}"
               )[0] == 304
    status, _headers, body = get(served, "/page.html", "Accept-Encoding: gzip",
                                f"If-None-Match: {ident}")
    assert status == 200 and gzip.decompress(body) == gz[1]
    status, _, body = get(served, "/page.html", f"If-None-Match: {gzipped}")
    assert (status, body) == (200, gz[1])
    assert get(served, "/page.html", f"If-None-Match: {ident}")[0] == 304


def test_range_ignored_on_compressed_response(gz):
    served, data = gz
    status, headers, body = get(served, "/page.html", "Accept-Encoding: gzip",
                                "Range: bytes=0-9")
    assert status == 200
    assert "content-range" not in headers
    assert gzip.decompress(body) == data


@pytest.mark.parametrize("size", [64 * 1024, 12 * 1024 * 1024], ids=["cached", "streamed"])
def test_head_with_gzip_has_get_headers(start, tmp_path, size):
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True))
    (root / "page.html").write_bytes(text(size))
    for first in ("HEAD", "GET"):  # HEAD before and after the body is cached
        with served.connect() as sock:
            r = Reader(sock, timeout=20)
            results = {}
            for method in (first, "GET" if first == "HEAD" else "HEAD"):
                sock.sendall(f"{method} /page.html HTTP/1.1\r\nHost: x\r\n"
                             "Accept-Encoding: gzip\r\n\r\n".encode())
                status, headers, body = r.response(head_only=method == "HEAD")
                headers.pop("date")
                results[method] = (status, headers, body)
        assert results["HEAD"][:2] == results["GET"][:2], first
        assert results["HEAD"][2] == b""
        assert gzip.decompress(results["GET"][2]) == text(size)


def test_precompressed_sibling_served_as_is(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True, brotli_enable=True))
    js = b"function f(x) { return x * 2; }\n" * 400
    (root / "app.js").write_bytes(js)
    # mtime/filename in the header make these bytes unlike anything the server would produce
    pre_gz = gzip.compress(js, compresslevel=1, mtime=1234567)
    pre_br = brotli.compress(js, quality=1)
    (root / "app.js.gz").write_bytes(pre_gz)
    (root / "app.js.br").write_bytes(pre_br)
    status, headers, body = get(served, "/app.js", "Accept-Encoding: gzip")
    assert (status, body) == (200, pre_gz)
    assert headers["content-encoding"] == "gzip"
    assert headers["content-type"] == "text/javascript"
    assert headers["vary"] == "Accept-Encoding"
    assert headers["content-length"] == str(len(pre_gz))
    status, headers, body = get(served, "/app.js", "Accept-Encoding: br")
    assert (status, body) == (200, pre_br)
    assert headers["content-encoding"] == "br"
    assert headers["content-type"] == "text/javascript"
    # no Accept-Encoding: the original
    status, headers, body = get(served, "/app.js")
    assert (status, body) == (200, js)
    assert "content-encoding" not in headers


def test_gz_file_requested_by_name_is_not_content_encoded(start, tmp_path):
    """``/x.js.gz`` is a gzip file (a download), not a gzip-encoded JavaScript response."""
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True))
    js = b"console.log(1);\n" * 100
    (root / "x.js").write_bytes(js)
    gz_bytes = gzip.compress(js)
    (root / "x.js.gz").write_bytes(gz_bytes)
    status, headers, body = get(served, "/x.js.gz", "Accept-Encoding: gzip")
    assert (status, body) == (200, gz_bytes)
    assert headers["content-type"] == "application/gzip"
    assert "content-encoding" not in headers


def test_stale_precompressed_sibling_is_ignored(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True))
    new = b"let v = 'new version';\n" * 300
    (root / "app.js").write_bytes(new)
    (root / "app.js.gz").write_bytes(gzip.compress(b"let v = 'OLD';\n" * 300))
    os.utime(root / "app.js.gz", (1_500_000_000, 1_500_000_000))  # older than app.js
    _status, headers, body = get(served, "/app.js", "Accept-Encoding: gzip")
    assert headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == new


def test_curl_compressed(gz):
    served, data = gz
    for enc in ("gzip", "br"):
        out = subprocess.run(
            ["curl", "-s", "--compressed", "-H", f"Accept-Encoding: {enc}",
             "-w", "%{http_code}", "-o", "-", served.url("/page.html")],
            capture_output=True, timeout=30, check=True).stdout
        assert out == data + b"200", enc


def test_large_file_streamed_chunked(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True, brotli_enable=True))
    data = text(12 * 1024 * 1024, seed=7)
    (root / "big.txt").write_bytes(data)
    for enc, decode in (("gzip", gzip.decompress), ("br", brotli.decompress)):
        with served.connect() as sock:
            r = Reader(sock, timeout=30)
            # twice on one connection: the chunked framing must end exactly
            for _ in range(2):
                sock.sendall(b"GET /big.txt HTTP/1.1\r\nHost: x\r\nAccept-Encoding: "
                             + enc.encode() + b"\r\n\r\n")
                status, headers, body = r.response()
                assert status == 200
                assert headers["content-encoding"] == enc
                assert headers["transfer-encoding"] == "chunked"
                assert "content-length" not in headers
                assert decode(body) == data
    # and through curl
    out = subprocess.run(["curl", "-s", "--compressed", "-o", "-", served.url("/big.txt")],
                         capture_output=True, timeout=60, check=True).stdout
    assert out == data


def test_http10_client_gets_compressed_body_without_chunking(start, tmp_path):
    """HTTP/1.0 has no chunked coding: a streamed body must be framed by closing."""
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True))
    data = text(9 * 1024 * 1024, seed=3)
    (root / "big.txt").write_bytes(data)
    with served.connect(timeout=30) as sock:
        sock.sendall(b"GET /big.txt HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
        status, headers, body = Reader(sock, timeout=30).response()
    assert status == 200
    assert "chunked" not in headers.get("transfer-encoding", "")
    if headers.get("content-encoding") == "gzip":
        assert gzip.decompress(body) == data
    else:
        assert body == data


@pytest.mark.parametrize("size", [64 * 1024, 12 * 1024 * 1024], ids=["cached", "streamed"])
def test_compressed_response_follows_edits(start, tmp_path, size):
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True, brotli_enable=True))
    f = root / "page.html"
    v1, v2 = text(size, seed=10), text(size, seed=11)  # same size: only the content differs
    f.write_bytes(v1)
    for enc, decode in (("gzip", gzip.decompress), ("br", brotli.decompress)):
        assert decode(get(served, "/page.html", f"Accept-Encoding: {enc}")[2]) == v1
    time.sleep(0.05)  # beyond the file system's timestamp granularity
    f.write_bytes(v2)
    for enc, decode in (("gzip", gzip.decompress), ("br", brotli.decompress)):
        assert decode(get(served, "/page.html", f"Accept-Encoding: {enc}")[2]) == v2, enc
    assert get(served, "/page.html")[2] == v2


def test_listing_compressed(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    for i in range(40):
        (root / f"file-{i:03}.txt").write_bytes(b"x")
    served = start(routes=route(root, gzip_enable=True))
    plain = get(served, "/")
    status, headers, body = get(served, "/", "Accept-Encoding: gzip")
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert headers["vary"] == "Accept-Encoding"
    assert gzip.decompress(body) == plain[2]


def test_pipelined_requests_behind_a_large_cached_body_are_answered(start, tmp_path):
    """A compressed body from the cache goes out as one piece of memory larger than the
    pipe: the requests queued behind it must be answered as soon as it has been sent, not
    at the header deadline."""
    root = tmp_path / "www"
    root.mkdir()
    served = start(routes=route(root, gzip_enable=True), header_timeout=60)
    data = text(8 * 1024 * 1024)
    (root / "big.html").write_bytes(data)
    (root / "a.txt").write_bytes(b"a")
    assert get(served, "/big.html", "Accept-Encoding: gzip")[0] == 200   # now cached
    big = b"GET /big.html HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n"
    with served.connect(timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(big * 2 + b"GET /a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.5)                     # the server fills the socket and waits
        r = Reader(sock, timeout=10)
        started = time.monotonic()
        for _ in range(2):
            status, headers, body = r.response()
            assert (status, headers["content-encoding"]) == (200, "gzip")
            assert gzip.decompress(body) == data
        assert r.response()[::2] == (200, b"a")
        assert time.monotonic() - started < 8
