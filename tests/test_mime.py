from __future__ import annotations

import pytest

from expserver import mime


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("index.html", "text/html"),
        ("a/b/page.htm", "text/html"),
        ("notes.txt", "text/plain"),
        ("site.css", "text/css"),
        ("app.js", "text/javascript"),
        ("mod.mjs", "text/javascript"),
        ("data.json", "application/json"),
        ("photo.jpg", "image/jpeg"),
        ("photo.jpeg", "image/jpeg"),
        ("logo.png", "image/png"),
        ("anim.gif", "image/gif"),
        ("icon.svg", "image/svg+xml"),
        ("favicon.ico", "image/x-icon"),
        ("pic.webp", "image/webp"),
        ("pic.avif", "image/avif"),
        ("doc.pdf", "application/pdf"),
        ("feed.xml", "text/xml"),
        ("mod.wasm", "application/wasm"),
        ("clip.mp4", "video/mp4"),
        ("clip.webm", "video/webm"),
        ("song.mp3", "audio/mpeg"),
        ("song.ogg", "audio/ogg"),
        ("font.woff", "font/woff"),
        ("font.woff2", "font/woff2"),
        ("font.ttf", "font/ttf"),
        ("archive.zip", "application/zip"),
        ("archive.tar.gz", "application/gzip"),
        ("archive.tar", "application/x-tar"),
        ("table.csv", "text/csv"),
        ("README.md", "text/markdown"),
    ],
)
def test_known_extensions(path: str, expected: str) -> None:
    assert mime.guess(path) == expected


@pytest.mark.parametrize("path", ["INDEX.HTML", "Photo.JpG", "x.Css"])
def test_extension_is_case_insensitive(path: str) -> None:
    assert mime.guess(path) == mime.guess(path.lower())
    assert mime.guess(path) != mime.DEFAULT


@pytest.mark.parametrize(
    "path",
    [
        "Makefile",
        "file.unknownext",
        "a.d/README",  # the dot is in a directory name, not the file's
        "trailing.",
        "",
        "x.\u212a",  # Kelvin sign: str.lower() would fold it to "k"
    ],
)
def test_unknown_is_octet_stream(path: str) -> None:
    assert mime.guess(path) == "application/octet-stream"


def test_no_charset_in_any_type() -> None:
    assert all(";" not in t for t in mime.TYPES.values())


@pytest.mark.parametrize(
    "ctype",
    [
        "text/html",
        "text/plain",
        "text/css",
        "text/xml",
        "application/json",
        "application/javascript",
        "image/svg+xml",
        "application/xml",
        "application/wasm",
        "application/ld+json",
        "application/vnd.custom+xml",
    ],
)
def test_compressible(ctype: str) -> None:
    assert mime.is_compressible(ctype)


@pytest.mark.parametrize(
    "ctype",
    [
        "image/png",
        "image/jpeg",
        "font/woff2",
        "application/zip",
        "application/gzip",
        "video/mp4",
        "application/octet-stream",
        "application/pdf",
    ],
)
def test_not_compressible(ctype: str) -> None:
    assert not mime.is_compressible(ctype)
