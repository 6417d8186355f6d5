"""Directory listings (autoindex): read a directory, render eXpServer's HTML table page.

File names are bytes end to end: a name that is not valid UTF-8 is shown with U+FFFD but
linked by its exact bytes, percent-encoded, so every listed entry is reachable by its link.
Links are absolute paths (``url_path`` + encoded name, ``/`` appended for directories).

What is listed is decided by :func:`scan`: dotfiles when the route hides them, names holding a
backslash (the file server refuses ``\\`` in paths, so a link would only 404), and symlinks
the caller's ``follow`` rejects (e.g. leading out of the served root) are left out, so the
page never shows metadata of something that cannot be fetched.
"""

from __future__ import annotations

import html
import os
import stat
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple
from urllib.parse import quote


class Entry(NamedTuple):
    name: bytes
    is_dir: bool
    size: int
    mtime: float


def scan(
    dir_path: bytes,
    hide_dotfiles: bool,
    follow: Callable[[bytes], os.stat_result | None],
) -> list[Entry]:
    """Entries of ``dir_path`` worth listing; ``follow`` stats a symlink or rejects it (None)."""
    entries: list[Entry] = []
    with os.scandir(dir_path) as it:
        for e in it:
            name = e.name
            if (hide_dotfiles and name.startswith(b".")) or b"\\" in name:
                continue
            try:
                st = follow(e.path) if e.is_symlink() else e.stat(follow_symlinks=False)
            except OSError:  # vanished while listing, or unreadable
                continue
            if st is None:
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                entries.append(Entry(name, True, 0, st.st_mtime))
            elif stat.S_ISREG(mode):
                entries.append(Entry(name, False, st.st_size, st.st_mtime))
            # Sockets, FIFOs and devices are never served, so never listed.
    return entries


def human_size(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``23 MiB``: one decimal only below 10."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"


_STYLE = """\
:root{color-scheme:light dark}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:1.5rem}
h1{font-size:1.3rem;font-weight:600;margin:0 0 1rem;word-break:break-all}
table{border-collapse:collapse;width:100%;max-width:60rem}
th,td{padding:.35rem .75rem;text-align:left}
th{border-bottom:2px solid #8884;font-weight:600}
tbody tr:nth-child(even){background:#8881}
tbody tr:hover{background:#8882}
td:first-child{word-break:break-all}
.s{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.m{white-space:nowrap;font-variant-numeric:tabular-nums}
a{color:#0969da;text-decoration:none}a:hover{text-decoration:underline}
@media (prefers-color-scheme:dark){a{color:#58a6ff}}
@media (max-width:36rem){body{padding:.75rem}.m{display:none}}
footer{margin-top:1rem;font-size:.8rem;opacity:.6}"""


def _sort_key(e: Entry) -> tuple[bool, str, bytes]:
    return (not e.is_dir, e.name.decode("utf-8", "replace").casefold(), e.name)


def render(url_path: bytes, entries: Iterable[Entry], parent: bool) -> bytes:
    """The listing page for directory ``url_path`` (decoded bytes ending in ``/``).

    ``parent`` adds the "../" row; the caller leaves it out at the route root, above which
    there is nothing this route serves.
    """
    base = quote(url_path, safe="/")
    title = html.escape(url_path.decode("utf-8", "replace"))
    rows = []
    if parent:
        up = quote(url_path[: url_path.rstrip(b"/").rfind(b"/") + 1], safe="/")
        rows.append(
            f'<tr><td><a href="{up}">../</a></td><td class="s">-</td><td class="m"></td></tr>'
        )
    for e in sorted(entries, key=_sort_key):
        # quote(safe="") leaves only [A-Za-z0-9_.~-], so the href needs no HTML escaping.
        href = base + quote(e.name, safe="")
        label = html.escape(e.name.decode("utf-8", "replace"))
        if e.is_dir:
            href += "/"
            label += "/"
        size = "-" if e.is_dir else human_size(e.size)
        mtime = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime))
        rows.append(
            f'<tr><td><a href="{href}">{label}</a></td>'
            f'<td class="s">{size}</td><td class="m">{mtime}</td></tr>'
        )
    body = "\n".join(rows)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Index of {title}</title>
<style>
{_STYLE}
</style>
</head>
<body>
<h1>Index of {title}</h1>
<table>
<thead><tr><th>Name</th><th class="s">Size</th><th class="m">Modified (UTC)</th></tr></thead>
<tbody>
{body}
</tbody>
</table>
<footer>eXpServer</footer>
</body>
</html>
"""
    return page.encode("utf-8")
