from __future__ import annotations

import calendar
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from expserver import listing
from expserver.listing import Entry

T = calendar.timegm((2026, 11, 22, 5, 31, 59))


def _rows(page: bytes) -> list[tuple[str, str, str, str]]:
    """(href, label, size, mtime) of every table row."""
    return re.findall(
        r'<tr><td><a href="([^"]*)">([^<]*)</a></td><td class="s">([^<]*)</td>'
        r'<td class="m">([^<]*)</td></tr>',
        page.decode("utf-8"),
    )


def test_page_shape() -> None:
    page = listing.render(b"/files/", [Entry(b"a.txt", False, 5, T)], parent=True)
    text = page.decode()
    assert text.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in text
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    assert "<title>Index of /files/</title>" in text
    assert "<h1>Index of /files/</h1>" in text
    assert "<table>" in text and "</table>" in text
    assert _rows(page) == [
        ("/", "../", "-", ""),
        ("/files/a.txt", "a.txt", "5 B", "2026-11-22 05:31"),
    ]


def test_no_parent_row_at_route_root() -> None:
    page = listing.render(b"/", [Entry(b"a", True, 0, T)], parent=False)
    assert _rows(page) == [("/a/", "a/", "-", "2026-11-22 05:31")]


def test_parent_of_nested_dir_is_absolute() -> None:
    page = listing.render(b"/x/y z/", [], parent=True)
    assert _rows(page) == [("/x/", "../", "-", "")]


def test_sorting_dirs_first_then_case_insensitive() -> None:
    entries = [
        Entry(b"b.txt", False, 1, T),
        Entry(b"A.txt", False, 1, T),
        Entry(b"zdir", True, 0, T),
        Entry(b"Bdir", True, 0, T),
        Entry(b"a.txt", False, 1, T),
    ]
    labels = [r[1] for r in _rows(listing.render(b"/", entries, parent=False))]
    assert labels == ["Bdir/", "zdir/", "A.txt", "a.txt", "b.txt"]


def test_names_escaped_and_hrefs_encoded() -> None:
    entries = [
        Entry(b"a <b> & \"c\" 'd'.txt", False, 1, T),
        Entry(b"100% real#?.txt", False, 1, T),
        Entry("caf\u00e9 \u2603".encode(), True, 0, T),
    ]
    page = listing.render(b"/my dir/", entries, parent=True)
    text = page.decode()
    assert "<b>" not in text
    rows = _rows(page)
    assert (
        "/my%20dir/100%25%20real%23%3F.txt",
        "100% real#?.txt",
        "1 B",
        "2026-11-22 05:31",
    ) in rows
    assert (
        "/my%20dir/a%20%3Cb%3E%20%26%20%22c%22%20%27d%27.txt",
        "a &lt;b&gt; &amp; &quot;c&quot; &#x27;d&#x27;.txt",
        "1 B",
        "2026-11-22 05:31",
    ) in rows
    assert (
        "/my%20dir/caf%C3%A9%20%E2%98%83/",
        "caf\u00e9 \u2603/",
        "-",
        "2026-11-22 05:31",
    ) in rows
    assert "<title>Index of /my dir/</title>" in text


def test_title_is_escaped() -> None:
    page = listing.render(b"/<x>&/", [], parent=True).decode()
    assert "<title>Index of /&lt;x&gt;&amp;/</title>" in page


def test_non_utf8_name_linked_by_its_bytes() -> None:
    page = listing.render(b"/", [Entry(b"bad\xff.bin", False, 3, T)], parent=False)
    assert _rows(page) == [("/bad%FF.bin", "bad\ufffd.bin", "3 B", "2026-11-22 05:31")]


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (10 * 1024, "10 KiB"),
        (5 * 1024 * 1024 + 1, "5.0 MiB"),
        (300 * 1024**3, "300 GiB"),
        (2 * 1024**5, "2.0 PiB"),
        (5000 * 1024**5, "5000 PiB"),
    ],
)
def test_human_size(n: int, text: str) -> None:
    assert listing.human_size(n) == text


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "file.txt").write_bytes(b"hello")
    (root / "sub").mkdir()
    (root / ".env").write_bytes(b"SECRET=1")
    (root / ".git").mkdir()
    (root / "back\\slash").write_bytes(b"x")
    (root / "out.lnk").symlink_to(tmp_path)
    (root / "in.lnk").symlink_to(root / "file.txt")
    (root / "dangling").symlink_to(root / "nope")
    os.mkfifo(root / "fifo")
    (root / os.fsdecode(b"raw\xfe")).write_bytes(b"1234")
    os.utime(root / "file.txt", (T, T))
    return root


def _follow_inside(root: Path) -> Callable[[bytes], os.stat_result | None]:
    real_root = os.fsencode(os.path.realpath(root))

    def follow(p: bytes) -> os.stat_result | None:
        real = os.path.realpath(p, strict=True)
        return os.stat(real) if real.startswith(real_root + b"/") else None

    return follow


def test_scan_filters(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    entries = listing.scan(os.fsencode(root), True, _follow_inside(root))
    by_name = {e.name: e for e in entries}
    assert set(by_name) == {b"file.txt", b"sub", b"in.lnk", b"raw\xfe"}
    assert by_name[b"file.txt"] == Entry(b"file.txt", False, 5, T)
    assert by_name[b"sub"].is_dir
    assert by_name[b"in.lnk"].size == 5  # the target's size, not the link's


def test_scan_shows_dotfiles_when_allowed(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    names = {e.name for e in listing.scan(os.fsencode(root), False, _follow_inside(root))}
    assert {b".env", b".git"} <= names
