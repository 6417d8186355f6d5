"""File extension -> media type, and which media types are worth compressing.

The table is built in on purpose: the stdlib ``mimetypes`` module merges /etc/mime.types and
the Windows registry, so the same file would get a different Content-Type on another machine.
Types follow nginx's ``mime.types`` where nginx has an opinion (``.js`` is
``.xml`` is ``text/xml``), but ``.js`` is ``text/javascript`` as RFC 9239 says, and carry no
charset, like nginx's default; a route's ``charset`` adds one to text types (:func:`with_charset`).
"""

from __future__ import annotations

DEFAULT = "application/octet-stream"

TYPES: dict[str, str] = {
    # text and markup
    "html": "text/html",
    "htm": "text/html",
    "shtml": "text/html",
    "xhtml": "application/xhtml+xml",
    "txt": "text/plain",
    "text": "text/plain",
    "log": "text/plain",
    "css": "text/css",
    "csv": "text/csv",
    "tsv": "text/tab-separated-values",
    "md": "text/markdown",
    "markdown": "text/markdown",
    "xml": "text/xml",
    "xsl": "application/xslt+xml",
    "rss": "application/rss+xml",
    "atom": "application/atom+xml",
    "ics": "text/calendar",
    "vtt": "text/vtt",
    "mml": "text/mathml",
    # scripts and data
    "js": "text/javascript",       # RFC 9239 (nginx still says application/javascript)
    "mjs": "text/javascript",
    "map": "application/json",
    "json": "application/json",
    "jsonld": "application/ld+json",
    "webmanifest": "application/manifest+json",
    "wasm": "application/wasm",
    "yaml": "application/yaml",
    "yml": "application/yaml",
    "toml": "application/toml",
    # images
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "svg": "image/svg+xml",
    "ico": "image/x-icon",
    "webp": "image/webp",
    "avif": "image/avif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "jxl": "image/jxl",
    # audio and video
    "mp4": "video/mp4",
    "m4v": "video/mp4",
    "webm": "video/webm",
    "ogv": "video/ogg",
    "mov": "video/quicktime",
    "mkv": "video/x-matroska",
    "avi": "video/x-msvideo",
    "mpeg": "video/mpeg",
    "mpg": "video/mpeg",
    "ts": "video/mp2t",
    "m3u8": "application/vnd.apple.mpegurl",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "oga": "audio/ogg",
    "opus": "audio/ogg",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "m4a": "audio/mp4",
    "aac": "audio/aac",
    # fonts
    "woff": "font/woff",
    "woff2": "font/woff2",
    "ttf": "font/ttf",
    "otf": "font/otf",
    "eot": "application/vnd.ms-fontobject",
    # documents and archives
    "pdf": "application/pdf",
    "zip": "application/zip",
    "gz": "application/gzip",
    "tgz": "application/gzip",
    "br": "application/octet-stream",
    "bz2": "application/x-bzip2",
    "xz": "application/x-xz",
    "zst": "application/zstd",
    "7z": "application/x-7z-compressed",
    "tar": "application/x-tar",
    "rar": "application/vnd.rar",
    "jar": "application/java-archive",
    "apk": "application/vnd.android.package-archive",
    "deb": "application/octet-stream",
    "iso": "application/octet-stream",
    "doc": "application/msword",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xls": "application/vnd.ms-excel",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "ppt": "application/vnd.ms-powerpoint",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "odt": "application/vnd.oasis.opendocument.text",
    "epub": "application/epub+zip",
    "rtf": "application/rtf",
}

# Formats that are text underneath (or sparse binaries) and shrink well. Already-compressed
# formats (jpeg, png, woff2, zip, video...) are left alone: compressing them costs CPU for
# nothing. (".svgz" is deliberately absent from TYPES: it is gzip already and must not be
# labelled image/svg+xml and compressed again.)
_COMPRESSIBLE: frozenset[str] = frozenset(
    {
        "application/javascript",
        "application/json",
        "application/xml",
        "application/wasm",
        "application/xhtml+xml",
        "application/rss+xml",
        "application/atom+xml",
        "application/xslt+xml",
        "application/ld+json",
        "application/manifest+json",
        "application/yaml",
        "application/toml",
        "application/vnd.ms-fontobject",
        "application/rtf",
        "image/svg+xml",
        "image/x-icon",
        "image/bmp",
        "font/ttf",
        "font/otf",
    }
)


def guess(path: str) -> str:
    """Media type for ``path`` by its extension (case-insensitive); octet-stream if unknown."""
    # Only the last segment counts: "/a.d/README" has no extension.
    dot = path.rfind(".")
    if dot < 0 or path.find("/", dot) >= 0:
        return DEFAULT
    ext = path[dot + 1 :]
    # ASCII only: str.lower() folds e.g. the Kelvin sign into "k".
    if not ext.isascii():
        return DEFAULT
    return TYPES.get(ext.lower(), DEFAULT)


def takes_charset(mime: str) -> bool:
    """Types whose bytes are text in some charset (nginx's charset_types, and JSON)."""
    return mime.startswith("text/") or mime in _TEXTUAL or mime.endswith(("+json", "+xml"))


_TEXTUAL = frozenset(["application/javascript", "application/json", "application/xml",
                      "application/xhtml+xml", "application/rss+xml", "application/atom+xml"])


def with_charset(mime: str, charset: str | None) -> str:
    return f"{mime}; charset={charset}" if charset and takes_charset(mime) else mime


def is_compressible(mime: str) -> bool:
    """True for media types that gzip/brotli shrink meaningfully."""
    if mime.startswith("text/"):
        return True
    return mime in _COMPRESSIBLE or mime.endswith(("+json", "+xml"))
