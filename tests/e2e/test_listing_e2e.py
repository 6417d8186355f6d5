"""Directory listings (autoindex) through the real process.

The page is parsed the way a browser would read it (html.parser), and every link on it is
followed: a listing is only right if each entry it shows can be fetched by its link and gives
that entry's exact bytes.
"""
from __future__ import annotations

import calendar
import os
from html.parser import HTMLParser
from urllib.parse import unquote_to_bytes

import pytest

from .conftest import request

# Names that break naive listings: HTML metacharacters, URL delimiters, spaces, non-ASCII,
# and a name that is not UTF-8 at all (POSIX names are bytes).
TRICKY_FILES: list[bytes] = [
    os.fsencode(n) for n in [
        "a<b.txt", "x&y.txt", 'q"uote.txt', "it's.txt", "100%.txt", "100%25.txt",
        "hash#tag.txt", "what?.txt", "with space.txt", "plus+sign.txt", "semi;colon.txt",
        "ünïcødé.txt", "日本語.txt", "<script>alert(1)<script>.html",
        "Zebra.TXT", "apple.txt",
    ]
] + [b"bad\xff\xfename.txt", b"latin1-\xe9t\xe9.txt"]
TRICKY_DIRS: list[bytes] = [os.fsencode(n) for n in ["Zeta dir", "alpha&dir", "<dir>", "ä#?"]]


class Rows(HTMLParser):
    """Table rows of a listing: [(href, link text, [cell texts])], plus the <title>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[tuple[str | None, str, list[str]]] = []
        self.title = ""
        self.tables = 0
        self._in_title = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._href: str | None = None
        self._link: list[str] | None = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag == "table":
            self.tables += 1
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row, self._href, self._link = [], None, None
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "a" and self._row is not None:
            self._href = dict(attrs).get("href")
            self._link = []

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag == "tbody":
            self._in_body = False
        elif tag == "a" and self._link is not None:
            self._link_text = "".join(self._link)
            self._link = None
        elif tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append((self._href, getattr(self, "_link_text", ""), self._row))
            self._row = None

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._cell is not None:
            self._cell.append(data)
        if self._link is not None:
            self._link.append(data)


def parse(page: bytes) -> Rows:
    p = Rows()
    p.feed(page.decode("utf-8"))
    p.close()
    return p


def get(served, path: str | bytes, method: str = "GET"):
    if isinstance(path, str):
        path = path.encode("ascii")
    return request(served, method.encode() + b" " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                   head_only=method == "HEAD")


def label(name: bytes, is_dir: bool) -> str:
    return name.decode("utf-8", "replace") + ("/" if is_dir else "")


def content_of(name: bytes) -> bytes:
    return b"content of " + name + b"\n"


@pytest.fixture
def tricky(start):
    served = start()
    d = os.fsencode(served.root / "ldir")
    os.mkdir(d)
    for name in TRICKY_FILES:
        with open(d + b"/" + name, "wb") as f:
            f.write(content_of(name))
    for name in TRICKY_DIRS:
        os.mkdir(d + b"/" + name)
        with open(d + b"/" + name + b"/inner.txt", "wb") as f:
            f.write(b"inside " + name + b"\n")
    # never listed: a dotfile (hidden by default) and a symlink leading out of the root
    with open(d + b"/.hidden", "wb") as f:
        f.write(b"hidden\n")
    outside = served.root.parent / "outside.txt"
    outside.write_bytes(b"outside bytes\n")
    os.symlink(outside, d + b"/escape.txt")
    os.symlink(b"no-such-target", d + b"/dangling.txt")
    os.mkfifo(d + b"/pipe.fifo")  # never served, so never listed (and never opened)
    # listed: a symlink that stays inside the root
    os.symlink(b"apple.txt", d + b"/alias.txt")
    return served


def test_listing_page_shape(tricky):
    status, headers, page = get(tricky, "/ldir/")
    assert status == 200
    assert headers["content-type"] == "text/html"
    rows = parse(page)
    assert rows.tables == 1
    assert rows.title == "Index of /ldir/"
    # "../" first, then one row per entry: nothing hidden shows, nothing is missing
    assert rows.rows[0][:2] == ("/", "../")
    entries = rows.rows[1:]
    want = {label(n, False) for n in TRICKY_FILES} | {label(n, True) for n in TRICKY_DIRS}
    want.add("alias.txt")
    assert {text for _, text, _ in entries} == want
    for absent in (b".hidden", b"escape.txt", b"outside", b"dangling", b"pipe.fifo"):
        assert absent not in page, absent
    assert get(tricky, "/ldir/pipe.fifo")[0] in (403, 404)


def test_directories_first_then_files_sorted(tricky):
    rows = parse(get(tricky, "/ldir/")[2]).rows[1:]
    texts = [text for _, text, _ in rows]
    dirs = [t for t in texts if t.endswith("/")]
    files = [t for t in texts if not t.endswith("/")]
    assert texts == dirs + files
    assert len(dirs) == len(TRICKY_DIRS)
    assert dirs == sorted(dirs, key=str.casefold)
    assert files == sorted(files, key=str.casefold)
    # case does not split the order: "apple" < "Zebra" < "日本語"
    assert files.index("apple.txt") < files.index("Zebra.TXT") < files.index("日本語.txt")


def test_names_are_html_escaped(tricky):
    page = get(tricky, "/ldir/")[2]
    assert b"a&lt;b.txt" in page
    assert b"x&amp;y.txt" in page
    assert b"&lt;script&gt;alert(1)&lt;script&gt;.html" in page
    assert b"<script>" not in page
    assert b"a<b" not in page
    assert b"<dir>" not in page
    assert b'q"uote' not in page  # would end an attribute early if put in one raw


def test_every_href_is_absolute_and_fetches_that_entry(tricky):
    page = get(tricky, "/ldir/")[2]
    rows = parse(page).rows[1:]
    names = {label(n, False): n for n in TRICKY_FILES}
    names.update({label(n, True): n for n in TRICKY_DIRS})
    names["alias.txt"] = b"apple.txt"
    for href, text, _ in rows:
        assert href is not None and href.startswith("/ldir/"), href
        assert href.isascii() and " " not in href and "#" not in href and "?" not in href
        name = names[text]
        status, headers, body = get(tricky, href)
        assert status == 200, (href, status)
        if text.endswith("/"):
            assert unquote_to_bytes(href) == b"/ldir/" + name + b"/"
            assert headers["content-type"] == "text/html"
            inner = parse(body)
            assert [t for _, t, _ in inner.rows] == ["../", "inner.txt"]
            # the nested page's links work too
            assert get(tricky, inner.rows[1][0])[2] == b"inside " + name + b"\n"
            assert get(tricky, inner.rows[0][0])[0] == 200
        else:
            if text != "alias.txt":
                assert unquote_to_bytes(href) == b"/ldir/" + name
            assert body == content_of(name), href


def test_non_utf8_name_shown_with_replacement_and_linked_by_bytes(tricky):
    page = get(tricky, "/ldir/")[2]
    rows = {text: href for href, text, _ in parse(page).rows}
    href = rows["bad\ufffd\ufffdname.txt"]
    assert href == "/ldir/bad%FF%FEname.txt"
    assert get(tricky, href)[::2] == (200, content_of(b"bad\xff\xfename.txt"))
    # lower-case hex is the same name
    assert get(tricky, "/ldir/bad%ff%fename.txt")[0] == 200


def test_sizes_and_mtimes(start):
    served = start()
    d = served.root / "sizes"
    d.mkdir()
    sizes = {"ten.bin": 10, "zero.bin": 0, "k.bin": 1234, "m.bin": 3 * 1024 * 1024,
             "big.bin": 20 * 1024 * 1024, "kb.bin": 1024}
    for name, size in sizes.items():
        with open(d / name, "wb") as f:
            f.truncate(size)  # sparse: the listing only stats them
    (d / "sub").mkdir()
    when = calendar.timegm((2021, 3, 4, 5, 6, 7))
    for p in d.iterdir():
        os.utime(p, (when, when))
    rows = {text: cells for _, text, cells in parse(get(served, "/sizes/")[2]).rows}
    shown = {name: rows[name][1] for name in sizes}
    assert shown == {"ten.bin": "10 B", "zero.bin": "0 B", "k.bin": "1.2 KiB",
                     "m.bin": "3.0 MiB", "big.bin": "20 MiB", "kb.bin": "1.0 KiB"}
    assert rows["sub/"][1] == "-"
    for name in [*sizes, "sub/"]:
        assert rows[name][2] == "2021-03-04 05:06", name


def test_root_listing_has_no_parent_row(start):
    served = start()
    (served.root / "only.txt").write_bytes(b"x")
    rows = parse(get(served, "/")[2]).rows
    assert [(h, t) for h, t, _ in rows] == [("/only.txt", "only.txt")]


def test_empty_directory(start):
    served = start()
    (served.root / "empty").mkdir()
    status, _, page = get(served, "/empty/")
    assert status == 200
    assert [t for _, t, _ in parse(page).rows] == ["../"]


def test_listing_under_a_route_prefix(start, tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    (root / "d").mkdir()
    (root / "d" / "x y.txt").write_bytes(b"xy\n")
    (root / "top.txt").write_bytes(b"top\n")
    served = start(routes=[{"req_path": "/files", "type": "file_serve", "dir_path": str(root)}])
    rows = parse(get(served, "/files/")[2]).rows
    assert [(h, t) for h, t, _ in rows] == [("/files/d/", "d/"), ("/files/top.txt", "top.txt")]
    rows = parse(get(served, "/files/d/")[2]).rows
    assert [(h, t) for h, t, _ in rows] == [("/files/", "../"), ("/files/d/x%20y.txt", "x y.txt")]
    assert get(served, rows[1][0])[::2] == (200, b"xy\n")
    assert get(served, "/files")[1]["location"] == "/files/"


def test_dotfiles_listed_when_allowed(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / ".well-known").mkdir()
    (root / ".env").write_bytes(b"E=1\n")
    served = start(routes=[{"req_path": "/", "type": "file_serve", "dir_path": str(root),
                            "dotfiles": "allow"}])
    rows = parse(get(served, "/")[2]).rows
    assert [(h, t) for h, t, _ in rows] == [("/.well-known/", ".well-known/"), ("/.env", ".env")]
    assert get(served, "/.env")[::2] == (200, b"E=1\n")


def test_autoindex_off_is_403(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "plain").mkdir()
    (root / "plain" / "a.txt").write_bytes(b"a\n")
    (root / "withindex").mkdir()
    (root / "withindex" / "index.html").write_bytes(b"<p>idx</p>\n")
    served = start(routes=[{"req_path": "/", "type": "file_serve", "dir_path": str(root),
                            "autoindex": False}])
    status, _, body = get(served, "/plain/")
    assert status == 403
    assert b"a.txt" not in body
    assert get(served, "/")[0] == 403
    assert get(served, "/withindex/")[::2] == (200, b"<p>idx</p>\n")
    assert get(served, "/plain/a.txt")[::2] == (200, b"a\n")


def test_head_of_listing(tricky):
    _gs, gh, page = get(tricky, "/ldir/")
    hs, hh, body = get(tricky, "/ldir/", method="HEAD")
    assert (hs, body) == (200, b"")
    assert hh["content-length"] == gh["content-length"] == str(len(page))


def test_listing_sees_new_files(start):
    served = start()
    (served.root / "d").mkdir()
    (served.root / "d" / "one.txt").write_bytes(b"1")
    assert [t for _, t, _ in parse(get(served, "/d/")[2]).rows] == ["../", "one.txt"]
    (served.root / "d" / "two.txt").write_bytes(b"2")
    (served.root / "d" / "one.txt").unlink()
    assert [t for _, t, _ in parse(get(served, "/d/")[2]).rows] == ["../", "two.txt"]
