"""Checks of string values that the generic String spec cannot express (paths, host names,
addresses, URLs); each takes (text, JSON path, context) and returns the value to keep."""

from __future__ import annotations

import ipaddress
import os
import re

from ..acl import parse_network
from .specs import ConfigError, String, StringCheck, _Context, _show

# Bytes that would end up raw in a status line or header (Server, Location): CR/LF would let a
# config inject headers, and a space or control byte would break the URL for clients.
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


def req_path(text: str, path: str, ctx: _Context) -> str:
    if not text.startswith("/"):
        raise ConfigError(path, f'must start with "/", got {_show(text)}')
    if _UNSAFE.search(text) or "?" in text or "#" in text:
        reason = f'must not contain spaces, control characters, "?" or "#", got {_show(text)}'
        raise ConfigError(path, reason)
    # Requests have "//" collapsed and are matched on "/" boundaries, so "/api/" and "/api//"
    # mean "/api"; normalising here keeps route matching a plain prefix comparison.
    return re.sub("/{2,}", "/", text).rstrip("/") or "/"


def dir_path(text: str, path: str, ctx: _Context) -> str:
    if not text or "\x00" in text:
        raise ConfigError(path, f"must be a directory path, got {_show(text)}")
    # Resolved once here, so the server never depends on its working directory.
    return os.path.abspath(os.path.join(ctx.base_dir, text))


def file_name(text: str, path: str, ctx: _Context) -> str:
    if not text or "/" in text or "\x00" in text or text in (".", ".."):
        raise ConfigError(path, f'must be a file name (no "/", not "." or ".."), got {_show(text)}')
    return text


def hostname(text: str, path: str, ctx: _Context) -> str:
    # ASCII only: Host headers carry IDNs as punycode, and str.lower() on Unicode folds
    # look-alikes (KELVIN SIGN -> "k") that no client would send.
    if not text or not text.isascii() or _UNSAFE.search(text):
        raise ConfigError(path, f"must be an ASCII host name (punycode for IDN), got {_show(text)}")
    name = text.lower()
    _idna(name.removeprefix("*.") if name.startswith("*.") else name, path)
    return name


def _idna(name: str, path: str) -> None:
    """The check serve makes when it encodes the name (labels of 1 to 63 characters)."""
    try:
        name.rstrip(".").encode("idna")
    except UnicodeError:
        reason = f"is not a valid host name (labels of 1 to 63 characters), got {_show(name)}"
        raise ConfigError(path, reason) from None


def listen_host(text: str, path: str, ctx: _Context) -> str:
    """An address to bind: an IP address, or a name the resolver can be asked about."""
    if not text or _UNSAFE.search(text):
        raise ConfigError(path, f"must be an IP address or a host name, got {_show(text)}")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        _idna(text, path)
    return text


def upstream(text: str, path: str, ctx: _Context) -> str:
    try:
        split_upstream(text)
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None
    return text


def check_path(text: str, path: str, ctx: _Context) -> str:
    # Sent raw in a request line: CR/LF would inject fields, a space would split the line.
    if not text.startswith("/") or _UNSAFE.search(text) or "#" in text:
        reason = 'must start with "/" and not contain spaces, control characters or "#", got '
        raise ConfigError(path, reason + _show(text))
    return text


def host_header(text: str, path: str, ctx: _Context) -> str:
    if not text or not all("!" <= c <= "~" for c in text):
        reason = '"client", "upstream" or a Host value (printable ASCII, no spaces)'
        raise ConfigError(path, f"must be {reason}, got {_show(text)}")
    return text


def network(text: str, path: str, ctx: _Context) -> str:
    try:
        parse_network(text)
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None
    return text


def header_value(text: str, path: str, ctx: _Context) -> str:
    if not text or not all(" " <= c <= "~" for c in text):
        raise ConfigError(path, f"must be printable ASCII, got {_show(text)}")
    return text


def url(text: str, path: str, ctx: _Context) -> str:
    if not text or _UNSAFE.search(text):
        reason = f"must be a URL without spaces or control characters, got {_show(text)}"
        raise ConfigError(path, reason)
    return text


_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits: int() alone would take "+80", "8_0", " 80"


def split_host_port(text: str) -> tuple[str, int]:
    """Split an upstream ``"host:port"`` (IPv6 as ``"[::1]:8080"``). Raises ValueError."""
    bad = ValueError(f"{_show(text)} is not host:port")
    if "://" in text:
        bad = ValueError(f"{_show(text)} is not host:port (write it without the scheme)")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    else:
        host, sep, port = text.rpartition(":")
        if not _HOST_NAME.fullmatch(host):  # also refuses an unbracketed IPv6 address
            raise bad
    if not sep or not _PORT.fullmatch(port):
        raise bad
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{_show(text)}: port must be between 1 and 65535")
    return host, int(port)


def split_upstream(text: str) -> tuple[bool, str, int]:
    """(TLS?, host, port) of an upstream: ``"host:port"``, or ``"http://host[:port]"`` or
    ``"https://host[:port]"`` (the port defaulting to 80 or 443). Raises ValueError."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return (False, *split_host_port(text))
    if scheme not in ("http", "https") or not rest or "/" in rest:
        raise ValueError(f'{_show(text)} is not host:port, "http://host[:port]" or '
                         '"https://host[:port]"')
    tls = scheme == "https"
    has_port = rest.rpartition("]")[2].rfind(":") >= 0 if rest.startswith("[") else ":" in rest
    if not has_port:
        rest += ":443" if tls else ":80"
    return (tls, *split_host_port(rest))


def file_path(text: str, path: str, ctx: _Context) -> str:
    """A file that must exist, resolved against the config's directory like dir_path."""
    if not text or "\x00" in text:
        raise ConfigError(path, f"must be a file path, got {_show(text)}")
    full = os.path.abspath(os.path.join(ctx.base_dir, text))
    if not os.path.isfile(full):
        raise ConfigError(path, f"file {_show(full)} does not exist")
    return full


def log_path(text: str, path: str, ctx: _Context) -> str:
    """"stdout", "stderr", or a file (created if need be) in a directory that exists."""
    if text in ("stdout", "stderr"):
        return text
    if not text or "\x00" in text:
        raise ConfigError(path, f'must be "stdout", "stderr" or a file path, got {_show(text)}')
    full = os.path.abspath(os.path.join(ctx.base_dir, text))
    if not os.path.isdir(os.path.dirname(full)):
        raise ConfigError(path, f"directory {_show(os.path.dirname(full))} does not exist")
    if os.path.isdir(full):
        raise ConfigError(path, f"{_show(full)} is a directory")
    return full


def log_format(text: str, path: str, ctx: _Context) -> str:
    if text in ("combined", "json"):
        return text
    from .._access import compile_template
    try:
        compile_template(text)
    except ValueError as e:
        raise ConfigError(path, f'must be "combined", "json" or a template of $variables: '
                                f"{e}") from None
    return text


def plain_path(text: str, path: str, ctx: _Context) -> str:
    """A file path resolved against the config's directory (it need not exist yet)."""
    if not text or "\x00" in text:
        raise ConfigError(path, f"must be a file path, got {_show(text)}")
    return os.path.abspath(os.path.join(ctx.base_dir, text))


_RATE = re.compile(r"([0-9]{1,9})r/([sm])")


def rate(text: str, path: str, ctx: _Context) -> str:
    m = _RATE.fullmatch(text)
    if not m or int(m.group(1)) == 0:
        raise ConfigError(path, f'must be requests per second or minute ("10r/s", "600r/m"), '
                                f"got {_show(text)}")
    return text


def rate_milli(text: str) -> int:
    """"10r/s" -> 10000: thousandths of a request per second, as nginx counts."""
    m = _RATE.fullmatch(text)
    assert m is not None
    n = int(m.group(1)) * 1000
    return n if m.group(2) == "s" else max(1, n // 60)


def limit_key(text: str, path: str, ctx: _Context) -> str:
    if text == "client_ip":
        return text
    if text.startswith("header:") and _TOKEN.fullmatch(text[7:]):
        return text
    raise ConfigError(path, f'must be "client_ip" or "header:NAME", got {_show(text)}')


def origin(text: str, path: str, ctx: _Context) -> str:
    if text == "*" or re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", text):
        return text.lower()
    raise ConfigError(path, f'must be "*" or an origin such as "https://app.example.test" '
                            f"(scheme, host, optional port; no path), got {_show(text)}")


def env_name(text: str, path: str, ctx: _Context) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise ConfigError(path, f"must be an environment variable name, got {_show(text)}")
    return text


# Schema patterns for what the checks above enforce (ECMA-262 regex, as JSON Schema has).
_REQ_PATH_PATTERN = "^/[^\\x00-\\x20\\x7f?#]*$"
_FILE_NAME_PATTERN = "^(?!\\.\\.?$)[^/\\x00]+$"
UPSTREAM_PATTERN = ("^(https?://(\\[[^\\]]+\\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?"
                    "|(\\[[^\\]]+\\]|[A-Za-z0-9._-]+):[0-9]{1,5})$")
_URL_PATTERN = "^[^\\x00-\\x20\\x7f]+$"
_HOSTNAME_PATTERN = "^[\\x21-\\x7e]+$"
_HEADER_PATTERN = "^[\\x20-\\x7e]+$"
_CHECK_PATH_PATTERN = "^/[^\\x00-\\x20\\x7f#]*$"


def _pattern(check: StringCheck, pattern: str) -> String:
    return String(extra=check, keywords=(("pattern", pattern),))


REQ_PATH = _pattern(req_path, _REQ_PATH_PATTERN)
FILE_NAME = _pattern(file_name, _FILE_NAME_PATTERN)
UPSTREAM_ADDRESS = _pattern(upstream, UPSTREAM_PATTERN)
URL = _pattern(url, _URL_PATTERN)
HOSTNAME = _pattern(hostname, _HOSTNAME_PATTERN)
HOST_VALUE = _pattern(host_header, _HOSTNAME_PATTERN)
HEADER_VALUE = _pattern(header_value, _HEADER_PATTERN)
CHECK_PATH = _pattern(check_path, _CHECK_PATH_PATTERN)
LISTEN_HOST = String(extra=listen_host, keywords=(("minLength", 1),))
DIR_PATH = String(extra=dir_path, keywords=(("minLength", 1),))
NETWORK = String(extra=network)
FILE_PATH = String(extra=file_path, keywords=(("minLength", 1),))
LOG_PATH = String(extra=log_path, keywords=(("minLength", 1),))
LOG_FORMAT = String(extra=log_format, keywords=(("minLength", 1),))
PLAIN_PATH = String(extra=plain_path, keywords=(("minLength", 1),))
NAME = _pattern(header_value, "^[\\x20-\\x7e]+$")
ENV_NAME = _pattern(env_name, "^[A-Za-z_][A-Za-z0-9_]*$")


# --- response fields set by the config -----------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# The connection writes these itself: a rule that set them would break the framing.
FRAMING_FIELDS = frozenset(["content-length", "transfer-encoding", "connection", "keep-alive",
                            "upgrade", "te", "trailer", "proxy-connection"])


def field_name(text: str, path: str, ctx: _Context) -> str:
    if not _TOKEN.fullmatch(text):
        raise ConfigError(path, f"must be a header field name (a token), got {_show(text)}")
    if text.lower() in FRAMING_FIELDS:
        raise ConfigError(path, f"{_show(text)} is set by the connection itself")
    return text


def field_value(text: str, path: str, ctx: _Context) -> str:
    # obs-text and controls are refused: a value must survive every client unchanged
    if not all(c == "\t" or " " <= c <= "~" for c in text) or text != text.strip(" \t"):
        reason = "must be printable ASCII without leading or trailing spaces"
        raise ConfigError(path, f"{reason}, got {_show(text)}")
    return text


_STATUS_KEY = re.compile(r"[45](?:[0-9][0-9]|xx)")


def error_status(text: str, path: str, ctx: _Context) -> str:
    if not _STATUS_KEY.fullmatch(text):
        raise ConfigError(path, f'must be a status from 400 to 599, or "4xx" or "5xx", got '
                                f"{_show(text)}")
    return text


def page_path(text: str, path: str, ctx: _Context) -> str:
    if not text.startswith("/") or _UNSAFE.search(text) or "?" in text or "#" in text \
            or any(seg in (".", "..") for seg in text.split("/")):
        raise ConfigError(path, f'must be a path on this server ("/50x.html"), got {_show(text)}')
    return text


FIELD_NAME = _pattern(field_name, "^[!#$%&'*+\\-.^_`|~0-9A-Za-z]+$")
FIELD_VALUE = _pattern(field_value, "^[\\x20-\\x7e\\t]*$")
ERROR_STATUS = _pattern(error_status, "^[45]([0-9][0-9]|xx)$")
PAGE_PATH = _pattern(page_path, "^/[^\\x00-\\x20\\x7f?#]*$")
CHARSET = _pattern(field_name, "^[!#$%&'*+\\-.^_`|~0-9A-Za-z]+$")
RATE = _pattern(rate, "^[0-9]{1,9}r/[sm]$")
LIMIT_KEY = _pattern(limit_key, "^(client_ip|header:[!#$%&'*+\\-.^_`|~0-9A-Za-z]+)$")
ORIGIN = String(extra=origin)
METHOD = _pattern(field_name, "^[!#$%&'*+\\-.^_`|~0-9A-Za-z]+$")
