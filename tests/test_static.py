from __future__ import annotations

import calendar
import gzip
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import brotli
import pytest

from expserver import httpdate
from expserver.compression import CompressionCache, CompressStream
from expserver.response import FileRange
from expserver.static import SMALL_FILE, UNSATISFIABLE, FileServe, parse_range

T = calendar.timegm((2026, 11, 22, 5, 31, 59))
T_HTTP = "Sun, 22 Nov 2026 05:31:59 GMT"
HELLO = b"hello world\n"
JS = b"".join(b"function f%d() { return %d * 2; }\n" % (i, i) for i in range(400))
FORBIDDEN = (b"content-length", b"transfer-encoding", b"connection", b"server", b"date")


class FakeRequest:
    def __init__(
        self,
        path: bytes,
        method: bytes = b"GET",
        headers: dict[bytes, bytes] | None = None,
        query: bytes = b"",
        version: int = 11,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self._headers = headers or {}

    def get(self, name: bytes) -> bytes | None:
        assert name == name.lower()
        return self._headers.get(name)


@dataclass
class FakeRoute:
    dir_path: str
    req_path: str = "/"
    index: tuple[str, ...] = ("index.html", "index.htm")
    autoindex: bool = True
    dotfiles: str = "deny"
    gzip_enable: bool = False
    gzip_level: int = 6
    brotli_enable: bool = False
    brotli_level: int = 5
    compress_min_length: int = 20


@dataclass
class Answer:
    status: int
    raw_headers: bytes
    headers: dict[str, str]
    body: bytes | None
    raw_body: object


def _parse_headers(raw: bytes) -> dict[str, str]:
    assert raw == b"" or raw.endswith(b"\r\n")
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n")[:-1]:
        name, sep, value = line.partition(b": ")
        assert sep, line
        assert name.lower() not in FORBIDDEN, name
        assert name.decode() not in out, f"duplicate {name!r}"
        out[name.decode()] = value.decode("latin-1")
    return out


def _read(body: object) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, FileRange):
        if body.fd == -1:
            return None
        try:
            return os.pread(body.fd, body.length, body.offset)
        finally:
            if body.shared is None:     # else the route's open-file cache holds it
                os.close(body.fd)
    assert isinstance(body, Iterator)
    return b"".join(body)


def call(
    fs: FileServe, path: bytes, method: bytes = b"GET", query: bytes = b"", **hdrs: str
) -> Answer:
    headers = {k.replace("_", "-").lower().encode(): v.encode("utf-8") for k, v in hdrs.items()}
    status, raw_headers, body = fs.serve(FakeRequest(path, method, headers, query))
    assert isinstance(raw_headers, bytes)
    return Answer(status, raw_headers, _parse_headers(raw_headers), _read(body), body)


def etag(p: Path, suffix: str = "") -> str:
    st = p.stat()
    return f'"{int(st.st_mtime):x}-{st.st_size:x}{suffix}"'


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "hello.txt").write_bytes(HELLO)
    (root / "empty.txt").write_bytes(b"")
    (root / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "app.js").write_bytes(JS)
    (root / "tiny.js").write_bytes(b"x=1")
    (root / "docs").mkdir()
    (root / "docs" / "index.html").write_bytes(b"<h1>docs</h1>")
    (root / "docs" / "deep").mkdir()
    (root / "docs" / "deep" / "a.txt").write_bytes(b"deep")
    (root / "pub").mkdir()
    for name in ["a b.txt", "x<y>&'\".txt", "100%.txt", "caf\u00e9 \u2603.txt", "#hash?.txt"]:
        (root / "pub" / name).write_bytes(name.encode())
    (root / "pub" / os.fsdecode(b"raw\xff.bin")).write_bytes(b"raw")
    (root / "pub" / "sub dir").mkdir()
    (root / "pub" / ".hidden").write_bytes(b"no")
    (root / "noindex").mkdir()
    (root / ".env").write_bytes(b"SECRET=1")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(b"[core]")
    (root / "a%20b").write_bytes(b"literal percent")
    (root / "a b").write_bytes(b"space")
    (tmp_path / "secret.txt").write_bytes(b"top secret")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.txt").write_bytes(b"outside")
    (root / "link_out").symlink_to(tmp_path / "secret.txt")
    (root / "link_in").symlink_to(root / "hello.txt")
    (root / "link_rel").symlink_to("docs/index.html")
    (root / "link_dot").symlink_to(root / ".env")
    (root / "dir_out").symlink_to(tmp_path / "outside")
    (root / "dir_in").symlink_to(root / "docs")
    (root / "dangling").symlink_to(root / "nope")
    os.mkfifo(root / "fifo")
    for p in [root, *root.rglob("*")]:
        os.utime(p, (T, T), follow_symlinks=False)
    return root


@pytest.fixture
def fs(site: Path) -> FileServe:
    return FileServe(FakeRoute(str(site)))


def _gz_route(site: Path, **kw: object) -> FakeRoute:
    return FakeRoute(str(site), gzip_enable=True, brotli_enable=True, **kw)  # type: ignore[arg-type]


# -- plain files -------------------------------------------------------------------------------


def test_get_file_exact_headers_and_body(fs: FileServe, site: Path) -> None:
    a = call(fs, b"/hello.txt")
    assert a.status == 200
    assert a.raw_headers == (
        b"Content-Type: text/plain\r\n"
        b"Last-Modified: " + T_HTTP.encode() + b"\r\n"
        b'ETag: "' + b"%x-%x" % (T, len(HELLO)) + b'"\r\n'
        b"Accept-Ranges: bytes\r\n"
    )
    assert a.raw_body == HELLO  # small files are answered from memory


def test_small_file_memory_copy_follows_changes(fs: FileServe, site: Path) -> None:
    assert call(fs, b"/hello.txt").raw_body == HELLO
    (site / "hello.txt").write_bytes(b"changed!")
    os.utime(site / "hello.txt", (T + 60, T + 60))
    assert call(fs, b"/hello.txt").raw_body == b"changed!"
    assert call(fs, b"/hello.txt", range="bytes=1-3").raw_body == b"han"


def test_large_file_goes_out_with_sendfile(fs: FileServe, site: Path) -> None:
    big = os.urandom(SMALL_FILE + 1)
    (site / "big.bin").write_bytes(big)
    a = call(fs, b"/big.bin")
    assert isinstance(a.raw_body, FileRange)
    assert (a.raw_body.offset, a.raw_body.length) == (0, len(big))
    assert a.body == big


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_large_files_stay_open_for_the_next_requests(fs: FileServe, site: Path) -> None:
    """nginx's open_file_cache: one descriptor per version of a large file, shared by the
    answers sending it, replaced when the file is, closed once nobody sends it."""
    big = site / "big.bin"
    big.write_bytes(b"a" * (SMALL_FILE + 1))
    first, second = call(fs, b"/big.bin"), call(fs, b"/big.bin")
    assert first.raw_body.shared is not None and first.raw_body.shared is second.raw_body.shared
    assert first.raw_body.fd == second.raw_body.fd == first.raw_body.shared.fd
    kept = first.raw_body.shared
    new = site / "big.new"
    new.write_bytes(b"b" * (SMALL_FILE + 7))
    new.rename(big)                             # a deploy: a new inode under the same name
    third = call(fs, b"/big.bin")
    assert third.body == b"b" * (SMALL_FILE + 7) and third.raw_body.shared is not kept
    fd = kept.fd
    assert fd_is_open(fd)                       # the earlier answers may still be sending it
    del first, second, kept
    assert not fd_is_open(fd)                   # ... and once they are done, it is closed
    os.chmod(big, 0o600)                        # a chmod is another version too
    fourth = call(fs, b"/big.bin")
    assert fourth.raw_body.shared is not third.raw_body.shared
    fd = fourth.raw_body.shared.fd
    del third, fourth
    big.unlink()
    assert call(fs, b"/big.bin").status == 404
    assert not fd_is_open(fd)                   # a deleted file is not kept alive


def test_the_open_file_cache_is_bounded(fs: FileServe, site: Path) -> None:
    from expserver.static import _MAX_OPEN
    before = len(os.listdir("/proc/self/fd"))
    for i in range(3 * _MAX_OPEN):
        (site / f"f{i}.bin").write_bytes(b"x" * (SMALL_FILE + 1))
        assert call(fs, f"/f{i}.bin".encode()).status == 200
    assert len(os.listdir("/proc/self/fd")) - before <= _MAX_OPEN


def test_head_does_not_open(fs: FileServe) -> None:
    get = call(fs, b"/hello.txt")
    head = call(fs, b"/hello.txt", b"HEAD")
    assert head.status == 200
    assert head.raw_headers == get.raw_headers
    assert isinstance(head.raw_body, FileRange)
    assert (head.raw_body.fd, head.raw_body.offset, head.raw_body.length) == (-1, 0, len(HELLO))


def test_empty_file(fs: FileServe) -> None:
    a = call(fs, b"/empty.txt")
    assert a.status == 200 and a.body == b""


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"OPTIONS", b"get", b"PATCH"])
def test_other_methods_405(fs: FileServe, method: bytes) -> None:
    a = call(fs, b"/hello.txt", method)
    assert a.status == 405
    assert a.headers == {"Allow": "GET, HEAD", "Content-Type": "text/html"}
    assert a.body is not None and b"405 Method Not Allowed" in a.body


def test_error_page_exact(fs: FileServe) -> None:
    a = call(fs, b"/missing.txt")
    assert a.status == 404
    assert a.raw_headers == b"Content-Type: text/html\r\n"
    assert a.body == (
        b"<!DOCTYPE html>\n<html>\n<head><title>404 Not Found</title></head>\n"
        b"<body>\n<h1>404 Not Found</h1>\n<hr><p>eXpServer</p>\n</body>\n</html>\n"
    )


@pytest.mark.parametrize(
    ("path", "ctype"),
    [(b"/img.png", "image/png"), (b"/app.js", "text/javascript"), (b"/docs/", "text/html")],
)
def test_content_types(fs: FileServe, path: bytes, ctype: str) -> None:
    assert call(fs, path).headers["Content-Type"] == ctype


def test_file_with_trailing_slash_404(fs: FileServe) -> None:
    assert call(fs, b"/hello.txt/").status == 404


def test_fifo_403(fs: FileServe) -> None:
    assert call(fs, b"/fifo").status == 403


# -- path mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (b"//hello.txt", HELLO),
        (b"/docs//deep///a.txt", b"deep"),
        (b"/a%20b", b"space"),
        (b"/a b", b"space"),
        (b"/a%2520b", b"literal percent"),  # decoded exactly once
        (b"/%68ello.txt", HELLO),
        (b"/docs/deep/%61.txt", b"deep"),
        (b"/pub/caf%C3%A9%20%E2%98%83.txt", "caf\u00e9 \u2603.txt".encode()),
        (b"/pub/raw%FF.bin", b"raw"),  # not UTF-8, but the file exists
    ],
)
def test_path_mapping(fs: FileServe, path: bytes, body: bytes) -> None:
    a = call(fs, path)
    assert (a.status, a.body) == (200, body)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (b"/../secret.txt", 400),
        (b"/docs/../hello.txt", 400),
        (b"/%2e%2e/secret.txt", 400),
        (b"/%2E%2E/secret.txt", 400),
        (b"/docs/%2e%2e/%2e%2e/secret.txt", 400),
        (b"/.%2e/secret.txt", 400),
        (b"/./hello.txt", 400),
        (b"/..", 400),
        (b"/docs%2findex.html", 404),
        (b"/docs%2Findex.html", 404),
        (b"/%2e%2e%2fsecret.txt", 404),
        (b"/docs%5cindex.html", 404),
        (b"/docs\\index.html", 404),
        (b"/hello.txt%00.png", 400),
        (b"/hello.txt\x00", 400),
        (b"/hello%zz", 400),
        (b"/hello%2", 400),
        (b"/hello%", 400),
        (b"/%ff%fe", 400),  # invalid UTF-8 naming nothing
        (b"/caf%C3", 400),
        (b"/%2e%2e%2fsecret%00", 400),  # 400 beats 404
        (b"/missing/", 404),
        (b"/hello.txt/x", 404),
    ],
)
def test_path_refusals(fs: FileServe, path: bytes, status: int) -> None:
    a = call(fs, path)
    assert a.status == status
    assert a.headers["Content-Type"] == "text/html"


@pytest.mark.parametrize(
    "path", [b"/.env", b"/.git/config", b"/.git/", b"/%2eenv", b"/pub/.hidden", b"/.nope"]
)
def test_dotfiles_denied_as_404(fs: FileServe, path: bytes) -> None:
    assert call(fs, path).status == 404


def test_dotfiles_allowed(site: Path) -> None:
    fs = FileServe(FakeRoute(str(site), dotfiles="allow"))
    assert call(fs, b"/.env").body == b"SECRET=1"
    assert call(fs, b"/.git/config").body == b"[core]"
    assert call(fs, b"/link_dot").body == b"SECRET=1"
    assert ".hidden" in (call(fs, b"/pub/").body or b"").decode()


# -- symlinks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        (b"/link_out", 403, None),
        (b"/dir_out/x.txt", 403, None),
        (b"/dir_out/", 403, None),
        (b"/dir_out", 403, None),
        (b"/link_dot", 403, None),  # a link may not smuggle a dotfile out under "deny"
        (b"/dangling", 404, None),
        (b"/link_in", 200, HELLO),
        (b"/link_rel", 200, b"<h1>docs</h1>"),
        (b"/dir_in/deep/a.txt", 200, b"deep"),
        (b"/dir_in/", 200, b"<h1>docs</h1>"),
    ],
)
def test_symlinks(fs: FileServe, path: bytes, status: int, body: bytes | None) -> None:
    a = call(fs, path)
    assert a.status == status
    if body is not None:
        assert a.body == body


def test_symlink_typed_by_its_own_name(site: Path) -> None:
    (site / "link.css").symlink_to(site / "app.js")
    fs = FileServe(_gz_route(site), CompressionCache())
    assert call(fs, b"/link_in").headers["Content-Type"] == "application/octet-stream"
    assert call(fs, b"/hello.txt").headers["Content-Type"] == "text/plain"
    assert call(fs, b"/link.css", accept_encoding="gzip").headers["Content-Type"] == "text/css"
    a = call(fs, b"/app.js", accept_encoding="gzip")
    assert a.headers["Content-Type"] == "text/javascript"


def test_listing_hides_outward_symlinks(fs: FileServe) -> None:
    page = (call(fs, b"/").body or b"").decode()
    assert 'href="/link_in"' in page
    assert 'href="/dir_in/"' in page
    for hidden in ("link_out", "dir_out", "link_dot", "dangling", ".env", ".git", "fifo"):
        assert f'href="/{hidden}' not in page


def test_symlink_swap_of_parent_dir_is_caught_after_ttl(site: Path, tmp_path: Path) -> None:
    fs = FileServe(FakeRoute(str(site)))
    assert call(fs, b"/docs/deep/a.txt").status == 200
    (site / "docs" / "deep" / "a.txt").unlink()
    (site / "docs" / "deep").rmdir()
    (site / "docs" / "deep").symlink_to(tmp_path / "outside")
    (tmp_path / "outside" / "a.txt").write_bytes(b"outside")
    fs._parents.clear()  # what PARENT_TTL expiry does
    assert call(fs, b"/docs/deep/a.txt").status == 403


# -- directories -------------------------------------------------------------------------------


def test_directory_redirect(fs: FileServe) -> None:
    a = call(fs, b"/docs")
    assert a.status == 301
    assert a.headers["Location"] == "/docs/"
    assert a.headers["Content-Type"] == "text/html"


def test_directory_redirect_keeps_query_and_normalises(fs: FileServe) -> None:
    assert call(fs, b"/docs", query=b"a=1&b=2").headers["Location"] == "/docs/?a=1&b=2"
    # Never a protocol-relative "//docs/": that would redirect to host "docs".
    assert call(fs, b"//docs").headers["Location"] == "/docs/"
    assert call(fs, b"/pub/sub%20dir").headers["Location"] == "/pub/sub%20dir/"
    assert call(fs, b"/dir_in").headers["Location"] == "/dir_in/"


def test_index_file(fs: FileServe) -> None:
    a = call(fs, b"/docs/")
    assert (a.status, a.body) == (200, b"<h1>docs</h1>")
    assert a.headers["ETag"] == etag(Path(fs._root.decode()) / "docs" / "index.html")


def test_index_order(site: Path) -> None:
    (site / "docs" / "index.htm").write_bytes(b"htm")
    fs = FileServe(FakeRoute(str(site), index=("index.htm", "index.html")))
    assert call(fs, b"/docs/").body == b"htm"


def test_no_index_no_autoindex_403(site: Path) -> None:
    fs = FileServe(FakeRoute(str(site), autoindex=False))
    assert call(fs, b"/noindex/").status == 403
    assert call(fs, b"/docs/").status == 200


def test_listing(fs: FileServe) -> None:
    a = call(fs, b"/pub/")
    assert a.status == 200
    assert a.raw_headers == b"Content-Type: text/html\r\n"
    page = (a.body or b"").decode()
    assert "<title>Index of /pub/</title>" in page
    assert '<a href="/">../</a>' in page
    assert "x&lt;y&gt;&amp;&#x27;&quot;.txt" in page
    assert ".hidden" not in page
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs[0] == "/"
    assert hrefs[1] == "/pub/sub%20dir/"
    assert "/pub/%23hash%3F.txt" in hrefs
    assert "/pub/raw%FF.bin" in hrefs


def test_every_listed_link_is_reachable(fs: FileServe, site: Path) -> None:
    page = (call(fs, b"/pub/").body or b"").decode()
    hrefs = re.findall(r'href="([^"]*)"', page)[1:]
    assert len(hrefs) == 7
    for href in hrefs:
        a = call(fs, href.encode())
        assert a.status == 200, href


def test_root_listing_has_no_parent(fs: FileServe) -> None:
    page = (call(fs, b"/").body or b"").decode()
    assert "../" not in page
    assert "<title>Index of /</title>" in page


def test_head_listing(fs: FileServe) -> None:
    a = call(fs, b"/pub/", b"HEAD")
    assert a.status == 200 and a.body == call(fs, b"/pub/").body


# -- route prefix ------------------------------------------------------------------------------


def test_route_prefix(site: Path) -> None:
    fs = FileServe(FakeRoute(str(site), req_path="/static"))
    assert call(fs, b"/static/hello.txt").body == HELLO
    assert call(fs, b"/static//hello.txt").body == HELLO
    assert call(fs, b"/static").headers["Location"] == "/static/"
    root = (call(fs, b"/static/").body or b"").decode()
    assert "<title>Index of /static/</title>" in root
    assert "../" not in root
    assert 'href="/static/hello.txt"' in root
    sub = (call(fs, b"/static/pub/").body or b"").decode()
    assert '<a href="/static/">../</a>' in sub
    assert call(fs, b"/static/../root/hello.txt").status == 400


def test_route_prefix_with_trailing_slash_in_config(site: Path) -> None:
    fs = FileServe(FakeRoute(str(site), req_path="/files/"))
    assert call(fs, b"/files/hello.txt").body == HELLO


# -- conditional requests ----------------------------------------------------------------------


def test_if_none_match(fs: FileServe, site: Path) -> None:
    tag = etag(site / "hello.txt")
    for value in [tag, f"W/{tag}", f'"nope", {tag}', "*", f' "x" ,W/{tag} ']:
        a = call(fs, b"/hello.txt", if_none_match=value)
        assert a.status == 304, value
        assert a.raw_headers == f"Last-Modified: {T_HTTP}\r\nETag: {tag}\r\n".encode()
        assert a.raw_body is None
    assert call(fs, b"/hello.txt", if_none_match='"nope"').status == 200
    assert call(fs, b"/hello.txt", b"HEAD", if_none_match=tag).status == 304


def test_if_modified_since(fs: FileServe) -> None:
    assert call(fs, b"/hello.txt", if_modified_since=T_HTTP).status == 304
    later = httpdate.format(T + 10)
    assert call(fs, b"/hello.txt", if_modified_since=later).status == 304
    earlier = httpdate.format(T - 1)
    assert call(fs, b"/hello.txt", if_modified_since=earlier).status == 200
    assert call(fs, b"/hello.txt", if_modified_since="Sunday, 22-Nov-26 05:31:59 GMT").status == 304
    assert call(fs, b"/hello.txt", if_modified_since="yesterday").status == 200


def test_if_none_match_overrides_if_modified_since(fs: FileServe) -> None:
    a = call(fs, b"/hello.txt", if_none_match='"other"', if_modified_since=T_HTTP)
    assert a.status == 200


def test_if_match_and_if_unmodified_since(fs: FileServe, site: Path) -> None:
    tag = etag(site / "hello.txt")
    assert call(fs, b"/hello.txt", if_match=tag).status == 200
    assert call(fs, b"/hello.txt", if_match="*").status == 200
    assert call(fs, b"/hello.txt", if_match='"other"').status == 412
    assert call(fs, b"/hello.txt", if_match=f"W/{tag}").status == 412  # strong comparison
    assert call(fs, b"/hello.txt", if_unmodified_since=T_HTTP).status == 200
    a = call(fs, b"/hello.txt", if_unmodified_since=httpdate.format(T - 60))
    assert a.status == 412 and a.headers["Content-Type"] == "text/html"


def test_etag_changes_with_file(fs: FileServe, site: Path) -> None:
    tag = etag(site / "hello.txt")
    (site / "hello.txt").write_bytes(b"changed!")
    os.utime(site / "hello.txt", (T + 5, T + 5))
    a = call(fs, b"/hello.txt", if_none_match=tag)
    assert a.status == 200 and a.body == b"changed!"
    assert a.headers["ETag"] == etag(site / "hello.txt") != tag
    assert a.headers["Last-Modified"] == httpdate.format(T + 5)


# -- ranges ------------------------------------------------------------------------------------

N = len(HELLO)


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [
        ("bytes=0-4", 0, 4),
        ("bytes=6-", 6, N - 1),
        ("bytes=-3", N - 3, N - 1),
        ("bytes=-1000", 0, N - 1),
        ("bytes=3-1000", 3, N - 1),
        ("bytes=0-99999999999999999999999999999", 0, N - 1),
        ("BYTES=1-1", 1, 1),
        ("bytes= 2-3 ", 2, 3),
        ("bytes=2-3,", 2, 3),
        ("bytes=00-04", 0, 4),
    ],
)
def test_range_206(fs: FileServe, spec: str, first: int, last: int) -> None:
    a = call(fs, b"/hello.txt", range=spec)
    assert a.status == 206
    assert a.headers["Content-Range"] == f"bytes {first}-{last}/{N}"
    assert a.headers["Accept-Ranges"] == "bytes"
    assert a.body == HELLO[first : last + 1]


@pytest.mark.parametrize("spec", ["bytes=12-", "bytes=100-200", "bytes=-0", f"bytes={N}-{N}"])
def test_range_416(fs: FileServe, spec: str) -> None:
    a = call(fs, b"/hello.txt", range=spec)
    assert a.status == 416
    assert a.headers == {"Content-Type": "text/html", "Content-Range": f"bytes */{N}"}
    assert a.body is not None and b"416" in a.body


@pytest.mark.parametrize(
    "spec",
    [
        "bytes=5-2",
        "bytes=abc",
        "bytes=1-2-3",
        "bytes=",
        "bytes=-",
        "bytes=+1-2",
        "bytes=1 -2",
        "bytes=\u0661-2",
        "items=0-1",
        "bytes 0-1",
        "bytes=0-1,3-4",  # several ranges: documented policy is the full 200
        "bytes=0-1, 100-200",
    ],
)
def test_range_ignored(fs: FileServe, spec: str) -> None:
    a = call(fs, b"/hello.txt", range=spec)
    assert a.status == 200
    assert "Content-Range" not in a.headers
    assert a.body == HELLO


def test_range_on_empty_file_ignored(fs: FileServe) -> None:
    assert call(fs, b"/empty.txt", range="bytes=0-").status == 200
    assert call(fs, b"/empty.txt", range="bytes=-5").status == 200


def test_head_range(fs: FileServe) -> None:
    a = call(fs, b"/hello.txt", b"HEAD", range="bytes=2-5")
    assert a.status == 206
    assert isinstance(a.raw_body, FileRange)
    assert (a.raw_body.fd, a.raw_body.offset, a.raw_body.length) == (-1, 2, 4)


def test_if_range(fs: FileServe, site: Path) -> None:
    tag = etag(site / "hello.txt")
    assert call(fs, b"/hello.txt", range="bytes=0-1", if_range=tag).status == 206
    assert call(fs, b"/hello.txt", range="bytes=0-1", if_range=T_HTTP).status == 206
    assert call(fs, b"/hello.txt", range="bytes=0-1", if_range='"old"').status == 200
    assert call(fs, b"/hello.txt", range="bytes=0-1", if_range=f"W/{tag}").status == 200
    earlier = httpdate.format(T - 1)
    assert call(fs, b"/hello.txt", range="bytes=0-1", if_range=earlier).status == 200
    # A failed If-Range also turns a would-be 416 into a full 200.
    assert call(fs, b"/hello.txt", range="bytes=999-", if_range='"old"').status == 200


def test_parse_range_unit() -> None:
    assert parse_range(b"bytes=0-0", 1) == (0, 0)
    assert parse_range(b"bytes=0-", 0) is None
    assert parse_range(b"bytes=1-", 1) == UNSATISFIABLE
    assert parse_range(b"bytes=" + b"9" * 5000 + b"-", 10) == UNSATISFIABLE
    assert parse_range(b"bytes=-" + b"9" * 5000, 10) == (0, 9)


# -- compression -------------------------------------------------------------------------------


def test_gzip(site: Path) -> None:
    cache = CompressionCache()
    fs = FileServe(_gz_route(site), cache)
    a = call(fs, b"/app.js", accept_encoding="gzip, deflate")
    assert a.status == 200
    assert a.raw_headers == (
        b"Content-Type: text/javascript\r\n"
        b"Last-Modified: " + T_HTTP.encode() + b"\r\n"
        b'ETag: "' + b"%x-%x" % (T, len(JS)) + b'-gz"\r\n'
        b"Vary: Accept-Encoding\r\n"
        b"Content-Encoding: gzip\r\n"
    )
    assert a.body is not None and gzip.decompress(a.body) == JS
    assert (cache.hits, cache.misses) == (0, 1)
    b = call(fs, b"/app.js", accept_encoding="gzip, deflate")
    assert b.body == a.body
    assert (cache.hits, cache.misses) == (1, 1)


def test_brotli_preferred(site: Path) -> None:
    fs = FileServe(_gz_route(site), CompressionCache())
    a = call(fs, b"/app.js", accept_encoding="gzip, deflate, br")
    assert a.headers["Content-Encoding"] == "br"
    assert a.headers["ETag"] == etag(site / "app.js", "-br")
    assert "Accept-Ranges" not in a.headers
    assert a.body is not None and brotli.decompress(a.body) == JS


def test_identity_of_compressible_file_has_vary(site: Path) -> None:
    fs = FileServe(_gz_route(site), CompressionCache())
    for ae in [None, "identity", "gzip;q=0, br;q=0", "deflate"]:
        a = call(fs, b"/app.js") if ae is None else call(fs, b"/app.js", accept_encoding=ae)
        assert a.body == JS, ae
        assert a.headers["Vary"] == "Accept-Encoding"
        assert a.headers["Accept-Ranges"] == "bytes"
        assert "Content-Encoding" not in a.headers
        assert a.headers["ETag"] == etag(site / "app.js")


@pytest.mark.parametrize("path", [b"/img.png", b"/tiny.js"])
def test_not_compressed_no_vary(site: Path, path: bytes) -> None:
    fs = FileServe(_gz_route(site), CompressionCache())
    a = call(fs, path, accept_encoding="gzip, br")
    assert "Content-Encoding" not in a.headers
    assert "Vary" not in a.headers


def test_compression_disabled_no_vary(fs: FileServe) -> None:
    a = call(fs, b"/app.js", accept_encoding="gzip, br")
    assert "Content-Encoding" not in a.headers and "Vary" not in a.headers
    assert a.body == JS


def test_only_gzip_enabled(site: Path) -> None:
    fs = FileServe(FakeRoute(str(site), gzip_enable=True), CompressionCache())
    assert call(fs, b"/app.js", accept_encoding="br").headers.get("Content-Encoding") is None
    assert call(fs, b"/app.js", accept_encoding="br, gzip").headers["Content-Encoding"] == "gzip"


def test_head_compressed_matches_get(site: Path) -> None:
    fs = FileServe(_gz_route(site), CompressionCache())
    head = call(fs, b"/app.js", b"HEAD", accept_encoding="gzip")
    get = call(fs, b"/app.js", accept_encoding="gzip")
    assert head.raw_headers == get.raw_headers
    assert head.raw_body == get.raw_body  # same bytes, so the same Content-Length


def test_compressed_ignores_range(site: Path) -> None:
    fs = FileServe(_gz_route(site), CompressionCache())
    a = call(fs, b"/app.js", accept_encoding="gzip", range="bytes=0-9")
    assert a.status == 200
    assert "Content-Range" not in a.headers
    assert a.body is not None and gzip.decompress(a.body) == JS


def test_compressed_conditional(site: Path) -> None:
    fs = FileServe(_gz_route(site), CompressionCache())
    tag = call(fs, b"/app.js", accept_encoding="gzip").headers["ETag"]
    a = call(fs, b"/app.js", accept_encoding="gzip", if_none_match=tag)
    assert a.status == 304
    assert a.headers == {"Last-Modified": T_HTTP, "ETag": tag, "Vary": "Accept-Encoding"}
    # The identity tag does not validate the gzip representation, and vice versa.
    assert (
        call(fs, b"/app.js", accept_encoding="gzip", if_none_match=etag(site / "app.js")).status
        == 200
    )
    assert call(fs, b"/app.js", if_none_match=tag).status == 200
    assert call(fs, b"/app.js", if_none_match=etag(site / "app.js")).status == 304


def test_cache_invalidated_when_file_changes(site: Path) -> None:
    cache = CompressionCache()
    fs = FileServe(_gz_route(site), cache)
    first = call(fs, b"/app.js", accept_encoding="gzip")
    new = JS + b"// more\n"
    (site / "app.js").write_bytes(new)
    os.utime(site / "app.js", (T + 1, T + 1))
    second = call(fs, b"/app.js", accept_encoding="gzip")
    assert second.body is not None and gzip.decompress(second.body) == new
    assert second.headers["ETag"] != first.headers["ETag"]
    assert (cache.hits, cache.misses) == (0, 2)
    call(fs, b"/app.js", accept_encoding="gzip")
    assert cache.hits == 1


def test_cache_invalidated_on_same_size_same_mtime_rewrite(site: Path) -> None:
    # A replaced file (new inode) with identical size and mtime must not be served stale.
    cache = CompressionCache()
    fs = FileServe(_gz_route(site), cache)
    call(fs, b"/app.js", accept_encoding="gzip")
    other = JS.replace(b"return", b"RETURN")
    tmp = site / "app.js.tmp"
    tmp.write_bytes(other)
    os.utime(tmp, (T, T))
    keep = site / "keep"
    os.link(site / "app.js", keep)  # hold the old inode so its number is not reused
    os.replace(tmp, site / "app.js")
    a = call(fs, b"/app.js", accept_encoding="gzip")
    assert a.body is not None and gzip.decompress(a.body) == other


def test_cache_stays_under_cap(site: Path) -> None:
    cache = CompressionCache(max_bytes=5000, max_entry_bytes=4000)
    fs = FileServe(_gz_route(site), cache)
    for i in range(30):
        text = b"".join(b"%d-%d " % (i, j) for j in range(400)) + os.urandom(300).hex().encode()
        (site / f"f{i}.txt").write_bytes(text)
        a = call(fs, f"/f{i}.txt".encode(), accept_encoding="gzip")
        assert a.body is not None and gzip.decompress(a.body) == text
        assert cache.size <= 5000
    assert cache.evictions > 0
    assert 0 < len(cache) < 30


def test_large_file_streams_uncached(site: Path) -> None:
    cache = CompressionCache(max_bytes=4096, max_entry_bytes=1024)
    fs = FileServe(_gz_route(site), cache)
    a = call(fs, b"/app.js", accept_encoding="gzip")
    assert isinstance(a.raw_body, CompressStream)
    assert a.body is not None and gzip.decompress(a.body) == JS
    assert len(cache) == 0
    head = call(fs, b"/app.js", b"HEAD", accept_encoding="br")
    assert head.headers["Content-Encoding"] == "br"
    assert head.body == b""


def test_precompressed_sibling(site: Path) -> None:
    cache = CompressionCache()
    fs = FileServe(_gz_route(site), cache)
    pre = gzip.compress(JS, 9, mtime=0)
    sib = site / "app.js.gz"
    sib.write_bytes(pre)
    os.utime(sib, (T + 3, T + 3))
    a = call(fs, b"/app.js", accept_encoding="gzip")
    assert isinstance(a.raw_body, FileRange)
    assert a.body == pre
    assert a.headers["Content-Type"] == "text/javascript"
    assert a.headers["Content-Encoding"] == "gzip"
    assert a.headers["ETag"] == etag(sib, "-gz")
    assert a.headers["Last-Modified"] == httpdate.format(T + 3)
    assert len(cache) == 0  # nothing compressed in memory
    head = call(fs, b"/app.js", b"HEAD", accept_encoding="gzip")
    assert isinstance(head.raw_body, FileRange)
    assert (head.raw_body.fd, head.raw_body.length) == (-1, len(pre))
    assert (
        call(fs, b"/app.js", accept_encoding="gzip", if_none_match=etag(sib, "-gz")).status == 304
    )
    # br is not precompressed: compressed on the fly.
    assert call(fs, b"/app.js", accept_encoding="br").headers["ETag"] == etag(
        site / "app.js", "-br"
    )


def test_precompressed_br_sibling(site: Path) -> None:
    fs = FileServe(_gz_route(site), CompressionCache())
    pre = brotli.compress(JS, quality=11)
    (site / "app.js.br").write_bytes(pre)
    os.utime(site / "app.js.br", (T, T))  # same age as the original counts as fresh
    assert call(fs, b"/app.js", accept_encoding="br, gzip").body == pre


def test_stale_or_symlinked_sibling_ignored(site: Path, tmp_path: Path) -> None:
    fs = FileServe(_gz_route(site), CompressionCache())
    stale = site / "app.js.gz"
    stale.write_bytes(b"stale")
    os.utime(stale, (T - 10, T - 10))
    a = call(fs, b"/app.js", accept_encoding="gzip")
    assert a.body is not None and gzip.decompress(a.body) == JS
    stale.unlink()
    (tmp_path / "evil.gz").write_bytes(b"evil")
    os.utime(tmp_path / "evil.gz", (T + 10, T + 10))
    (site / "app.js.gz").symlink_to(tmp_path / "evil.gz")
    a = call(fs, b"/app.js", accept_encoding="gzip")
    assert a.body is not None and gzip.decompress(a.body) == JS


def test_listing_compressed(site: Path) -> None:
    fs = FileServe(_gz_route(site), CompressionCache())
    plain = call(fs, b"/pub/")
    a = call(fs, b"/pub/", accept_encoding="gzip")
    assert a.headers["Content-Encoding"] == "gzip"
    assert a.headers["Vary"] == "Accept-Encoding"
    assert a.body is not None and gzip.decompress(a.body) == plain.body


# -- httpdate ----------------------------------------------------------------------------------


def test_httpdate_format() -> None:
    assert httpdate.format(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert httpdate.format(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert httpdate.format(T) == T_HTTP


@pytest.mark.parametrize(
    "value",
    [
        b"Sun, 06 Nov 1994 08:49:37 GMT",
        b"Sunday, 06-Nov-94 08:49:37 GMT",
        b"Sun Nov  6 08:49:37 1994",
    ],
)
def test_httpdate_parse_three_forms(value: bytes) -> None:
    assert httpdate.parse(value) == 784111777.0


def test_httpdate_parse_two_digit_year_window() -> None:
    assert httpdate.parse(b"Monday, 01-Jan-70 00:00:00 GMT") is not None
    parsed = httpdate.parse(b"Monday, 01-Jan-01 00:00:00 GMT")
    assert parsed == calendar.timegm((2001, 1, 1, 0, 0, 0))


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"garbage",
        b"Sun, 06 Nov 1994 08:49:37 UTC",
        b"sun, 06 Nov 1994 08:49:37 GMT",
        b"Sun, 06 nov 1994 08:49:37 GMT",
        b"Sun, 31 Nov 1994 08:49:37 GMT",
        b"Sun, 06 Nov 1994 24:00:00 GMT",
        b"Sun, 06 Nov 1994 08:60:00 GMT",
        b"Sun, 06 Nov 1994 08:49:61 GMT",
        b"Sun, 6 Nov 1994 08:49:37 GMT ",
        b"Sun, 06 Nov 1994 08:49:37 GMT ",
        b" Sun, 06 Nov 1994 08:49:37 GMT",
        b"Sun, 06 Nov 0000 08:49:37 GMT",
        b"Sun, 0\xd9\xa1 Nov 1994 08:49:37 GMT",
        b"Sun, +6 Nov 1994 08:49:37 GMT",
        b"Xyz, 06 Nov 1994 08:49:37 GMT",
        b"Sunday, 06-Nov-1994 08:49:37 GMT",
        b"Someday, 06-Nov-94 08:49:37 GMT",
        b"Sun Nov 6 08:49:37 1994",
        b"Sun Nov  6 08:49:37 94",
        b"Sun, 06 Nov 1994 08-49-37 GMT",
        b"Sun, 29 Feb 1900 00:00:00 GMT",
    ],
)
def test_httpdate_parse_rejects(value: bytes) -> None:
    assert httpdate.parse(value) is None


def test_httpdate_roundtrip_leap_day() -> None:
    ts = calendar.timegm((2024, 2, 29, 23, 59, 59))
    assert httpdate.parse(httpdate.format(ts).encode()) == ts
